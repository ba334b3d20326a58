"""``precision show REPORT.json``: print a saved report's table."""

from __future__ import annotations

from .._terminal import safe_text
from ..report import Report, load_report
from ..table import format_report


def add_parser(sub):
    p = sub.add_parser("show", help="print the table of a saved report")
    p.add_argument("report", help="a report JSON written by precision run")
    p.set_defaults(handler=main)


def summary(report: Report) -> str:
    """The line under the table: count, date, CPU and versions. Report text, so escaped (precision/_terminal.py)."""
    env = report.environment
    versions = ", ".join(f"{k} {v}" for k, v in sorted((env.get("versions") or {}).items()) if v)
    return safe_text(f"{len(report.results)} results; created {report.created}; {env.get('cpu', '?')}; {versions}")


def main(args) -> int:
    report = load_report(args.report)
    print(format_report(report))
    print()
    print(summary(report))
    return 0
