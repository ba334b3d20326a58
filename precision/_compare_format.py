"""How a :class:`precision.compare.Comparison` is printed: a text table, markdown (a pull-request comment) or JSON.
Text from the reports is escaped in the table and markdown (precision/_terminal.py); json.dumps escapes it in JSON."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from ._mannwhitney import SIGNIFICANCE_LEVEL, format_p
from ._terminal import safe_text
from .errors import PrecisionError
from .report import finite_or_none

if TYPE_CHECKING:
    from .compare import Comparison, Row, Thresholds

__all__ = ["FORMATS", "format_comparison"]

FORMATS = ("table", "markdown", "json")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"x{x:.2f}"


def _cells(row: Row) -> tuple[str, ...]:
    t = row.time
    return (row.label, _num(t and t.old_s * 1e6, ".1f"), _num(t and t.new_s * 1e6, ".1f"),
            _ratio(t and t.ratio), _ratio(t and t.normalised_ratio), t.summary if t else "-",
            format_p(t and t.p_value), _num(row.old_bits, ".2f"),
            _num(row.new_bits, ".2f"), _num(row.bits_delta, "+.2f"),
            {True: "changed", False: "same", None: "-"}[row.fingerprint_changed], row.verdict)


_HEADERS = ("case", "old us/step", "new us/step", "raw ratio", "normalised", "time test", "p", "old bits", "new bits",
            "delta bits", "fingerprint", "verdict")


def _summary(cmp: Comparison) -> str:
    c = cmp.counts()
    return (f"{c['regressions']} regressions, {c['improvements']} improvements, {c['unconfirmed']} unconfirmed, "
            f"{c['numerics_changed']} with numerics changed, {c['unchanged']} unchanged, {c['errored_in_both']} "
            f"errored in both, {c['unavailable_in_both']} unavailable in both, {c['added']} added, "
            f"{c['removed']} removed")


def _criteria(th: Thresholds) -> str:
    text = (f"regression: slower than x{th.time_ratio:g} (time per step normalised by the calibration kernel when "
            f"both reports have one) with p < {SIGNIFICANCE_LEVEL:g} (Mann-Whitney U on normalised per-chunk step "
            f"times), or more than {th.bits:g} bits of agreement lost, or ok -> diverged/error, or a noise-floor verdict "
            f"from within to above seed noise")
    text += ", or any fingerprint change" if th.fingerprint else ""
    return text + ("; a time change past the threshold that the samples cannot test is UNCONFIRMED and does not "
                   "fail (docs/compare.md)")


def _collapsed(cmp: Comparison) -> list[str]:
    """One line per status for the results that failed the same way in both reports."""
    c = cmp.counts()
    return [f"{n} result(s) {word} in both reports (same status; not listed above, see --format json)"
            for n, word in ((c["errored_in_both"], "errored"), (c["unavailable_in_both"], "unavailable")) if n]


def _unconfirmed(cmp: Comparison) -> list[str]:
    rows = cmp.unconfirmed
    if not rows:
        return []
    head = (f"UNCONFIRMED: {len(rows)} time change(s) past x{cmp.thresholds.time_ratio:g} that the samples cannot "
            "test; they do not fail the gate. Rerun with more timed chunks (more --steps, or a smaller "
            "--record-every) to confirm:")
    return [head] + [safe_text(f"  {r.label}: {'; '.join(r.unconfirmed)}") for r in rows]


def _finite(value):
    """``value`` with every float that is not finite replaced by None. JSON has no inf, and a ratio or a delta of
    two finite numbers can still overflow (times of 1e-320 and 1e300 s, in a hand-made report)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return finite_or_none(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare pipe would end the cell (GitHub tables: also inside code spans)


def _md_code(text: str) -> str:
    """``text`` as a markdown code span: fenced by more backticks than any run of them inside it."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def format_comparison(cmp: Comparison, fmt: str = "table", changed_only: bool = False) -> str:
    """The comparison as a text table, markdown or JSON. Text from the reports (labels, statuses, environment
    values) is escaped in the table and markdown (precision/_terminal.py: no control character of a report
    reaches the terminal); json.dumps escapes it in JSON."""
    if fmt not in FORMATS:
        raise PrecisionError(f"unknown output format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(_finite(cmp.to_dict()), indent=1, sort_keys=True, allow_nan=False)
    rows = [r for r in cmp.rows if not (r.failed_in_both or (changed_only and r.verdict == "unchanged"))]
    cells = [tuple(map(safe_text, _cells(r))) for r in rows]
    env = [safe_text(f"environments differ: {change}") for change in cmp.environment_changes]
    if cmp.environment_note:
        env.append(cmp.environment_note)
    notes = [safe_text(cmp.calibration_note)] + _collapsed(cmp)
    unconfirmed = _unconfirmed(cmp)
    if fmt == "markdown":
        lines = [f"**precision compare**: {_summary(cmp)}", "", f"_{_criteria(cmp.thresholds)}_", ""]
        lines += [f"> {line}" for line in env + notes] + [""]
        if unconfirmed:
            lines += [f"**{_md_cell(unconfirmed[0])}**", ""]
            lines += [f"- {_md_cell(line.strip())}" for line in unconfirmed[1:]] + [""]
        lines += ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        for row, c in zip(rows, cells):
            verdict = f"**{c[-1]}**" if row.regressions or row.unconfirmed else c[-1]
            lines.append("| " + " | ".join(map(_md_cell, [_md_code(c[0]), *c[1:-1], verdict])) + " |")
        return "\n".join(lines)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(_HEADERS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells]
    tail = env + notes + ([""] + unconfirmed + [""] if unconfirmed else [])
    return "\n".join(lines + [""] + tail + [_criteria(cmp.thresholds), _summary(cmp)])
