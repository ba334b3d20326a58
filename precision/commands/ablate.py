"""``precision ablate POLICY``: which field of a mixed-precision recipe carries the bits (docs/ablation.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SpecError
from ._grid import add_case_options, add_output_options, add_run_options
from ._options import batch_size as parse_batch_size
from ._options import positive_int

EXIT_CODES = """\
exit status:
  0    every run finished (a diverged run is a result, not a failure)
  1    some run errored (its message is in the table and, with --out, in the report), or nothing ran,
       or the report could not be written
  2    bad input, found before any training: an unknown policy, format, name or value, a problem that does
       not fit its data set, a grid over the size limits (without --force), an unusable --out; nothing written
  130  interrupted (Ctrl-C or SIGTERM); with --out, the results finished so far are saved as the report
"""

DESCRIPTION = """\
Runs POLICY, its reference (POLICY's shape with every format at --reference, no loss scale) and every
one-field change between them, and prints, per case, what each field is worth in bits of agreement with
the float64 reference:

  raise  POLICY with ONE field set to the reference's value; delta = its bits - POLICY's bits
  lower  the reference with ONE field set to POLICY's value; delta = its bits - the reference's bits

Raising 'master' when POLICY has none adds a master copy in the reference format; raising the loss scale
removes it. A one-field change that the policy rules refuse (an accumulator narrower than compute) is a row
with status 'invalid' and the reason. Without --problem and --data, the default cases run (logreg on
breast_cancer, mlp on digits). --problem, --data, --optimizer and --backend take comma-separated lists; each
combination is one table.
"""


def add_parser(sub):
    p = sub.add_parser("ablate", help="which field of a mixed-precision policy carries the bits: one-field changes "
                       "towards and from the float64 reference", description=DESCRIPTION, epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", metavar="POLICY", help="a preset (bf16-mixed, fp16-mixed, ...) or a string like "
                   "'p=bf16,c=bf16,a=fp32,s=fp32,m=fp32'")
    add_case_options(p)
    p.add_argument("--reference", default="fp64", help="the format every field is raised to: fp64 (default) or "
                   "fp32; bits are always measured against the float64 run")
    add_run_options(p)
    add_output_options(p)
    p.set_defaults(handler=main)


def _seed(text: str) -> int:
    from ..data import MAX_SEED
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"--seed {text!r} is not an integer; valid seeds: 0..{MAX_SEED}") from None
    if not 0 <= value <= MAX_SEED:
        raise SpecError(f"--seed {value} is out of range; valid seeds: 0..{MAX_SEED}")
    return value


def _lr(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"--lr {text!r} is not a number; valid: a positive finite number") from None


def _items(args, option: str) -> list[str] | None:
    """The comma-separated values of --option (None when not given); an empty value or item is bad input."""
    from ..backends import BACKENDS
    from ..data import DATA_SOURCES
    from ..optim import OPTIMIZERS
    from ..problems import PROBLEMS
    text = getattr(args, option)
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        choices = {"problem": PROBLEMS, "data": DATA_SOURCES, "optimizer": OPTIMIZERS, "backend": BACKENDS}[option]
        raise SpecError(f"--{option} {text!r} is empty or has an empty item; valid choices: "
                        f"{', '.join(choices)} (comma-separated)")
    return items


def main(args) -> int:
    from .._atomic import check_file_target
    from ..ablate import format_ablation, plan_ablation, tabulate
    from ..runner import validate
    from ._grid import run_grid, summary_line

    # Everything is checked before anything runs or is written: names and values, the policy and the reference,
    # the grid as precision run checks it (problem/data fit, batch sizes, sizes, backends), the output path.
    plan = plan_ablation(args.policy, _items(args, "problem"), _items(args, "data"), _items(args, "optimizer"),
                         _items(args, "backend"), positive_int("steps", args.steps), _seed(args.seed),
                         parse_batch_size(args.batch_size), _lr(args.lr), reference=args.reference,
                         record_every=positive_int("record-every", args.record_every))
    specs = validate(plan.specs, force=args.force, cli_names=True)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_file_target(out, "--out")
    report, status, written = run_grid("ablate", specs, out, force=args.force, quiet=args.quiet)
    if report is None:
        return status
    # stdout last: a reader that goes away early (| head) costs nothing already on disk.
    print(format_ablation(tabulate(plan, report), markdown=args.markdown))
    print(summary_line(report, out, written))
    return status
