"""``precision run``: train a matrix of specs, compare each with its float64 reference, print and save a report."""

from __future__ import annotations

import sys
from pathlib import Path

from .._atomic import OutputError, check_file_target, check_folder_target
from ..backends import BACKENDS, backend_availability
from ..checkpoint import Checkpoint, checkpoint_path
from ._options import batch_size as parse_batch_size
from ._options import positive_int
from ..data import DATA_SOURCES, MAX_SEED
from ..errors import PrecisionError, SpecError, choice_error
from ..floors import FLOOR_SEEDS, MAX_FLOOR_SEEDS, check_floor_seeds
from ..formats import FORMATS
from ..inference import INFER_FORMATS
from ..matrix import DEFAULT_STEPS, MEMORY_LIMIT, REPORT_LIMIT, WORK_LIMIT, build_specs, default_specs, split_list
from ..optim import OPTIMIZERS
from ..policy import PRESETS
from ..problems import PROBLEMS
from ..report import Report, environment, now_utc
from ..runner import Serving, run, validate
from ..spec import DEVICES
from ..table import format_report

DEFAULT_OUT = "precision-report.json"


# What each list option accepts, for the message about an empty value or an empty item.
_CHOICES = {"problem": ", ".join(PROBLEMS), "data": ", ".join(DATA_SOURCES), "optimizer": ", ".join(OPTIMIZERS),
            "policy": ", ".join(PRESETS) + " or 'p=..,c=..' strings", "backend": ", ".join(BACKENDS),
            "device": ", ".join(DEVICES), "seed": f"integers in 0..{MAX_SEED}"}


def _items(args, option: str) -> list[str] | None:
    """The comma-separated values of --option (None when not given); an empty value or item is bad input."""
    text = getattr(args, option)
    if text is None:
        return None
    try:
        items = (split_policies(text) if option == "policy" else split_list(text)) if text.strip() else []
    except SpecError:  # what split_list refuses: an empty item ("logreg,")
        items = []
    if not items:
        raise SpecError(f"--{option} {text!r} is empty or has an empty item; valid choices: "
                        f"{_CHOICES[option]} (comma-separated)")
    return items


EXIT_CODES = """\
exit status:
  0    every run finished: ok, diverged (a result, not a failure), or unavailable on a device not asked for
  1    some run errored (its message is in the report), or an output could not be written after training;
       also when nothing ran (every run errored or was unavailable): an existing report at --out is then kept
  2    bad input, found before any training: an unknown name or value, a problem that does not fit its data set,
       a grid over the size limits (without --force), an output path that cannot be written, --backend naming a
       backend that cannot run here, --plot without matplotlib; nothing is written
  130  interrupted (Ctrl-C or SIGTERM); the results finished so far are saved as the report
  141  stdout closed early (e.g. piped into head); the report is still written
"""

