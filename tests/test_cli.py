"""The CLI end to end in a subprocess: a small matrix, its report, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from precision.report import SCHEMA_VERSION

REQUIRED_RESULT_KEYS = {"spec", "time_per_step_s", "compile_s", "final_loss", "bits_of_agreement", "rel_l2",
                        "max_ulp", "loss_gap", "flip_rate", "diverged_at", "fingerprint", "drift", "status"}


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "precision", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "report.json"
    params = out.parent / "params"
    proc = cli("run", "--problem", "logreg,softmax", "--optimizer", "sgd,adam", "--policy", "fp64,fp32,bf16",
               "--backend", "numpy", "--steps", "30", "--record-every", "10", "--out", str(out),
               "--save-params", str(params))
    assert proc.returncode == 0, proc.stderr
    return out, params, proc.stdout


def test_run_writes_a_complete_report(small_report):
    out, params, stdout = small_report
    data = json.loads(out.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert {"python", "numpy", "ml_dtypes"} <= {"python", *data["environment"]["versions"]}
    results = data["results"]
    assert len(results) == 2 * 2 * 3
    for r in results:
        assert REQUIRED_RESULT_KEYS <= set(r), r.keys()
        assert r["status"] == "ok"
        assert [p["step"] for p in r["drift"]] == [0, 10, 20, 30]
        if r["spec"]["policy_name"] == "fp64":
            # fp64 on numpy IS the reference: identical arithmetic, so exactly equal.
            assert r["rel_l2"] == 0.0 and r["bits_of_agreement"] == 53.0
        else:
            assert 0 < r["rel_l2"] < 1
    ids = [r["spec"]["id"] for r in results]
    assert len(set(ids)) == len(ids)
    # One .npz per result, holding the recorded float64 params.
    assert len(list(params.glob("*.npz"))) == len(results)
    assert "bits" in stdout and "12 runs (12 ok)" in stdout


def test_show_prints_the_saved_table(small_report):
    out, _, _ = small_report
    proc = cli("show", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "logreg:synthetic" in proc.stdout and "softmax:synthetic" in proc.stdout


def test_list_names_every_backend_with_its_availability():
    proc = cli("list")
    assert proc.returncode == 0
    for name in ("numpy", "numba", "jax", "bf16-mixed", "mlp", "adamw", "breast_cancer"):
        assert name in proc.stdout
    assert "numpy  gpu  unavailable: the numpy backend runs on the CPU only" in proc.stdout


BAD_INPUTS = [
    (["run", "--problem", "resnet"], "unknown problem 'resnet'; valid choices: linreg, logreg, softmax, mlp"),
    (["run", "--problem", "logreg", "--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'; valid choices: sgd"),
    (["run", "--problem", "logreg", "--policy", "fp12"], "unknown policy 'fp12'; valid choices: fp64"),
    (["run", "--problem", "logreg", "--policy", "p=bf16,c"], "malformed policy field 'c'"),
    (["run", "--problem", "logreg", "--policy", "p=bf16,q=fp32"], "unknown policy key 'q'"),
    (["run", "--problem", "logreg", "--backend", "torch"], "unknown backend 'torch'; valid choices: numpy"),
    (["run", "--problem", "logreg", "--steps", "0"], "steps 0 must be a positive integer"),
    (["run", "--problem", "logreg", "--steps", "-5"], "steps -5 must be a positive integer"),
    (["run", "--problem", "logreg", "--steps", "ten"], "steps 'ten' is not an integer"),
    (["run", "--problem", "logreg", "--data", "mnist"], "unknown data set 'mnist'; valid choices: synthetic"),
    (["run", "--problem", "logreg", "--device", "tpu"], "unknown device 'tpu'; valid choices: cpu, gpu"),
    (["run", "--problem", "logreg", "--lr", "fast"], "learning rate 'fast' is not a number"),
    (["show", "does-not-exist.json"], "report 'does-not-exist.json' does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = cli(*args, "--out", str(tmp_path / "r.json")) if args[0] == "run" else cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not readable JSON"),
    ('{"results": []}', "has no schema_version"),
    ('{"schema_version": 99, "results": []}', "has schema version 99; this precision reads versions 1 and 2 (written by a newer precision"),
])
def test_unreadable_report_is_refused_in_one_line(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(content)
    proc = cli("show", str(path))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_failing_configuration_keeps_the_others(tmp_path, broken_sklearn):
    # A failure only running can find: a stand-in scikit-learn whose load_digits cannot read its file. (A problem
    # that does not fit its data set is bad input now, refused before any run: exit 2.) The digits spec errors at
    # run time; the synthetic one still runs.
    env = broken_sklearn("load_digits", "digits file unreadable (test)")
    out = tmp_path / "r.json"
    proc = cli("run", "--problem", "softmax", "--data", "synthetic,digits", "--policy", "fp32", "--backend", "numpy",
               "--steps", "5", "--out", str(out), env=env)
    # Exit 1: a spec errored (docs/cli.md), yet the report holds every result.
    assert proc.returncode == 1, proc.stderr
    assert "1 of 2 runs failed" in proc.stderr and "Traceback" not in proc.stderr
    results = {r["spec"]["data"]: r for r in json.loads(out.read_text())["results"]}
    assert results["digits"]["status"] == "error"
    assert "OSError: digits file unreadable (test)" in results["digits"]["message"]
    assert results["synthetic"]["status"] == "ok"
