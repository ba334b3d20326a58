"""Sweeps on Dask distributed: the specs of a grid run as tasks on a cluster, one result file each.

The pieces, each usable alone (``precision sweep`` strings them together, docs/sweep.md):

* :func:`result_path` names a spec's result file: ``<DIR>/run-<16 hex of sha256(id)>-<id made safe, cut>.json``.
  The hash makes the name unique and fixed for the spec id; the readable part is for people listing the folder.
  Each file is a one-result report (``precision.report.Report``, schema-valid, ``precision show`` reads it),
  written atomically by the process that drives the sweep as soon as the result comes back.
* :func:`plan` splits a grid into the results found in the folder that can be reused and the specs to run.
  ``resume=True`` reuses "ok" and "diverged" results (``precision.checkpoint.REUSABLE``, as ``precision run
  --resume``); "error" and "unavailable" ones are run again, so is a file that cannot be read or holds another id.
* :func:`execute` runs specs on a ``distributed.Client``: at most as many tasks in flight as the cluster has
  threads, each task ``run_one(spec)`` in a worker with its BLAS/OpenMP pools limited to one thread. A task that
  raises, or whose worker dies, becomes a result with status "error"; nothing a task does stops the sweep.
* :func:`merge` reads the result files of a grid back into one report, in spec order.
* :func:`estimate_seconds` turns precision.matrix's work estimate into a rough wall-clock time.
* :func:`local_cluster` starts the default cluster: one single-threaded worker process per core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .checkpoint import REUSABLE
from .errors import PrecisionError, ReportError
from .matrix import estimate_grid
from .report import Report, Result, environment, load_report, now_utc
from .spec import RunSpec

__all__ = ["result_path", "result_files", "Plan", "plan", "execute", "merge", "write_result", "read_result",
           "estimate_seconds", "SweepEstimate", "local_cluster", "connect", "WORKER_ENV", "DEFAULT_MAX_RUNS",
           "SweepLock"]

DEFAULT_MAX_RUNS = 1000

# The environment of every worker process of the default cluster: one thread for every BLAS/OpenMP pool (threads
# change summation order, so results, and they disturb each other's timings). Tasks also limit the pools with
# threadpoolctl, which covers the workers of a cluster started elsewhere (--scheduler).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}

_PREFIX = "run-"
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
_SAFE_LEN = 100  # readable part of the name; with the prefix and hash the name stays far below 255 bytes


# ---- naming and files ---------------------------------------------------------------------------------------------

def result_path(results_dir: str | os.PathLike, spec: RunSpec | str) -> Path:
    """The result file of a spec (or spec id) in ``results_dir``."""
    spec_id = spec if isinstance(spec, str) else spec.id
    digest = hashlib.sha256(spec_id.encode("utf-8")).hexdigest()[:16]
    readable = _SAFE_CHARS.sub("_", spec_id).strip("._")[:_SAFE_LEN]
    return Path(results_dir) / f"{_PREFIX}{digest}-{readable}.json"


def result_files(results_dir: str | os.PathLike) -> list[Path]:
    """Every result file in ``results_dir`` (temp files of an unfinished write are not)."""
    folder = Path(results_dir)
    return sorted(folder.glob(f"{_PREFIX}*.json")) if folder.is_dir() else []


def write_result(results_dir: str | os.PathLike, result: Result, env: dict | None = None) -> Path:
    """Write one result as a one-result report, atomically (a reader sees no file or the whole file)."""
    report = Report(results=(result,), environment=env if env is not None else environment(), created=now_utc())
    return report.save(result_path(results_dir, result.id))


def read_result(results_dir: str | os.PathLike, spec: RunSpec) -> Result | None:
    """The result stored for ``spec``; None when there is none, or the file is unreadable or holds another id."""
    path = result_path(results_dir, spec)
    if not path.is_file():
        return None
    try:
        results = load_report(path).results
    except (ReportError, OSError, ValueError):
        return None
    if len(results) != 1 or results[0].id != spec.id:
        return None
    return results[0]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a sweep has to do: ``reused`` results by spec id (found in the folder), ``todo`` the specs to run,
    ``stale`` the specs of the grid whose file exists but is not reused (an error or unavailable result, an
    unreadable file)."""
    specs: tuple[RunSpec, ...]
    reused: Mapping[str, Result]
    todo: tuple[RunSpec, ...]
    stale: tuple[RunSpec, ...] = ()


