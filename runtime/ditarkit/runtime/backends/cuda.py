"""CUDA through cuda-python, and writing an LM step's new keys/values into a preallocated
cache in place, on any device.

The cache is (L, 1, Hkv, capacity, hd) and a step's output (L, 1, Hkv, steps, hd): the new
slots are L*Hkv rows of steps*hd values that land at `position` in rows of capacity*hd.
That is one 2-D copy, whatever the memory: cudaMemcpy2D on a GPU, memmove on the host.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def load_cudart():
    """cuda-python's runtime module (imported only when a GPU backend is used)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def check(result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


# (dst, dst_pitch, src, src_pitch, width, height), all in bytes
Copy2D = Callable[[int, int, int, int, int, int], None]


def insert_slots(copy2d: Copy2D, cache_ptr: int, new_ptr: int, position: int, steps: int, capacity: int,
                 rows: int, head_dim: int, itemsize: int = 4) -> None:
    width = steps * head_dim * itemsize
    copy2d(cache_ptr + position * head_dim * itemsize, capacity * head_dim * itemsize, new_ptr, width, width, rows)


def host_copy2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
    for row in range(height):
        ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)


def cuda_copy2d(cudart, stream=None) -> Copy2D:
    """cudaMemcpy2D(Async) device to device; `cudart` is cuda-python's runtime module."""
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def copy(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        if stream is None:
            check(cudart.cudaMemcpy2D(dst, dst_pitch, src, src_pitch, width, height, kind))
        else:
            check(cudart.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, kind, stream))

    return copy
