"""The asv suite stays runnable: ``asv check`` passes, and a quick run of one case in this environment
(``--python=same``) completes with a time and drift figures, the drift equal to what ``precision run`` reports.

asv writes a machine file under $HOME and results/benchmarks.json under results_dir even with --python=same, so
both point into a temporary folder through a copy of asv.conf.json; the repository is left untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from precision.backends import backend_availability
from precision.benchcases import ONLY_ENV, CaseFigures, frozen_dataset, get_case, measure
from precision.drift import MAX_BITS, rel_l2
from precision.runner import run, train

ROOT = Path(__file__).resolve().parents[1]
CASE = get_case("logreg:breast_cancer", "sgd", "fp32", "numpy")
# asv matches --bench against "name(param, ...)" for parameterized benchmarks: this selects the one case.
BENCH_REGEX = r"bench_(training|drift)\..*\('logreg:breast_cancer', 'sgd', 'fp32', 'numpy'\)"
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def asv(tmp_path_factory):
    """Run ``python -m asv ARGS`` against a temporary copy of the config; returns the finished process."""
    asv_util = pytest.importorskip("asv.util", reason="asv is not installed (pip install 'precision[bench]')")
    tmp = tmp_path_factory.mktemp("asv")
    conf = asv_util.load_json(str(ROOT / "asv.conf.json"), js_comments=True)
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"), env_dir=str(tmp / "env"),
                results_dir=str(tmp / "results"), html_dir=str(tmp / "html"))
    (tmp / "asv.conf.json").write_text(json.dumps(conf))
    env = dict(os.environ, HOME=str(tmp), **{ONLY_ENV: f"^{re.escape(CASE.label)}$"})

    def call(*args):
        return subprocess.run([sys.executable, "-m", "asv", *args, "--config", str(tmp / "asv.conf.json")],
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp)

    machine = call("machine", "--yes")
    assert machine.returncode == 0, machine.stdout + machine.stderr
    return call


def test_asv_check_passes(asv):
    proc = asv("check", "--python=same")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


def _value(output: str, benchmark: str) -> str:
    """The figure asv printed for ``benchmark`` on the selected case: the first table row after the benchmark's
    name whose cells are the case's parameters, then the value."""
    row = re.compile(r"^\s*" + r"\s+".join(map(re.escape, CASE.label.split("/"))) + r"\s+(\S+)\s*$")
    after = output.split(f"{benchmark} ", 1)[1]
    return next(m.group(1) for m in map(row.match, after.splitlines()) if m)


def test_quick_run_of_one_case_gives_time_and_drift(asv):
    proc = asv("run", "--python=same", "--quick", "--show-stderr", "--bench", BENCH_REGEX)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "failed" not in out, out
    # (Compile and CrossBackend have no numpy cases: numpy neither compiles nor is compared with itself.)
    for name in ("bench_training.TrainStep.time_train_step", "bench_drift.Drift.track_bits_lost",
                 "bench_drift.Drift.track_rel_l2", "bench_drift.Drift.track_flip_rate"):
        assert name in out, out
    assert re.fullmatch(r"[0-9.]+(±[0-9.]+)?[mμ]?s", _value(out, "TrainStep.time_train_step"))

    # Drift is deterministic on one machine: asv's figure is the report's figure, bit for bit (asv prints the
    # float's repr).
    (result,) = run([CASE.spec()]).results
    assert float(_value(out, "Drift.track_bits_lost")) == MAX_BITS - result.bits_of_agreement
    assert float(_value(out, "Drift.track_rel_l2")) == result.rel_l2
    assert float(_value(out, "Drift.track_flip_rate")) == result.flip_rate


