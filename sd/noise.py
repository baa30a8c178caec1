"""A1111's noise: its three random sources, one stream per image, variation seeds, seed resize and ENSD.

A1111 v1.10.1 (modules/rng.py, rng_philox.py) draws each image's noise from its own generator seeded with
`seed + i`, and the samplers' later draws continue those streams. The source is the infotext's `RNG`:

    GPU (the default; a PNG without an RNG key)   torch.randn on CUDA
    NV                                             the same numbers, computed here (`philox_randn`)
    CPU                                            torch.randn with a CPU generator

CUDA's torch.randn is Philox4x32-10 plus a Box-Muller transform, and for A1111's per-image tensors each
element j is the first output of Philox subsequence j at offset "call number". That is computed here on any
CPU, so "GPU" and "NV" are the same source here, as on NVIDIA hardware (A1111's emulator agrees with CUDA to
about 2e-7; so does this, being the same arithmetic).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

RNG_SOURCES = ("GPU", "CPU", "NV")

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox multipliers
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)  # key bumps (Weyl sequence)
_LOW = np.uint64(0xFFFFFFFF)
_TWO_POW_32_INV = np.float32(2.3283064e-10)
_TWO_PI_TWO_POW_32_INV = np.float32(2.3283064e-10 * 6.2831855)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 of (4, n) uint32 counters under a (2,) uint32 key -> (4, n) uint32."""
    c = [word.astype(np.uint64) for word in counter]
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    with np.errstate(over="ignore"):  # uint32 key bumps wrap around, as they should
        for round_ in range(rounds):
            p0, p2 = c[0] * _M0, c[2] * _M1
            c = [
                (p2 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0),
                p2 & _LOW,
                (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
                p0 & _LOW,
            ]
            if round_ < rounds - 1:
                k0, k1 = k0 + _W0, k1 + _W1
    return np.stack(c).astype(np.uint32)


def philox_randn(seed: int, shape: Sequence[int], offset: int = 0) -> np.ndarray:
    """float32 normal noise of CUDA's torch.randn from a generator seeded with `seed`, at call `offset`."""
    n = int(np.prod(shape))
    counter = np.zeros((4, n), dtype=np.uint32)
    counter[0] = offset
    counter[2] = np.arange(n, dtype=np.uint32)
    key = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=np.uint32)
    g = philox4x32(counter, key)
    # Box-Muller on the first two words (the other pair is discarded). The uint32 x float32 products are
    # float64, as in A1111's emulator; A/2 and B/2 stay float32.
    u = g[0] * _TWO_POW_32_INV + _TWO_POW_32_INV / np.float32(2)
    v = g[1] * _TWO_PI_TWO_POW_32_INV + _TWO_PI_TWO_POW_32_INV / np.float32(2)
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


