"""``precision compare OLD.json NEW.json``: what changed between two reports; exit 1 when something regressed."""

from __future__ import annotations

import argparse
import math

from ..compare import (BITS_THRESHOLD_RANGE, FORMATS, SIGNIFICANCE_LEVEL, TIME_THRESHOLD_RANGE, Thresholds,
                       compare_reports, format_comparison)
from ..report import load_report

_DEFAULTS = Thresholds()


def _number(name: str, valid, valid_range: str):
    """An argparse type: a float for which ``valid`` holds; else one line naming the option's range."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number: {valid_range}") from None
        if not (math.isfinite(value) and valid(value)):
            raise argparse.ArgumentTypeError(f"{name} {text!r} is out of range: {valid_range}")
        return value
    return parse


def add_parser(sub):
    p = sub.add_parser(
        "compare", help="compare two reports: time, drift and numerics per result; exit 1 on a regression",
        description="Matches results by spec id. Times are divided by each report's calibration kernel (timed in "
        "the same run) so that a loaded machine does not read as slower code. A time change counts only when the "
        f"normalised per-chunk step times of the two runs separate (two-sided Mann-Whitney U, p < "
        f"{SIGNIFICANCE_LEVEL:g}) and the normalised median moved past --time-threshold; a change past it that too "
        "few samples cannot test is printed as UNCONFIRMED and does not fail (docs/compare.md); drift (bits of "
        "agreement) is deterministic, so only --bits-threshold decides; a changed "
        "fingerprint means the final params differ in at least one bit. Exit status: 0 no regression, 1 "
        "regression, 2 bad input.")
    p.add_argument("old", metavar="OLD.json", help="the baseline report")
    p.add_argument("new", metavar="NEW.json", help="the report to judge")
    p.add_argument("--time-threshold", type=_number("time threshold", lambda v: v > 1.0, TIME_THRESHOLD_RANGE),
                   default=_DEFAULTS.time_ratio, metavar="RATIO",
                   help=f"new/old time per step (normalised) above which a significant change is a regression "
                   f"(default {_DEFAULTS.time_ratio:g}, i.e. 50%% slower; must be > 1)")
    p.add_argument("--bits-threshold", type=_number("bits threshold", lambda v: v >= 0.0, BITS_THRESHOLD_RANGE),
                   default=_DEFAULTS.bits, metavar="BITS",
                   help=f"bits of agreement lost above which it is a regression (default {_DEFAULTS.bits:g})")
    p.add_argument("--fail-on-fingerprint", action="store_true",
                   help="treat any fingerprint change (numerics moved by even one bit) as a regression")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table (default), markdown (for a pull request comment) or json")
    p.add_argument("--changed-only", action="store_true",
                   help="leave out unchanged results (results that failed the same way in both reports are always "
                   "summed up in one line; --format json lists them)")
    p.set_defaults(handler=main)


def main(args) -> int:
    old, new = load_report(args.old), load_report(args.new)
    thresholds = Thresholds(time_ratio=args.time_threshold, bits=args.bits_threshold,
                            fingerprint=args.fail_on_fingerprint)
    comparison = compare_reports(old, new, thresholds)
    print(format_comparison(comparison, args.format, changed_only=args.changed_only))
    return 1 if comparison.regressions else 0
