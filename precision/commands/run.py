"""``precision run``: train a matrix of specs, compare each with its float64 reference, print and save a report."""

from __future__ import annotations

import sys
from pathlib import Path

from .._atomic import OutputError, check_file_target, check_folder_target
from ..backends import BACKENDS, backend_availability
from ..checkpoint import Checkpoint, checkpoint_path
from ..errors import PrecisionError, SpecError
from ..matrix import DEFAULT_STEPS, build_specs, default_specs, split_list
from ..report import Report, environment, now_utc
from ..runner import run, validate
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


EXIT_CODES = """\
exit status:
  0    every run finished: ok, diverged (a result, not a failure), or unavailable on a device not asked for
  1    some run errored (its message is in the report), or an output could not be written after training
  2    bad input, found before any training: an unknown name or value, an output path that cannot be written,
       --backend naming a backend that cannot run here, --plot without matplotlib
  130  interrupted (Ctrl-C or SIGTERM); the results finished so far are saved as the report
  141  stdout closed early (e.g. piped into head); the report is still written
"""

DESCRIPTION = """\
Without matrix options, runs the built-in default matrix. Every option that takes a list accepts
comma-separated values; their cross product runs.

Every output path is checked before training: --out (and the plots of --plot) must be a regular file or
absent, --save-params a folder or absent, each in a writable folder. Each result is appended to
<out>.partial.jsonl as it finishes; the final report replaces it. After a crash or kill, rerun the same
command with --resume to run only what is missing.
"""


