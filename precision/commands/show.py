"""``precision show REPORT.json``: print a saved report's table."""

from __future__ import annotations

from ..report import load_report
from ..table import format_table


def add_parser(sub):
    p = sub.add_parser("show", help="print the table of a saved report")
    p.add_argument("report", help="a report JSON written by precision run")
    p.set_defaults(handler=main)


def main(args) -> int:
    report = load_report(args.report)
    print(format_table(report))
    env = report.environment
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()) if v)
    print(f"\n{len(report.results)} results; created {report.created}; {env.get('cpu', '?')}; {versions}")
    return 0
