"""Gradient accumulation through precision run: the option, the report's accumulation figures, the table."""

from __future__ import annotations

import json
import subprocess
import sys

from precision.accumulation import accumulation_effect
from precision.optim import make_optimizer
from precision.policy import PRESETS
from precision.spec import RunSpec


def test_run_reports_the_accumulated_run_against_one_batch(tmp_path):
    """precision run --accum-steps 1,4: both runs, the K = 4 one with its accumulation figures (the same as
    accumulation_effect's), the table's accum columns; a bad K is one line and exit 2."""
    out = tmp_path / "r.json"
    argv = [sys.executable, "-m", "precision", "run", "--problem", "logreg", "--data", "breast_cancer", "--policy",
            "bf16", "--backend", "numpy", "--steps", "30", "--accum-steps", "1,4", "--out", str(out), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["spec"]["accum_steps"] for r in results] == [1, 4]
    assert results[0]["accumulation"] is None
    spec = RunSpec("logreg", make_optimizer("adam"), PRESETS["bf16"], data="breast_cancer", steps=30,
                   accum_steps=4)
    assert results[1]["accumulation"] == accumulation_effect(spec)
    assert "bits vs 1 batch" in proc.stdout.splitlines()[0]
    bad = subprocess.run(argv[:-5] + ["--accum-steps", "0", "--out", str(tmp_path / "x.json")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "accum-steps 0 must be a positive integer" in bad.stderr
