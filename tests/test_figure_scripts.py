"""Smoke tests of the figure script behind docs/numba.md's measured figures (benchmarks/numba_figures.py): each
figure runs end to end at a small size and prints its ratios. The figures themselves are measured by hand on a
quiet machine (speed goals live in benchmarks, not in timed tests): these only keep the script working (an import
lost in a refactor once broke the agreement figure unnoticed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from precision.backends import backend_availability

pytestmark = pytest.mark.skipif(not backend_availability("numba", "cpu").available, reason="numba not installed")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "numba_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("numba_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ratios(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s*([0-9.]+)", text)
    assert match, f"{label!r} not in the figure's output:\n{text}"
    return float(match.group(1))


def test_kernels_figure(figures, capsys):
    figures.kernels(10**4, repeats=1)
    out = capsys.readouterr().out
    for label in ("fp32 Adam throughput / memory reference:", "bf16 Adam time / fp32 Adam time:",
                  "fp16 Adam time / fp32 Adam time:"):
        assert ratios(out, label) > 0


def test_bf16_hardware_figure(figures, capsys):
    # Machine-dependent: the hardware conversion exists only with AVX512_BF16 (without it the kernel would call a
    # runtime routine numba does not link, and crash), so the expectation follows the detected feature.
    from precision.backends.numba_backend.rounding import target_has
    figures.bf16_hardware(10**4, repeats=1)
    out = capsys.readouterr().out
    if target_has("avx512bf16"):
        assert "bf16 vcvtneps2bf16" in out and "x fp32" in out
    else:
        assert "bf16 vcvtneps2bf16: not measured: this CPU (or NUMBA_CPU_FEATURES) has no AVX512_BF16" in out
        assert "x fp32" not in out


@pytest.mark.skipif(not backend_availability("jax", "cpu").available, reason="jax not installed")
def test_logreg_figure(figures, capsys):
    figures.logreg(runs=1)
    out = capsys.readouterr().out
    assert ratios(out, "numba / best backend:") > 0


def test_agreement_figure(figures, capsys, monkeypatch):
    # Whether numpy's own bf16-mixed runs are bit-identical to numba's depends on the BLAS kernel's summation order
    # (docs/numba.md: 12 / 12 with OpenBLAS's AVX-512 or Sandybridge kernels, 9 / 12 with its Haswell kernel), so
    # the machine-independent statement is tested: with the numpy backend summing in numba's order (the pin of
    # test_numpy_with_numba_order_reproduces_numba), all 12 runs train, none diverges, all 12 are bit-identical.
    from test_numba_backend import SequentialOps

    from precision.backends import numpy_backend
    monkeypatch.setattr(numpy_backend, "FormatOps", SequentialOps)
    figures.agreement(["bf16-mixed"])
    out = capsys.readouterr().out
    assert re.search(r"bf16-mixed\s+trained 12, diverged in both\s+0, bit-identical 12", out), out


@pytest.mark.skipif(not backend_availability("jax", "cpu").available, reason="jax not installed")
def test_mlp_figure(figures, capsys, monkeypatch):
    monkeypatch.setattr(figures, "MLP_CASES", (("mlp", 3),))
    figures.mlp(runs=1, policies=("fp32",))
    out = capsys.readouterr().out
    assert re.search(r"mlp\s+fp32\s+numpy .* us \(\d+\.\d\dx\)\s+numba .* us \(\d+\.\d\dx\)", out), out


@pytest.mark.skipif(not backend_availability("jax", "cpu").available, reason="jax not installed")
def test_mlp_ratio_figure(figures, capsys):
    figures.mlp_ratio(rounds=2, steps=(2, 4))
    out = capsys.readouterr().out
    assert re.search(r"mlp fp32: numba / jax per extra step, median of 2 rounds \S+ \(quartiles", out), out


def test_mlp_products_figure(figures, capsys):
    # The tile loop with and without fused multiply-adds on the same padded operands; the figure prints the ratio.
    figures.mlp_products(repeats=1)
    out = capsys.readouterr().out
    assert ratios(out, "no-FMA rule costs") > 0 and "mlp-256x256" in out