class PhiloxGenerator:
    """A seeded stream: each `randn` call is the next call of CUDA's generator (offset + 1)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        noise = philox_randn(self.seed, shape, self.offset)
        self.offset += 1
        return torch.from_numpy(noise)


def check_source(source: str) -> str:
    """The canonical name of an RNG source ("gpu" -> "GPU"); ValueError for others."""
    upper = source.upper()
    if upper not in RNG_SOURCES:
        raise ValueError(f"RNG source must be one of {', '.join(RNG_SOURCES)}; got {source!r}")
    return upper


def generator(source: str, seed: int) -> PhiloxGenerator | torch.Generator:
    """A fresh stream for `seed` from `source` (A1111's create_generator)."""
    if check_source(source) == "CPU":
        return torch.Generator("cpu").manual_seed(int(seed))
    return PhiloxGenerator(seed)


def randn(stream: PhiloxGenerator | torch.Generator, shape: Sequence[int]) -> torch.Tensor:
    """The next float32 draw of `shape` from a stream, on the CPU."""
    if isinstance(stream, PhiloxGenerator):
        return stream.randn(shape)
    return torch.randn(tuple(shape), generator=stream, dtype=torch.float32)


def randn_seeded(source: str, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The first draw of a fresh stream (A1111's randn(seed, shape) and randn_local)."""
    return randn(generator(source, seed), shape)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of one image's (C, H, W) noises, quirks kept: the vectors it normalises
    run along H (dim 1), and where they are nearly parallel it falls back to `low * v + high * (1 - v)`,
    the reverse of a linear blend."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1) * low + (
        torch.sin(strength * omega) / sin_omega
    ).unsqueeze(1) * high


def _paste_centred(into: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Seed resize: `noise` (C, h, w) centred in `into` (C, H, W), cropped where it is larger."""
    dx, dy = (into.shape[2] - noise.shape[2]) // 2, (into.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    into[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return into


class ImageNoise:
    """A1111's ImageRNG: one stream per image of a batch. `next()` gives the initial noise first (with
    variation seed and seed resize applied), then each later draw of every image's stream.

    `shape` is one image's latent shape (C, H/8, W/8); `seeds` one seed per image; ENSD (eta noise seed
    delta) replaces the streams by `seed + ensd` ones after the first draw.
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        source: str = "GPU",
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,  # (width, height) in pixels
        ensd: int = 0,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.source = check_source(source)
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength = subseed_strength
        self.seed_resize_from = seed_resize_from
        self.ensd = ensd
        self.streams = [generator(self.source, seed) for seed in self.seeds]
        self.drawn = False

    def _first(self) -> torch.Tensor:
        shape = self.shape
        if self.seed_resize_from and all(v > 0 for v in self.seed_resize_from):
            width, height = self.seed_resize_from
            noise_shape = (shape[0], int(height) // 8, int(width) // 8)
        else:
            noise_shape = shape
        images = []
        for i, (seed, stream) in enumerate(zip(self.seeds, self.streams, strict=True)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = randn_seeded(self.source, subseed, noise_shape)
            resized = noise_shape != shape
            noise = randn_seeded(self.source, seed, noise_shape) if resized else randn(stream, shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if resized:
                noise = _paste_centred(randn(stream, shape), noise)
            images.append(noise)
        if self.ensd:
            self.streams = [generator(self.source, seed + self.ensd) for seed in self.seeds]
        return torch.stack(images)

    def next(self) -> torch.Tensor:
        """(B, C, H, W) float32 on the CPU: the initial noise, then each image's next draw."""
        if not self.drawn:
            self.drawn = True
            return self._first()
        return torch.stack([randn(stream, self.shape) for stream in self.streams])


@contextlib.contextmanager
def _torchsde_draws_from(source: str) -> Iterator[None]:
    """torchsde's normal draws taken from `source` (A1111 patches torchsde's `_randn` so)."""
    from torchsde._brownian import brownian_interval

    original = brownian_interval._randn

    def draw(size: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
        return randn_seeded(source, int(seed), size).to(device=device, dtype=dtype)

    brownian_interval._randn = draw
    try:
        with warnings.catch_warnings():
            # torchsde warns when a query point is outside its interval by float rounding (ta=0.02916753
            # against t0=0.029168): harmless, and A1111's own runs hit it at every first and last step.
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            yield
    finally:
        brownian_interval._randn = original


class BrownianNoise:
    """The SDE samplers' noise as A1111 gives it: one torchsde Brownian tree per image over [sigma_min,
    sigma_max], seeded with the image's seed, its normals from the RNG source. `noise(sigma, sigma_next)` is
    the increment between the two levels over the square root of their distance (k-diffusion's
    BrownianTreeNoiseSampler)."""

    def __init__(
        self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seeds: Sequence[int],
        source: str = "GPU",
    ):  # fmt: skip
        import torchsde

        self.source = check_source(source)
        self.sign = 1 if sigma_min < sigma_max else -1
        t0, t1 = (sigma_min, sigma_max) if self.sign == 1 else (sigma_max, sigma_min)
        with _torchsde_draws_from(self.source):
            self.trees = [torchsde.BrownianTree(t0, torch.zeros_like(x[0]), t1, entropy=s) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with _torchsde_draws_from(self.source):
            w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


__all__ = [
    "RNG_SOURCES",
    "BrownianNoise",
    "ImageNoise",
    "PhiloxGenerator",
    "check_source",
    "generator",
    "philox4x32",
    "philox_randn",
    "randn",
    "randn_seeded",
    "slerp",
]
