"""Shared pytest configuration: the ``exhaustive`` marker, off unless asked for.

Tests marked ``exhaustive`` (e.g. all 2^32 float32 bit patterns) take minutes; they run only when the ``-m``
expression names them: ``python -m pytest tests/test_formats.py -m exhaustive``.
"""

from __future__ import annotations

import pytest

EXHAUSTIVE_HOW = "exhaustive check (minutes): run with `python -m pytest -m exhaustive`"


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
