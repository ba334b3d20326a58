"""Shared pytest configuration: the ``exhaustive`` marker, off unless asked for.

Tests marked ``exhaustive`` (e.g. all 2^32 float32 bit patterns) take minutes; they run only when the ``-m``
expression names them: ``python -m pytest tests/test_formats.py -m exhaustive``.
"""

from __future__ import annotations

import os

import pytest

EXHAUSTIVE_HOW = "exhaustive check (minutes): run with `python -m pytest -m exhaustive`"


def pytest_addoption(parser):
    # Here rather than in tests/bench/conftest.py: only conftests loaded before parsing can add options, and this one
    # always is, so `python -m pytest tests --bench` works as well as `python -m pytest tests/bench --bench`.
    parser.addoption("--bench", action="store_true", default=False,
                     help="run the pytest-benchmark suite in tests/bench (off by default)")


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here so the marker exists under any ini file (--strict-markers).
    config.addinivalue_line("markers", f"exhaustive: {EXHAUSTIVE_HOW}")


def pytest_collection_modifyitems(config, items):
    if "exhaustive" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason=f"skipped {EXHAUSTIVE_HOW}")
    for item in items:
        if item.get_closest_marker("exhaustive") is not None:
            item.add_marker(skip)


@pytest.fixture
def broken_sklearn(tmp_path):
    """A stand-in scikit-learn, first on PYTHONPATH, whose ``loader`` (e.g. "load_digits") raises OSError(message):
    a run-time failure that no check before training can see. Returns the environment for a subprocess."""
    def make(loader: str, message: str) -> dict:
        package = tmp_path / "broken" / "sklearn"
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
        (package / "datasets.py").write_text(f"def {loader}():\n    raise OSError({message!r})\n")
        return dict(os.environ, PYTHONPATH=os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]))
    return make
