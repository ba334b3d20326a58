"""Reading reports: the published schema, every malformed file refused in one line (library and CLI), and a fuzz
of the reader whose only outcomes are a Report or a ReportError.

The malformed cases run three ways: ``load_report`` (a ReportError naming the file), ``precision show`` in a
subprocess (exit 2, one stderr line, no traceback, bounded time: a FIFO must not hang it), and ``precision
compare`` / ``precision plot`` in-process (exit 2, one line). Each checks that the file was left as it was.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from precision import build_specs, run
from precision import _report_reader as reader
from precision.cli import main as cli_main
from precision.commands import show
from precision.compare import compare_reports, format_comparison
from precision.errors import ReportError
from precision.report import SCHEMA_VERSION, Report, load_report
from precision.table import format_table

SUBPROCESS_TIMEOUT_S = 60  # a reader that blocks (on a FIFO, say) fails the test instead of hanging it


@pytest.fixture(scope="module")
def report() -> Report:
    """A real report: two ok runs and an unavailable one (numpy has no GPU), so metrics are numbers and nulls."""
    specs = build_specs(["logreg"], ["sgd"], ["fp32", "bf16"], steps=20, record_every=10)
    specs += build_specs(["logreg"], ["sgd"], ["fp32"], devices=("gpu",), steps=20, record_every=10)
    result = run(specs)
    assert [r.status for r in result.results] == ["ok", "ok", "unavailable"]  # the premise
    return result


@pytest.fixture(scope="module")
def good(report, tmp_path_factory) -> Path:
    return report.save(tmp_path_factory.mktemp("good") / "good.json")


# ---------------------------------------------------------------------------------------------------------------
# The schema and valid reports
# ---------------------------------------------------------------------------------------------------------------

def test_schema_is_a_valid_draft_2020_12_schema():
    schema = reader.schema(SCHEMA_VERSION)  # loaded from the package data, as load_report does
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_round_trip_validates_and_equals_the_original(report, good):
    data = json.loads(good.read_text(encoding="utf-8"))
    # The published schema as any JSON Schema tool reads it (not only precision's stricter integers) accepts it.
    assert list(Draft202012Validator(reader.schema(SCHEMA_VERSION)).iter_errors(data)) == []
    loaded = load_report(good)
    assert loaded == report
    assert loaded.to_dict() == report.to_dict()
    assert json.loads(json.dumps(loaded.to_dict())) == data  # to_dict keeps tuples where the file has lists
    assert loaded.results[2].time_per_step_s is None and loaded.results[0].step_times_s  # nulls and numbers


def test_older_and_newer_reports_of_version_1_still_read(good, tmp_path):
    """Before step_times_s existed it was absent; a later precision may add keys (it added step_times_s so)."""
    data = json.loads(good.read_text(encoding="utf-8"))
    for result in data["results"]:
        del result["step_times_s"]
    data["results"][0]["step_times_s"] = None
    data["results"][1]["new_metric"] = {"any": ["thing"]}
    data["results"][1]["spec"]["new_field"] = 3
    data["new_top_level_key"] = True
    data["environment"] = {"free": {"form": [1, "two", None]}, "versions": None}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    loaded = load_report(path)
    assert [r.step_times_s for r in loaded.results] == [None, None, None]
    assert loaded.environment["free"] == {"form": [1, "two", None]}
    assert "new_metric" not in loaded.results[1].to_dict()  # unknown keys are read past, not kept
    assert format_table(loaded).count("logreg:synthetic") == 3  # and the table still renders


# ---------------------------------------------------------------------------------------------------------------
# Malformed files, three ways
# ---------------------------------------------------------------------------------------------------------------

def _valid(good: Path) -> dict:
    return json.loads(good.read_text(encoding="utf-8"))


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _edit(edit):
    def make(good: Path, path: Path) -> Path:
        data = _valid(good)
        edit(data)
        return _write(path, json.dumps(data))
    return make


def _replace_text(old: str, new: str):
    def make(good: Path, path: Path) -> Path:
        text = good.read_text(encoding="utf-8")
        assert old in text
        return _write(path, text.replace(old, new, 1))
    return make


def _set(*keys_value):
    *keys, value = keys_value

    def edit(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return edit


def _delete(*keys):
    def edit(data):
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]
    return edit


def _fifo(good, path):
    os.mkfifo(path)
    return path


def _dev_zero_link(good, path):
    path.symlink_to("/dev/zero")
    return path


def _directory(good, path):
    path.mkdir()
    return path


def _nested(good, path):
    return _write(path, "[" * 100_000 + "]" * 100_000)


def _huge_int(good, path):
    return _replace_text('"seed": 0', '"seed": ' + "7" * 5000)(good, path)


def _nan_metrics(good, path):
    return _replace_text('"rel_l2": ', '"rel_l2": NaN, "was": ')(good, path)


def _over_size_cap(good, path):
    with open(path, "wb") as fh:  # sparse: refused by its size before a byte is read
        fh.truncate(reader.MAX_REPORT_BYTES + 1)
    return path


# (id, how to make the file, what the one line says). The first eleven are the list.
MALFORMED = [
    ("results-of-a-number", _edit(_set("results", [1])), "results[0]: 1 is not of type 'object'"),
    ("spec-without-policy_name", _edit(_delete("results", 0, "spec", "policy_name")),
     "results[0].spec: 'policy_name' is a required property"),
    ("string-for-a-number", _edit(_set("results", 1, "rel_l2", "small")),
     "results[1].rel_l2: 'small' is not of type 'number', 'null'"),
    ("100000-nested-lists", _nested, "is not readable JSON: nested too deeply"),
    ("5000-digit-integer", _huge_int, "is not readable JSON: an integer of 5000 digits"),
    ("NaN-token", _nan_metrics, "is not readable JSON: NaN is not valid JSON"),
    ("Infinity-token", _replace_text('"final_loss": ', '"final_loss": Infinity, "was": '),
     "is not readable JSON: Infinity is not valid JSON"),
    ("minus-Infinity-token", _replace_text('"loss_gap": ', '"loss_gap": -Infinity, "was": '),
     "is not readable JSON: -Infinity is not valid JSON"),
    ("FIFO", _fifo, "is a named pipe (FIFO), not a report file"),
    ("symlink-to-dev-zero", _dev_zero_link, "is a character device, not a report file"),
    ("directory", _directory, "is a directory, not a report file"),
    ("empty-file", lambda good, path: _write(path, b""), "is not readable JSON: the file is empty"),
    ("invalid-UTF-8", lambda good, path: _write(path, b'{"schema_version": 1, "created": "\xff"}'),
     "is not readable JSON: not UTF-8 text (byte 0xff at offset 34"),
    ("unknown-schema_version", _edit(_set("schema_version", 3)),
     "has schema version 3; this precision reads versions 1 and 2 (written by a newer precision: upgrade precision "
     "to read it)"),
    # and a few more of the same families
    ("1e999-overflows-float", _replace_text('"eps": 1e-08', '"eps": 1e999'),
     "is not readable JSON: the number 1e999 is beyond the float range"),
    ("larger-than-the-cap", _over_size_cap, f"more than the {reader.MAX_REPORT_BYTES / 2**20:g} MiB"),
    ("truncated-json", lambda good, path: _write(path, good.read_bytes()[:100]), "is not readable JSON: "),
    ("escape-sequence-in-a-bad-value", _edit(_set("results", 0, "status", "\x1b[2J\x1b]0;pwned\x07")),
     r"results[0].status: '\x1b[2J\x1b]0;pwned\x07' is not one of ['ok', 'diverged', 'unavailable', 'error']"),
    ("does-not-exist", lambda good, path: path, "does not exist"),
    ("repeated-spec-id", _edit(lambda data: data["results"].append(data["results"][0])),
     "repeats the spec id of results[0]"),
]


def _snapshot(path: Path):
    """What must not change: the entry itself (lstat), a symlink's target, a regular file's bytes."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    content = path.read_bytes() if stat.S_ISREG(info.st_mode) and info.st_size < 2**20 else None
    link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
    return (info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino, link, content)


