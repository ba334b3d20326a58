"""The pytest-benchmark suite: off in the default test run, on when asked for.

It runs when ``--bench`` is given or when a path inside tests/bench is named on the command line::

    python -m pytest tests/bench --bench --benchmark-autosave
    python -m pytest tests/bench --bench --benchmark-compare

Otherwise (a plain ``python -m pytest``) its tests are deselected, so they are neither run nor reported as
skipped-but-covered. Every test in this folder also gets the ``bench`` marker, so ``-m bench`` / ``-m "not
bench"`` select them too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent


def _inside(path: Path) -> bool:
    return path == BENCH_DIR or BENCH_DIR in path.parents


def _named_explicitly(config) -> bool:
    """A command-line path (or node id) inside tests/bench, e.g. ``tests/bench`` or ``tests/bench/x.py::t``."""
    root = Path(str(config.invocation_params.dir))
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        if _inside((root / path).resolve()):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    bench_items = [item for item in items if _inside(Path(str(item.path)).resolve())]
    for item in bench_items:
        item.add_marker(pytest.mark.bench)
    enabled = config.getoption("--bench", default=False) or _named_explicitly(config)
    if enabled or not bench_items:
        return
    selected = set(map(id, bench_items))
    config.hook.pytest_deselected(items=bench_items)
    items[:] = [item for item in items if id(item) not in selected]
