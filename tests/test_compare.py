"""precision compare: matching by id, drift and fingerprint changes, time noise, statuses, outputs, exit codes."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest

from precision import build_specs, run
from precision.compare import Thresholds, compare_reports, format_comparison, mann_whitney_p
from precision.errors import PrecisionError
from precision.report import Report, load_report

# Small real runs: 60 steps recorded every 10 -> 5 timed chunks per result (the first chunk is warm-up).
STEPS, RECORD_EVERY = 60, 10


def _specs(policies):
    return build_specs(["logreg"], ["sgd"], policies, data=["breast_cancer"], steps=STEPS,
                       record_every=RECORD_EVERY)


@pytest.fixture(scope="module")
def base() -> Report:
    return run(_specs(["fp32", "bf16-mixed"]))


@pytest.fixture(scope="module")
def pure_bf16() -> Report:
    return run(_specs(["bf16"]))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "precision", "compare", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _with_result(report: Report, index: int, result) -> Report:
    results = list(report.results)
    results[index] = result
    return dataclasses.replace(report, results=tuple(results))


def _mixed_index(report: Report) -> int:
    return next(i for i, r in enumerate(report.results) if r.spec["policy_name"] == "bf16-mixed")


def test_changed_policy_under_the_same_id_is_flagged_and_exits_1(tmp_path, base, pure_bf16):
    """The bf16-mixed slot of the new report holds a pure-bf16 run (master weights and state in bf16 instead of
    fp32) under the bf16-mixed id: the numerics moved, and drift got worse."""
    i = _mixed_index(base)
    mixed, pure = base.results[i], pure_bf16.results[0]
    assert mixed.bits_of_agreement - pure.bits_of_agreement > 1.0  # the premise: pure bf16 drifts further
    changed = _with_result(base, i, dataclasses.replace(pure, spec=mixed.spec))
    old, new = base.save(tmp_path / "old.json"), changed.save(tmp_path / "new.json")

    comparison = compare_reports(load_report(old), load_report(new))
    (row,) = comparison.regressions
    assert row.id == mixed.id
    assert row.fingerprint_changed is True
    assert row.bits_delta == pytest.approx(pure.bits_of_agreement - mixed.bits_of_agreement, abs=0)
    assert any("bits of agreement" in reason for reason in row.regressions)
    untouched = [r for r in comparison.rows if r.id != mixed.id]
    assert [r.fingerprint_changed for r in untouched] == [False] and untouched[0].bits_delta == 0.0

    proc = _cli(old, new)
    assert proc.returncode == 1, proc.stderr
    assert "REGRESSION" in proc.stdout and "changed" in proc.stdout


def test_identical_reports_exit_0(tmp_path, base):
    old = base.save(tmp_path / "old.json")
    new = tmp_path / "new.json"
    new.write_bytes(old.read_bytes())
    proc = _cli(old, new)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    comparison = compare_reports(load_report(old), load_report(new))
    assert not comparison.regressions
    assert {r.verdict for r in comparison.rows} == {"unchanged"}


def test_rerun_has_identical_numerics(base):
    """The same specs run again: same fingerprints and exactly the same bits (CPU runs are deterministic).
    Times differ run to run; whether that is significant depends on the machine's load, so only the numerics
    are asserted here (time noise has its own tests below, on constructed samples)."""
    again = run(_specs(["fp32", "bf16-mixed"]))
    comparison = compare_reports(base, again)
    assert [r.fingerprint_changed for r in comparison.rows] == [False, False]
    assert [r.bits_delta for r in comparison.rows] == [0.0, 0.0]
    assert not [reason for r in comparison.rows for reason in r.regressions if "bits" in reason]


def test_fingerprint_only_change_is_reported_and_fails_only_when_asked(tmp_path, base):
    """A perturbed result file: one bit of the final params changed (a new fingerprint), drift the same."""
    data = base.to_dict()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    fp = data["results"][0]["fingerprint"]
    data["results"][0]["fingerprint"] = ("0" if fp[0] != "0" else "1") + fp[1:]
    new = tmp_path / "new.json"
    new.write_text(json.dumps(data))

    row = compare_reports(load_report(old), load_report(new)).rows[0]
    assert row.fingerprint_changed and row.verdict == "numerics changed" and not row.regressions
    assert _cli(old, new).returncode == 0
    strict = _cli(old, new, "--fail-on-fingerprint")
    assert strict.returncode == 1 and "fingerprint changed" in strict.stdout


# Per-chunk seconds per step. NOISE: the new median is 12.7% above the old one, past the 10% threshold, but the
# samples interleave (Mann-Whitney p = 0.22), so the change is inside the measured noise.
OLD_TIMES = (1.00, 1.30, 0.95, 1.25, 1.05, 1.20, 1.10, 1.15, 0.90)
NOISE_TIMES = (0.92, 1.28, 1.31, 1.33, 1.06, 1.24, 1.27, 1.22, 0.97)
SLOW_TIMES = tuple(1.5 * t for t in OLD_TIMES)  # every new sample above every old one: p = 2 / C(18, 9)


def _timed(result, samples):
    median = sorted(samples)[len(samples) // 2]
    return dataclasses.replace(result, step_times_s=samples, time_per_step_s=median)


@pytest.mark.parametrize("new_times, flagged", [(NOISE_TIMES, False), (SLOW_TIMES, True)])
def test_time_change_needs_to_leave_the_noise(base, new_times, flagged):
    old = _with_result(base, 0, _timed(base.results[0], OLD_TIMES))
    new = _with_result(base, 0, _timed(base.results[0], new_times))
    row = compare_reports(old, new).rows[0]
    assert row.time.ratio > Thresholds().time_ratio
    assert row.time.significant is flagged
    assert bool(row.regressions) is flagged
    if not flagged:
        assert row.time.p_value > 0.05 and "not significant" in format_comparison(compare_reports(old, new))
    else:
        assert row.time.p_value == pytest.approx(2 / math.comb(18, 9), rel=1e-12)


def test_time_without_samples_is_judged_by_threshold_alone(base):
    old = _with_result(base, 0, dataclasses.replace(base.results[0], step_times_s=None, time_per_step_s=1.0))
    new = _with_result(base, 0, dataclasses.replace(base.results[0], step_times_s=None, time_per_step_s=1.2))
    row = compare_reports(old, new).rows[0]
    assert row.time.significant is None
    assert row.regressions == ("slower x1.20 (noise unknown)",)


def test_status_changes_and_added_removed(base):
    diverged = dataclasses.replace(base.results[0], status="diverged", diverged_at=7, bits_of_agreement=0.0)
    new = dataclasses.replace(_with_result(base, 0, diverged), results=(diverged,))
    comparison = compare_reports(base, new)
    by_presence = {r.presence: r for r in comparison.rows}
    assert by_presence["both"].regressions[0] == "ok -> diverged at step 7"
    assert by_presence["removed"].id == base.results[1].id and not by_presence["removed"].regressions
    back = compare_reports(new, base)
    assert {r.presence for r in back.rows} == {"both", "added"} and back.rows[0].improvements
    assert not back.regressions


def test_markdown_and_json_outputs(base, pure_bf16):
    i = _mixed_index(base)
    changed = _with_result(base, i, dataclasses.replace(pure_bf16.results[0], spec=base.results[i].spec))
    comparison = compare_reports(base, changed)
    markdown = format_comparison(comparison, "markdown")
    assert markdown.startswith("**precision compare**: 1 regressions")
    assert "| case |" in markdown and "**REGRESSION" in markdown
    data = json.loads(format_comparison(comparison, "json"))
    assert data["counts"]["regressions"] == 1 and data["counts"]["numerics_changed"] == 1
    assert {r["id"] for r in data["results"]} == {r.id for r in base.results}
    assert data["thresholds"] == {"time_ratio": 1.1, "bits": 0.5, "fingerprint": False,
                                  "significance_level": 0.05}


def test_environment_differences_are_shown(base):
    env = dict(base.environment, versions=dict(base.environment["versions"], numpy="0.0-other"))
    comparison = compare_reports(base, dataclasses.replace(base, environment=env))
    assert any(change.startswith("versions.numpy: ") and change.endswith("-> 0.0-other")
               for change in comparison.environment_changes)
    assert "environments differ: versions.numpy" in format_comparison(comparison)
    assert comparison.environment_note is None  # no fingerprint changed: nothing to attribute


def test_fingerprint_changes_next_to_environment_changes_are_flagged(base):
    # XLA_FLAGS differ and one result's bits moved: the output must say the change may be the environment's.
    env = copy.deepcopy(base.environment)
    env.setdefault("numerics", {}).setdefault("env", {})["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    moved = dataclasses.replace(base.results[0], fingerprint="0" * 64)
    new = dataclasses.replace(base, environment=env, results=(moved, *base.results[1:]))
    comparison = compare_reports(base, new)
    assert any("XLA_FLAGS" in change for change in comparison.environment_changes)
    assert comparison.environment_note.startswith("1 fingerprint change(s) may come from the environment")
    assert comparison.environment_note in format_comparison(comparison)
    assert json.loads(format_comparison(comparison, "json"))["environment_note"] == comparison.environment_note


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json", "not readable JSON"),
    ('{"schema_version": 99, "results": []}', "schema version 99"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, base, content, message):
    good = base.save(tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    proc = _cli(good, bad)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


@pytest.mark.parametrize("option, value", [("--time-threshold", "0.9"), ("--time-threshold", "nan"),
                                           ("--bits-threshold", "-1"), ("--format", "html")])
def test_bad_options_exit_2_with_one_line(tmp_path, base, option, value):
    good = base.save(tmp_path / "good.json")
    proc = _cli(good, good, option, value)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and option in proc.stderr


def test_thresholds_reject_bad_values():
    with pytest.raises(PrecisionError, match="ratio > 1"):
        Thresholds(time_ratio=1.0)
    with pytest.raises(PrecisionError, match="bits >= 0"):
        Thresholds(bits=-0.1)


def test_mann_whitney_matches_scipy():
    """Against scipy's exact (no ties, small) and asymptotic (ties, larger) tests; both are double-precision
    evaluations of the same quantity, so they agree to a few ulps (1e-12 relative leaves ample room)."""
    stats = pytest.importorskip("scipy.stats", reason="scipy is the oracle for this check")
    import numpy as np
    rng = np.random.default_rng(5)
    for _ in range(50):
        n1, n2 = rng.integers(1, 20, size=2)
        x, y = rng.normal(size=n1), rng.normal(loc=rng.uniform(0, 2), size=n2)
        assert mann_whitney_p(x, y) == pytest.approx(stats.mannwhitneyu(x, y, method="exact").pvalue, rel=1e-12)
    for _ in range(50):
        n1, n2 = rng.integers(30, 60, size=2)
        x = np.round(rng.normal(size=n1), 1)  # rounded: ties
        y = np.round(rng.normal(loc=rng.uniform(0, 1), size=n2), 1)
        expected = stats.mannwhitneyu(x, y, method="asymptotic").pvalue
        assert mann_whitney_p(x, y) == pytest.approx(expected, rel=1e-12)
