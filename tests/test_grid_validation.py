"""The whole grid checked before any run starts (issue 10): every bad input is one line and exit 2 with nothing
written, the existing report byte-identical; the Python API raises the same SpecError before training, refuses a
dataset made for another spec, and estimates a grid's size against documented limits (``force`` overrides them).
Every CLI case runs the real command in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import precision
from precision import matrix, runner
from precision.data import DATA_SETS, MAX_SEED, classes_for, make_dataset, split_sizes
from precision.errors import SpecError
from precision.matrix import (MEMORY_LIMIT, REPORT_LIMIT, WORK_LIMIT, build_specs, check_grid, default_specs,
                              estimate_grid)
from precision.problems import PROBLEMS
from precision.runner import dataset_for, run_one, train
from precision.spec import RunSpec

CLI = [sys.executable, "-m", "precision.cli"]
OLD_REPORT = b'{"schema_version": 1, "results": [], "note": "an earlier report that must survive"}\n'
# Logreg on numpy for a few steps: a command that would run in a second, were its input not refused.
FAST = ["run", "--problem", "logreg", "--backend", "numpy", "--policy", "fp32", "--steps", "5", "--quiet"]


def cli(*args, env=None, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def shadowed(tmp_path: Path, files: dict[str, str]) -> dict:
    """An environment whose PYTHONPATH starts with stand-in packages: {"jax/__init__.py": source, ...}."""
    root = tmp_path / "shadow"
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


ONLY_NUMPY = {"jax/__init__.py": "raise ImportError('No module named jax (hidden by the test)')\n",
              "numba/__init__.py": "raise ImportError('No module named numba (hidden by the test)')\n"}

# (arguments, fragments of the one stderr line): each refused before anything runs.
BAD = [
    (["run", "--problem", "logreg,mlp", "--data", "digits", "--backend", "numpy", "--quiet"],
     ["problem 'logreg' is binary; data 'digits' has 10 classes", "use softmax or mlp"]),
    ([*FAST, "--batch-size", "0"], ["--batch-size 0 must be a positive integer", "'full'"]),
    ([*FAST, "--seed", "-1"], ["seed -1 is out of range", f"valid seeds: 0..{MAX_SEED}"]),
    ([*FAST, "--seed", "0,x"], ["seed 'x' is not an integer", f"0..{MAX_SEED}"]),
    (["run", "--problem", "", "--backend", "numpy", "--quiet"],
     ["--problem '' is empty", "valid choices: linreg, logreg, softmax, mlp"]),
    ([*FAST, "--data", "synthetic,"], ["--data 'synthetic,'", "empty item", "synthetic, breast_cancer, digits"]),
    (["run", "--device", "tpu", "--quiet"], ["unknown device 'tpu'; valid choices: cpu, gpu"]),
    ([*FAST, "--device", "cpu,tpu"], ["unknown device 'tpu'; valid choices: cpu, gpu"]),
    ([*FAST, "--steps", "1000000000000"],
     ["--steps 1000000000000 is too many", "steps fit the limits", "estimated memory", "--force"]),
    ([*FAST, "--data", "breast_cancer", "--batch-size", "456"],
     ["--batch-size 456 is larger than the 455 training rows of data set 'breast_cancer'", "1..455", "'full'"]),
    ([*FAST, "--seed", "0,0"], ["repeats id"]),
]


@pytest.mark.parametrize("args, fragments", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_input_is_refused_before_anything_runs(args, fragments, tmp_path):
    out = tmp_path / "report.json"
    out.write_bytes(OLD_REPORT)
    proc = cli(*args, "--out", str(out))
    assert_refused(proc, out, fragments)


def assert_refused(proc, out: Path, fragments) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("precision run: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""  # no table: nothing ran
    assert out.read_bytes() == OLD_REPORT  # byte-identical
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "shadow") == [out.name]  # no checkpoint, no temp
    return lines[0]


def test_backend_not_installed_names_its_extra(tmp_path):
    # With only numpy installed, a named backend is bad input before any training, and the message says what to
    # install; without --backend only the available ones are chosen.
    out = tmp_path / "report.json"
    out.write_bytes(OLD_REPORT)
    env = shadowed(tmp_path, ONLY_NUMPY)
    line = assert_refused(cli("run", "--backend", "jax", "--quiet", "--out", str(out), env=env), out,
                          ["--backend jax cannot run on cpu here", "pip install 'precision[jax]'", "usable here: numpy"])
    assert "numba" not in line.split("usable here:")[1]
    assert_refused(cli(*FAST[:3], "--backend", "numpy,numba", "--out", str(out), env=env), out,
                   ["--backend numba cannot run on cpu here", "pip install 'precision[numba]'"])


def test_a_run_in_which_nothing_ran_keeps_the_existing_report(tmp_path):
    # Every run fails at run time (a stand-in scikit-learn cannot read its file: nothing the checks can see): the
    # earlier report is not replaced by a report of errors. Exit 1, one line saying so, no checkpoint left.
    out = tmp_path / "report.json"
    out.write_bytes(OLD_REPORT)
    env = shadowed(tmp_path, {"sklearn/__init__.py": "",
                              "sklearn/datasets.py": "def load_digits():\n    raise OSError('unreadable (test)')\n"})
    proc = cli("run", "--problem", "softmax", "--data", "digits", "--backend", "numpy", "--policy", "fp32,bf16",
               "--steps", "5", "--quiet", "--out", str(out), env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "nothing ran (2 error; first: OSError: unreadable (test)" in lines[0]
    assert f"the existing report {str(out)!r} was kept" in lines[0]
    assert out.read_bytes() == OLD_REPORT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "shadow"]


def test_force_lets_a_grid_over_the_limits_run(tmp_path):
    # A real --force without a huge job: the same small command, in a process whose memory limit is 1 KiB.
    out = tmp_path / "report.json"
    out.write_bytes(OLD_REPORT)
    code = ("import sys, precision.matrix as m; m.MEMORY_LIMIT = 1024; from precision.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = [sys.executable, "-c", code, *FAST, "--out", str(out)]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert_refused(refused, out, ["this grid of 1 run is too large even at 1 step", "limit 1 KiB", "--force"])
    forced = subprocess.run([*args, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert precision.load_report(out).results[0].status == "ok"


# ---- the Python API: the same checks, raised before training ----------------------------------------------------

def spec(problem="logreg", data="synthetic", **kw) -> RunSpec:
    return RunSpec(problem, precision.make_optimizer("adam"), precision.get_policy("fp32"), data=data, **kw)


def test_run_refuses_a_bad_grid_before_training(monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "run_one", lambda s, *a, **k: ran.append(s))
    good = spec(steps=5)
    bad_grids = {
        "problem 'logreg' is binary; data 'digits' has 10 classes": [good, spec(data="digits", steps=5)],
        "batch size 2000 is larger than the 1024 training rows": [good, spec(batch_size=2000, steps=5)],
        "steps 1000000000000 is too many": [spec(steps=10**12)],
        "backend 'numpy' cannot run on gpu here": [spec(device="gpu", steps=5)],
    }
    for message, specs in bad_grids.items():
        with pytest.raises(SpecError, match=re.escape(message)):
            precision.run(specs)
    assert ran == []
    # An unavailable device next to an available one is a result, not bad input.
    monkeypatch.undo()
    report = precision.run([good, spec(device="gpu", steps=5)])
    assert [r.status for r in report.results] == ["ok", "unavailable"]


def test_seed_range_is_what_numpy_and_a_report_take():
    for seed in (0, MAX_SEED):
        spec(seed=seed)
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(SpecError, match=rf"seed {seed} is out of range; valid seeds: 0\.\.{MAX_SEED}"):
            spec(seed=seed)
        with pytest.raises(SpecError, match=f"seed {seed} is out of range"):
            make_dataset("logreg", seed=seed)  # a SpecError, not numpy's ValueError
    with pytest.raises(ValueError):
        np.random.default_rng(-1)  # the premise: numpy refuses negative seeds


def test_missing_scikit_learn_is_found_before_running(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(SpecError, match=re.escape("data set 'digits' needs scikit-learn: pip install "
                                                  "'precision[data]'")):
        check_grid([spec("softmax", "digits")])
    check_grid([spec()])  # synthetic data never needs it


def test_the_fit_table_agrees_with_the_data_sets():
    # The cheap check (DATA_SETS, no data loaded) refuses exactly what make_dataset refuses with the loaded labels,
    # and the table's shapes are the real ones.
    pytest.importorskip("sklearn", reason="the scikit-learn data sets need the 'data' extra")
    for data, info in DATA_SETS.items():
        for name, problem in PROBLEMS.items():
            try:
                ds = make_dataset(name, data, steps=0)
            except SpecError as exc:
                with pytest.raises(SpecError, match=re.escape(str(exc))):
                    check_grid([spec(name, data)])
                continue
            check_grid([spec(name, data)])
            assert (len(ds.X_train), len(ds.X_test)) == split_sizes(info.samples)
            assert ds.X_train.shape[1] == info.features and ds.classes == classes_for(problem, data)


def test_a_dataset_made_for_another_spec_is_refused():
    logreg = build_specs(["logreg"], ["adam"], ["fp32"], data=["breast_cancer"], steps=20)[0]
    other = make_dataset("mlp", "digits", seed=1, steps=200, batch_size=64)
    for call in (lambda: train(logreg, other), lambda: run_one(logreg, dataset=other)):
        with pytest.raises(SpecError) as info:
            call()
        message = str(info.value)
        for fragment in ("problem 'mlp' (the spec has 'logreg')", "data 'digits' (the spec has 'breast_cancer')",
                         "seed 1 (the spec has 0)", "steps 200 (the spec has 20)", "batch_size 64 (the spec has 128)"):
            assert fragment in message, message
    # One field off is named alone; a dataset made for the spec is taken.
    with pytest.raises(SpecError, match=r"made for another spec: steps 21 \(the spec has 20\); pass"):
        train(logreg, make_dataset("logreg", "breast_cancer", 0, 21, 128))
    ds = dataset_for(logreg)
    assert ds.made_for() == {"problem": "logreg", "data": "breast_cancer", "seed": 0, "steps": 20, "batch_size": 128}
    assert run_one(logreg, dataset=ds).status == "ok"


def test_train_without_a_dataset_makes_the_spec_own():
    s = spec(steps=30, record_every=10)
    traj = train(s)
    assert traj.record_steps.tolist() == [0, 10, 20, 30]
    same = train(s, dataset_for(s))
    assert precision.fingerprint(traj.final_params) == precision.fingerprint(same.final_params)


# ---- the size estimate and its limits ----------------------------------------------------------------------------

def test_estimate_counts_schedules_trajectories_and_work():
    s = spec(steps=1000, batch_size=100, record_every=10)  # synthetic logreg: 32 features + bias = 33 params
    e = estimate_grid([s])
    assert e.runs == 2 and e.steps == 2000  # the spec and its float64 reference
    # the schedule is made a chunk at a time: one epoch's permutation of the 1024 training rows and one chunk's
    # rows (record_every 10 x batch 100), int64, one dataset for both; it no longer grows with the steps
    assert e.schedule_bytes == (1024 + 10 * 100) * 8
    records = 101
    assert e.trajectory_bytes == records * 33 * 8 * (1 + matrix._IN_FLIGHT_TRAJECTORIES)  # reference + in flight
    assert e.work == 2 * 1000 * 100 * 33
    full = estimate_grid([spec(steps=1000, batch_size=None, record_every=10)])
    assert full.schedule_bytes == 0 and full.work == 2 * 1000 * 1024 * 33  # full batch: every train row
    seeds = estimate_grid([spec(steps=1000, batch_size=100, seed=k, record_every=10) for k in range(3)])
    assert seeds.schedule_bytes == 3 * e.schedule_bytes  # one cached dataset per seed


def test_default_matrix_and_readme_examples_pass_with_a_wide_margin():
    grids = {
        "default": default_specs(["numpy", "numba", "jax"]),
        "readme": build_specs(["softmax", "mlp"], ["adam", "adamw"], ["fp32", "bf16-mixed", "fp16-mixed-ls"],
                              backends=["numpy", "numba", "jax"], data=["digits"], steps=500, seeds=[0, 1]),
        "readme-compare": build_specs(["mlp"], ["sgd", "adam"], ["fp32", "bf16-mixed", "fp16-mixed", "bf16"],
                                      backends=["numpy", "numba", "jax"], data=["digits"]),
    }
    # At least 20x below every limit. Memory is the tightest: the calibration kernel every run() times holds a
    # fixed 48 MB (precision.calibration.CALIBRATION_BYTES), most of the default matrix's ~52 MB estimate.
    for name, specs in grids.items():
        e = estimate_grid(specs)
        assert e.memory_bytes * 20 < MEMORY_LIMIT and e.work * 100 < WORK_LIMIT, (name, e)
        assert e.report_bytes * 100 < REPORT_LIMIT, (name, e)


def test_refusal_names_the_largest_steps_that_fit_and_force_accepts():
    big = build_specs(["mlp"], ["adam"], ["fp32", "bf16"], data=["digits"], steps=10**12)
    with pytest.raises(SpecError) as info:
        check_grid(big)
    message = str(info.value)
    assert message.startswith("steps 1000000000000 is too many for this grid of 2 runs") and "force=True" in message
    fits = int(re.search(r"at most (\d+) steps fit", message).group(1))
    assert not estimate_grid(build_specs(["mlp"], ["adam"], ["fp32", "bf16"], data=["digits"], steps=fits)).exceeded()
    assert estimate_grid(build_specs(["mlp"], ["adam"], ["fp32", "bf16"], data=["digits"], steps=fits + 1)).exceeded()
    forced = check_grid(big, force=True)  # returns the estimate; nothing is run here
    assert forced.memory_bytes > MEMORY_LIMIT and forced.exceeded()
    # A report over the reader's cap is refused too: every step recorded for a long run.
    with pytest.raises(SpecError, match="a report of about .* read at most 256 MiB"):
        check_grid([spec(steps=3_000_000, record_every=1, batch_size=None)])


def test_estimate_is_not_below_measured_memory():
    # A run recording every step: the estimate stays above the traced peak, and within 3x of it.
    s = build_specs(["mlp"], ["adam"], ["fp32"], data=["digits"], steps=200, record_every=1)
    precision.run(build_specs(["mlp"], ["adam"], ["fp32"], data=["digits"], steps=2))  # imports out of the way
    tracemalloc.start()
    try:
        precision.run(s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = estimate_grid(s).memory_bytes
    assert peak <= estimate <= 3 * peak, (peak, estimate)