def add_parser(sub):
    import argparse
    p = sub.add_parser("run", help="train a matrix of configurations and report drift and runtime",
                       description=DESCRIPTION, epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", help="linreg, logreg, softmax, mlp (comma-separated)")
    p.add_argument("--data", help="synthetic (default), breast_cancer, digits, diabetes")
    p.add_argument("--optimizer", help="sgd, adam, adamw")
    p.add_argument("--policy", help="presets (fp64, fp32, fp16, bf16, fp16-mixed, bf16-mixed, ...) or strings "
                   "like 'p=bf16,c=bf16,a=fp32,s=fp32,m=fp32'; separate several with ';' or ','-free presets")
    p.add_argument("--backend", help="numpy, numba, jax (default: every available one; a backend named here "
                   "that cannot run is an error)")
    p.add_argument("--device", help="cpu (default), gpu")
    p.add_argument("--steps", default=str(DEFAULT_STEPS), help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", default="0", help="data/init seed(s) (default 0)")
    p.add_argument("--batch-size", default="128", help="minibatch size, or 'full' (default 128)")
    p.add_argument("--lr", help="learning rate (default: the optimizer's own)")
    p.add_argument("--record-every", default="20", help="record params every N steps (default 20)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report JSON path (default {DEFAULT_OUT})")
    p.add_argument("--save-params", metavar="DIR", help="write each run's params trajectory as DIR/<id>.npz")
    p.add_argument("--plot", action="store_true", help="also write drift and runtime plots next to the report")
    p.add_argument("--resume", action="store_true", help="reuse the ok and diverged results already in --out and "
                   "its .partial.jsonl checkpoint; run only the other specs")
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


def plot_paths(out: Path) -> list[Path]:
    """The files ``plot_report(report, out.with_suffix(""))`` writes (names as in precision/plot.py)."""
    from ..plot import SUFFIXES
    prefix = out.with_suffix("")
    return [prefix.with_name(f"{prefix.name}-{name}{suffix}") for name in ("drift", "tradeoff") for suffix in SUFFIXES]


def check_outputs(args) -> None:
    """Every path the run will write, checked before any training: one OutputError or SpecError, else nothing."""
    out = Path(args.out)
    check_file_target(out, "--out")
    check_file_target(checkpoint_path(out), "checkpoint file")
    if args.save_params:
        check_folder_target(args.save_params, "--save-params")
    if args.plot:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401 -- the import plot_report needs, tried now
        except ImportError:
            raise SpecError("--plot needs matplotlib: pip install 'precision[plot]'") from None
        for path in plot_paths(out):
            check_file_target(path, "--plot output")


def check_backends(args, specs) -> None:
    """A backend the user named must run on at least one of the devices asked for; else bad input (exit 2), not
    a report of "unavailable" rows. Without --backend, only the available backends were chosen."""
    if not args.backend:
        return
    devices: dict[str, list[str]] = {}
    for spec in specs:
        devices.setdefault(spec.backend, [])
        if spec.device not in devices[spec.backend]:
            devices[spec.backend].append(spec.device)
    for name, devs in devices.items():
        avail = [backend_availability(name, d) for d in devs]
        if not any(a.available for a in avail):
            usable = [b for b in BACKENDS if any(backend_availability(b, d).available for d in devs)]
            raise SpecError(f"--backend {name} cannot run on {'/'.join(devs)} here: {avail[0].reason}; "
                            f"usable here: {', '.join(usable) or 'none'}")


def main(args) -> int:
    specs = validate(specs_from_args(args))  # e.g. --seed 0,0: a repeated id
    out = Path(args.out)
    check_outputs(args)
    check_backends(args, specs)
    # Last check, as it locks and creates the checkpoint file. Leaving the block keeps the file if it holds any
    # result (and releases the lock); only remove(), once a report holds its results, deletes it.
    with Checkpoint(out, resume=args.resume) as checkpoint:
        try:
            report = run(specs, progress=_Progress(sys.stderr.isatty() and not args.quiet),
                         save_params=args.save_params, finished=checkpoint.found, on_result=checkpoint.append)
        except KeyboardInterrupt:
            return _save_interrupted(specs, checkpoint, out)
        try:
            report.save(out)
        except (OSError, OutputError) as exc:
            print(f"precision run: error: the report could not be written to {str(out)!r} ({exc}); its "
                  f"{len(specs)} results are kept in {str(checkpoint.path)!r}: rerun with --resume to write it",
                  file=sys.stderr)
            return 1
        checkpoint.remove()
    status = 0
    statuses = [r.status for r in report.results]
    if "error" in statuses:
        print(f"precision run: error: {statuses.count('error')} of {len(statuses)} runs failed; their messages "
              f"are in the report", file=sys.stderr)
        status = 1
    if args.plot:
        try:
            from ..plot import plot_report
            written = plot_report(report, out.with_suffix(""))
        except (OSError, PrecisionError) as exc:
            print(f"precision run: error: plots not written: {exc}", file=sys.stderr)
            written, status = [], 1
    # stdout last: a reader that goes away early (| head) costs nothing already on disk.
    print(format_table(report))
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "diverged", "unavailable", "error")
                        if statuses.count(s))
    print(f"\n{len(statuses)} runs ({summary}); report written to {out}")
    if args.plot:
        for path in written:
            print(f"plot written to {path}")
    return status


def _save_interrupted(specs, checkpoint: Checkpoint, out: Path) -> int:
    """Ctrl-C or SIGTERM: the finished results (and those --resume found) become the report, atomically."""
    known = {**checkpoint.found, **checkpoint.results}
    done = [known[s.id] for s in specs if s.id in known]
    if not done:
        checkpoint.discard()
        _say("precision run: interrupted before any run finished; nothing written")
        return 130
    try:
        Report(results=tuple(done), environment=environment(), created=now_utc()).save(out)
    except (OSError, OutputError) as exc:
        _say(f"precision run: interrupted; the report could not be written ({exc}); the finished results are kept in "
             f"{str(checkpoint.path)!r}")
        return 130
    checkpoint.remove()
    _say(f"precision run: interrupted; {len(done)} of {len(specs)} results saved to {out}; rerun with --resume to "
         f"run the rest")
    return 130


def _say(line: str) -> None:
    """One line on stderr, first clearing the progress line a terminal may show."""
    print(("\r\033[K" if sys.stderr.isatty() else "") + line, file=sys.stderr)