DESCRIPTION = f"""\
Without matrix options, runs the built-in default matrix. Every option that takes a list accepts
comma-separated values; their cross product runs.

The whole grid is checked before any run starts (names, problem/data fit, devices, seeds, batch sizes,
backends, optional packages) and its size estimated: a grid estimated above {MEMORY_LIMIT // 2**30} GiB of memory,
{WORK_LIMIT:.0e} multiply-adds (steps x batch rows x params, summed over runs) or a {REPORT_LIMIT // 2**20} MiB
report is refused unless --force is given.

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
    add_matrix_options(p)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report JSON path (default {DEFAULT_OUT})")
    p.add_argument("--save-params", metavar="DIR", help="write each run's params trajectory as DIR/<id>.npz")
    p.add_argument("--plot", action="store_true", help="also write drift and runtime plots next to the report")
    p.add_argument("--resume", action="store_true", help="reuse the ok and diverged results already in --out and "
                   "its .partial.jsonl checkpoint; run only the other specs")
    p.add_argument("--force", action="store_true", help="run a grid over the size limits anyway (see above)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--noise-floor", nargs="?", const=str(FLOOR_SEEDS), metavar="K",
                   help=f"measure noise floors (K float64 seeds, default {FLOOR_SEEDS}, and one reordered run per "
                        f"reference configuration) and give each result a verdict: within seed noise, above seed "
                        f"noise or order-dominated; 0 turns them off (default: on, K = {FLOOR_SEEDS}, for the "
                        f"default matrix; off otherwise)")
    p.add_argument("--infer-policy", metavar="FORMATS",
                   help=f"serve each trained model in these formats and measure inference parity against fp64 on "
                        f"the same backend (flip rate, KL, logit ulps, accuracy change); comma-separated formats, "
                        f"or 'none' (default: {','.join(INFER_FORMATS)} for the default matrix; none otherwise)")
    p.add_argument("--batch-invariance", action="store_true",
                   help="also check whether each trained model's test logits depend on the batch they are served "
                        "in (batch sizes 1, 3, 32, 128, all; positions in a batch of 32)")
    p.set_defaults(handler=main)


def add_matrix_options(p) -> None:
    """The options that make the grid (read by :func:`specs_from_args`): ``precision run`` and
    ``precision sweep`` share them."""
    p.add_argument("--problem", help="linreg, logreg, softmax, mlp (comma-separated)")
    p.add_argument("--data", help="synthetic (default), breast_cancer, digits, diabetes")
    p.add_argument("--optimizer", help="sgd, adam, adamw")
    p.add_argument("--policy", help="presets (fp64, fp32, fp16, bf16, fp16-mixed, bf16-mixed, ...) or strings "
                   "like 'p=bf16,c=bf16,a=fp32,s=fp32,m=fp32'; separate several with ';' or ','-free presets")
    p.add_argument("--backend", help="numpy, numba, jax (default: every available one; a backend named here "
                   "that cannot run is an error)")
    p.add_argument("--device", help="cpu (default), gpu")
    p.add_argument("--steps", default=str(DEFAULT_STEPS), help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", default="0", help=f"data/init seed(s), integers in 0..{MAX_SEED} (default 0)")
    p.add_argument("--batch-size", default="128", help="minibatch size (at most the data set's training rows), "
                   "or 'full' (default 128)")
    p.add_argument("--lr", help="learning rate (default: the optimizer's own)")
    p.add_argument("--accum-steps", default="1", metavar="K",
                   help="gradient accumulation: each step's batch as K micro-batches whose gradients are summed in "
                        "the accumulator format (comma-separated for several; default 1: none); a run with K > 1 "
                        "also reports how far it lands from the same run in one batch")
    p.add_argument("--record-every", default="20", help="record params every N steps (default 20)")


def split_policies(text: str) -> list[str]:
    """Policies are separated by ';'. A ',' list is split too when every item is a preset (no '=')."""
    if ";" in text:
        return split_list(text.replace(";", "\n").splitlines())
    return [text] if "=" in text else split_list(text)


def specs_from_args(args):
    problems, data, optimizers, policies, backends, devices, seed_items = (
        _items(args, option) for option in ("problem", "data", "optimizer", "policy", "backend", "device", "seed"))
    for device in devices or ():  # named before anything about the matrix: `--device tpu` is about 'tpu'
        if device not in DEVICES:
            raise choice_error("device", device, DEVICES)
    steps = positive_int("steps", args.steps)
    record_every = positive_int("record-every", args.record_every)
    batch_size = parse_batch_size(args.batch_size)
    accum_steps = [positive_int("accum-steps", k) for k in split_list(args.accum_steps)]
    seeds = [int(s) if s.lstrip("-").isdigit() else _bad_seed(s) for s in seed_items or ["0"]]
    lr = None
    if args.lr is not None:
        try:
            lr = float(args.lr)
        except ValueError:
            raise SpecError(f"learning rate {args.lr!r} is not a number") from None
    if all(o is None for o in (problems, data, optimizers, policies)):
        if devices:
            raise SpecError("--device needs an explicit matrix (--problem ...); the default matrix runs on the cpu")
        specs = default_specs(backends)
        import dataclasses
        return [dataclasses.replace(s, steps=steps, record_every=record_every, batch_size=batch_size, seed=seed,
                                    accum_steps=k, optimizer=dataclasses.replace(s.optimizer, lr=lr)
                                    if lr is not None else s.optimizer)
                for s in specs for k in accum_steps for seed in seeds]
    devices = devices or ["cpu"]
    if backends is None:  # every backend that runs on one of the devices asked for
        backends = [b for b in BACKENDS if any(backend_availability(b, d).available for d in devices)]
        if not backends:
            why = "; ".join(backend_availability(b, devices[0]).reason for b in BACKENDS)
            raise SpecError(f"--device {','.join(devices)}: no backend can run here ({why}); valid here: "
                            f"--device cpu")
    return build_specs(
        problems=problems or ["logreg"], optimizers=optimizers or ["adam"],
        policies=policies or split_policies("fp64,fp32,fp16,bf16,bf16-mixed"), backends=backends,
        devices=devices, data=data or ["synthetic"], seeds=seeds,
        steps=steps, batch_size=batch_size, lr=lr, record_every=record_every, accum_steps=accum_steps)


def _default_matrix(args) -> bool:
    return all(getattr(args, o) is None for o in ("problem", "data", "optimizer", "policy"))


def serving_from_args(args) -> Serving | None:
    """--infer-policy and --batch-invariance as a Serving (None: neither). --infer-policy not given: every
    INFER_FORMATS for the default matrix, none for a matrix of options."""
    text = args.infer_policy
    if text is None:
        formats = INFER_FORMATS if _default_matrix(args) else ()
    elif text.strip().lower() == "none":
        formats = ()
    else:
        try:
            formats = tuple(split_list(text))
        except SpecError:
            formats = ()
        if not formats:
            raise SpecError(f"--infer-policy {text!r} is empty or has an empty item; valid formats: "
                            f"{', '.join(FORMATS)} (comma-separated), or none")
    if not formats and not args.batch_invariance:
        return None
    return Serving(formats=formats, batches=args.batch_invariance)


def noise_floor_from_args(args) -> int:
    """--noise-floor K as an int (0: off). Not given: on for the default matrix, off for a matrix of options."""
    if args.noise_floor is None:
        return FLOOR_SEEDS if _default_matrix(args) else 0
    try:
        seeds = int(args.noise_floor)
    except ValueError:
        raise SpecError(f"--noise-floor {args.noise_floor!r} is not an integer; valid: 0 (off) or "
                        f"2..{MAX_FLOOR_SEEDS} seeds") from None
    return check_floor_seeds(seeds)


def _bad_seed(text):
    raise SpecError(f"seed {text!r} is not an integer; valid seeds: 0..{MAX_SEED}")


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
    """The files ``plot_report(report, out.with_suffix(""))`` writes."""
    from ..plot import figure_paths
    return list(figure_paths(out.with_suffix("")).values())


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


def main(args) -> int:
    # The whole grid, before anything is written or run: names, repeated ids (--seed 0,0), problem/data fit, batch
    # sizes, optional packages, the size limits (--force) and each backend on the devices asked for.
    noise_floor = noise_floor_from_args(args)
    specs = validate(specs_from_args(args), force=args.force, cli_names=True, noise_floor=noise_floor)
    serve = serving_from_args(args)
    out = Path(args.out)
    check_outputs(args)
    # Last check, as it locks and creates the checkpoint file. Leaving the block keeps the file if it holds any
    # result (and releases the lock); only remove(), once a report holds its results, deletes it.
    with Checkpoint(out, resume=args.resume) as checkpoint:
        try:
            report = run(specs, progress=_Progress(sys.stderr.isatty() and not args.quiet),
                         save_params=args.save_params, finished=checkpoint.found, on_result=checkpoint.append,
                         force=args.force, noise_floor=noise_floor, serve=serve)
        except KeyboardInterrupt:
            return _save_interrupted(specs, checkpoint, out)
        statuses = [r.status for r in report.results]
        if _nothing_ran(statuses) and out.exists():
            # Not one result measured anything: the report at --out stays as it was (and no checkpoint remains).
            checkpoint.remove()
            return _nothing_ran_exit(report, out)
        try:
            report.save(out)
        except (OSError, OutputError) as exc:
            print(f"precision run: error: the report could not be written to {str(out)!r} ({exc}); its "
                  f"{len(specs)} results are kept in {str(checkpoint.path)!r}: rerun with --resume to write it",
                  file=sys.stderr)
            return 1
        checkpoint.remove()
    status = 0
    if "error" in statuses:
        print(f"precision run: error: {statuses.count('error')} of {len(statuses)} runs failed; their messages "
              f"are in the report", file=sys.stderr)
        status = 1
    elif _nothing_ran(statuses):
        print(f"precision run: error: no run could start ({len(statuses)} unavailable); the reasons are in the "
              f"report", file=sys.stderr)
        status = 1
    if args.plot:
        try:
            from ..plot import plot_report
            written = plot_report(report, out.with_suffix(""))
        except (OSError, PrecisionError) as exc:
            print(f"precision run: error: plots not written: {exc}", file=sys.stderr)
            written, status = [], 1
    # stdout last: a reader that goes away early (| head) costs nothing already on disk.
    print(format_report(report))
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "diverged", "unavailable", "error")
                        if statuses.count(s))
    print(f"\n{len(statuses)} runs ({summary}); report written to {out}")
    if args.plot:
        for path in written:
            print(f"plot written to {path}")
    return status


def _nothing_ran(statuses: list[str]) -> bool:
    """No result measured anything: every run errored or was unavailable (a diverged run is a result)."""
    return bool(statuses) and not any(s in ("ok", "diverged") for s in statuses)


def _nothing_ran_exit(report: Report, out: Path) -> int:
    """Every run failed or was unavailable and a report exists at --out: keep it, say why in one line, exit 1."""
    from .._terminal import clip, safe_text
    failed = [r for r in report.results if r.status == "error"] or list(report.results)
    kinds = ", ".join(f"{n} {s}" for s in ("error", "unavailable")
                      if (n := sum(r.status == s for r in report.results)))
    _say(f"precision run: error: nothing ran ({kinds}; first: {clip(safe_text(failed[0].message or '?'), 200)}); the "
         f"existing report {str(out)!r} was kept")
    return 1


def _save_interrupted(specs, checkpoint: Checkpoint, out: Path) -> int:
    """Ctrl-C or SIGTERM: the finished results (and those --resume found) become the report, atomically."""
    known = {**checkpoint.found, **checkpoint.results}
    done = [known[s.id] for s in specs if s.id in known]
    if not done:
        checkpoint.discard()
        _say("precision run: interrupted before any run finished; nothing written")
        return 130
    if _nothing_ran([r.status for r in done]) and out.exists():  # errors only: the existing report stays
        checkpoint.remove()
        _say(f"precision run: interrupted; nothing ran ({len(done)} finished, none ok or diverged); the existing "
             f"report {str(out)!r} was kept")
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
