"""Weight deltas of one network module: LoRA / LoCon, LyCORIS LoHa and LoKr, and DoRA's rescaling.

Each formula turns the tensors a file stores for one layer into dW, shaped like the layer's weight, for a
multiplier of 1 (A1111's network_lora.py / network_hada.py / network_lokr.py, LyCORIS' modules):

    LoRA   dW = (alpha / r) * up.flatten(1) @ down.flatten(1)           r = down.shape[0]
    LoCon  the same; conv "down" is (r, in, kh, kw), "up" (out, r, 1, 1); a "mid" (r, r, kh, kw) is CP
    LoHa   dW = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)             r = hada_w1_b.shape[0]
    LoKr   dW = (alpha / r) * kron(w1, w2), each factor full or a product   scale 1 when both are full

A missing alpha (or 0) means alpha = r (scale 1), as kohya and A1111 read old files; an explicit
"scale" tensor wins over alpha. Everything is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# The tensor roles each kind needs (one alternative set must be complete).
LORA_ROLES = ("up", "down")
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def kind_of(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The kind ("lora", "loha" or "lokr") of a complete set of one module's tensors; None when incomplete."""
    if all(r in tensors for r in LORA_ROLES):
        return "lora"
    if all(r in tensors for r in LOHA_ROLES):
        return "loha"
    w1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
    w2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
    return "lokr" if w1 and w2 else None


def network_scale(tensors: Mapping[str, torch.Tensor], rank: int | None) -> float:
    """A module's factor: its "scale" tensor, else alpha / rank, else 1."""
    if "scale" in tensors:
        return float(tensors["scale"])
    alpha = float(tensors["alpha"]) if "alpha" in tensors else 0.0
    return alpha / rank if rank and alpha else 1.0


def _tucker(core: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A Tucker-decomposed conv factor: core (r, r, kh, kw), b (r, in), a (r, out) -> (out, in, kh, kw)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", _f32(core), _f32(b), _f32(a))


def _lora(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    up, down = _f32(t["up"]).flatten(1), _f32(t["down"]).flatten(1)
    if "mid" in t:  # CP decomposition of a conv kernel (LyCORIS LoCon "lora_mid")
        return torch.einsum("n m k l, i n, m j -> i j k l", _f32(t["mid"]), up, down), t["down"].shape[0]
    return up @ down, t["down"].shape[0]


def _hada_factor(t: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" in t:
        return _tucker(t[f"hada_t{i}"], b, a)
    return _f32(a) @ _f32(b).flatten(1)


def _loha(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return _hada_factor(t, 1) * _hada_factor(t, 2), t["hada_w1_b"].shape[0]


def _lokr_factor(t: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    if f"lokr_w{i}" in t:
        return _f32(t[f"lokr_w{i}"])
    a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    if f"lokr_t{i}" in t:
        return _tucker(t[f"lokr_t{i}"], b, a)
    return _f32(a) @ _f32(b).flatten(1)


def _lokr(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    w1, w2 = _lokr_factor(t, 1), _lokr_factor(t, 2)
    # kron of the flattened factors, then reshaped, equals the conv kron of w1[:, :, None, None] and w2.
    rank = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)
    return torch.kron(w1.flatten(1), w2.flatten(1)), rank


_FORMULAS = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def delta_weight(tensors: Mapping[str, torch.Tensor], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """dW (fp32, `shape`) of one module at multiplier 1, before any DoRA rescaling.

    ValueError when the tensors do not make a weight of that shape.
    """
    kind = kind_of(tensors)
    if kind is None:
        raise ValueError(f"incomplete network module (tensors {sorted(tensors)})")
    delta, rank = _FORMULAS[kind](tensors)
    if delta.numel() != torch.Size(shape).numel():
        raise ValueError(
            f"its {kind} weights make {tuple(delta.shape)}, the layer's weight is {tuple(shape)}"
        )
    return delta.reshape(shape) * network_scale(tensors, rank)


def dora(delta: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: the delta that rescales W + dW to `magnitude` (the file's "dora_scale") over the norm axis.

    LyCORIS / A1111 store the magnitude per input channel, (1, in, 1...), and take the norm over all other
    axes; a (out, 1, 1...) magnitude means the norm per output channel (peft's layout).
    """
    merged = _f32(weight) + delta
    magnitude = _f32(magnitude)
    if magnitude.dim() == 1:  # peft stores the per-output magnitude as a vector
        magnitude = magnitude.reshape(-1, *[1] * (merged.dim() - 1))
    per_output = magnitude.shape[0] == merged.shape[0] and magnitude[0].numel() == 1 and merged.shape[0] != 1
    if per_output:
        norm = merged.flatten(1).norm(dim=1).reshape(magnitude.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(magnitude.shape)
    return merged * (magnitude / norm) - _f32(weight)
