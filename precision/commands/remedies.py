"""``precision remedies``: the field's fixes for low-precision training, measured side by side (docs/remedies.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._grid import add_case_options, add_output_options, add_run_options
from ._options import batch_size as parse_batch_size
from ._options import positive_int
from .ablate import EXIT_CODES, _items, _lr, _seed

DESCRIPTION = """\
Runs each remedy for low-precision training on identical runs (same data, init, batches and seed; only the
arithmetic differs) and prints, per case, what it buys and what it costs:

  bits         bits of agreement with the float64 reference (final params)
  recovered    bits minus the baseline's (the first policy: pure bf16)
  flips        share of test predictions that differ from the reference's
  us/step      median time per step; 'x baseline' is that over the baseline's, measured in the same run
  bytes/param  params + master copy + optimizer state + Kahan buffer, kept between steps
  stagnation   share of parameters whose non-zero update round-to-nearest loses (mean over record steps)
  skipped      steps skipped by dynamic loss scaling

Remedies (--policies to choose others; the first is the baseline): bf16, bf16-mixed, torch-bf16, bf16-sr,
bf16-kahan, fp16-mixed, torch-amp-fp16. Without --problem and --data, the default cases run (logreg on
breast_cancer, mlp on digits).
"""


def add_parser(sub):
    p = sub.add_parser("remedies", help="which remedy? master weights, stochastic rounding, Kahan updates, opmath "
                       "and loss scaling measured side by side", description=DESCRIPTION, epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", help="comma-separated presets or quoted policy strings separated by ';' "
                   "(default: the remedies above; the first is the baseline)")
    add_case_options(p)
    add_run_options(p)
    p.add_argument("--plot", metavar="PREFIX", help="also draw PREFIX-remedies.png/.svg: bits recovered against "
                   "time per step relative to the baseline (needs matplotlib)")
    add_output_options(p)
    p.set_defaults(handler=main)


def _policies(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from ..errors import SpecError
    sep = ";" if ";" in text or "=" in text else ","  # policy strings hold commas of their own
    items = [t.strip() for t in text.split(sep)]
    if not all(items):
        raise SpecError(f"--policies {text!r} is empty or has an empty item; give presets separated by ',' or "
                        f"policy strings separated by ';'")
    return items


def main(args) -> int:
    from .._atomic import check_file_target
    from ..remedies import format_remedies, plan_remedies, plot_remedies, tabulate
    from ..runner import validate
    from ._grid import run_grid, say, summary_line

    specs = plan_remedies(_items(args, "problem"), _items(args, "data"), _items(args, "optimizer") or ["adam"],
                          _items(args, "backend") or ["numpy"], positive_int("steps", args.steps), _seed(args.seed),
                          parse_batch_size(args.batch_size), _lr(args.lr),
                          record_every=positive_int("record-every", args.record_every),
                          policies=_policies(args.policies))
    specs = validate(specs, force=args.force, cli_names=True)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_file_target(out, "--out")
    if args.plot:
        from .._plot_style import _matplotlib
        _matplotlib()  # before training: a missing matplotlib is bad input, not a lost run
        check_file_target(Path(args.plot + "-remedies.png"), "--plot")
    report, status, written = run_grid("remedies", specs, out, force=args.force, quiet=args.quiet)
    if report is None:
        return status
    rows = tabulate(report)
    if args.plot:
        try:
            from .._plot_style import _colors
            for path in plot_remedies(rows, args.plot, _colors(report.results)):
                say(f"wrote {path}")
        except OSError as exc:
            say(f"precision remedies: error: the plot could not be written ({exc})")
            status = 1
    print(format_remedies(rows, markdown=args.markdown))
    print(summary_line(report, out, written))
    return status
