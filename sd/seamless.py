"""A1111's "Tiling": every convolution of the U-Net and the VAE pads circularly instead of with zeros, so
the image wraps around at its edges and tiles without seams (v1.10.1's sd_hijack.apply_circular, for the
whole run: init-image encode, sampling, decode).

Only convolutions with padding change anything (a 1x1 convolution reads no neighbours), so those alone are
switched. The VAE encoder's stride-2 convolutions pad by hand with zeros on the right and bottom (as in
the original code), and stay so, in A1111 too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def circular_padding(models: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Within the block, the padded convolutions of `models` pad circularly (nothing changes if not
    `enabled`); their padding mode is restored on the way out."""
    layers = [
        layer
        for model in (models if enabled else ())
        for layer in model.modules()
        if isinstance(layer, nn.Conv2d) and any(layer.padding)
    ]
    saved = [layer.padding_mode for layer in layers]
    for layer in layers:
        layer.padding_mode = "circular"
    try:
        yield
    finally:
        for layer, mode in zip(layers, saved, strict=True):
            layer.padding_mode = mode


__all__ = ["circular_padding"]