def plan(specs: Iterable[RunSpec], results_dir: str | os.PathLike, *, resume: bool) -> Plan:
    """Which specs to run. Without ``resume`` every spec runs (the caller refuses a folder that already holds
    results of the grid: :func:`existing`). With it, an "ok" or "diverged" result stored for the spec is reused."""
    specs = tuple(specs)
    reused, todo, stale = {}, [], []
    for spec in specs:
        found = read_result(results_dir, spec) if resume else None
        if found is not None and found.status in REUSABLE:
            reused[spec.id] = found
        else:
            todo.append(spec)
            if resume and result_path(results_dir, spec).exists():
                stale.append(spec)
    return Plan(specs=specs, reused=reused, todo=tuple(todo), stale=tuple(stale))


def existing(specs: Iterable[RunSpec], results_dir: str | os.PathLike) -> list[RunSpec]:
    """The specs of the grid that already have a result file in ``results_dir``."""
    return [s for s in specs if result_path(results_dir, s).exists()]


def merge(specs: Iterable[RunSpec], results_dir: str | os.PathLike, *, env: dict | None = None) -> Report:
    """One report of the grid's results read from their files, in spec order; specs without a readable result are
    left out (the caller knows which ran)."""
    results = [r for r in (read_result(results_dir, s) for s in specs) if r is not None]
    return Report(results=tuple(results), environment=env if env is not None else environment(), created=now_utc())


class SweepLock:
    """An exclusive lock on a results folder (``.sweep.lock`` in it), so two sweeps never write the same files."""

    def __init__(self, results_dir: str | os.PathLike):
        from ._atomic import OutputError
        self.path = Path(results_dir) / ".sweep.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl
        except ImportError:  # not on Windows: there the lock is skipped
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise OutputError(f"another precision sweep is writing {str(results_dir)!r} (its lock {str(self.path)!r} "
                              f"is held); wait for it or choose another --results") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ---- the estimate -------------------------------------------------------------------------------------------------

# Rough numpy costs on one core, measured with `precision run` of tiny grids on a 2-core x86 machine: ~10 ms per
# run besides its steps (dataset, drift, audit, result), ~100 us per step of a small model (Python and ufunc
# overhead dominate), and the arithmetic itself at 1e12 multiply-adds an hour, the figure behind
# precision.matrix.WORK_LIMIT. numba and JAX steps are faster once compiled; their compiling is not counted.
RUN_OVERHEAD_S = 0.01
STEP_S = 1e-4
MACS_PER_S = 1e12 / 3600


@dataclasses.dataclass(frozen=True)
class SweepEstimate:
    runs: int  # specs to run
    trainings: int  # with their float64 references (precision.matrix.estimate_grid)
    steps: int
    work: int
    workers: int
    seconds: float

    def line(self) -> str:
        return (f"estimated {_duration(self.seconds)} on {self.workers} worker{'s' if self.workers != 1 else ''} "
                f"({self.trainings} trainings with the float64 references, {self.steps:.3g} steps, {self.work:.3g} "
                f"multiply-adds; at {RUN_OVERHEAD_S * 1e3:.0f} ms per training, {STEP_S * 1e6:.0f} us per step and "
                f"{MACS_PER_S:.2g} multiply-adds/s per worker, numpy)")


def estimate_seconds(specs: Iterable[RunSpec], workers: int) -> SweepEstimate:
    """Wall-clock estimate of running ``specs`` on ``workers`` single-threaded workers, from the suite's work
    estimate (precision.matrix.estimate_grid: trainings, steps and multiply-adds, references included) and the
    per-training, per-step and per-multiply-add costs above, divided over the workers."""
    specs = list(specs)
    workers = max(1, int(workers))
    if not specs:
        return SweepEstimate(0, 0, 0, 0, workers, 0.0)
    est = estimate_grid(specs)
    seconds = (est.runs * RUN_OVERHEAD_S + est.steps * STEP_S + est.work / MACS_PER_S) / min(workers, len(specs))
    return SweepEstimate(len(specs), est.runs, est.steps, est.work, workers, seconds)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{max(seconds, 1)} s"
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d} min"


# ---- the cluster --------------------------------------------------------------------------------------------------

def _need_distributed():
    try:
        import distributed
    except ImportError:
        raise PrecisionError("precision sweep needs Dask distributed: pip install 'precision[sweep]'") from None
    return distributed


def local_cluster(workers: int | None = None):
    """A LocalCluster of ``workers`` (default: the cores) worker processes, one thread each, one task at a time;
    BLAS/OpenMP pools at one thread (WORKER_ENV); no dashboard; a task whose worker dies is not retried."""
    distributed = _need_distributed()
    import dask
    import logging
    workers = workers or os.cpu_count() or 1
    # worker-saturation 1.0: a worker holds exactly as many tasks as threads, so a worker that dies takes only the
    # task it was running; allowed-failures 0: that task is an error result at once (--resume runs it again).
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0,
                          "distributed.scheduler.allowed-failures": 0}):
        return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.CRITICAL, env=dict(WORKER_ENV))


