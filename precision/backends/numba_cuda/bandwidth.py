"""A memory-bandwidth figure for numba-cuda on this GPU (benchmarks/gpu_check.py): an in-place fp32 Adam update.

Not a results kernel: native float32 arithmetic (NVVM may contract it into FMAs, which is fine for a timing), one
thread per element in a grid-stride loop. Per element it reads p, g, m, v and writes p, m, v: 7 x 4 bytes of
traffic. Timed with CUDA events around each launch after a warm-up launch (which compiles it: compile time is
excluded); the figure is the median. The GPU's peak is computed from its attributes: 2 (double data rate) x memory
clock x bus width.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

__all__ = ["adam_fp32_inplace", "peak_bandwidth_gbs", "measure_adam_bandwidth"]

BYTES_PER_ELEMENT = 7 * 4  # read p, g, m, v; write p, m, v (float32)


@cuda.jit
def adam_fp32_inplace(p, g, m, v, lr, b1, b2, omb1, omb2, bc1, bc2, eps):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * (mi / bc1) / (math.sqrt(vi / bc2) + eps)


@cuda.jit
def _fill(x, value):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] = value


def peak_bandwidth_gbs(device=None) -> float | None:
    """2 x memory clock (kHz attribute) x bus width (bits) / 8, in GB/s; None when the attributes are missing."""
    device = device or cuda.get_current_device()
    try:
        clock_khz = int(device.MEMORY_CLOCK_RATE)
        bus_bits = int(device.GLOBAL_MEMORY_BUS_WIDTH)
    except Exception:  # an attribute this driver or numba-cuda does not expose
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def measure_adam_bandwidth(n: int = 10**8, repeats: int = 10) -> dict:
    """Median GB/s of :func:`adam_fp32_inplace` on ``n`` elements, and its fraction of the peak."""
    f32 = np.float32
    arrays = [cuda.device_array(n, dtype=np.float32) for _ in range(4)]
    threads = 256
    blocks = min(-(-n // threads), 65535 * 8)
    for array, value in zip(arrays, (1.0, 0.01, 0.0, 0.0)):
        _fill[blocks, threads](array, f32(value))
    args = (f32(1e-3), f32(0.9), f32(0.999), f32(0.1), f32(0.001), f32(0.1), f32(0.001), f32(1e-8))
    adam_fp32_inplace[blocks, threads](*arrays, *args)  # warm-up: compiles; excluded from the timing
    cuda.synchronize()
    times_ms = []
    for _ in range(repeats):
        start, stop = cuda.event(), cuda.event()
        start.record()
        adam_fp32_inplace[blocks, threads](*arrays, *args)
        stop.record()
        stop.synchronize()
        times_ms.append(cuda.event_elapsed_time(start, stop))
    ms = float(np.median(times_ms))
    gbs = BYTES_PER_ELEMENT * n / (ms / 1e3) / 1e9
    peak = peak_bandwidth_gbs()
    return {"n": n, "median_ms": ms, "gb_per_s": gbs, "peak_gb_per_s": peak,
            "fraction_of_peak": None if not peak else gbs / peak, "repeats": repeats,
            "bytes_per_element": BYTES_PER_ELEMENT}
