"""The checkpoint of a run in progress: ``<report>.partial.jsonl`` beside the report, one finished result per line.

Each line is flushed and fsynced as its result finishes, so a killed run loses only the run that was in flight.
The file is append-only (a kill mid-line leaves at most one cut-off line, which reading skips; when a result id
appears twice the later line wins) and locked while its run is alive, so two runs never write the same report.
The final report write replaces it: ``remove()`` runs only after the report is safely on disk.

``precision run --resume`` reuses the "ok" and "diverged" results found in the report and in its checkpoint and
runs only the rest; an "error" or "unavailable" result is run again.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ._atomic import OutputError, check_file_target
from .errors import ReportError
from .report import Result, load_report

try:
    import fcntl
except ImportError:  # not on Windows: there the lock is skipped
    fcntl = None

__all__ = ["Checkpoint", "checkpoint_path", "read_checkpoint", "REUSABLE"]

SUFFIX = ".partial.jsonl"
REUSABLE = ("ok", "diverged")


def checkpoint_path(report_path: str | os.PathLike) -> Path:
    return Path(str(report_path) + SUFFIX)


def _parse(lines, where: str) -> list[Result]:
    results = []
    for n, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: its run is simply run again
        try:
            result = Result.from_dict(data)
            result.id  # noqa: B018 -- every use keys on it: a result without one is refused here, in one line
        except (KeyError, TypeError, AttributeError) as exc:
            raise ReportError(f"checkpoint {where!r} line {n} is not a precision result: {exc}") from None
        results.append(result)
    return results


def read_checkpoint(path: str | os.PathLike) -> list[Result]:
    """The results in a checkpoint file, in the order they finished; [] if there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ReportError(f"checkpoint {str(path)!r} cannot be read: {exc.strerror}") from None
    return _parse(text.splitlines(), str(path))


class Checkpoint:
    """An open, locked checkpoint for the report at ``report_path``.

    ``resume=False`` refuses a checkpoint that already holds results (they belong to an interrupted run the user
    may want to resume). ``resume=True`` sets ``found``: the results worth reusing, by id — the report's (if it
    exists) overridden by the checkpoint's, keeping only statuses in REUSABLE. ``results`` holds what this run
    appended.
    """

    def __init__(self, report_path: str | os.PathLike, resume: bool = False):
        self.path = checkpoint_path(report_path)
        self.results: dict[str, Result] = {}
        self.found: dict[str, Result] = {}
        _, report_stat = check_file_target(report_path, "--out")
        check_file_target(self.path, "checkpoint file")
        # Same permissions as the report it stands in for: a private report gets a private checkpoint.
        mode = stat.S_IMODE(report_stat.st_mode) if report_stat is not None else 0o666
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = os.path.lexists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, mode)
        self._file = os.fdopen(fd, "r+", encoding="utf-8")
        locked = False
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise OutputError(f"another precision run is writing {str(report_path)!r} (its checkpoint "
                                      f"{str(self.path)!r} is locked); wait for it or choose another --out") from None
            locked = True
            self._file.seek(0)
            text = self._file.read()
            previous = _parse(text.splitlines(), str(self.path))  # read under the lock: no writer is mid-line
            self._empty = not text
            if previous and not resume:
                raise OutputError(f"{str(self.path)!r} holds finished results of an interrupted run; rerun with "
                                  f"--resume to keep them, or delete it to start over")
            if resume:
                if os.path.lexists(report_path):
                    self.found.update(load_report(report_path).by_id())
                self.found.update((r.id, r) for r in previous)
                self.found = {k: r for k, r in self.found.items() if r.status in REUSABLE}
            if text and not text.endswith("\n"):
                self._file.write("\n")  # end the cut-off line, so the next result starts a line of its own
        except BaseException:
            if locked and not existed:  # made just now and refused (e.g. an unreadable report to resume): no litter
                os.unlink(self.path)
            self._file.close()
            raise

    def append(self, result: Result) -> None:
        """Record one finished result durably: one JSON line, flushed and fsynced."""
        # In memory first: a Ctrl-C during the write below must not leave it out of the interrupted run's report.
        self.results[result.id] = result
        self._file.write(json.dumps(result.to_dict(), sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def discard(self) -> None:
        """Delete the checkpoint if it never held a result (a run stopped before its first one); else keep it."""
        if self._empty and not self.results:
            self.remove()
        else:
            self.close()

    def close(self) -> None:
        """Release the lock, keeping the file (its results are not in a report yet)."""
        self._file.close()

    def remove(self) -> None:
        """Delete the checkpoint: call only once the report holding its results is written."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self.discard()
