"""Atomic file writes: a temp file in the target folder, then a rename, so a reader never sees half a file.

Safety rules, checked up front by the CLI (``check_file_target``, ``check_folder_target``) and again by
``write_atomic`` itself:

* Only a regular file is ever replaced. Symlinks are followed and the file they point to is written (the link
  stays a link); a directory, FIFO, device or socket is refused with ``OutputError``, because a rename over it
  would silently swap e.g. /dev/full for a regular file when run as root.
* A replaced file keeps its permission bits (a 0600 report stays 0600) and, where allowed, its owner; a new file
  gets 0666 & ~umask, like any file a shell redirect creates.
* Temp files are ``.<name>.<pid>.<8 hex>.tmp<suffix>`` beside the target. A SIGKILL can leave one behind; the next
  write of the same target removes those older than ``STALE_AFTER_S`` whose writer process is gone. The age test
  guards writers this host cannot see (another machine on a shared folder, another pid namespace).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Callable

from .errors import PrecisionError

__all__ = ["write_atomic", "check_file_target", "check_folder_target", "sweep_stale_temps", "OutputError",
           "STALE_AFTER_S"]

STALE_AFTER_S = 600.0


class OutputError(PrecisionError):
    """An output path that cannot be written: not a regular file, or in a folder that is missing or read-only."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _stat(path: Path, what: str, shown: str | os.PathLike) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink loop, a path through a regular file (ENOTDIR), no permission
        raise OutputError(f"{what} {str(shown)!r} cannot be used: {exc.strerror}") from None


def _check_parent(folder: Path, what: str, shown: str | os.PathLike) -> None:
    """``folder`` exists and is writable, or its nearest existing ancestor is a writable folder (so it can be made)."""
    probe = folder
    while True:
        st = _stat(probe, what, shown)
        if st is not None:
            break
        if probe.parent == probe:
            raise OutputError(f"{what} {str(shown)!r}: no existing folder above it")
        probe = probe.parent
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {str(shown)!r}: {str(probe)!r} is {_kind(st.st_mode)}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(shown)!r}: folder {str(probe)!r} is not writable")


def check_file_target(path: str | os.PathLike, what: str = "output file") -> tuple[Path, os.stat_result | None]:
    """The file that writing ``path`` would replace (symlinks followed) and its stat, None if it does not exist yet.

    Raises OutputError, naming ``what`` and the path, unless the target is absent or a regular file and its folder
    exists (or can be created) and is writable.
    """
    target = Path(os.path.realpath(path))
    st = _stat(target, what, path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{what} {str(path)!r} is {_kind(st.st_mode)}; give a path to a regular file or to one "
                          f"that does not exist yet")
    _check_parent(target.parent, what, path)
    return target, st


def check_folder_target(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Raises OutputError unless ``path`` is a writable folder or absent with a creatable, writable parent."""
    target = Path(os.path.realpath(path))
    st = _stat(target, what, path)
    if st is None:
        _check_parent(target.parent, what, path)
    elif not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {str(path)!r} is {_kind(st.st_mode)}; give a folder, or a path that does not "
                          f"exist yet")
    elif not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(path)!r} is not writable")
    return target


def _temp_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.(?P<pid>[0-9]+)\.[0-9a-f]{{8}}\.tmp{re.escape(target.suffix)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):
        return False
    return True


def sweep_stale_temps(path: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temp files of ``path`` left by killed writers: exact temp-name pattern, a pid that is no longer running
    (and not ours) and a modification time over ``older_than_s`` ago. Returns the paths removed; never raises."""
    target = Path(os.path.realpath(path))
    pattern = _temp_pattern(target)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        try:
            if (not entry.is_file(follow_symlinks=False) or pid == os.getpid() or _alive(pid)
                    or now - entry.stat(follow_symlinks=False).st_mtime < older_than_s):
                continue
            os.unlink(entry.path)
        except OSError:
            continue  # gone already, or not ours to remove: a sweep must never fail a write
        removed.append(Path(entry.path))
    return removed


def _create_temp(target: Path) -> str:
    while True:
        tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{target.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return str(tmp)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temp file beside ``path``, fsync it, then rename it over ``path``.

    Raises OutputError if ``path`` (after symlinks) exists and is not a regular file. Returns ``path``.
    """
    target, st = check_file_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output file {str(path)!r}: cannot create its folder: {exc.strerror}") from None
    sweep_stale_temps(target)
    tmp = _create_temp(target)
    try:
        write(tmp)
        if st is not None:
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                try:  # only root (or, for the group, a member) may; otherwise the new file is ours
                    os.chown(tmp, st.st_uid, st.st_gid)
                except OSError:
                    pass
            os.chmod(tmp, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # the temp was made private; results get the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # Checked again just before the rename: the path may have changed while ``write`` ran.
        check_file_target(path)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return Path(path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; a file system that cannot fsync a folder loses nothing here."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
