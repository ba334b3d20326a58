"""Shared pytest configuration: the ``exhaustive`` marker, off unless asked for.

Tests marked ``exhaustive`` (e.g. all 2^32 float32 bit patterns) take minutes; they run only when the ``-m``
expression names them: ``python -m pytest tests/test_formats.py -m exhaustive``.
"""

from __future__ import annotations

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
