"""The calibration kernel: recorded in a real run, saved and read back, optional in older reports, cheap."""

from __future__ import annotations

import json
import statistics

import pytest

from precision import build_specs, run
from precision.calibration import (CALIBRATION_KERNEL, REPEATS_PER_PHASE, Calibration, Calibrator, calibrate)
from precision.errors import ReportError
from precision.report import load_report


@pytest.fixture(scope="module")
def tiny():
    return run(build_specs(["logreg"], ["sgd"], ["fp32"], data=["breast_cancer"], steps=20, record_every=10))


def test_a_run_records_the_calibration_and_it_reads_back(tiny, tmp_path):
    cal = tiny.calibration
    assert cal.kernel == CALIBRATION_KERNEL
    assert len(cal.seconds) == 2 * REPEATS_PER_PHASE  # before the first spec and after the last
    assert all(s > 0 for s in cal.seconds) and cal.median_s == statistics.median(cal.seconds)
    path = tiny.save(tmp_path / "report.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["calibration"] == {"kernel": CALIBRATION_KERNEL, "seconds": list(cal.seconds),
                                   "median_s": cal.median_s}
    loaded = load_report(path)
    assert loaded.calibration == cal and loaded == tiny


def test_reports_without_calibration_still_read(tiny, tmp_path):
    data = tiny.to_dict()
    del data["calibration"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert load_report(path).calibration is None
    data["calibration"] = None
    path.write_text(json.dumps(data), encoding="utf-8")
    assert load_report(path).calibration is None
    assert "calibration" not in load_report(path).to_dict()  # written back as before it existed


@pytest.mark.parametrize("calibration, message", [
    ({"kernel": "k", "seconds": []}, "'median_s' is a required property"),
    ({"kernel": "k", "seconds": [], "median_s": 1.0}, "calibration.seconds: [] should be non-empty"),
    ({"kernel": "k", "seconds": [-1.0], "median_s": 1.0}, "calibration.seconds[0]: -1.0 is less than the minimum"),
    ({"kernel": "", "seconds": [1.0], "median_s": 1.0}, "calibration.kernel"),
    ([1.0], "calibration: [1.0] is not of type 'object', 'null'"),
])
def test_malformed_calibration_is_refused_in_one_line(tiny, tmp_path, calibration, message):
    data = tiny.to_dict()
    data["calibration"] = calibration
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ReportError, match="calibration") as info:
        load_report(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_calibration_round_trips_and_recomputes_its_median():
    cal = Calibration.from_dict({"kernel": "k", "seconds": [3, 1, 2], "median_s": 99.0})
    assert cal.seconds == (3.0, 1.0, 2.0) and cal.median_s == 2.0
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_calibration_does_the_same_work_each_time():
    """The timed work never changes: inputs are never written, so every repeat computes the same outputs. (Its cost,
    about 0.1-0.3 s per run(), is a figure for docs/compare.md, not a test: no timing assertions in tests/.)"""
    calibrator = Calibrator()
    calibrator.measure()
    first = calibrator.p_out.copy(), calibrator.m_out.copy(), calibrator.v_out.copy()
    calibrator.measure()
    assert len(calibrator.result().seconds) == 2 * REPEATS_PER_PHASE
    for before, after in zip(first, (calibrator.p_out, calibrator.m_out, calibrator.v_out)):
        assert (before == after).all()
    assert (calibrator.p_out != calibrator.p).mean() > 0.9  # the update moved the params
    assert len(calibrate(3).seconds) == 3
