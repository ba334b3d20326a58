"""``precision bench``: the headline performance ratios of one run (precision/bench.py, docs/performance.md)."""

from __future__ import annotations

import argparse
import sys

from ..errors import SpecError

DESCRIPTION = """\
Time one in-place Adam step per backend (numpy, numba, jax) next to the in-place memory reference and the
installed peers (torch.optim Adam / AdamW fused and foreach, 1 thread; optax adam under jit), the 16-bit steps
against fp32, and a whole fp32 Adam training step of logreg and the MLP against torch and optax. Prints the ratios
of this one run and the CPU features that explain them. Defaults take 1-3 minutes; --quick a few seconds.
Peers that are not importable are reported absent."""


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(float(part)) for part in text.split(",") if part.strip())
    except ValueError:
        raise SpecError(f"--sizes {text!r}: expected comma-separated integers such as 1e6,1e7") from None
    from ..kernels import KERNEL_BLOCK
    bad = [n for n in sizes if n <= 0 or n % KERNEL_BLOCK]
    if not sizes or bad:
        raise SpecError(f"--sizes {text!r}: every size must be a positive multiple of {KERNEL_BLOCK} (the inputs "
                        f"repeat a block of that length)")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(sub):
    p = sub.add_parser("bench", help="headline performance ratios: Adam step vs the memory floor and torch / optax, "
                       "16-bit vs fp32, whole loops vs peers", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="kernel sizes N, comma-separated (default 1e6,1e7; --quick: 1e5); "
                   "multiples of 10000")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats per kernel case, the fastest "
                   "counts (default 5; --quick: 2)")
    p.add_argument("--loop-repeats", type=_positive, default=None, help="timed 200-step calls per training loop "
                   "(default 3; --quick: 1)")
    p.add_argument("--no-loops", action="store_true", help="skip the whole-loop figures")
    p.add_argument("--quick", action="store_true", help="small and fast (N = 1e5, 2 repeats, 1 loop call): checks "
                   "that everything runs; the ratios are not the memory-bound ones")
    p.add_argument("--json", metavar="OUT", default=None, help="also save the figures as JSON to OUT")
    p.set_defaults(handler=main)


def main(args) -> int:
    from ..bench import DEFAULT_SIZES, QUICK_SIZES, format_report, run_bench, save_json

    sizes = _sizes(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (2 if args.quick else 5)
    loop_repeats = args.loop_repeats or (1 if args.quick else 3)
    if args.json:
        from .._atomic import check_file_target
        check_file_target(args.json, "--json output")

    def progress(text: str) -> None:
        if sys.stderr.isatty():
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)

    report, wall = run_bench(sizes, repeats, not args.no_loops, loop_repeats, progress)
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    print(format_report(report))
    print(f"\n{wall:.1f} s")
    if args.json:
        save_json(report, args.json)
        print(f"saved {args.json}")
    return 0