def _one_line(text: str) -> str:
    lines = text.splitlines()  # also splits on \x1c-\x1e, \x85, \u2028: none may be left raw
    assert len(lines) == 1, repr(text)
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("make, fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_report_is_refused_in_one_line(make, fragment, good, tmp_path, capsys):
    bad = make(good, tmp_path / "bad.json")
    before = _snapshot(bad)
    name = f"report {str(bad)!r}"

    # The CLI first, in a subprocess with a timeout: if the reader blocked, this fails instead of hanging pytest.
    proc = subprocess.run([sys.executable, "-m", "precision.cli", "show", str(bad)], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith(f"precision show: error: {name}") and fragment in line, line

    with pytest.raises(ReportError) as caught:
        load_report(bad)
    message = str(caught.value)
    assert message.startswith(name) and fragment in message and len(message.splitlines()) == 1, message
    assert message.isprintable()

    figures = tmp_path / "figures"
    for argv in (["compare", str(good), str(bad)], ["compare", str(bad), str(good)],
                 ["plot", str(bad), "--out", str(figures)]):
        assert cli_main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and _one_line(err) == f"precision {argv[0]}: error: {message}"
    assert not figures.exists()
    assert _snapshot(bad) == before


@pytest.mark.parametrize("edit, fragment", [
    (_set("results", 0, "diverged_at", 1.0), "results[0].diverged_at: 1.0 is not of type 'integer', 'null'"),
    (_set("results", 0, "rel_l2", True), "results[0].rel_l2: True is not of type 'number', 'null'"),
    (_set("results", 0, "time_per_step_s", -1.0), "results[0].time_per_step_s: -1.0 is less than the minimum"),
    (_set("results", 0, "fingerprint", "ABC"), "results[0].fingerprint: 'ABC' does not match '^[0-9a-f]{64}$'"),
    (_set("results", 0, "spec", "steps", 0), "results[0].spec.steps: 0 is less than the minimum of 1"),
    (_set("results", 0, "spec", "optimizer", "betas", [0.9]), "results[0].spec.optimizer.betas: [0.9] is too short"),
    (_set("results", 0, "drift", [{"rel_l2": 0.1, "bits": 3.0}]), "results[0].drift[0]: 'step' is a required"),
    (_set("results", 0, "step_times_s", ["fast"]), "results[0].step_times_s[0]: 'fast' is not of type 'number'"),
    (_set("results", 0, "max_ulp", 10**400), "results[0].max_ulp: 1000"),  # an int beyond the float range
    (_set("environment", "versions", ["numpy 2"]), "environment.versions: ['numpy 2'] is not of type 'object'"),
    (_set("environment", "not an object"), "environment: 'not an object' is not of type 'object'"),
    (_set("created", 20240101), "created: 20240101 is not of type 'string'"),
    (_delete("results"), "top level: 'results' is a required property"),
    (_set("schema_version", True), "has schema version True; this precision reads versions 1 and 2"),
    (_set("schema_version", "1"), "has schema version '1'; this precision reads versions 1 and 2"),
    (_delete("schema_version"), "has no schema_version; is it a precision report?"),
])
def test_known_keys_must_have_their_types(edit, fragment, good, tmp_path):
    bad = _edit(edit)(good, tmp_path / "bad.json")
    with pytest.raises(ReportError) as caught:
        load_report(bad)
    assert str(caught.value).startswith(f"report {str(bad)!r}") and fragment in str(caught.value), caught.value
    # The published schema, read by any tool, refuses the same files, except 1.0 for an integer: JSON Schema
    # counts it as one, precision's reader does not (docs/reports.md).
    published = Draft202012Validator(reader.schema(SCHEMA_VERSION))
    assert published.is_valid(json.loads(bad.read_text())) == fragment.startswith("results[0].diverged_at: 1.0")


def test_top_level_that_is_not_an_object(tmp_path):
    bad = _write(tmp_path / "list.json", "[1, 2]")
    with pytest.raises(ReportError, match=r"is not a precision report: its JSON is an array, not an object"):
        load_report(bad)


def test_a_long_bad_value_is_cut_in_the_middle(good, tmp_path):
    bad = _edit(_set("results", 0, "message", ["x" * 100_000]))(good, tmp_path / "bad.json")
    with pytest.raises(ReportError) as caught:
        load_report(bad)
    message = str(caught.value)
    assert len(message) < 300 + len(str(bad)) and "\u2026" in message
    assert message.endswith("is not of type 'string'")  # the end, which says what is wrong, is kept


def test_a_file_that_understates_its_size_is_read_only_up_to_the_cap(monkeypatch):
    """/proc files report size 0 and can be any length: the reader stops at cap + 1 bytes, whatever stat says."""
    proc_file = Path("/proc/self/status")
    if not proc_file.exists():
        pytest.skip("needs Linux /proc (a regular file whose stat size is 0)")
    assert os.stat(proc_file).st_size == 0 and len(proc_file.read_bytes()) > 64  # the premise
    monkeypatch.setattr(reader, "MAX_REPORT_BYTES", 64)
    read = []
    real_read = os.read

    def counting_read(fd, n):
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(ReportError, match=r"is more than the 64 bytes a report may have"):
        load_report(proc_file)
    assert sum(read) == 65


def test_compare_no_longer_calls_an_all_nan_report_unchanged(report, good, tmp_path):
    """Every metric NaN used to read as 'unchanged' (NaN comparisons are all false); NaN tokens are refused now."""
    data = report.to_dict()
    for result in data["results"]:
        for key, value in result.items():
            if isinstance(value, float):
                result[key] = float("nan")
        result["drift"] = [{k: float("nan") if k != "step" else v for k, v in p.items()} for p in result["drift"]]
    nan_report = _write(tmp_path / "nan.json", json.dumps(data))  # json.dumps writes NaN tokens
    assert "NaN" in nan_report.read_text()
    proc = subprocess.run([sys.executable, "-m", "precision.cli", "compare", str(good), str(nan_report)],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 2 and proc.stdout == "" and "unchanged" not in proc.stderr
    assert f"report {str(nan_report)!r} is not readable JSON: NaN is not valid JSON" in _one_line(proc.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: >= 10,000 cases, each a Report (that every printer renders safely) or a ReportError
# ---------------------------------------------------------------------------------------------------------------

# 10,000 cases in all; the split and the sizes of the generated values keep this file under a minute on 2 cores
# (hypothesis itself costs ~1-2 ms an example; a recursive JSON value more).
FUZZ_STRUCTURE_CASES = 3_000
FUZZ_BYTES_CASES = 7_000

# JSON-ish values, including what JSON text cannot hold plainly: NaN and infinities (json.dumps writes NaN /
# Infinity tokens for them), integers beyond the float range and past the reader's digit cap, control characters,
# lone surrogates (written as \ud800 escapes), and the characters markdown and mathtext treat specially.
_HOSTILE_TEXT = st.text(st.sampled_from("\x1b\n\r\t\x00\x7f\x85\x9b\u2028\u202e\ud800\U0001f600$|`\\ aé"), max_size=10)
_TEXT = st.text(st.characters(exclude_categories=()), max_size=10) | _HOSTILE_TEXT
_BIG_INTS = st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**308, 2 * 10**308, 10**700])
_SCALARS = (st.none() | st.booleans() | st.integers() | _BIG_INTS | st.floats() | _TEXT
            | st.sampled_from(["ok", "diverged", "error", "unavailable", "fp32", "0" * 64]))
_JSON = st.recursive(_SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_TEXT, kids, max_size=3),
                     max_leaves=6)


def _like(original) -> st.SearchStrategy:
    """Values of the kind found at a position, most of which the schema takes: so they reach the printers and
    the comparison with edge numbers (0, -0.0, 5e-324, 1.8e308, 1.0 for an integer) and hostile text."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.integers() | _BIG_INTS | st.integers(-3, 3).map(float)
    if isinstance(original, float) or original is None:  # null stands for a number
        return (st.floats() | st.sampled_from([0.0, -0.0, 5e-324, 2.2e-308, 1.7976931348623157e308, -1e308])
                | st.integers() | _BIG_INTS | st.none())
    if isinstance(original, str):
        return _HOSTILE_TEXT | st.sampled_from([original + "\x1b[0m", original[:-1], original.upper()])
    return _JSON


def _at(data, path):
    for part in path:
        data = data[part]
    return data


def _paths(value, prefix=()):
    """Every position in a JSON value: the value itself, then each item or member, depth first."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, prefix + (i,))


def _mutate(data, path, action, value, key):
    """Replace the value at ``path``, delete it, or add a member / item next to it."""
    if not path:  # the report itself
        if action == "add":
            data[key] = value
        return {"replace": value, "delete": {}}.get(action, data)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[key] = value
    else:
        parent.insert(last, value)
    return data


def _is_terminal_safe(text: str) -> bool:
    text.encode("utf-8")  # raises on a lone surrogate, as print() would
    return all(line.isprintable() for line in text.split("\n"))


class _Outcomes:
    """Runs one candidate file through load_report and, when it loads, through every printer of a report."""

    def __init__(self, folder: Path, base: Report):
        self.path = folder / "fuzz.json"
        self.base = base
        self.loaded = self.refused = 0

    def check(self, content: bytes) -> None:
        self.path.write_bytes(content)
        try:
            loaded = load_report(self.path)
        except ReportError as exc:  # any other exception fails the test, with its traceback
            self.refused += 1
            message = str(exc)
            assert message.startswith(f"report {str(self.path)!r}") and message.isprintable(), message
            return
        self.loaded += 1
        assert isinstance(loaded, Report)
        assert _is_terminal_safe(format_table(loaded))
        for comparison in (compare_reports(self.base, loaded), compare_reports(loaded, self.base)):
            for fmt in ("table", "markdown"):
                assert _is_terminal_safe(format_comparison(comparison, fmt))
            json.loads(format_comparison(comparison, "json"))
        assert _is_terminal_safe(show.summary(loaded))  # the line under `precision show`'s table


@pytest.fixture(scope="module")
def fuzz_base(report):
    """A small valid report to mutate: one ok result (numbers, drift, times) and one unavailable one (nulls)."""
    small = Report(results=(report.results[0], report.results[2]), environment=report.environment,
                   created=report.created)
    data = json.loads(json.dumps(small.to_dict()))  # as in the file: lists, not tuples
    data["environment"] = {"cpu": "x", "versions": {"numpy": "2"}}  # smaller: the mutations matter, not its size
    return small, data


_EDGE_NUMBERS = [0, -1, 1.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308,
                 2**63 - 1, 10**308, None]
_EDGE_TEXT = ["", "\x1b[31m", "a\nb", "\r\x00\x7f\x9b", "\u202e\u2028", "\ud800", "$\\frac$", "a|b`c", "x" * 300]


def test_edge_values_at_every_position(fuzz_base, tmp_path):
    """Deterministic companion of the fuzz: each extreme number (or null) at every number position and each
    hostile string at every string position. Many load (the schema takes 5e-324 and 1.8e308), and then the ratios
    and deltas of the comparison must not overflow into a crash (a JSON output has no inf)."""
    small, data = fuzz_base
    outcomes = _Outcomes(tmp_path, small)
    for path in _paths(data):
        original = _at(data, path)
        # results[0] has every kind of position; the unavailable result and later drift points repeat them.
        if isinstance(original, (bool, dict, list)) or path[:2] == ("results", 1) or path[3:5] == ("drift", 1):
            continue
        for value in _EDGE_TEXT if isinstance(original, str) else _EDGE_NUMBERS:
            outcomes.check(json.dumps(_mutate(copy.deepcopy(data), path, "replace", value, "")).encode("utf-8"))
    assert outcomes.loaded > 100 and outcomes.refused > 100, vars(outcomes)


def test_fuzz_json_values_at_every_position(fuzz_base, tmp_path):
    small, data = fuzz_base
    paths = list(_paths(data))
    outcomes = _Outcomes(tmp_path, small)

    @settings(max_examples=FUZZ_STRUCTURE_CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(paths), st.sampled_from(["replace", "replace", "delete", "add"]), st.data(), _TEXT,
           st.booleans())
    def check(path, action, draw, key, ascii_only):
        value = draw.draw(_like(_at(data, path)) | _JSON)
        mutated = _mutate(copy.deepcopy(data), path, action, value, key)
        # Raw UTF-8 or \u escapes; a lone surrogate written raw is not UTF-8 (the reader must refuse it).
        outcomes.check(json.dumps(mutated, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))

    check()
    assert outcomes.loaded + outcomes.refused >= FUZZ_STRUCTURE_CASES
    # Both outcomes well exercised (measured: about 40% of the cases load).
    assert min(outcomes.loaded, outcomes.refused) > FUZZ_STRUCTURE_CASES // 10, vars(outcomes)


def test_fuzz_bytes_of_a_valid_report(fuzz_base, tmp_path):
    small, data = fuzz_base
    original = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
    outcomes = _Outcomes(tmp_path, small)

    @settings(max_examples=FUZZ_BYTES_CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    # Each 4 bytes drawn are one edit: (what, where (2 bytes), byte). One binary draw costs hypothesis a third of
    # a list of tuples, and the budget of this file is mostly hypothesis's own time per example.
    @given(st.binary(min_size=4, max_size=12))
    def check(edits):
        content = bytearray(original)
        for i in range(0, len(edits) - 3, 4):
            op, where, byte = edits[i] % 4, int.from_bytes(edits[i + 1:i + 3], "little"), edits[i + 3]
            where %= max(len(content), 1)
            if op == 0:
                content[where:where] = bytes([byte]) * (1 + byte % 4)  # insert
            elif op == 1:
                del content[where:where + 1 + byte % 8]  # delete
            elif op == 2 and content:
                content[where] ^= 1 << (byte % 8)  # flip a bit
            elif content:
                content[where] = byte  # set a byte
        outcomes.check(bytes(content))

    check()
    assert outcomes.loaded + outcomes.refused >= FUZZ_BYTES_CASES
    # Both outcomes exercised (measured: about one case in ten loads: a byte changed inside a string or a number).
    assert min(outcomes.loaded, outcomes.refused) > FUZZ_BYTES_CASES // 50, vars(outcomes)
