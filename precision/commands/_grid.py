"""Running a command's grid of specs: progress on the terminal, the report saved atomically (also what finished
before Ctrl-C), and the exit status the commands share (``precision ablate``, ``precision remedies``)."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["Progress", "say", "run_grid", "summary_line", "add_case_options", "add_run_options", "add_output_options"]


def add_case_options(p) -> None:
    """--problem, --data, --optimizer, --backend: the cases of a grid command (comma-separated lists)."""
    p.add_argument("--problem", help="linreg, logreg, softmax, mlp (comma-separated)")
    p.add_argument("--data", help="synthetic, breast_cancer, digits, diabetes, or a data file PATH.npz / "
                   "PATH.csv:COLUMN (comma-separated)")
    p.add_argument("--optimizer", default="adam", help="sgd, adam, adamw (comma-separated; default adam)")
    p.add_argument("--backend", default="numpy", help="numpy, numba, jax (comma-separated; default numpy)")


def add_run_options(p) -> None:
    """--steps, --seed, --batch-size, --lr, --record-every, --out: how each run of a grid command trains."""
    p.add_argument("--steps", default="200", help="training steps (default 200)")
    p.add_argument("--seed", default="0", help="data/init seed (default 0)")
    p.add_argument("--batch-size", default="128", help="minibatch size, or 'full' (default 128)")
    p.add_argument("--lr", help="learning rate (default: the optimizer's own)")
    p.add_argument("--record-every", default="20", help="record params every N steps (default 20)")
    p.add_argument("--out", help="also save the runs as a precision report (JSON, written atomically)")


def add_output_options(p) -> None:
    """--markdown, --force, --quiet."""
    p.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    p.add_argument("--force", action="store_true", help="run a grid over the size limits anyway")
    p.add_argument("--quiet", action="store_true", help="no progress display")


class Progress:
    """One updating line on a terminal; nothing when stderr is not a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, i, n, spec, result):
        if self.enabled:
            line = f"[{i}/{n}] {spec.id}  {result.status}"[:150]
            sys.stderr.write("\r\033[K" + line + ("\r\033[K" if i == n else ""))
            sys.stderr.flush()


def say(line: str) -> None:
    print(("\r\033[K" if sys.stderr.isatty() else "") + line, file=sys.stderr)


def run_grid(command: str, specs, out: Path | None, *, force: bool, quiet: bool):
    """Run ``specs`` (already validated; ``out`` already checked) and save the report to ``out``. Returns
    (report or None, exit status, whether the report was written); the report is None after an interrupt (status
    130, the finished results saved to ``out`` when there are any)."""
    from .._atomic import OutputError
    from ..report import Report, environment, now_utc
    from ..runner import run

    done = []
    try:
        report = run(specs, progress=Progress(sys.stderr.isatty() and not quiet), on_result=done.append, force=force)
    except KeyboardInterrupt:
        if out is None or not done:
            say(f"precision {command}: interrupted; nothing written")
            return None, 130, False
        try:
            Report(results=tuple(done), environment=environment(), created=now_utc()).save(out)
        except (OSError, OutputError) as exc:
            say(f"precision {command}: interrupted; the report could not be written ({exc})")
            return None, 130, False
        say(f"precision {command}: interrupted; {len(done)} of {len(specs)} results saved to {out}")
        return None, 130, True
    statuses = [r.status for r in report.results]
    nothing_ran = not any(s in ("ok", "diverged") for s in statuses)
    status, written = 0, False
    if out is not None:
        if nothing_ran and out.exists():
            say(f"precision {command}: error: nothing ran; the existing report {str(out)!r} was kept")
            status = 1
        else:
            try:
                report.save(out)
                written = True
            except (OSError, OutputError) as exc:
                say(f"precision {command}: error: the report could not be written to {str(out)!r} ({exc})")
                status = 1
    if "error" in statuses:
        say(f"precision {command}: error: {statuses.count('error')} of {len(statuses)} runs failed; their messages "
            f"are in the table{' and the report' if written else ''}")
        status = 1
    elif nothing_ran:
        status = 1
    return report, status, written


def summary_line(report, out: Path | None, written: bool) -> str:
    statuses = [r.status for r in report.results]
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "diverged", "unavailable", "error")
                        if statuses.count(s))
    where = f"; report written to {out}" if written else ""
    return f"\n{len(statuses)} runs ({summary}){where}"
