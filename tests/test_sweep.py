"""``precision sweep`` on Dask distributed: the same results as ``precision run``, one result file per run, a killed
sweep resumed running only what was missing, failed and crashed tasks as error results, the --max-runs guard, and
a cluster started apart from the sweep (--scheduler)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from precision import cli  # noqa: E402
from precision import sweep as lib  # noqa: E402
from precision.matrix import build_specs  # noqa: E402
from precision.report import Result, load_report  # noqa: E402
from precision.runner import run, run_one  # noqa: E402

BIN = Path(sys.executable).parent
ENV = dict(os.environ, **lib.WORKER_ENV)


def grid_args(problems, policies, seeds, steps, optimizers="adam,sgd", record_every=2):
    return ["--problem", problems, "--optimizer", optimizers, "--policy", policies, "--seed", seeds,
            "--steps", str(steps), "--record-every", str(record_every), "--backend", "numpy"]


def grid_specs(problems, policies, seeds, steps, optimizers="adam,sgd", record_every=2):
    return build_specs(problems.split(","), optimizers.split(","), policies.split(","), backends=("numpy",),
                       seeds=[int(s) for s in seeds.split(",")], steps=steps, record_every=record_every)


def fingerprints(report):
    return {r.id: (r.status, r.fingerprint) for r in report.results}


def sweep_cli(*args, env=None, **kwargs):
    return subprocess.run([str(BIN / "precision"), "sweep", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=300, **kwargs)


def test_result_files_are_named_safely_and_resume_reuses_only_finished_results(tmp_path):
    (spec, other) = build_specs(["logreg"], ["adam"], ["p=bf16,c=bf16,a=fp32,s=fp32,m=fp32", "fp32"],
                                backends=("numpy",), steps=2)
    path = lib.result_path(tmp_path, spec)
    assert path.parent == tmp_path and path.name.startswith("run-") and path.suffix == ".json"
    assert "/" not in path.name[4:] and "," not in path.name and len(path.name) < 200
    assert path == lib.result_path(tmp_path, spec.id) != lib.result_path(tmp_path, other)
    lib.write_result(tmp_path, Result(spec=spec.to_dict(), status="error", message="boom"))
    lib.write_result(tmp_path, run_one(other))
    assert load_report(path).results[0].message == "boom"  # a one-result report, schema-valid
    plan = lib.plan([spec, other], tmp_path, resume=True)
    assert list(plan.reused) == [other.id] and plan.todo == (spec,) and plan.stale == (spec,)
    assert lib.plan([spec, other], tmp_path, resume=False).todo == (spec, other)
    assert lib.existing([spec, other], tmp_path) == [spec, other]


def test_sweep_of_120_specs_gives_the_fingerprints_of_run(tmp_path, capsys):
    args = grid_args("logreg,linreg", "fp64,fp32,fp16,bf16,bf16-mixed", "0,1,2,3,4,5", 4)
    specs = grid_specs("logreg,linreg", "fp64,fp32,fp16,bf16,bf16-mixed", "0,1,2,3,4,5", 4)
    assert len(specs) == 120
    start = time.perf_counter()
    status = cli.main(["sweep", *args, "--workers", "2", "--results", str(tmp_path / "res")])
    swept_s = time.perf_counter() - start
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "120 runs (120 to run) on a local cluster; estimated" in captured.err
    assert captured.err.count("[") >= 120  # a plain line per finished result (stderr is not a terminal)
    report = load_report(tmp_path / "res" / "report.json")
    assert [r.id for r in report.results] == [s.id for s in specs]
    assert len(lib.result_files(tmp_path / "res")) == 120
    start = time.perf_counter()
    expected = run(specs)
    run_s = time.perf_counter() - start
    assert fingerprints(report) == fingerprints(expected)
    print(f"sweep of 120 specs: {swept_s:.1f} s (2 workers, cluster start included); run: {run_s:.1f} s",
          file=sys.stderr)


def test_a_killed_sweep_resumes_with_only_the_unfinished_specs(tmp_path):
    grid = ("logreg,linreg", "fp32,bf16,fp16", "0,1,2,3", 400)
    args = grid_args(*grid, optimizers="adam", record_every=200)
    results = tmp_path / "res"
    proc = subprocess.Popen([str(BIN / "precision"), "sweep", *args, "--workers", "2", "--results", str(results),
                             "--quiet"], env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(lib.result_files(results)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its local cluster's worker processes
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    proc.stderr.close()
    before = {p.name: p.stat().st_mtime_ns for p in lib.result_files(results)}
    assert 3 <= len(before) < 24, len(before)
    assert not (results / "report.json").exists()

    again = sweep_cli(*args, "--workers", "2", "--results", str(results))
    assert again.returncode == 2 and "rerun with --resume" in again.stderr  # results there: not overwritten
    resumed = sweep_cli(*args, "--workers", "2", "--results", str(results), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"24 runs ({len(before)} found in {str(results)!r}, {24 - len(before)} to run)" in resumed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in lib.result_files(results) if p.name in before} == before
    assert len(lib.result_files(results)) == 24
    report = load_report(results / "report.json")
    assert fingerprints(report) == fingerprints(run(grid_specs(*grid, optimizers="adam", record_every=200)))


def test_a_task_that_raises_or_kills_its_worker_is_an_error_result(tmp_path):
    # A stand-in scikit-learn, seen by the sweep and its worker processes: load_breast_cancer raises, load_digits
    # kills the worker process running it. The synthetic runs still finish.
    package = tmp_path / "fake" / "sklearn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "datasets.py").write_text("import os\n\ndef load_breast_cancer():\n    raise OSError('unreadable "
                                         "(test)')\n\ndef load_digits():\n    os._exit(3)\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]))
    results = tmp_path / "res"
    proc = sweep_cli("--problem", "softmax", "--data", "synthetic,breast_cancer,digits", "--policy", "fp32",
                     "--seed", "0,1", "--steps", "4", "--record-every", "2", "--backend", "numpy", "--workers", "2",
                     "--results", str(results), env=env)
    assert proc.returncode == 1, proc.stderr
    assert "4 of 6 runs failed" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    by_data = {}
    for r in load_report(results / "report.json").results:
        by_data.setdefault(r.spec["data"], []).append(r)
    assert [r.status for r in by_data["synthetic"]] == ["ok", "ok"]
    assert all(r.status == "error" and "OSError: unreadable (test)" in r.message for r in by_data["breast_cancer"])
    assert all(r.status == "error" and "worker running it died" in r.message for r in by_data["digits"])
    # --resume runs the error results again, and only them.
    specs = build_specs(["softmax"], ["adam"], ["fp32"], backends=("numpy",),
                        data=("synthetic", "breast_cancer", "digits"), seeds=[0, 1], steps=4, record_every=2)
    plan = lib.plan(specs, results, resume=True)
    assert sorted(plan.reused) == sorted(s.id for s in specs if s.data == "synthetic") and len(plan.todo) == 4


def test_max_runs_refuses_a_larger_grid_in_one_line(tmp_path, capsys):
    status = cli.main(["sweep", *grid_args("logreg", "fp32,bf16", "0,1", 4), "--max-runs", "7",
                       "--results", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert status == 2
    assert err == ("precision sweep: error: this grid has 8 runs, more than --max-runs 7; raise --max-runs to run "
                   "it\n")
    assert not (tmp_path / "res").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client
    with Client(address, timeout=timeout, set_as_default=False) as client:
        client.wait_for_workers(n, timeout=timeout)


def test_sweep_on_a_cluster_started_apart(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, cwd=tmp_path)]
    try:
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--no-dashboard", "--local-directory", str(tmp_path / "w")], env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                      cwd=tmp_path))
        _wait_for_workers(address, 2)
        args = grid_args("logreg,linreg", "fp32,bf16,bf16-mixed", "0,1", 4)
        proc = sweep_cli(*args, "--scheduler", address, "--results", str(tmp_path / "res"))
        assert proc.returncode == 0, proc.stderr
        assert f"24 runs (24 to run) on the cluster at {address}; estimated" in proc.stderr
        report = load_report(tmp_path / "res" / "report.json")
        assert fingerprints(report) == fingerprints(run(grid_specs("logreg,linreg", "fp32,bf16,bf16-mixed", "0,1",
                                                                   4)))
        # the cluster stays up for others: the sweep only disconnected
        assert procs[0].poll() is None and procs[1].poll() is None
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_an_unreachable_scheduler_is_one_line_and_exit_2(tmp_path):
    env = dict(ENV, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="1s")  # how long the sweep tries to connect
    proc = sweep_cli(*grid_args("logreg", "fp32", "0", 4), "--scheduler", f"tcp://127.0.0.1:{_free_port()}",
                     "--results", str(tmp_path / "res"), env=env)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot be reached" in proc.stderr, proc.stderr
