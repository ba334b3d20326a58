"""Output safety of ``precision run`` (issue 9): bad output paths refused before training, files kept as they were,
exit statuses as documented in docs/cli.md, signals and closed pipes without tracebacks, results checkpointed as
they finish and resumable. Every CLI case runs the real command in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import precision
from precision._atomic import OutputError, STALE_AFTER_S, sweep_stale_temps, write_atomic
from precision.errors import SpecError

FAST = ["run", "--problem", "logreg", "--backend", "numpy", "--steps", "20", "--policy", "fp32", "--quiet"]
CLI = [sys.executable, "-m", "precision.cli"]


def cli(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kw)


def seeds(n: int) -> str:
    return ",".join(map(str, range(n)))


def assert_one_line(proc, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temp and checkpoint files: what a run must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".partial.jsonl"))


def wait_for_lines(path: Path, proc, n: int = 1, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before its checkpoint had {n} lines"
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} lines")


def results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


# ---- bad outputs: refused before training, in one line, exit 2, nothing touched ------------------------------

def test_out_that_is_a_directory_is_refused_before_training(tmp_path):
    folder = tmp_path / "report.json"
    folder.mkdir()
    proc = cli(*FAST, "--out", str(folder))
    assert_one_line(proc, 2, "--out", str(folder), "is a directory")
    assert list(folder.iterdir()) == [] and leftovers(tmp_path) == []
    assert proc.stdout == ""  # no table: nothing was trained


def test_out_that_is_a_fifo_stays_a_fifo(tmp_path):
    # The stand-in for /dev/full: a file that is not a regular one, which a rename would silently replace.
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    proc = cli(*FAST, "--out", str(fifo))
    assert_one_line(proc, 2, "--out", "named pipe (FIFO)", "regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


def test_save_params_that_is_a_file_is_refused_and_kept(tmp_path):
    params = tmp_path / "params"
    params.write_text("keep me")
    proc = cli(*FAST, "--out", str(tmp_path / "r.json"), "--save-params", str(params))
    assert_one_line(proc, 2, "--save-params", str(params), "is a regular file", "give a folder")
    assert params.read_text() == "keep me"
    assert not (tmp_path / "r.json").exists() and leftovers(tmp_path) == []


def test_backend_named_but_unusable_is_bad_input(tmp_path):
    # numpy never runs on a GPU: asked for by name, that is an error up front, not a report of "unavailable" rows.
    proc = cli(*FAST, "--device", "gpu", "--out", str(tmp_path / "r.json"))
    assert_one_line(proc, 2, "--backend numpy cannot run on gpu", "CPU only")
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_fails_before_training(tmp_path):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib (shadowed by the test)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    proc = cli(*FAST, "--plot", "--out", str(tmp_path / "r.json"), env=env)
    assert_one_line(proc, 2, "--plot needs matplotlib", "pip install")
    assert not (tmp_path / "r.json").exists()


# ---- files written keep what they were -------------------------------------------------------------------------

def test_existing_private_report_stays_private(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    out.chmod(0o600)
    proc = cli(*FAST, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [r["status"] for r in results(out)] == ["ok"]
    assert leftovers(tmp_path) == []


def test_write_atomic_refuses_non_regular_files_and_keeps_modes(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="named pipe"):
        write_atomic(fifo, lambda tmp: Path(tmp).write_text("x"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # A symlink is followed: its target is replaced, keeping its mode, and the link stays a link.
    target = tmp_path / "target.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomic(link, lambda tmp: Path(tmp).write_text("new"))
    assert link.is_symlink() and target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    # A new file gets 0666 & ~umask.
    mask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "new.json", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json", "new.json", "target.json"]


def test_stale_temp_sweep_removes_only_dead_old_exact_matches(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - STALE_AFTER_S - 60
    names = {
        f".r.json.{dead.pid}.0123abcd.tmp.json": True,        # dead writer, old: swept
        f".r.json.{dead.pid}.89abcdef.tmp.json": False,       # dead writer, but recent: kept
        f".r.json.{os.getppid()}.0123abcd.tmp.json": False,   # live writer: kept
        f".r.json.{dead.pid}.0123abcd.tmp.json.bak": False,   # not the exact pattern: kept
        f".other.json.{dead.pid}.0123abcd.tmp.json": False,   # another target's temp: kept
    }
    for name, stale in names.items():
        (tmp_path / name).write_text("partial")
        if "89abcdef" not in name:
            os.utime(tmp_path / name, (old, old))
    removed = sweep_stale_temps(tmp_path / "r.json")
    assert [p.name for p in removed] == [n for n, stale in names.items() if stale]
    assert {p.name for p in tmp_path.iterdir()} == {n for n, stale in names.items() if not stale}


# ---- exit statuses -----------------------------------------------------------------------------------------------

def test_every_spec_erroring_exits_1_with_the_report_written(tmp_path, broken_sklearn):
    # A run-time failure the checks before training cannot see: a stand-in scikit-learn whose load_breast_cancer
    # cannot read its file. (logreg on digits, the old example, is bad input now: exit 2.) No report existed, so
    # the one written holds the error messages.
    env = broken_sklearn("load_breast_cancer", "unreadable (test)")
    out = tmp_path / "r.json"
    proc = cli(*FAST, "--data", "breast_cancer", "--seed", "0,1", "--out", str(out), env=env)
    assert_one_line(proc, 1, "2 of 2 runs failed")
    assert [r["status"] for r in results(out)] == ["error", "error"]
    assert leftovers(tmp_path) == []


def test_python_api_checks_every_spec_before_running(monkeypatch):
    with pytest.raises(SpecError, match=r"unknown backend 'torch'; valid choices: numpy, numba, jax"):
        precision.RunSpec("logreg", precision.make_optimizer("adam"), precision.get_policy("fp32"), backend="torch")
    good = precision.build_specs(["logreg"], ["adam"], ["fp32"], steps=5)[0]
    ran = []
    monkeypatch.setattr(precision.runner, "run_one", lambda spec, *a, **k: ran.append(spec))
    with pytest.raises(SpecError, match=r"2 bad spec\(s\), nothing was run: #1 is a dict.*#2 repeats id"):
        precision.run([good, {"problem": "logreg"}, good])
    assert ran == []


# ---- signals, pipes, checkpoints --------------------------------------------------------------------------------

def test_sigterm_mid_run_saves_the_finished_results(tmp_path):
    out = tmp_path / "r.json"
    sidecar = tmp_path / "r.json.partial.jsonl"
    proc = subprocess.Popen([*CLI, *FAST, "--seed", seeds(2000), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(sidecar, proc)
        seen = [json.loads(line) for line in sidecar.read_text().splitlines()]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    done = assert_one_line(subprocess.CompletedProcess([], proc.returncode, stdout, stderr), 130, "interrupted",
                           str(out), "--resume")
    saved = results(out)
    assert f"{len(saved)} of 2000 results saved" in done
    assert len(seen) <= len(saved) < 2000
    assert saved[:len(seen)] == seen  # in spec order, exactly what was checkpointed
    assert [r["spec"]["seed"] for r in saved] == list(range(len(saved)))
    assert leftovers(tmp_path) == []  # checkpoint replaced by the report; no temp file left


def test_sigkill_keeps_the_checkpoint_and_resume_completes_it(tmp_path):
    out = tmp_path / "r.json"
    sidecar = tmp_path / "r.json.partial.jsonl"
    args = [*FAST, "--seed", seeds(300), "--out", str(out)]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(sidecar, proc)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpointed = {r["spec"]["id"]: r for r in map(json.loads, sidecar.read_text().splitlines())}
    assert checkpointed and all(r["status"] == "ok" for r in checkpointed.values())
    # What a SIGKILL during a report write leaves: the killed writer's old temp file. The next write sweeps it.
    stale = tmp_path / f".r.json.{proc.pid}.0123abcd.tmp.json"
    stale.write_text("{partial")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))

    again = cli(*args)  # without --resume the checkpoint is not overwritten
    assert_one_line(again, 2, str(sidecar), "--resume")
    assert {r["spec"]["id"] for r in map(json.loads, sidecar.read_text().splitlines())} == set(checkpointed)

    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = results(out)
    assert [r["spec"]["seed"] for r in final] == list(range(300))
    assert all(r["status"] == "ok" for r in final)
    by_id = {r["spec"]["id"]: r for r in final}
    assert all(by_id[i] == r for i, r in checkpointed.items())  # the finished ones reused as they were
    assert leftovers(tmp_path) == []  # checkpoint removed, stale temp swept


def test_stdout_closed_early_is_quiet_and_keeps_the_report(tmp_path):
    # `precision run ... | head -1` with head already gone: the reading end is closed before anything is written.
    out = tmp_path / "r.json"
    proc = subprocess.Popen([*CLI, *FAST, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    with proc.stderr:
        stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 141, stderr
    assert stderr == ""
    assert [r["status"] for r in results(out)] == ["ok"]


def test_ctrl_c_while_a_framework_imports_is_one_line(tmp_path):
    # A stand-in jax whose import blocks, like the real one taking seconds: Ctrl-C lands inside that import.
    shadow = tmp_path / "shadow" / "jax"
    shadow.mkdir(parents=True)
    marker = tmp_path / "importing"
    (shadow / "__init__.py").write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n"
                                        "time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "r.json"
    # Python's Ctrl-C handler installed first in the child: a parent that ignores SIGINT (pytest-xdist's workers do)
    # passes SIG_IGN on, and Python then installs no KeyboardInterrupt handler at all, unlike under a terminal. (Not
    # preexec_fn: forking with it runs the parent's at-fork hooks, and JAX's warns, in this multithreaded process.)
    interactive = [sys.executable, "-c",
                   "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
                   " runpy.run_module('precision.cli', run_name='__main__', alter_sys=True)"]
    proc = subprocess.Popen([*interactive, *FAST[:3], "--backend", "jax", "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert_one_line(subprocess.CompletedProcess([], proc.returncode, stdout, stderr), 130, "interrupted")
    assert not out.exists()
