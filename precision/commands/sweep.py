"""``precision sweep``: the grid of ``precision run`` on Dask distributed, one result file per run, then a report."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .._atomic import OutputError, check_file_target, check_folder_target
from ..errors import PrecisionError, SpecError
from ._options import positive_int
from .run import add_matrix_options, specs_from_args

DEFAULT_RESULTS = "results/sweep"

EXIT_CODES = """\
exit status:
  0    every run finished: ok, diverged (a result, not a failure), or unavailable on a device not asked for
  1    some run errored (a task that raised, or whose worker died: its message is in the report), a result or
       the report could not be written, or nothing ran (every run errored or was unavailable: an existing report
       at --out is then kept)
  2    bad input, found before any run: what `precision run` refuses, a grid larger than --max-runs, a results
       folder that already holds results of this grid without --resume, a folder another sweep is writing,
       Dask not installed, a --scheduler that cannot be reached
  130  interrupted (Ctrl-C or SIGTERM): the result files written so far stay, the report holds them; rerun
       with --resume to run the rest
"""

DESCRIPTION = """\
Runs the grid of `precision run` (the same matrix options) as tasks on Dask distributed: by default a local
cluster of one single-threaded worker process per core, each running one task at a time; --scheduler ADDRESS
uses a running cluster instead. Each result is written to its own file in --results as it finishes
(run-<hash>-<id>.json, a one-result report); at the end the report (--out) is merged from those files. A task
that raises or whose worker dies becomes an error result. A killed sweep loses only the runs in flight:
rerun it with --resume, which reuses the ok and diverged results in the folder and runs the rest (error and
unavailable results run again). Before starting, the number of runs and an estimated time are printed; grids
above --max-runs runs are refused. No noise floors, serving figures or calibration kernel (see docs/sweep.md).
"""


def add_parser(sub):
    p = sub.add_parser("sweep", help="run a matrix on Dask distributed (local cluster or --scheduler), one result "
                       "file per run, resumable", description=DESCRIPTION, epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_options(p)
    p.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                   help=f"folder of the result files (default {DEFAULT_RESULTS})")
    p.add_argument("--out", help="report JSON path (default DIR/report.json)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler (e.g. "
                   "tcp://10.0.0.5:8786); its workers need this version of precision installed (default: a local "
                   "cluster)")
    p.add_argument("--workers", metavar="N", help=f"worker processes of the local cluster, one thread each "
                   f"(default: the cores, {os.cpu_count()} here)")
    p.add_argument("--max-runs", default="1000", metavar="N", help="refuse a grid of more runs (default 1000)")
    p.add_argument("--resume", action="store_true", help="reuse the ok and diverged results already in DIR; run "
                   "only the other specs")
    p.add_argument("--force", action="store_true", help="run a grid over the size limits of `precision run` anyway")
    p.add_argument("--quiet", action="store_true", help="no estimate and no progress on stderr")
    p.set_defaults(handler=main)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Plain:
    """One line on stderr per finished result (stderr is not a terminal)."""

    def __init__(self, total: int, done: int, slots: int):
        self.total, self.done, self.in_flight, self.failed, self.slots = total, done, 0, 0, slots
        self.first_done, self.start = done, time.monotonic()

    @property
    def running(self) -> int:  # sent tasks beyond the workers' threads wait in the scheduler's queue
        return min(self.in_flight, self.slots)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def started(self, spec):
        self.in_flight += 1

    def finished(self, spec, result):
        from .._terminal import clip, safe_text
        self.in_flight -= 1
        self.done += 1
        self.failed += result.status == "error"
        ran = self.done - self.first_done
        left = (time.monotonic() - self.start) / ran * (self.total - self.done) if ran else 0.0
        _say(f"[{self.done}/{self.total}] {result.status:<11} {clip(safe_text(spec.id), 110)}  (running "
             f"{self.running}, failed {self.failed}, eta {_clock(left)})")


class _Rich(_Plain):
    """A rich progress bar on stderr: done / total, running, failed, elapsed, time remaining."""

    def __init__(self, total: int, done: int, slots: int):
        super().__init__(total, done, slots)
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("running {task.fields[running]}, failed {task.fields[failed]}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=Console(file=sys.stderr))
        self.task = self.progress.add_task("sweep", total=total, completed=done, running=0, failed=0)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def started(self, spec):
        self.in_flight += 1
        self.progress.update(self.task, running=self.running)

    def finished(self, spec, result):
        self.in_flight -= 1
        self.failed += result.status == "error"
        self.progress.update(self.task, advance=1, running=self.running, failed=self.failed)


class _Silent(_Plain):
    def finished(self, spec, result):
        pass


def _progress(quiet: bool, total: int, done: int, slots: int):
    if quiet:
        return _Silent(total, done, slots)
    if sys.stderr.isatty():
        try:
            return _Rich(total, done, slots)
        except ImportError:
            pass
    return _Plain(total, done, slots)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(args) -> int:
    from .. import sweep as lib
    from ..runner import validate

    lib._need_distributed()  # before anything: without Dask there is nothing to do (exit 2, one line)
    max_runs = positive_int("max-runs", args.max_runs)
    workers = positive_int("workers", args.workers) if args.workers is not None else None
    if workers is not None and args.scheduler:
        raise SpecError("--workers sets the local cluster's size; with --scheduler the cluster's own workers run "
                        "the tasks")
    specs = specs_from_args(args)
    if len(specs) > max_runs:
        raise SpecError(f"this grid has {len(specs)} runs, more than --max-runs {max_runs}; raise --max-runs to "
                        f"run it")
    specs = validate(specs, force=args.force, cli_names=True)
    results_dir = Path(args.results)
    out = Path(args.out) if args.out else results_dir / "report.json"
    check_folder_target(results_dir, "--results")
    check_file_target(out, "--out")

    with lib.SweepLock(results_dir):
        if not args.resume and (found := lib.existing(specs, results_dir)):
            raise OutputError(f"--results {str(results_dir)!r} already holds results of {len(found)} of these "
                              f"{len(specs)} runs; rerun with --resume to keep them, or choose another --results")
        todo = lib.plan(specs, results_dir, resume=args.resume)
        return _sweep(args, specs, todo, results_dir, out, workers)


def _sweep(args, specs, todo, results_dir: Path, out: Path, workers: int | None) -> int:
    from .. import sweep as lib
    from ..report import environment

    env = environment()
    reused = f"{len(todo.reused)} found in {str(results_dir)!r}, " if args.resume else ""
    client = cluster = None
    write_errors: list[str] = []
    try:
        if todo.todo:
            if args.scheduler:
                client = lib.connect(args.scheduler)
                workers = sum(client.nthreads().values())
                if not workers:
                    _say(f"precision sweep: the cluster at {args.scheduler} has no workers yet; the tasks wait for some")
                where = f"the cluster at {args.scheduler}"
            else:
                workers = workers or os.cpu_count() or 1
                where = "a local cluster"
            if not args.quiet:
                _say(f"precision sweep: {len(specs)} runs ({reused}{len(todo.todo)} to run) on {where}; "
                     f"{lib.estimate_seconds(todo.todo, workers).line()}")
            if client is None:
                cluster = lib.local_cluster(workers)
                from distributed import Client
                client = Client(cluster, set_as_default=False)

            def on_result(spec, result):
                try:
                    lib.write_result(results_dir, result, env)
                except (OSError, OutputError) as exc:
                    write_errors.append(f"{spec.id}: {exc}")
                progress.finished(spec, result)

            with _progress(args.quiet, len(specs), len(todo.reused), workers) as progress:
                lib.execute(client, todo.todo, on_result, on_start=progress.started)
        elif not args.quiet:
            _say(f"precision sweep: {len(specs)} runs ({reused}nothing to run)")
    except KeyboardInterrupt:
        _close(client, cluster)
        return _interrupted(specs, results_dir, out, env)
    finally:
        _close(client, cluster)
    return _finish(specs, results_dir, out, env, write_errors)


def _close(client, cluster) -> None:
    for thing in (client, cluster):
        if thing is not None:
            try:
                thing.close()
            except Exception:  # a cluster already gone (interrupted, scheduler lost): nothing left to close
                pass


def _interrupted(specs, results_dir: Path, out: Path, env) -> int:
    from .. import sweep as lib
    report = lib.merge(specs, results_dir, env=env)
    if not report.results:
        _say("precision sweep: interrupted before any run finished; nothing written")
        return 130
    try:
        report.save(out)
    except (OSError, OutputError) as exc:
        _say(f"precision sweep: interrupted; the report could not be written ({exc}); the results are in "
             f"{str(results_dir)!r}")
        return 130
    _say(f"precision sweep: interrupted; {len(report.results)} of {len(specs)} results in {str(results_dir)!r} "
         f"and the report {str(out)!r}; rerun with --resume to run the rest")
    return 130


def _finish(specs, results_dir: Path, out: Path, env, write_errors: list[str]) -> int:
    from .. import sweep as lib
    from ..table import format_report
    report = lib.merge(specs, results_dir, env=env)
    status = 0
    if write_errors:
        _say(f"precision sweep: error: {len(write_errors)} result file(s) could not be written; first: "
             f"{write_errors[0]}")
        status = 1
    statuses = [r.status for r in report.results]
    nothing_ran = bool(statuses) and not any(s in ("ok", "diverged") for s in statuses)
    if nothing_ran and out.exists():
        _say(f"precision sweep: error: nothing ran ({len(statuses)} error or unavailable); the existing report "
             f"{str(out)!r} was kept")
        return 1
    try:
        report.save(out)
    except (OSError, PrecisionError) as exc:
        _say(f"precision sweep: error: the report could not be written to {str(out)!r} ({exc}); the results are in "
             f"{str(results_dir)!r}: rerun with --resume to write it")
        return 1
    if "error" in statuses:
        _say(f"precision sweep: error: {statuses.count('error')} of {len(statuses)} runs failed; their messages are "
             f"in the report")
        status = 1
    elif nothing_ran:
        _say(f"precision sweep: error: no run could start ({len(statuses)} unavailable); the reasons are in the "
             f"report")
        status = 1
    print(format_report(report))
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "diverged", "unavailable", "error")
                        if statuses.count(s))
    print(f"\n{len(statuses)} runs ({summary}); results in {results_dir}; report written to {out}")
    return status
