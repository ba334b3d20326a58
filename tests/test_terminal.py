"""Report text reaches the terminal escaped: safe_text and clip themselves, then every printer of report text
(the table, compare's table and markdown, show's summary line, plot labels)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precision import build_specs, run
from precision._terminal import ELLIPSIS, clip, safe_text
from precision.commands import show
from precision._compare_format import _HEADERS
from precision.compare import compare_reports, format_comparison
from precision.report import Report
from precision.table import MESSAGE_CHARS, format_table

HOSTILE = "\x1b]0;owned\x07\x1b[2J\r\n\t\x00\x7f\x9b\u2028\u202e\ud800"


def _printable_lines(text: str) -> bool:
    text.encode("utf-8")  # a lone surrogate would make print() raise
    return all(line.isprintable() for line in text.split("\n"))


# ---------------------------------------------------------------------------------------------------------------
# The helpers
# ---------------------------------------------------------------------------------------------------------------

def test_safe_text_escapes_controls_like_repr_without_quotes():
    assert safe_text("plain text, é 中 µ") == "plain text, é 中 µ"  # printable text is left alone
    assert safe_text("a\x1b[31mb") == "a\\x1b[31mb"
    assert safe_text("\n\r\t") == "\\n\\r\\t"
    assert safe_text("\x00\x7f\x85\x9b") == "\\x00\\x7f\\x85\\x9b"  # C0, DEL, C1 (NEL, CSI)
    assert safe_text("\u2028\u202e\ud800\U000e0001") == "\\u2028\\u202e\\ud800\\U000e0001"  # separators, bidi...
    assert safe_text(42) == "42" and safe_text(None) == "None"


@settings(max_examples=1000, deadline=None, database=None)
@given(st.text(st.characters(exclude_categories=())))
def test_safe_text_output_is_always_printable_and_lossless_when_it_can_be(text):
    out = safe_text(text)
    assert out.isprintable()
    out.encode("utf-8")  # no lone surrogate left: print() would raise on one
    if text.isprintable():
        assert out == text
    # Nothing is dropped: each character is kept or written as its escape, which repr also writes.
    assert out == "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def test_clip_keeps_the_start_marks_the_cut_and_prefers_a_word_boundary():
    message = "problem 'logreg' is binary; data 'digits' has 10 classes (using the first two)"
    cut = clip(message, 60)
    assert len(cut) <= 60 and cut.endswith(ELLIPSIS) and message.startswith(cut[:-1])
    assert cut == "problem 'logreg' is binary; data 'digits' has 10 classes" + ELLIPSIS  # not "... (us"
    assert clip("x" * 100, 10) == "x" * 9 + ELLIPSIS  # no space to cut at: a hard cut
    assert clip("short", 60) == "short"
    middle = clip("'" + "y" * 500 + "' is not of type 'number'", 40, middle=True)  # both ends kept
    assert len(middle) == 40 and middle.startswith("'yyy") and middle.endswith(" type 'number'")
    assert middle.count(ELLIPSIS) == 1
    with pytest.raises(ValueError):
        clip("text", 0)


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(), st.integers(1, 80), st.booleans())
def test_clip_never_exceeds_its_width(text, width, middle):
    out = clip(text, width, middle=middle)
    assert len(out) <= width
    assert out == text if len(text) <= width else out.count(ELLIPSIS) >= 1


# ---------------------------------------------------------------------------------------------------------------
# The printers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report() -> Report:
    return run(build_specs(["logreg"], ["sgd"], ["fp32", "bf16"], steps=10, record_every=5))


def _hostile(report: Report) -> Report:
    """The same report with hostile text in every string a printer shows."""
    first, second = report.results
    spec = dict(first.spec, policy_name="fp32" + HOSTILE, problem="lo$g|re`g" + HOSTILE, backend="np\x1b[1m")
    bad = dataclasses.replace(first, spec=spec, status="error", message="boom " + HOSTILE + " " + "w" * 80)
    env = dict(report.environment, cpu="cpu" + HOSTILE, versions={"numpy": "2" + HOSTILE})
    return dataclasses.replace(report, results=(bad, second), environment=env, created="2024" + HOSTILE)


def test_table_escapes_report_text_and_marks_cut_messages(report):
    table = format_table(_hostile(report))
    assert _printable_lines(table)
    assert "\\x1b]0;owned\\x07" in table and "\\u202e" in table and "\\ud800" in table
    status = next(line for line in table.splitlines() if "error: boom" in line).split("  ")[-1].strip()
    assert status.endswith(ELLIPSIS) and len(status) <= len("error: ") + MESSAGE_CHARS
    # escaped first, cut second: the start of the message reads as it was
    assert status.startswith("error: boom \\x1b]0;owned\\x07\\x1b[2J\\r\\n\\t")


def test_table_cuts_long_messages_at_a_word(report):
    message = "problem 'logreg' is binary; data 'digits' has 10 classes (using the first two would change it)"
    result = dataclasses.replace(report.results[0], status="error", message=message)
    table = format_table(dataclasses.replace(report, results=(result,)))
    assert "error: problem 'logreg' is binary; data 'digits' has 10 classes" + ELLIPSIS in table
    assert "(us" not in table


def test_compare_table_and_markdown_escape_report_text(report):
    hostile = _hostile(report)
    comparison = compare_reports(report, hostile)
    for old_new in (comparison, compare_reports(hostile, report)):
        for fmt in ("table", "markdown"):
            out = format_comparison(old_new, fmt)
            assert _printable_lines(out), fmt
    table = format_comparison(compare_reports(hostile, report), "table")
    assert "lo$g|re`g\\x1b]0;owned\\x07" in table
    assert "-> cpu\\x1b]0;owned\\x07" in format_comparison(comparison, "table")  # environment lines too
    # JSON stays JSON: json.dumps escapes the same text, and it reads back unchanged.
    data = json.loads(format_comparison(compare_reports(hostile, report), "json"))
    assert any(HOSTILE in r["label"] for r in data["results"])


def test_markdown_keeps_its_table_shape_with_pipes_and_backticks_in_labels(report):
    hostile = _hostile(report)
    rows = [line for line in format_comparison(compare_reports(hostile, report), "markdown").splitlines()
            if line.startswith("| `") or line.startswith("| ``")]
    assert rows
    for row in rows:
        unescaped_pipes = row.replace("\\|", "").count("|")
        assert unescaped_pipes == len(_HEADERS) + 1, row  # one more separator than columns, none from the label
    assert any(row.startswith("| ``lo$g\\|re`g") for row in rows)  # a longer fence around a backtick


def test_show_summary_line_is_escaped(report):
    line = show.summary(_hostile(report))
    assert line.isprintable()
    assert "cpu\\x1b]0;owned" in line and "numpy 2\\x1b]0;owned" in line and "created 2024\\x1b" in line


def test_show_summary_takes_null_versions(report):
    assert show.summary(dataclasses.replace(report, environment={"versions": None})).endswith("; ?; ")


def test_plot_escapes_dollars_and_controls(report, tmp_path):
    """A '$' pair in report text would be parsed as mathtext, which raises at draw time on what it cannot parse."""
    pytest.importorskip("matplotlib", reason="plotting is the optional extra precision[plot]")
    from precision.plot import plot_report
    first, second = report.results
    spec = dict(first.spec, policy_name="$\\frac$" + HOSTILE, problem="a$b$c")
    odd = dataclasses.replace(report, results=(dataclasses.replace(first, spec=spec), second))
    paths = plot_report(odd, tmp_path / "odd")
    svg = next(p for p in paths if p.name == "odd-drift.svg").read_bytes()
    assert b"\x1b" not in svg and len(paths) == 4
