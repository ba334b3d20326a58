"""Running a command's grid of specs: progress on the terminal, the report saved atomically (also what finished
before Ctrl-C), and the exit status the commands share (``precision ablate``, ``precision remedies``)."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["Progress", "say", "run_grid", "summary_line"]


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
