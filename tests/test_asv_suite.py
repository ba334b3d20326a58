"""The asv suite stays runnable: ``asv check`` passes, and a quick run of one case in this environment
(``--python=same``) completes with a time and drift figures, the drift equal to what ``precision run`` reports.
It stays sized for a run per commit (docs/tracking.md, "Per-commit cost"): forked processes, one per case, a
bounded count of them, the drift grid run once, and every benchmark with its regression threshold.

asv writes a machine file under $HOME and results/benchmarks.json under results_dir even with --python=same, so
both point into a temporary folder through a copy of asv.conf.json; the repository is left untouched.
"""

from __future__ import annotations

import importlib.util
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
                seen.add(entry)
    assert {"time_train_step", "time_update", "track_compile_s", "track_bits_lost", "track_bytes_per_step"} <= {
        entry.split(".")[-1].split("(")[0] for entry in seen}
    # and no entry is left over from a renamed or removed benchmark (it would silently match nothing)
    for regex in thresholds:
        assert any(re.match(regex, entry) for entry in seen), f"regressions_thresholds {regex!r} matches no benchmark"


def _suite():
    """The benchmark modules, imported from the repository (benchmarks/ is not an installed package)."""
    import importlib
    sys.path.insert(0, str(ROOT))
    try:
        return {path.stem: importlib.import_module(f"benchmarks.{path.stem}")
                for path in sorted((ROOT / "benchmarks").glob("bench_*.py"))}
    finally:
        sys.path.remove(str(ROOT))


def _benchmarks(modules):
    """(module stem, class, method name) of every time_ / track_ benchmark."""
    import inspect
    for stem, module in modules.items():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                for name in dir(cls):
                    if name.startswith(("time_", "track_")):
                        yield stem, cls, name


# Processes asv starts for one commit: one per benchmark and parameter combination (x rounds for time_). The suite
# had 1,012 (asv's default 2 rounds, the whole kernel grid, every peer); docs/tracking.md ("Per-commit cost") has
# what that cost and what was trimmed. Raise this only together with a new per-commit measurement there.
MAX_PROCESSES_PER_COMMIT = 450
MAX_SECONDS_PER_TIME_CASE = 2.0  # repeat's time budget: asv stops sampling after it (once it has the minimum)


def test_the_suite_is_sized_for_a_run_per_commit():
    """A commit's run stays within minutes on 2 cores: asv forks every benchmark process from one server that has
    imported the suite, time_ benchmarks run one process each with a bounded sampling budget, and the total count
    of processes stays under MAX_PROCESSES_PER_COMMIT."""
    import itertools
    asv_util = pytest.importorskip("asv.util", reason="asv is not installed (pip install 'precision[bench]')")
    conf = asv_util.load_json(str(ROOT / "asv.conf.json"), js_comments=True)
    assert conf.get("launch_method") == "forkserver"
    processes = 0
    for stem, cls, name in _benchmarks(_suite()):
        combos = len(list(itertools.product(*getattr(cls, "params", [[None]]))))
        if name.startswith("time_"):
            assert getattr(cls, "rounds", 2) == 1, f"{stem}.{cls.__name__}: rounds must be 1 (asv's default is 2)"
            assert getattr(cls, "warmup_time", -1) == 0, f"{stem}.{cls.__name__}: setup warms up, asv need not"
            low, high, budget = cls.repeat
            assert 3 <= low <= high and budget <= MAX_SECONDS_PER_TIME_CASE, f"{stem}.{cls.__name__}.repeat"
        processes += combos
    assert processes <= MAX_PROCESSES_PER_COMMIT, f"{processes} benchmark processes per commit"


def test_drift_runs_the_grid_once_and_every_track_reads_it():
    """Drift and CrossBackend share one setup_cache (asv keys the cache on the function: one run of the grid per
    commit), and the tracks only read it: a setup with the cache's figures and no backend call."""
    bench_drift = _suite()["bench_drift"]
    assert bench_drift.CrossBackend.setup_cache is bench_drift.Drift.setup_cache
    params = ("mlp:digits", "adam", "bf16-mixed", "numba")
    label = get_case(*params).label
    figures = {label: CaseFigures(label, "id", "ok", bits_lost=9.5, rel_l2=1e-3, flip_rate=0.0,
                                  cross_backend_rel_l2=2e-4)}
    drift, cross = bench_drift.Drift(), bench_drift.CrossBackend()
    drift.setup(figures, *params)
    cross.setup(figures, *params)
    assert (drift.track_bits_lost(figures, *params), drift.track_rel_l2(figures, *params),
            drift.track_flip_rate(figures, *params), cross.track_cross_backend_rel_l2(figures, *params)) == (
        9.5, 1e-3, 0.0, 2e-4)


