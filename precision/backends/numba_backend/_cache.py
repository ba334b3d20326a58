"""Guard against stale numba caches: numba re-validates a cached function against its *own* source file only.

A loop in loops.py that calls (and so links in) a kernel of linalg.py keeps its cached machine code after linalg.py
changes, and would silently run the old kernel. Here, the sources of this package (and numba's version) are hashed
at import; when the hash differs from the one stamped in the cache folder, that folder's cache files of this
package are deleted first, so every kernel recompiles from the current sources.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba

__all__ = ["drop_stale_caches"]

_PACKAGE = Path(__file__).resolve().parent
_STAMP = "precision-numba-sources.sha256"


def sources_digest() -> str:
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(_PACKAGE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def drop_stale_caches(dispatcher) -> None:
    """``dispatcher``: any cached kernel of this package (its cache folder is the package's)."""
    try:
        folder = Path(dispatcher._cache._cache_path)  # numba internals: no public accessor exists
    except AttributeError:
        return
    stamp = folder / _STAMP
    current = sources_digest()
    try:
        if stamp.read_text() == current:
            return
    except OSError:
        pass
    modules = {path.stem for path in _PACKAGE.glob("*.py")}
    try:
        for cached in folder.glob("*.nb[ic]"):
            if cached.name.split(".", 1)[0] in modules:
                cached.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(current)
    except OSError:  # read-only install: numba then compiles without caching; nothing stale can load
        pass
