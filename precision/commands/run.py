"""``precision run``: train a matrix of specs, compare each with its float64 reference, print and save a report."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SpecError
from ..matrix import DEFAULT_STEPS, build_specs, default_specs, split_list
from ..runner import run
from ..table import format_table

DEFAULT_OUT = "precision-report.json"


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise SpecError(f"{name} {text!r} is not an integer") from None
        if value <= 0:
            raise SpecError(f"{name} {value} must be a positive integer")
        return value
    return parse


def _batch_size(text: str):
    return None if text.strip().lower() in ("full", "none", "0") else _positive_int("batch size")(text)


def add_parser(sub):
    p = sub.add_parser("run", help="train a matrix of configurations and report drift and runtime",
                       description="Without matrix options, runs the built-in default matrix. Every option that "
                       "takes a list accepts comma-separated values; their cross product runs.")
    p.add_argument("--problem", help="linreg, logreg, softmax, mlp (comma-separated)")
    p.add_argument("--data", help="synthetic (default), breast_cancer, digits, diabetes")
    p.add_argument("--optimizer", help="sgd, adam, adamw")
    p.add_argument("--policy", help="presets (fp64, fp32, fp16, bf16, fp16-mixed, bf16-mixed, ...) or strings "
                   "like 'p=bf16,c=bf16,a=fp32,s=fp32,m=fp32'; separate several with ';' or ','-free presets")
    p.add_argument("--backend", help="numpy, numba, jax (default: every available one)")
    p.add_argument("--device", help="cpu (default), gpu")
    p.add_argument("--steps", default=str(DEFAULT_STEPS), help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", default="0", help="data/init seed(s) (default 0)")
    p.add_argument("--batch-size", default="128", help="minibatch size, or 'full' (default 128)")
    p.add_argument("--lr", help="learning rate (default: the optimizer's own)")
    p.add_argument("--record-every", default="20", help="record params every N steps (default 20)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report JSON path (default {DEFAULT_OUT})")
    p.add_argument("--save-params", metavar="DIR", help="write each run's params trajectory as DIR/<id>.npz")
    p.add_argument("--plot", action="store_true", help="also write drift and runtime plots next to the report")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(handler=main)


def split_policies(text: str) -> list[str]:
    """Policies are separated by ';'. A ',' list is split too when every item is a preset (no '=')."""
    if ";" in text:
        return split_list(text.replace(";", "\n").splitlines())
    return [text] if "=" in text else split_list(text)


def specs_from_args(args):
    steps = _positive_int("steps")(args.steps)
    record_every = _positive_int("record-every")(args.record_every)
    batch_size = _batch_size(args.batch_size)
    seeds = [int(s) if s.lstrip("-").isdigit() else _bad_seed(s) for s in split_list(args.seed)]
    lr = None
    if args.lr is not None:
        try:
            lr = float(args.lr)
        except ValueError:
            raise SpecError(f"learning rate {args.lr!r} is not a number") from None
    matrix_options = (args.problem, args.data, args.optimizer, args.policy)
    if all(o is None for o in matrix_options):
        specs = default_specs(split_list(args.backend) if args.backend else None)
        if args.device:
            raise SpecError("--device needs an explicit matrix (--problem ...); the default matrix runs on the cpu")
        import dataclasses
        return [dataclasses.replace(s, steps=steps, record_every=record_every, batch_size=batch_size, seed=seed,
                                    optimizer=dataclasses.replace(s.optimizer, lr=lr) if lr else s.optimizer)
                for s in specs for seed in seeds]
    from ..backends import BACKENDS, backend_availability
    backends = split_list(args.backend) if args.backend else [
        b for b in BACKENDS if backend_availability(b, "cpu").available]
    return build_specs(
        problems=split_list(args.problem or "logreg"), optimizers=split_list(args.optimizer or "adam"),
        policies=split_policies(args.policy or "fp64,fp32,fp16,bf16,bf16-mixed"), backends=backends,
        devices=split_list(args.device or "cpu"), data=split_list(args.data or "synthetic"), seeds=seeds,
        steps=steps, batch_size=batch_size, lr=lr, record_every=record_every)


def _bad_seed(text):
    raise SpecError(f"seed {text!r} is not an integer")


class _Progress:
    """One updating line on a terminal; nothing when stderr is not a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, i, n, spec, result):
        if not self.enabled:
            return
        line = f"[{i}/{n}] {spec.id}  {result.status}"
        sys.stderr.write("\r\033[K" + line[:150])
        if i == n:
            sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def main(args) -> int:
    specs = specs_from_args(args)
    out = Path(args.out)
    report = run(specs, progress=_Progress(sys.stderr.isatty() and not args.quiet), save_params=args.save_params)
    report.save(out)
    print(format_table(report))
    statuses = [r.status for r in report.results]
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "diverged", "unavailable", "error")
                        if statuses.count(s))
    print(f"\n{len(statuses)} runs ({summary}); report written to {out}")
    if args.plot:
        from ..plot import plot_report
        for path in plot_report(report, out.with_suffix("")):
            print(f"plot written to {path}")
    return 0
