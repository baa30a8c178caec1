"""Networks kept out of the weights: each targeted layer's weight is read through a parametrization
(torch.nn.utils.parametrize) that returns W0 + sum_i m_i * dW_i, with plain LoRA's dW kept as its two
low-rank factors. The stored weights are never written, so there is nothing to restore and switching sets
costs no copy of the originals; every read of a touched weight pays for the sum, once per layer and call.
Parametrizing the weight, rather than hooking the layer's forward, also reaches the code paths that read
`.weight` directly (our 1x1 convs run as linear maps, the phase-split upsampling convs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..kernels import forget_folded_kernels
from .deltas import kind_of, network_scale
from .merge import ActiveLora, NetworkSet, layer_delta, layer_parts


class _AddDeltas(nn.Module):
    """weight -> weight + the set's deltas: low-rank terms (up, down, factor) and full ones."""

    def __init__(self, low_rank: list[tuple[torch.Tensor, torch.Tensor, float]], full: torch.Tensor | None):
        super().__init__()
        self.low_rank = low_rank
        self.full = full

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        total = weight.float() if self.full is None else weight.float() + self.full
        for up, down, factor in self.low_rank:
            total = total + (up @ down).reshape(weight.shape) * factor
        return total.to(weight.dtype)


class UnmergedNetworks(NetworkSet):
    """A LoRA set kept out of the weights: `apply(set)` parametrizes its layers, `[]` removes them."""

    def __init__(self, models: Mapping[str, nn.Module]):
        super().__init__(models)
        self._layers: list[nn.Module] = []

    def restore(self) -> None:
        for layer in self._layers:
            # leave_parametrized=False: the stored weight goes back as it was, untouched
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            # what the layer derived from its weight (the upsampling conv's folded kernels): a parametrized
            # weight is a new tensor at each read, whose address a later set's weight could reuse
            forget_folded_kernels(layer)
        self._layers.clear()
        self._applied = ()

    def _install(self, loras: Sequence[ActiveLora]) -> None:
        self.restore()
        for (component, name), entries in layer_parts(loras, self.models).items():
            layer = self.models[component].get_submodule(name)
            weight = layer.weight.detach()
            merged = weight.float()
            low_rank, full = [], None
            for lora, tensors, multiplier in entries:
                delta = layer_delta(lora, tensors, name, merged)  # also checks the shapes, as merging does
                merged = merged + delta * multiplier
                if kind_of(tensors) == "lora" and "mid" not in tensors and "dora_scale" not in tensors:
                    rank = tensors["down"].shape[0]
                    factor = multiplier * network_scale(tensors, rank)
                    up, down = tensors["up"].float().flatten(1), tensors["down"].float().flatten(1)
                    low_rank.append((up.to(weight.device), down.to(weight.device), factor))
                else:
                    full = delta * multiplier if full is None else full + delta * multiplier
            full = full.to(weight.device) if full is not None else None
            parametrize.register_parametrization(layer, "weight", _AddDeltas(low_rank, full))
            # what the layer derived from its weight (the upsampling conv's folded kernels): a parametrized
            # weight is a new tensor at each read, whose address a later set's weight could reuse
            forget_folded_kernels(layer)
            self._layers.append(layer)