def connect(address: str, timeout: float | None = None):
    """A Client of the scheduler at ``address``; a PrecisionError (one line) when it cannot be reached within
    ``timeout`` seconds (default: Dask's ``distributed.comm.timeouts.connect``, 30 s unless configured, e.g. by
    DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s)."""
    distributed = _need_distributed()
    try:
        kwargs = {} if timeout is None else {"timeout": timeout}
        return distributed.Client(address, set_as_default=False, **kwargs)
    except (OSError, TimeoutError, ValueError) as exc:
        raise PrecisionError(f"--scheduler {address!r} cannot be reached: {exc}") from None


# ---- the tasks ----------------------------------------------------------------------------------------------------

_WORKER_CACHE = None  # datasets and float64 references of this worker process, reused by its next tasks
_CACHE_ITEMS = 32  # dropped whole past this many entries, so a long sweep's worker does not grow without bound


def run_task(spec: RunSpec) -> Result:
    """One spec in a worker: ``precision.runner.run_one`` with one BLAS/OpenMP thread, never raising for the run's
    own failures. Datasets and references are cached per worker process (the same values the run would make)."""
    global _WORKER_CACHE
    from threadpoolctl import threadpool_limits
    from .runner import _Cache, run_one
    if _WORKER_CACHE is None or len(_WORKER_CACHE.datasets) + len(_WORKER_CACHE.references) > _CACHE_ITEMS:
        _WORKER_CACHE = _Cache()
    with threadpool_limits(limits=1):
        return run_one(spec, _WORKER_CACHE)


def _failed(spec: RunSpec, exc: BaseException | None) -> Result:
    """The error result of a task that did not return one."""
    name = type(exc).__name__ if exc is not None else "unknown"
    if name == "KilledWorker":
        message = f"the worker running it died (killed, crashed or out of memory): {exc}"
    elif exc is None:
        message = "the task failed without an exception (cancelled, or the scheduler lost it)"
    else:
        message = f"task failed: {name}: {exc}"
    return Result(spec=spec.to_dict(), status="error", message=message)


def execute(client, specs: Iterable[RunSpec], on_result: Callable[[RunSpec, Result], None], *,
            on_start: Callable[[RunSpec], None] | None = None, task: Callable[[RunSpec], Result] = run_task,
            prefetch: int = 2) -> None:
    """Run ``specs`` on ``client``'s cluster and call ``on_result(spec, result)`` in this process as each comes
    back (in the order they finish). At most ``prefetch`` times as many tasks as the cluster has threads are
    submitted at once (the count is read again every second, so workers that join are used): the scheduler hands
    a worker a task when one of its threads is free, the rest wait in its queue, so workers do not idle while
    this process writes a result, and a killed sweep has few tasks in flight. Never raises for a task's
    failure: a task that raised, was lost or whose worker died is an "error" result."""
    distributed = _need_distributed()
    pending = list(specs)[::-1]  # popped from the end: spec order
    in_flight: dict = {}
    done = distributed.as_completed(loop=client.loop, with_results=True, raise_errors=False)
    threads = {"n": 1, "at": -1.0}

    def window() -> int:
        now = time.monotonic()
        if now - threads["at"] >= 1.0:
            try:
                threads["n"] = max(1, sum(client.nthreads().values()))
            except Exception:  # the scheduler is busy or gone: keep the last count
                pass
            threads["at"] = now
        return prefetch * threads["n"]

    def fill():
        room = window() - len(in_flight)
        while pending and room > 0:
            spec = pending.pop()
            future = client.submit(task, spec, key=f"precision-run-{uuid.uuid4().hex}", pure=False)
            in_flight[future.key] = (future, spec)
            done.add(future)
            if on_start is not None:
                on_start(spec)
            room -= 1

    try:
        fill()
        for future, value in done:
            _, spec = in_flight.pop(future.key)
            if future.status == "finished":
                result = value
                if not isinstance(result, Result) or result.id != spec.id:
                    result = _failed(spec, TypeError(f"the task returned {type(result).__name__}, not its result"))
            else:
                exc = value[1] if isinstance(value, tuple) and len(value) == 3 else value
                result = _failed(spec, exc if isinstance(exc, BaseException) else None)
            future.release()
            on_result(spec, result)
            fill()
    finally:
        for future, _ in in_flight.values():
            future.cancel()