def test_traffic_covers_the_timed_sizes_and_numpy_16_bit_skips_at_1e7():
    """Bytes per step are tracked once per (optimizer, storage, N) for every N a kernel is timed at; numpy's
    software 16-bit in-place steps (seconds each at 1e7) are timed at the smaller size only, and skip at once
    (no buffers built) at the larger one."""
    from precision.kernels import bytes_per_step

    suite = _suite()
    common, kernels = sys.modules["benchmarks.common"], suite["bench_kernels"]
    assert set(common.UPDATE_SIZES) | set(common.INPLACE_SIZES) <= set(common.TRAFFIC_SIZES)
    assert kernels.UpdateStep.params[-1] == list(common.UPDATE_SIZES)
    assert kernels.InplaceUpdateStep.params[-1] == list(common.INPLACE_SIZES)
    assert kernels.Traffic().track_bytes_per_step("adam", "bf16", 10**6) == bytes_per_step("adam", "bf16", 10**6)
    for storage in ("fp16", "bf16", "torch-bf16"):
        with pytest.raises(NotImplementedError, match="precision bench"):
            kernels.InplaceUpdateStep().setup("numpy", storage, max(common.INPLACE_SIZES))


def test_the_fork_server_preimports_the_frameworks_without_starting_them():
    """In asv's fork server (argv[1] == "run_server") benchmarks/common.py imports sklearn.datasets, numba and jax,
    with no Python thread and no jax backend started (forking is safe); imported any other way it imports none."""
    pytest.importorskip("jax", reason="jax is not installed")
    probe = ("import sys, threading\n"
             "sys.argv[1:] = {argv!r}\n"
             "import benchmarks.bench_training, benchmarks.bench_kernels, benchmarks.bench_drift\n"
             "imported = [name in sys.modules for name in ('jax', 'numba', 'sklearn.datasets')]\n"
             "threads = threading.active_count()\n"
             "from jax._src import xla_bridge\n"
             "print(*imported, threads, len(xla_bridge._backends))\n")
    numba, sklearn = (str(importlib.util.find_spec(name) is not None) for name in ("numba", "sklearn"))
    for argv, expected in ((["run_server", "benchmarks", "socket"], f"True {numba} {sklearn} 1 0"),
                           ([], "False False False 1 0")):
        proc = subprocess.run([sys.executable, "-c", probe.format(argv=argv)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == expected.split(), (argv, proc.stdout, proc.stderr)


def test_compile_compiles_and_the_other_jax_cases_share_the_persistent_cache(tmp_path):
    """``Compile`` turns jax's persistent compilation cache off (its figure is a real compile); the drift grid and
    ``TrainStep`` use the one folder (``PRECISION_ASV_JAX_CACHE``), so the warm-ups load what the grid compiled.
    In a child process: the setting is per process and this one runs jax in other tests."""
    pytest.importorskip("jax", reason="jax is not installed")
    probe = ("import sys, jax\n"
             "from benchmarks import bench_training\n"
             "case = ('logreg:breast_cancer', 'sgd', 'fp32', 'jax')\n"
             "getattr(bench_training, sys.argv[1])().setup(*case)\n"
             "print(jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)\n")
    env = dict(os.environ, PRECISION_ASV_JAX_CACHE=str(tmp_path), **{ONLY_ENV: ""})
    outputs = {}
    for cls in ("Compile", "TrainStep"):
        proc = subprocess.run([sys.executable, "-c", probe, cls], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs[cls] = proc.stdout.split()
    assert outputs["Compile"] == ["False", "None"]
    assert outputs["TrainStep"] == ["True", str(tmp_path)]
    assert any(tmp_path.iterdir()), "the TrainStep warm-up wrote no executable to the cache"