def test_measure_gives_the_report_figures_and_the_cross_backend_distance():
    """setup_cache's figures for a non-numpy case: drift as precision.run reports it, and the distance to the
    numpy run of the same policy computed from the two runs' final params (numpy itself is not a case here,
    it runs as the counterpart)."""
    case = get_case("logreg:breast_cancer", "adam", "fp32", "jax")
    avail = backend_availability("jax", "cpu")
    if not avail.available:
        pytest.skip(f"the cross-backend figure needs a second backend: {avail.reason}")
    (figures,) = measure((case,)).values()
    (result,) = run([case.spec()]).results
    assert figures.status == "ok" and figures.fingerprint == result.fingerprint
    assert figures.bits_lost == MAX_BITS - result.bits_of_agreement and figures.rel_l2 == result.rel_l2
    ours = train(case.spec(), frozen_dataset(case.spec())).params[-1]
    theirs = train(case.numpy_counterpart().spec(), frozen_dataset(case.numpy_counterpart().spec())).params[-1]
    assert figures.cross_backend_rel_l2 == rel_l2(ours, theirs)
    # fp32 on both sides, 200 steps: each run is within the first-order bound 200 u (u = 2^-24) of the float64
    # reference (tests/bench/test_bench_training.py), so within 2 * 200 u of each other.
    assert figures.cross_backend_rel_l2 <= 2 * 200 * 2.0**-24


def test_a_diverged_or_failed_case_fails_its_track_and_an_unavailable_one_skips():
    """asv shows a returned NaN as a silent "n/a": a diverged run must raise instead (asv: failed), and a case that
    could not run here must raise NotImplementedError in setup (asv: skipped, with the reason)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_drift
    finally:
        sys.path.remove(str(ROOT))

    params = ("logreg:breast_cancer", "adam", "bf16", "numpy")
    label = get_case(*params).label
    diverged = {label: CaseFigures(label, "id", "diverged", diverged_at=3)}
    drift = bench_drift.Drift()
    drift.setup(diverged, *params)
    with pytest.raises(RuntimeError, match="diverged at step 3"):
        drift.track_bits_lost(diverged, *params)
    failed = {label: CaseFigures(label, "id", "error", "ZeroDivisionError: boom")}
    drift.setup(failed, *params)
    with pytest.raises(RuntimeError, match="error: ZeroDivisionError: boom"):
        drift.track_rel_l2(failed, *params)
    unavailable = {label: CaseFigures(label, "id", "unavailable", "backend 'x' is not installed")}
    with pytest.raises(NotImplementedError, match="not installed"):
        drift.setup(unavailable, *params)


def test_every_benchmark_has_a_regression_threshold():
    """``asv publish`` flags a figure above (1 + threshold) x the best earlier one, with 5% for a benchmark no
    regex of ``regressions_thresholds`` matches: on a shared machine that listed timing noise as 87 regressions.
    Every time_ and track_ benchmark gets its own threshold: deterministic figures (drift, bytes) a tight one,
    times a wide one (measured noise: docs/tracking.md)."""
    asv_util = pytest.importorskip("asv.util", reason="asv is not installed (pip install 'precision[bench]')")
    import importlib
    import inspect

    thresholds = asv_util.load_json(str(ROOT / "asv.conf.json"), js_comments=True)["regressions_thresholds"]
    sys.path.insert(0, str(ROOT))
    try:
        modules = [importlib.import_module(f"benchmarks.{path.stem}")
                   for path in sorted((ROOT / "benchmarks").glob("bench_*.py"))]
    finally:
        sys.path.remove(str(ROOT))
    seen = set()
    for module in modules:
        short = module.__name__.split(".", 1)[1]
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for name in dir(cls):
                if not name.startswith(("time_", "track_")):
                    continue
                entry = f"{short}.{cls_name}.{name}(x)"  # asv matches "name(params)" (with "@branch")
                matched = [float(t) for regex, t in thresholds.items() if re.match(regex, entry)]
                assert matched, f"{entry}: no regressions_thresholds entry (asv would use 5%)"
                threshold = max(matched)
                if name.startswith("time_") or name == "track_compile_s":
                    assert threshold >= 0.5, f"{entry}: {threshold} is inside this machine's timing noise"
                else:
                    assert threshold <= 0.01, f"{entry}: {threshold} hides a deterministic change"
                seen.add(name)
    assert {"time_train_step", "time_update", "track_compile_s", "track_bits_lost", "track_bytes_per_step"} <= seen
