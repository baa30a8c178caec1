"""Networks merged into the models' weights, as A1111 applies LoRA: W = W0 + sum_i m_i * dW_i.

The first time a weight is touched a copy of it is kept (on the CPU); every later set is computed from that
copy, and a layer no set touches any more gets its copy written back, so removing every network restores
the original weights bit for bit. Applying the set that is already merged does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints import file_sha256
from .deltas import delta_weight, dora
from .lora import LoraFile


@dataclass(frozen=True)
class ActiveLora:
    """One file of a set, with its strengths and the name it was asked for by (a tag's, or the stem)."""

    name: str
    file: LoraFile
    te: float = 1.0
    unet: float = 1.0

    def multiplier(self, component: str) -> float:
        return self.te if component == "clip" else self.unet


def lora_tag(lora: ActiveLora) -> str:
    """The A1111 prompt tag that applies `lora` as it is: <lora:name:w>, or <lora:name:te:unet>."""
    strengths = f"{lora.te:g}" if lora.te == lora.unet else f"{lora.te:g}:{lora.unet:g}"
    return f"<lora:{lora.name}:{strengths}>"


LayerParts = dict[tuple[str, str], list[tuple[ActiveLora, Mapping[str, torch.Tensor], float]]]


def layer_parts(loras: Sequence[ActiveLora], models: Mapping[str, nn.Module]) -> LayerParts:
    """(component, layer) -> the set's (file, tensors, multiplier) for it, in file order. Strength 0
    leaves a layer exactly as it is, and components not in `models` are left alone."""
    parts: LayerParts = {}
    for lora in loras:
        for m in lora.file.modules:
            multiplier = lora.multiplier(m.component)
            if multiplier and m.component in models:
                parts.setdefault((m.component, m.module), []).append((lora, m.tensors, multiplier))
    return parts


def layer_delta(lora: ActiveLora, tensors: Mapping[str, torch.Tensor], layer: str, weight: torch.Tensor):
    """dW (fp32) of one file's layer at multiplier 1, over `weight` (W0 plus the earlier files' deltas,
    which DoRA's rescaling depends on); ValueError naming the file for tensors that do not fit."""
    try:
        delta = delta_weight(tensors, weight.shape)
    except ValueError as error:
        raise ValueError(f"{lora.file.path}: layer {layer}: {error} (a LoRA for another model?)") from None
    if "dora_scale" in tensors:  # A1111: DoRA's rescaling first, then the multiplier
        delta = dora(delta, weight, tensors["dora_scale"])
    return delta


class NetworkSet:
    """A LoRA set applied to `models`: `apply(set)` (the same set again does nothing), `restore()`."""

    def __init__(self, models: Mapping[str, nn.Module]):
        self.models = models
        self._applied: tuple = ()

    def apply(self, loras: Sequence[ActiveLora]) -> None:
        """Apply the set's deltas (files in order); [] gives the original model back. On an error (a file
        that does not fit the model) the original model is restored and it is raised."""
        key = tuple((a.file.stamp, a.te, a.unet) for a in loras)
        if key == self._applied:
            return
        try:
            self._install(loras)
        except BaseException:
            self.restore()
            raise
        self._applied = key

    def restore(self) -> None:
        raise NotImplementedError

    def _install(self, loras: Sequence[ActiveLora]) -> None:
        raise NotImplementedError


class WeightMerger(NetworkSet):
    """Merges LoRA sets into `models` ({"clip": ..., "diffusion": ...}, or one of them) in place."""

    def __init__(self, models: Mapping[str, nn.Module]):
        super().__init__(models)
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # (component, module) -> W0 copy

    @property
    def touched(self) -> int:
        """How many weights currently differ from (or were written over) their originals."""
        return len(self._originals)

    def _weight(self, component: str, module: str) -> torch.Tensor:
        try:
            weight = self.models[component].get_submodule(module).weight
        except (AttributeError, KeyError):
            raise ValueError(f"the {component} model has no layer {module} to merge a LoRA into (LoRA needs "
                             "the torch backend's modules)") from None  # fmt: skip
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"the {component} layer {module} has no weight tensor to merge a LoRA into")
        return weight

    def restore(self) -> None:
        """Write every kept original back (bit-exact) and forget them."""
        with torch.no_grad():
            for (component, module), original in self._originals.items():
                self._weight(component, module).copy_(original)
        self._originals.clear()
        self._applied = ()

    def _install(self, loras: Sequence[ActiveLora]) -> None:
        """Make the weights W0 + the set's deltas, writing back the originals of layers it leaves."""
        targets = layer_parts(loras, self.models)
        with torch.no_grad():
            for target in [t for t in self._originals if t not in targets]:
                self._weight(*target).copy_(self._originals.pop(target))
            for target, parts in targets.items():
                weight = self._weight(*target)
                original = self._originals.get(target)
                if original is None:
                    original = self._originals[target] = weight.detach().to("cpu", copy=True)
                merged = original.to(torch.float32)
                for lora, tensors, multiplier in parts:
                    merged = merged + layer_delta(lora, tensors, target[1], merged) * multiplier
                weight.copy_(merged.to(weight.dtype))


def _touches(file: LoraFile, component: str) -> bool:
    return any(m.component == component for m in file.modules)


class RebindingMerger(NetworkSet):
    """A LoRA set for models that run converted weights (the OpenVINO backend): handed to each component's
    `rebind(weights_id, prepare)`, which merges it into freshly read torch weights and converts them once,
    cached under an id made of the files' hashes and strengths."""

    def __init__(self, models: Mapping[str, nn.Module]):
        super().__init__(models)
        self._rebound: dict[str, tuple] = {}  # component -> the id its module now runs

    def restore(self) -> None:
        self._install([])
        self._applied = ()

    def _install(self, loras: Sequence[ActiveLora]) -> None:
        # Only a new set gets here (NetworkSet.apply skips the one in place), so files are hashed per set,
        # not per image.
        for component in ("clip", "diffusion"):
            used = [a for a in loras if a.multiplier(component) and _touches(a.file, component)]
            key = tuple((file_sha256(a.file.path), a.multiplier(component)) for a in used)
            if key == self._rebound.get(component, ()):
                continue
            module = self.models[component]
            if key:

                def prepare(m: nn.Module, c: str = component, chosen: list = used) -> None:
                    WeightMerger({c: m}).apply(chosen)

                module.rebind(f"lora {key}", prepare)
            else:
                module.rebind(None, None)
            self._rebound[component] = key
