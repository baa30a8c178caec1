"""Keep CPU activations' memory in the process instead of handing it back to the kernel after every op.

PyTorch's CPU tensors come from malloc. With glibc's defaults, a block above the mmap threshold (dynamic,
128 KiB at first, 32 MiB at most) gets pages of its own from the kernel and returns them when freed, and
the top of the heap is trimmed back whenever 2x that threshold is free. A U-Net step allocates and frees
the same few hundred activation buffers of 1-80 MB each, and every convolution's weights are copied into
oneDNN's blocked layout on each call (59 MB for a 1280-channel 3x3 conv), so every step faulted in, and
the kernel zeroed, gigabytes of fresh pages. `tune_malloc` serves every block from the heap (mmap off)
and trims only above 1 GiB free, so freed buffers are reused.

Measured on a 2-core CPU, 2 threads, SD1.5 fp32, alternating fresh processes:
- heap reuse below 32 MiB only (the first version of this module): CFG U-Net step at 64x64 latents
  5.33 -> 4.90 s, a whole 512x512 20-step image 114 -> 107 s, peak RSS 5.49 -> 5.59 GB;
- every block from the heap: the image 103-104 -> 97-98 s, the first U-Net step of a fresh process
  6.8-7.4 -> 5.3-5.9 s (a 1280-channel conv at 8x8: 29 -> 16 ms).

The VAE's activations at 512x512 and above are 100-300 MB each. On the heap they leave holes the next
ones do not fit, which cost 0.8 GB of peak RSS; `large_buffers_from_kernel` gives those back to the kernel
(and what the U-Net left free on the heap) while the VAE runs: the image's peak RSS is 5.4 GB, against 5.6
GB with the first version and 5.5 GB with glibc's defaults. Freed weights stay on the heap as well, until
`release_free_heap`.

This is a process-wide setting, made once, on Linux with glibc only; `SD_MALLOC_TUNING=0` leaves malloc
alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt() parameter numbers
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for it on 64-bit systems (for large_buffers_from_kernel)
TRIM_THRESHOLD = 2**30
GLIBC_MMAP_MAX = 65536  # glibc's default: at most this many blocks mapped at once

_tuned: bool | None = None
_libc: Any = None
_lock = threading.Lock()
_kernel_depth = 0


def tune_malloc() -> bool:
    """Apply the settings above (first call only); True when they are in effect."""
    global _tuned, _libc
    if _tuned is None:
        _tuned = False
        if os.environ.get("SD_MALLOC_TUNING", "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c"))
                _tuned = all(
                    libc.mallopt(param, value)
                    for param, value in (
                        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                        (M_MMAP_MAX, 0),
                    )
                )
                _libc = libc if _tuned else None
            except (OSError, AttributeError):
                pass
    return _tuned


def release_free_heap() -> None:
    """Give the heap's free pages back to the kernel, e.g. after dropping a model's weights (which, with
    mmap off, live on the heap). Does nothing where `tune_malloc` is not in effect."""
    if _tuned:
        _libc.malloc_trim(0)


@contextlib.contextmanager
def large_buffers_from_kernel() -> Iterator[None]:
    """Within: free heap pages go back to the kernel on entry, and blocks above 32 MiB are mapped and
    unmapped one by one again (glibc's way). For the VAE, whose few huge buffers would fragment the heap.
    Does nothing where `tune_malloc` is not in effect."""
    global _kernel_depth
    if not _tuned:
        yield
        return
    with _lock:
        _kernel_depth += 1
        if _kernel_depth == 1:
            release_free_heap()
            _libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        with _lock:
            _kernel_depth -= 1
            if _kernel_depth == 0:
                _libc.mallopt(M_MMAP_MAX, 0)
