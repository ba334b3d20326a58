"""The ``precision`` command line. Each subcommand lives in precision/commands/<name>.py with
``add_parser(subparsers)`` and ``main(args) -> int``. Library errors become one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PrecisionError

__all__ = ["main", "COMMANDS"]

COMMANDS = ("run", "list", "show", "compare", "plot")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="precision", description="Measure how training drifts from a float64 reference "
                     "across float formats, mixed-precision policies and backends.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"precision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PrecisionError as exc:
        print(f"precision {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"precision {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
