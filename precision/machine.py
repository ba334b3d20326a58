"""What the machine adds to the numbers: CPU features, numerics-relevant settings, the BLAS library.

The same code can give other bits on another machine (docs/numerics.md, "What the machine changes"): XLA
contracts ``a*b + c`` into an FMA only where the CPU has FMA, computes float16 natively (and contracts it) only
with AVX512-FP16, flushes float32 subnormals to zero; numba's fp16 rounding takes the F16C instructions where they
exist; numpy dispatches other float16 transcendental kernels with AVX-512; the BLAS picks a kernel by core type and
its thread count changes summation order. Reports record :func:`numerics_environment`, and the tests that pin such
behaviour derive their expectation from :func:`cpu_features` and :func:`xla_cpu_rewrites`, so the record and the
expectation come from one place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform

__all__ = ["NUMERIC_CPU_FEATURES", "NUMERIC_ENV_VARS", "XLA_ISA_LADDER", "cpu_features", "has_cpu_feature",
           "xla_max_isa", "XlaCpuRewrites", "xla_cpu_rewrites", "blas_info", "numerics_environment"]

# numpy's names (its runtime dispatch table, the same on every OS numpy supports). x86: FMA3 (fused multiply-add),
# F16C (float16 <-> float32 conversions), AVX512F, AVX512BF16, AVX512FP16 (native float16 arithmetic); aarch64:
# ASIMD (NEON, has FMA), ASIMDHP (half-precision arithmetic).
NUMERIC_CPU_FEATURES = ("FMA3", "F16C", "AVX2", "AVX512F", "AVX512BF16", "AVX512FP16", "ASIMD", "ASIMDHP")

# Settings read by the frameworks at start-up that change results or their order (thread counts change BLAS and
# parallel summation order; OPENBLAS_CORETYPE picks the kernel; XLA_FLAGS can change contraction and threading).
NUMERIC_ENV_VARS = ("XLA_FLAGS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION", "JAX_PLATFORMS",
                    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
                    "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES")

# XLA's --xla_cpu_max_isa values, lowest first (xla/backends/cpu: the ISA a program may use is capped there).
XLA_ISA_LADDER = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_FP16")
# The lowest cap that still lets LLVM use FMA instructions (measured: AVX removes every contraction, the test
# tests/test_jax_rewrites.py::test_no_fma_isa_removes_every_contraction), and the lowest that keeps AVX512-FP16
# (not measured: AVX512-FP16 arrived with AMX on Sapphire Rapids, so only the AMX levels are taken to keep it).
_XLA_FMA_FROM, _XLA_FP16_FROM = "AVX2", "AMX"


@functools.cache
def _numpy_cpu_table() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def cpu_features() -> dict[str, bool]:
    """The features of :data:`NUMERIC_CPU_FEATURES` this CPU has (numpy's detection at import time)."""
    table = _numpy_cpu_table()
    return {name: bool(table.get(name, False)) for name in NUMERIC_CPU_FEATURES}


def has_cpu_feature(name: str) -> bool:
    if name not in NUMERIC_CPU_FEATURES:
        raise ValueError(f"unknown CPU feature {name!r}; valid choices: {', '.join(NUMERIC_CPU_FEATURES)}")
    return cpu_features()[name]


def xla_max_isa(xla_flags: str | None = None) -> str | None:
    """The ``--xla_cpu_max_isa`` cap in ``xla_flags`` (default: the XLA_FLAGS environment variable), upper-case,
    or None when absent. The last occurrence wins, as in XLA's flag parser."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    value = None
    for token in flags.split():
        if token.startswith("--xla_cpu_max_isa="):
            value = token.split("=", 1)[1].strip().upper()
    return value


def _isa_allows(cap: str | None, lowest: str) -> bool:
    if cap is None:
        return True
    if cap not in XLA_ISA_LADDER:  # XLA rejects unknown values at start-up; treat as no cap
        return True
    return XLA_ISA_LADDER.index(cap) >= XLA_ISA_LADDER.index(lowest)


@dataclasses.dataclass(frozen=True)
class XlaCpuRewrites:
    """What XLA's CPU backend does to the reference op order, derived from the CPU and XLA_FLAGS.

    ``fp32_fma``: float32/float64 ``a*b + c`` contracted into one FMA. ``fp16_native``: float16 computed as float16
    (AVX512-FP16); without it XLA computes each float16 op in float32 and rounds the result, exactly numpy's
    per-op rounding. ``fp16_fma``: float16 ``a*b + c`` contracted (only when native). ``reciprocal_division``:
    ``x / s`` for a broadcast scalar ``s`` computed as ``x * (1/s)`` (XLA's algebraic simplifier, every CPU).
    ``flushes_subnormals``: float32 subnormal inputs and results flushed to zero (bf16 tiny values are float32
    subnormals; fp16 ones are not). Measured on an AMD EPYC with FMA3 and F16C and no AVX-512, and (per
    docs/numerics.md) on an Intel Emerald Rapids with AVX512-FP16; pinned by tests/test_jax_rewrites.py."""

    fp32_fma: bool
    fp16_native: bool
    fp16_fma: bool
    reciprocal_division: bool = True
    flushes_subnormals: bool = True


def xla_cpu_rewrites(features: dict[str, bool] | None = None, xla_flags: str | None = None) -> XlaCpuRewrites:
    """:class:`XlaCpuRewrites` for ``features`` (default: this CPU's) under ``xla_flags`` (default: XLA_FLAGS)."""
    features = cpu_features() if features is None else features
    cap = xla_max_isa(xla_flags)
    fma = bool(features.get("FMA3") or features.get("ASIMD")) and _isa_allows(cap, _XLA_FMA_FROM)
    fp16_native = bool(features.get("AVX512FP16")) and _isa_allows(cap, _XLA_FP16_FROM)
    return XlaCpuRewrites(fp32_fma=fma, fp16_native=fp16_native, fp16_fma=fp16_native and fma)


def blas_info() -> list[dict]:
    """The BLAS/OpenMP libraries loaded in this process (threadpoolctl): library, version, the kernel's core type
    ("architecture"), threads. File paths are left out: they differ between virtual environments, not numerics."""
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - a core dependency; kept optional for minimal installs
        return []
    import numpy  # noqa: F401  (loads numpy's BLAS, so that threadpoolctl sees it)
    keys = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer")
    libs = [{k: info.get(k) for k in keys} for info in threadpoolctl.threadpool_info()]
    # Sorted: the load order varies with what imported first (numpy's and scipy's OpenBLAS both appear), and the
    # record must not differ between two runs of the same environment.
    return sorted(libs, key=lambda lib: json.dumps(lib, sort_keys=True))


def numerics_environment() -> dict:
    """Everything besides the code and the package versions that can change a result's bits (recorded in every
    report; ``precision compare`` lists what differs between two)."""
    return {
        "machine": platform.machine(),
        "cpu_features": cpu_features(),
        "env": {name: os.environ[name] for name in NUMERIC_ENV_VARS if name in os.environ},
        "blas": blas_info(),
        "xla_cpu": dataclasses.asdict(xla_cpu_rewrites()),
    }
