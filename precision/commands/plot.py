"""``precision plot REPORT.json``: drift over training steps and the runtime-vs-drift trade-off, PNG and SVG."""

from __future__ import annotations

from pathlib import Path

from ..report import load_report


def add_parser(sub):
    p = sub.add_parser("plot", help="plot drift over training steps and the runtime-vs-drift trade-off",
                       description="Writes <name>-drift.png/.svg (bits of agreement at each record step, one "
                       "panel per problem x data x optimizer settings, one line per policy x backend) and "
                       "<name>-tradeoff.png/.svg (time per step against final bits), where <name> is the "
                       "report's file name without .json. A policy has the same colour in every figure, a backend "
                       "the same line style and marker; backends with exactly equal trajectories are named in "
                       "the panel's legend, each diverged run is marked where it diverged, and grey lines mark "
                       "each params format's precision p (what one rounding of the params leaves; not a "
                       "ceiling). docs/plots.md says how to read them. Needs matplotlib: "
                       "pip install 'precision[plot]'.")
    p.add_argument("report", metavar="REPORT.json", help="a report written by precision run")
    p.add_argument("--out", metavar="DIR", help="folder for the figures (default: the report's folder)")
    p.set_defaults(handler=main)


def main(args) -> int:
    from ..plot import plot_report
    path = Path(args.report)
    report = load_report(path)
    folder = Path(args.out) if args.out else path.parent
    for written in plot_report(report, folder / path.with_suffix("").name):
        print(f"plot written to {written}")
    return 0
