"""``precision compare OLD.json NEW.json``: what changed between two reports; exit 1 when something regressed."""

from __future__ import annotations

import argparse
import math

from ..compare import FORMATS, SIGNIFICANCE_LEVEL, Thresholds, compare_reports, format_comparison
from ..report import load_report

_DEFAULTS = Thresholds()


def _number(name: str, valid):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number") from None
        if not (math.isfinite(value) and valid(value)):
            raise argparse.ArgumentTypeError(f"{name} {text!r} is out of range")
        return value
    return parse


def add_parser(sub):
    p = sub.add_parser(
        "compare", help="compare two reports: time, drift and numerics per result; exit 1 on a regression",
        description="Matches results by spec id. A time change counts only when the per-chunk step times of the "
        f"two runs separate (two-sided Mann-Whitney U, p < {SIGNIFICANCE_LEVEL:g}) and the median moved past "
        "--time-threshold; drift (bits of agreement) is deterministic, so only --bits-threshold decides; a changed "
        "fingerprint means the final params differ in at least one bit. Exit status: 0 no regression, 1 "
        "regression, 2 bad input.")
    p.add_argument("old", metavar="OLD.json", help="the baseline report")
    p.add_argument("new", metavar="NEW.json", help="the report to judge")
    p.add_argument("--time-threshold", type=_number("time threshold", lambda v: v > 1.0),
                   default=_DEFAULTS.time_ratio, metavar="RATIO",
                   help=f"new/old time per step above which a significant change is a regression "
                   f"(default {_DEFAULTS.time_ratio:g}, i.e. 10%% slower; must be > 1)")
    p.add_argument("--bits-threshold", type=_number("bits threshold", lambda v: v >= 0.0),
                   default=_DEFAULTS.bits, metavar="BITS",
                   help=f"bits of agreement lost above which it is a regression (default {_DEFAULTS.bits:g})")
    p.add_argument("--fail-on-fingerprint", action="store_true",
                   help="treat any fingerprint change (numerics moved by even one bit) as a regression")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table (default), markdown (for a pull request comment) or json")
    p.add_argument("--changed-only", action="store_true", help="leave out unchanged results")
    p.set_defaults(handler=main)


def main(args) -> int:
    old, new = load_report(args.old), load_report(args.new)
    thresholds = Thresholds(time_ratio=args.time_threshold, bits=args.bits_threshold,
                            fingerprint=args.fail_on_fingerprint)
    comparison = compare_reports(old, new, thresholds)
    print(format_comparison(comparison, args.format, changed_only=args.changed_only))
    return 1 if comparison.regressions else 0
