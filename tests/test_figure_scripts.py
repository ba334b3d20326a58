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
    figures.bf16_hardware(10**4, repeats=1)
    out = capsys.readouterr().out
    assert "bf16 vcvtneps2bf16" in out and "x fp32" in out


@pytest.mark.skipif(not backend_availability("jax", "cpu").available, reason="jax not installed")
def test_logreg_figure(figures, capsys):
    figures.logreg(runs=1)
    out = capsys.readouterr().out
    assert ratios(out, "numba / best backend:") > 0


def test_agreement_figure(figures, capsys):
    figures.agreement(["bf16-mixed"])
    out = capsys.readouterr().out
    # bf16-mixed runs are bit-identical to numpy (docs/numba.md): all 12 trained, none diverged
    assert re.search(r"bf16-mixed\s+trained 12, diverged in both\s+0, bit-identical 12", out), out
