"""The ``precision`` command line. Each subcommand lives in precision/commands/<name>.py with
``add_parser(subparsers)`` and ``main(args) -> int``. Library errors become one line on stderr and exit status 2;
the exit statuses are listed in docs/cli.md and in ``precision run --help``."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .errors import PrecisionError

__all__ = ["main", "COMMANDS"]

COMMANDS = ("run", "sweep", "list", "show", "compare", "plot", "ablate", "remedies", "bench")


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


def _terminate(signum, frame):
    # SIGTERM takes the Ctrl-C path: the run saves what finished and exits 130, instead of dying mid-write.
    raise KeyboardInterrupt


def _quiet_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so the exit-time flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status (0 ok, 1 a run failed, 2 bad input, 130 interrupted, 141 stdout
    closed early; see docs/cli.md). Everything, parser building and argument parsing included, is inside the
    handlers, so Ctrl-C while the frameworks import is one line too."""
    name = "precision"
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        previous = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        name = f"precision {args.command}"
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe must raise inside this try
        return status
    except PrecisionError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Like a command killed by SIGPIPE in a shell (128 + 13), without a traceback.
        _quiet_stdout()
        return 141
    except OSError as exc:  # the file system refused something the checks could not foresee
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
