"""precision.machine: the CPU features and settings that change numerics, and the expectations derived from them.

The tests of machine-dependent behaviour (tests/test_jax_rewrites.py, tests/test_numba_rounding.py) take their
expectation from these functions; here the functions themselves are checked: against the kernel's own account of
the CPU (/proc/cpuinfo), and on a table of CPUs this suite has met (their features as numpy reports them).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from precision.machine import (NUMERIC_CPU_FEATURES, XlaCpuRewrites, cpu_features, has_cpu_feature,
                               numerics_environment, xla_cpu_rewrites, xla_max_isa)

NONE = {name: False for name in NUMERIC_CPU_FEATURES}
# Feature sets of CPUs the suite has run on (numpy's names), and what XLA did with their fp32/fp16 updates.
EMERALD_RAPIDS = NONE | {"FMA3": True, "F16C": True, "AVX2": True, "AVX512F": True, "AVX512BF16": True,
                         "AVX512FP16": True}
EPYC_AVX512 = NONE | {"FMA3": True, "F16C": True, "AVX2": True, "AVX512F": True, "AVX512BF16": True}
EPYC_AVX2 = NONE | {"FMA3": True, "F16C": True, "AVX2": True}
NO_FMA = NONE | {"F16C": True}

CASES = [
    # (features, XLA_FLAGS, fp32 contraction, fp16 native and contracted)
    (EMERALD_RAPIDS, "", True, True),
    (EMERALD_RAPIDS, "--xla_cpu_max_isa=AVX512_BF16", True, False),  # capped below AVX512-FP16
    (EMERALD_RAPIDS, "--xla_cpu_max_isa=AVX", False, False),
    (EPYC_AVX512, "", True, False),
    (EPYC_AVX2, "", True, False),
    (EPYC_AVX2, "--xla_cpu_max_isa=avx", False, False),  # XLA upper-cases the value
    (NO_FMA, "", False, False),
]


@pytest.mark.parametrize("features, flags, fp32_fma, fp16", CASES)
def test_xla_rewrites_follow_the_features(features, flags, fp32_fma, fp16):
    rewrites = xla_cpu_rewrites(features, flags)
    assert rewrites == XlaCpuRewrites(fp32_fma=fp32_fma, fp16_native=fp16, fp16_fma=fp16)
    assert rewrites.reciprocal_division and rewrites.flushes_subnormals  # measured on every CPU so far


def test_max_isa_parsing():
    assert xla_max_isa("") is None
    assert xla_max_isa("--xla_cpu_multi_thread_eigen=false --xla_cpu_max_isa=avx2") == "AVX2"
    assert xla_max_isa("--xla_cpu_max_isa=AVX --xla_cpu_max_isa=AVX512") == "AVX512"  # last one wins


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64",
                    reason="/proc/cpuinfo flags are checked on x86-64 Linux only")
def test_features_agree_with_the_kernel():
    # An independent account of the same CPU: the kernel's flags line (its spelling differs from numpy's).
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    kernel_names = {"FMA3": "fma", "F16C": "f16c", "AVX2": "avx2", "AVX512F": "avx512f",
                    "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16"}
    features = cpu_features()
    for numpy_name, kernel_name in kernel_names.items():
        assert features[numpy_name] == (kernel_name in flags), numpy_name
    assert not features["ASIMD"]


def test_unknown_feature_names_the_choices():
    with pytest.raises(ValueError, match="AVX512FP16"):
        has_cpu_feature("avx512-fp16")


def test_environment_records_what_changes_numerics():
    # In a subprocess with known settings: the record must hold them verbatim.
    code = "import json; from precision.machine import numerics_environment as n; print(json.dumps(n()))"
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["env"]["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX"
    assert record["env"]["OMP_NUM_THREADS"] == "1"
    assert record["xla_cpu"]["fp32_fma"] is False  # the cap is applied, whatever this CPU has
    assert record["cpu_features"] == cpu_features()
    blas = [lib for lib in record["blas"] if lib["user_api"] == "blas"]
    assert blas and all(lib["internal_api"] and lib["num_threads"] >= 1 for lib in blas)
    assert all("filepath" not in lib for lib in record["blas"])  # paths differ per venv, not per numerics
    json.dumps(numerics_environment(), allow_nan=False)  # the in-process record is JSON as it stands
