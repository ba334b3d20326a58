"""What NVVM made of the step kernels: their PTX, audited for FMA and flush-to-zero instructions.

The simulator cannot see code generation, so benchmarks/gpu_check.py compiles every kernel of :mod:`.kernels` to
PTX for the GPU's compute capability and counts ``fma.rn`` and ``.ftz`` instructions. Expected: none in any kernel
(exp and tanh are the CPU backend's own recipes, written with never-contracted operations, not libdevice's, whose
tanh uses FMAs and ``ex2.approx.ftz``). A nonzero count means a product and a sum that feed a result were
contracted.
"""

from __future__ import annotations

import re

from numba import cuda
from numba import types as T
from numba.core.typing import typeof

from . import kernels as K
from .device import gpu_format

__all__ = ["kernel_signatures", "audit_ptx", "LIBDEVICE_FMA_KERNELS"]

LIBDEVICE_FMA_KERNELS = ()  # kernels allowed FMAs inside a libdevice function: none since tanh is tanh64


def kernel_signatures() -> dict:
    """Each kernel's argument types as the training loop launches it (one compilation serves every format)."""
    f = typeof.typeof(gpu_format("bf16"))
    a1, i2, t2, i32 = T.float64[::1], T.int64[:, ::1], T.float64[:, ::1], T.int32[::1]
    i, b, x = T.int64, T.boolean, T.float64
    return {
        "round_into": (a1, a1, i, f),
        "gather": (a1, i2, i, i, a1, i),
        "matmul": (a1, i, i, i, a1, i, i, i, a1, i, i, i, i, i, i, f, b),
        "linear_delta": (a1, a1, i, a1, x, b, f, b, a1, i),
        "add_bias": (a1, a1, i, i, f, i),
        "activate": (a1, b, f, i),
        "activation_backward": (a1, a1, b, f, i),
        "softmax_delta": (a1, a1, x, f, b, i, i),
        "update": (a1, a1, a1, a1, a1, a1, i32, t2, i, i, f, f, f, f, f, T.UniTuple(T.int64, 5), b, x, b,
                   T.UniTuple(T.int64, 5)),
        "unscale_checked": (a1, f, x, i32, i),
    }


def audit_ptx(cc: tuple[int, int]) -> dict:
    """{kernel: {"fma": count, "ftz": count}} of each kernel's PTX for compute capability ``cc``."""
    out = {}
    for name, sig in kernel_signatures().items():
        ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=cc)
        out[name] = {"fma": len(re.findall(r"\bfma\.rn", ptx)), "ftz": len(re.findall(r"\.ftz\b", ptx))}
    return out
