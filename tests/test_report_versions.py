"""Report schema versions: version 2 is written; version 1 reports (before noise floors, inference parity, batch
invariance and gradient accumulation) still load, upgraded on read; a newer version is refused in one line."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from precision import _report_reader as reader
from precision.errors import PrecisionError
from precision.matrix import build_specs
from precision.report import READABLE_VERSIONS, SCHEMA_VERSION, load_report
from precision.runner import run

V2_ONLY_RESULT_KEYS = ("floors", "verdict", "inference", "batch_invariance", "accumulation")


@pytest.fixture(scope="module")
def report_with_floors():
    return run(build_specs(["logreg"], ["adam"], ["fp32", "bf16"], data=("breast_cancer",), steps=10), noise_floor=3)


def test_current_version_is_written_and_valid(report_with_floors):
    data = json.loads(json.dumps(report_with_floors.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION == 2 and READABLE_VERSIONS == (1, 2)
    assert list(Draft202012Validator(reader.schema(2)).iter_errors(data)) == []
    assert data["results"][0]["floors"]["seeds"] == 3 and data["results"][0]["verdict"]["label"]


def _as_version_1(data: dict) -> dict:
    """What precision wrote before version 2: no version 2 keys, spec without accum_steps."""
    data = json.loads(json.dumps(data))
    data["schema_version"] = 1
    for result in data["results"]:
        for key in V2_ONLY_RESULT_KEYS:
            result.pop(key, None)
        result["spec"].pop("accum_steps", None)
    return data


def test_version_1_report_loads_upgraded(report_with_floors, tmp_path):
    v1 = _as_version_1(report_with_floors.to_dict())
    assert list(Draft202012Validator(reader.schema(1)).iter_errors(v1)) == []
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    loaded = load_report(path)
    for result, original in zip(loaded.results, report_with_floors.results):
        assert all(getattr(result, key) is None for key in V2_ONLY_RESULT_KEYS)
        assert result.spec["accum_steps"] == 1
        assert result.fingerprint == original.fingerprint and result.bits_of_agreement == original.bits_of_agreement


def test_version_2_keys_are_checked(report_with_floors, tmp_path):
    data = report_with_floors.to_dict()
    data["results"][0]["verdict"]["label"] = "fine"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PrecisionError, match=r"results\[0\]\.verdict\.label: 'fine' is not one of"):
        load_report(path)


def test_newer_version_is_refused_in_one_line(report_with_floors, tmp_path):
    data = report_with_floors.to_dict() | {"schema_version": 3}
    path = tmp_path / "v3.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PrecisionError) as info:
        load_report(path)
    assert str(info.value).endswith("has schema version 3; this precision reads versions 1 and 2 (written by a newer "
                                    "precision: upgrade precision to read it)")
    assert "\n" not in str(info.value)
