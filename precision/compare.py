"""Compare two reports result by result (matched by spec id): time, drift, numerics, status; flag regressions.

In the spirit of pyperf's compare: a time change is judged against the noise each report measured (the per-chunk
step times, tested with a two-sided Mann-Whitney U test) and called "not significant" instead of a change when
the samples do not separate; drift is deterministic on a given machine, so any change in bits of agreement is
real and only the threshold decides; a changed fingerprint means the numerics moved, even by one bit.

The library returns a :class:`Comparison`; only the CLI prints it and sets the exit status.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Sequence

from ._terminal import safe_text
from .envdiff import environment_differences
from .errors import PrecisionError
from .report import Report, Result, finite_or_none

__all__ = ["Thresholds", "TimeChange", "Row", "Comparison", "compare_reports", "mann_whitney_p",
           "format_comparison", "FORMATS", "SIGNIFICANCE_LEVEL"]

SIGNIFICANCE_LEVEL = 0.05
FORMATS = ("table", "markdown", "json")
_STATUS_RANK = {"ok": 0, "diverged": 1, "error": 2}  # "unavailable" is not comparable either way
_EXACT_MAX_SAMPLES = 60  # n1 + n2 up to which the U distribution is computed exactly (integers, instant)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a difference is a regression. ``time_ratio``: new/old median time per step above it (and
    significant) is a slowdown; ``bits``: bits of agreement lost beyond it; ``fingerprint``: any change of the
    final params' bits is a regression (for refactors meant to be bit-exact)."""

    time_ratio: float = 1.10
    bits: float = 0.5
    fingerprint: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.time_ratio) and self.time_ratio > 1.0):
            raise PrecisionError(f"time threshold {self.time_ratio!r} must be a finite ratio > 1 (1.10 = 10% "
                                 "slower)")
        if not (math.isfinite(self.bits) and self.bits >= 0.0):
            raise PrecisionError(f"bits threshold {self.bits!r} must be a finite number of bits >= 0")


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that ``x`` and ``y`` come from the same distribution.

    Exact (the U distribution counted with integers, as the coefficients of the Gaussian binomial
    [n1+n2 choose n1]_q) when there are no ties and n1 + n2 <= 60; otherwise the normal approximation with tie
    and continuity corrections. Same conventions as ``scipy.stats.mannwhitneyu``.
    """
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise PrecisionError("the Mann-Whitney test needs at least one sample on each side")
    combined = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks, ties, i = [0.0] * len(combined), [], 0
    while i < len(combined):  # midranks over runs of equal values
        j = i
        while j + 1 < len(combined) and combined[j + 1][0] == combined[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    u1 = sum(r for r, (_, side) in zip(ranks, combined) if side == 0) - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)  # by symmetry, P(U >= max) is the one-sided tail that doubles to two-sided
    if not ties and n1 + n2 <= _EXACT_MAX_SAMPLES:
        counts = _u_counts(n1, n2)
        tail = sum(counts[int(u):])
        return min(1.0, 2.0 * tail / sum(counts))
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1))
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term))
    if sigma == 0.0:
        return 1.0  # every sample equal: nothing separates them
    z = (u - n1 * n2 / 2.0 - 0.5) / sigma
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0)))


def _u_counts(n1: int, n2: int) -> list[int]:
    """counts[u] = number of orderings of n1 x's and n2 y's with U = u: the coefficients of
    prod_{k=1..n1} (1 - q^(n2+k)) / (1 - q^k), computed exactly in integers."""
    degree = n1 * n2
    coeffs = [1] + [0] * degree
    for k in range(1, n1 + 1):
        for i in range(degree, n2 + k - 1, -1):  # times (1 - q^(n2+k)), highest power first
            coeffs[i] -= coeffs[i - n2 - k]
        for i in range(k, degree + 1):  # divided by (1 - q^k): a running sum with stride k (exact division)
            coeffs[i] += coeffs[i - k]
    return coeffs


@dataclasses.dataclass(frozen=True)
class TimeChange:
    old_s: float
    new_s: float
    ratio: float  # new / old median seconds per step
    p_value: float | None  # None: a report has fewer than 2 timed chunks, no noise estimate
    significant: bool | None

    @property
    def summary(self) -> str:
        if self.significant is None:
            return f"x{self.ratio:.2f} (noise unknown)"
        return f"x{self.ratio:.2f}" if self.significant else f"x{self.ratio:.2f} not significant"


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    label: str
    presence: str  # "both", "added" (only in new), "removed" (only in old)
    old_status: str | None
    new_status: str | None
    time: TimeChange | None = None
    old_bits: float | None = None
    new_bits: float | None = None
    fingerprint_changed: bool | None = None
    regressions: tuple[str, ...] = ()
    improvements: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def bits_delta(self) -> float | None:
        return None if self.old_bits is None or self.new_bits is None else self.new_bits - self.old_bits

    @property
    def verdict(self) -> str:
        if self.regressions:
            return "REGRESSION: " + "; ".join(self.regressions)
        if self.improvements:
            return "improved: " + "; ".join(self.improvements)
        if self.presence != "both":
            return self.presence
        if self.fingerprint_changed:
            return "numerics changed"
        return "; ".join(self.notes) if self.notes else "unchanged"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["bits_delta"] = self.bits_delta
        out["verdict"] = self.verdict
        return out


@dataclasses.dataclass(frozen=True)
class Comparison:
    rows: tuple[Row, ...]
    thresholds: Thresholds
    environment_changes: tuple[str, ...] = ()

    @property
    def regressions(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.regressions)

    def counts(self) -> dict[str, int]:
        rows = self.rows
        return {"regressions": len(self.regressions),
                "improvements": sum(1 for r in rows if r.improvements and not r.regressions),
                "numerics_changed": sum(1 for r in rows if r.fingerprint_changed),
                "unchanged": sum(1 for r in rows if r.verdict == "unchanged"),
                "added": sum(1 for r in rows if r.presence == "added"),
                "removed": sum(1 for r in rows if r.presence == "removed")}

    @property
    def environment_note(self) -> str | None:
        """Said when fingerprints changed and the environments differ: the change may not come from the code."""
        changed = self.counts()["numerics_changed"]
        if not (changed and self.environment_changes):
            return None
        return (f"{changed} fingerprint change(s) may come from the environment differences above, not from the "
                "code: these settings alone can change the bits (docs/numerics.md); compare runs made on one "
                "machine with the same settings to tell")

    def to_dict(self) -> dict:
        return {"thresholds": dataclasses.asdict(self.thresholds) | {"significance_level": SIGNIFICANCE_LEVEL},
                "environment_changes": list(self.environment_changes), "environment_note": self.environment_note,
                "counts": self.counts(),
                "results": [r.to_dict() for r in self.rows]}


def _time_change(old: Result, new: Result) -> TimeChange | None:
    if not old.time_per_step_s or not new.time_per_step_s:
        return None
    ratio = new.time_per_step_s / old.time_per_step_s
    a, b = old.step_times_s or (), new.step_times_s or ()
    if len(a) < 2 or len(b) < 2:
        return TimeChange(old.time_per_step_s, new.time_per_step_s, ratio, None, None)
    p = mann_whitney_p(a, b)
    return TimeChange(old.time_per_step_s, new.time_per_step_s, ratio, p, p < SIGNIFICANCE_LEVEL)


def _pair_row(rid: str, label: str, old: Result, new: Result, th: Thresholds) -> Row:
    regressions, improvements, notes = [], [], []
    time = old_bits = new_bits = fingerprint_changed = None
    ranks = _STATUS_RANK.get(old.status), _STATUS_RANK.get(new.status)
    if None in ranks:
        if old.status != new.status:
            notes.append(f"not comparable: {old.status} -> {new.status}")
    elif ranks[1] > ranks[0]:
        at = f" at step {new.diverged_at}" if new.status == "diverged" else ""
        regressions.append(f"{old.status} -> {new.status}{at}")
    elif ranks[1] < ranks[0]:
        improvements.append(f"{old.status} -> {new.status}")
    if old.status == new.status == "diverged" and old.diverged_at != new.diverged_at:
        notes.append(f"diverges at step {new.diverged_at} (was {old.diverged_at})")
    if old.fingerprint and new.fingerprint:
        fingerprint_changed = old.fingerprint != new.fingerprint
        if fingerprint_changed and th.fingerprint:
            regressions.append("fingerprint changed")
    if old.status == new.status == "ok":
        time = _time_change(old, new)
        if time is not None and time.significant is not False:
            basis = "" if time.significant else " (noise unknown)"
            if time.ratio > th.time_ratio:
                regressions.append(f"slower x{time.ratio:.2f}{basis}")
            elif time.ratio < 1.0 / th.time_ratio:
                improvements.append(f"faster x{time.ratio:.2f}{basis}")
        old_bits, new_bits = old.bits_of_agreement, new.bits_of_agreement
        if old_bits is not None and new_bits is not None:
            delta = new_bits - old_bits
            if delta < -th.bits:
                regressions.append(f"{delta:+.2f} bits of agreement")
            elif delta > th.bits:
                improvements.append(f"{delta:+.2f} bits of agreement")
    return Row(rid, label, "both", old.status, new.status, time, old_bits, new_bits, fingerprint_changed,
               tuple(regressions), tuple(improvements), tuple(notes))


def _label(spec: dict) -> str:
    return (f"{spec['problem']}:{spec['data']}/{spec['optimizer']['name']}/{spec['policy_name']}/"
            f"{spec['backend']}-{spec['device']}")


def _environment_changes(old: dict, new: dict) -> tuple[str, ...]:
    """Differences that make times (machine) or fingerprints (versions, CPU features, XLA_FLAGS, threads, BLAS)
    not comparable as like for like (precision.envdiff)."""
    return tuple(f"{c.key}: {c.old} -> {c.new}" for c in environment_differences(old, new))


def compare_reports(old: Report, new: Report, thresholds: Thresholds = Thresholds()) -> Comparison:
    """Match results by spec id; results in one report only are listed as added or removed."""
    old_by, new_by = old.by_id(), new.by_id()
    ids = list(old_by) + [i for i in new_by if i not in old_by]
    labels = {i: _label((old_by.get(i) or new_by[i]).spec) for i in ids}
    if len(set(labels.values())) < len(labels):  # short labels collide (seeds, steps...): use the full ids
        labels = {i: i for i in ids}
    rows = []
    for rid in ids:
        o, n = old_by.get(rid), new_by.get(rid)
        if o is None:
            rows.append(Row(rid, labels[rid], "added", None, n.status, new_bits=n.bits_of_agreement))
        elif n is None:
            rows.append(Row(rid, labels[rid], "removed", o.status, None, old_bits=o.bits_of_agreement))
        else:
            rows.append(_pair_row(rid, labels[rid], o, n, thresholds))
    return Comparison(tuple(rows), thresholds, _environment_changes(old.environment, new.environment))


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _cells(row: Row) -> tuple[str, ...]:
    t = row.time
    return (row.label, _num(t and t.old_s * 1e6, ".1f"), _num(t and t.new_s * 1e6, ".1f"),
            t.summary if t else "-", _num(t and t.p_value, ".2g"), _num(row.old_bits, ".2f"),
            _num(row.new_bits, ".2f"), _num(row.bits_delta, "+.2f"),
            {True: "changed", False: "same", None: "-"}[row.fingerprint_changed], row.verdict)


_HEADERS = ("case", "old us/step", "new us/step", "time", "p", "old bits", "new bits", "delta bits",
            "fingerprint", "verdict")


def _summary(cmp: Comparison) -> str:
    c = cmp.counts()
    return (f"{c['regressions']} regressions, {c['improvements']} improvements, {c['numerics_changed']} with "
            f"numerics changed, {c['unchanged']} unchanged, {c['added']} added, {c['removed']} removed")


def _criteria(th: Thresholds) -> str:
    text = (f"regression: slower than x{th.time_ratio:g} with p < {SIGNIFICANCE_LEVEL:g} (Mann-Whitney U on "
            f"per-chunk step times), or more than {th.bits:g} bits of agreement lost, or ok -> diverged/error")
    return text + (", or any fingerprint change" if th.fingerprint else "")


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
    rows = [r for r in cmp.rows if not (changed_only and r.verdict == "unchanged")]
    cells = [tuple(map(safe_text, _cells(r))) for r in rows]
    env = [safe_text(f"environments differ: {change}") for change in cmp.environment_changes]
    if cmp.environment_note:
        env.append(cmp.environment_note)
    if fmt == "markdown":
        lines = [f"**precision compare**: {_summary(cmp)}", "", f"_{_criteria(cmp.thresholds)}_", ""]
        lines += [f"> {line}" for line in env] + ([""] if env else [])
        lines += ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        for row, c in zip(rows, cells):
            verdict = f"**{c[-1]}**" if row.regressions else c[-1]
            lines.append("| " + " | ".join(map(_md_cell, [_md_code(c[0]), *c[1:-1], verdict])) + " |")
        return "\n".join(lines)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(_HEADERS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells]
    return "\n".join(lines + [""] + env + [_criteria(cmp.thresholds), _summary(cmp)])
