"""The pytest-benchmark suite: off in the default test run, on when asked for.

It runs when ``--bench`` is given or when a path inside tests/bench is named on the command line::

    python -m pytest tests/bench --bench --benchmark-autosave
    python -m pytest tests/bench --bench --benchmark-compare

With ``--benchmark-compare``, the training tests also gate the numerics: a case whose drift (rel_l2 or flip rate)
got worse than in the saved run it is compared with fails (``saved_extra_info`` below; the rule is in
test_bench_training.py). Timing gates need a threshold above the machine's noise; drift is deterministic, so this
gate needs none and catches what no timing gate can (for example Adam's moments rounded to a coarser format).

Otherwise (a plain ``python -m pytest``) its tests are deselected, so they are neither run nor reported as
skipped-but-covered. Every test in this folder also gets the ``bench`` marker, so ``-m bench`` / ``-m "not
bench"`` select them too.

A regression gate (``--benchmark-compare=0001 --benchmark-compare-fail=...``) ends with a message and an exit
status, never a traceback: pytest-benchmark 5.3 raises its PerformanceRegression out of its terminal-summary hook
(pytest then prints a Python traceback, skips the summary line, exit status 1), and with no saved run matching
``--benchmark-compare`` it warns at configure time, which the project's ``filterwarnings = error`` turns into an
INTERNALERROR (exit status 3). Here: a regression ends as "FAILED: the regression gate ..." with exit status 1; no
run to compare with, as an ERROR line with exit status 4 (usage error).
"""

from __future__ import annotations

import warnings
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


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """``--benchmark-compare=NNNN`` naming no saved run makes pytest-benchmark warn in its (trylast) configure, and
    the project's ``filterwarnings = error`` turns that warning into an INTERNALERROR traceback. Shown as a
    warning instead, the run goes on to the gate, which then stops with a usage error (exit status 4)."""
    try:
        from pytest_benchmark.logger import PytestBenchmarkWarning
    except ImportError:
        return
    warnings.filterwarnings("always", category=PytestBenchmarkWarning)


_session = None


@pytest.fixture
def saved_extra_info(request):
    """The ``extra_info`` this test stored in the saved runs named by ``--benchmark-compare``, as
    ``[(file name, extra_info), ...]``; empty without ``--benchmark-compare`` or when no saved run has the test."""
    bs = getattr(request.config, "_benchmarksession", None)
    mapping = getattr(bs, "compared_mapping", None) or {}
    return [(Path(str(path)).name, saved[request.node.nodeid].get("extra_info", {}))
            for path, saved in mapping.items() if request.node.nodeid in saved]


def pytest_collection_finish(session):
    global _session
    _session = session


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    try:
        from pytest_benchmark.session import PerformanceRegression
    except ImportError:  # pytest-benchmark not installed: nothing to catch
        return (yield)
    bs = getattr(terminalreporter.config, "_benchmarksession", None)
    if getattr(bs, "compare_fail", None) and not getattr(bs, "compared_mapping", True):
        # no saved run to compare with (warned above): pytest-benchmark would raise a UsageError after printing
        # its traceback; report it here and let the tables show
        bs.compare_fail = []
        terminalreporter.write_line("ERROR: --benchmark-compare-fail needs a saved run to compare with: none matched "
                                    "--benchmark-compare (saved runs: pytest-benchmark list)", red=True, bold=True)
        if _session is not None:
            _session.exitstatus = pytest.ExitCode.USAGE_ERROR
    try:
        return (yield)
    except PerformanceRegression:
        # pytest-benchmark has listed the failing comparisons just above
        terminalreporter.write_line("FAILED: the regression gate (--benchmark-compare-fail) fired, see above",
                                    red=True, bold=True)
        if _session is not None and _session.exitstatus == pytest.ExitCode.OK:
            _session.exitstatus = pytest.ExitCode.TESTS_FAILED
