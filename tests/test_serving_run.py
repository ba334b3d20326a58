"""Inference parity and batch invariance inside precision run: the options, the report fields, the tables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from precision.errors import SpecError
from precision.inference import INFER_FORMATS
from precision.matrix import build_specs
from precision.report import load_report
from precision.runner import Serving, run
from precision.table import format_report


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "precision", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    specs = build_specs(["logreg"], ["adam"], ["fp64", "fp32", "fp16"], backends=("numpy", "numba"),
                        data=("breast_cancer",), steps=30)
    report = run(specs, serve=Serving(formats=INFER_FORMATS, batches=True))
    return load_report(report.save(tmp_path_factory.mktemp("served") / "r.json"))


def test_every_finished_run_is_served_in_every_format(served):
    for r in served.results:
        assert r.status == "ok"
        assert [row["format"] for row in r.inference] == list(INFER_FORMATS)
        assert len(r.batch_invariance) == 1 and r.batch_invariance[0]["format"] == r.spec["policy"].split(",")[1][2:]


def test_fp64_served_in_fp64_is_exact_everywhere(served):
    """The fp64 row is a second fp64 pass on the same backend: a deterministic forward pass gives it exactly 0."""
    for r in served.results:
        row = r.inference[0]
        assert row["format"] == "fp64"
        assert (row["flip_rate"], row["kl_mean"], row["kl_max"], row["max_abs_diff"], row["max_logit_ulp"],
                row["accuracy_change"], row["nonfinite"]) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)


def test_numba_is_batch_invariant_in_the_report(served):
    """numba sums every dot product in one fixed order whatever the batch (docs/inference.md)."""
    for r in served.results:
        if r.spec["backend"] == "numba":
            assert r.batch_invariance[0]["invariant"] is True, r.id


def test_tables_show_serving_and_batch_invariance(served):
    text = format_report(served)
    assert "Served in other formats" in text and "flips@fp8_e4m3fn" in text
    assert "Batch invariance" in text and "bs=full" in text


def test_serving_names_a_bad_format():
    with pytest.raises(SpecError, match="tf99"):
        Serving(formats=("tf99",))


def test_cli_bad_infer_policy_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    proc = cli("run", "--problem", "logreg", "--steps", "5", "--infer-policy", "bf16,tf99", "--out", str(out))
    assert proc.returncode == 2 and "tf99" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert out.read_text() == "{}"
    proc = cli("run", "--problem", "logreg", "--steps", "5", "--infer-policy", "bf16,", "--out", str(out))
    assert proc.returncode == 2 and "--infer-policy 'bf16,' is empty or has an empty item" in proc.stderr


def test_cli_serving_is_off_for_an_explicit_matrix_unless_asked(tmp_path):
    out = tmp_path / "r.json"
    proc = cli("run", "--problem", "logreg", "--policy", "fp32", "--backend", "numpy", "--steps", "5", "--out",
               str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["results"][0]
    assert result["inference"] is None and result["batch_invariance"] is None and result["floors"] is None
    proc = cli("run", "--problem", "logreg", "--policy", "fp32", "--backend", "numpy", "--steps", "5", "--out",
               str(out), "--quiet", "--infer-policy", "bf16", "--batch-invariance")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["results"][0]
    assert [row["format"] for row in result["inference"]] == ["bf16"] and result["batch_invariance"][0]["format"]
    assert "Served in other formats" in proc.stdout and "Batch invariance" in proc.stdout
