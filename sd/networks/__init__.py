"""Extra networks (LoRA, LoCon, LoHa, LoKr, DoRA) applied to our models as A1111 applies them.

Modules:
    lora.py     files -> our module names and the tensors of each layer (kohya, peft, LyCORIS layouts)
    deltas.py   the tensors of one layer -> its weight delta
    merge.py    deltas merged into the weights, the originals kept and restored bit for bit
    unmerged.py deltas added to the weights as they are read (parametrized), the stored weights untouched
    library.py  files found by name in a folder, read once, hashed for the PNG (`Lora hashes`)
"""

from __future__ import annotations

from .deltas import delta_weight, dora
from .library import LoraCache, addnet_hash, find_lora, lora_files, lora_hashes, lora_shorthash
from .lora import LORA_SUFFIXES, LoraFile, ModuleNetwork, load_lora, map_tensors, read_tensors
from .merge import ActiveLora, RebindingMerger, WeightMerger, lora_tag
from .unmerged import UnmergedNetworks

__all__ = [
    "LORA_SUFFIXES",
    "ActiveLora",
    "LoraCache",
    "LoraFile",
    "ModuleNetwork",
    "RebindingMerger",
    "UnmergedNetworks",
    "WeightMerger",
    "addnet_hash",
    "delta_weight",
    "dora",
    "find_lora",
    "load_lora",
    "lora_files",
    "lora_hashes",
    "lora_shorthash",
    "lora_tag",
    "map_tensors",
    "read_tensors",
]
