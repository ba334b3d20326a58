"""Building spec matrices (the cross product of comma-separated choices, the built-in default matrix) and checking
a whole grid before any run starts (:func:`check_grid`, used by ``precision run`` and ``precision.run``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from typing import Iterable

from .calibration import CALIBRATION_BYTES
from .backends import BACKENDS, backend_availability
from .data import classes_for, data_set, fit_error
from .errors import SpecError
from .optim import make_optimizer
from .policy import get_policy
from .problems import get_problem
from .spec import RunSpec

__all__ = ["build_specs", "default_specs", "DEFAULT_CASES", "DEFAULT_POLICIES", "split_list", "check_grid",
           "estimate_grid", "GridEstimate", "MEMORY_LIMIT", "WORK_LIMIT", "REPORT_LIMIT"]

# (problem, data): a real data set and a hidden-layer model, so the default table shows both kinds of drift.
DEFAULT_CASES = (("logreg", "breast_cancer"), ("mlp", "digits"))
DEFAULT_OPTIMIZERS = ("sgd", "adam")
DEFAULT_POLICIES = ("fp64", "fp32", "fp16", "bf16", "bf16-mixed")
DEFAULT_STEPS = 200


def split_list(text: str | Iterable) -> list[str]:
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",")]
    else:
        items = [str(t).strip() for t in text]
    if not items or any(not t for t in items):
        raise SpecError(f"empty item in list {text!r}")
    return items


def build_specs(problems, optimizers, policies, backends=("numpy",), devices=("cpu",), data=("synthetic",),
                seeds=(0,), steps: int = DEFAULT_STEPS, batch_size: int | None = 128, lr: float | None = None,
                record_every: int = 20, accum_steps=(1,)) -> list[RunSpec]:
    """Every combination of the given choices (validated up front, so a typo fails before any run)."""
    problems = [get_problem(p).name for p in problems]
    opts = [make_optimizer(o, lr=lr) for o in optimizers]
    pols = [get_policy(p) for p in policies]
    for b in backends:
        if b not in BACKENDS:
            from .errors import choice_error
            raise choice_error("backend", b, BACKENDS)
    return [RunSpec(problem=p, optimizer=o, policy=pol, backend=b, device=dev, data=d, steps=steps, seed=s,
                    batch_size=batch_size, record_every=record_every, accum_steps=k)
            for p, d, o, pol, k, b, dev, s in itertools.product(problems, data, opts, pols, accum_steps, backends,
                                                                devices, seeds)]


def default_specs(backends: Iterable[str] | None = None) -> list[RunSpec]:
    """The built-in matrix: DEFAULT_CASES x optimizers x policies x every backend available on the CPU."""
    if backends is None:
        backends = [b for b in BACKENDS if backend_availability(b, "cpu").available]
    specs = []
    for problem, data in DEFAULT_CASES:
        specs += build_specs([problem], DEFAULT_OPTIMIZERS, DEFAULT_POLICIES, backends=tuple(backends),
                             data=(data,))
    return specs


# ---- checking a whole grid before any run starts ------------------------------------------------------------------

# Limits of a grid run without force (docs/cli.md, "Validation"). With all three backends the default matrix
# estimates to 4 MiB, 2e9 multiply-adds and a 230 KB report; the README examples stay below 13 MiB, 8e9 and 0.5 MB.
MEMORY_LIMIT = 2 * 2**30  # bytes the run is estimated to hold at its peak
WORK_LIMIT = 10**12  # multiply-adds: the sum over runs of steps x rows per step x params (an hour or more of numpy)
REPORT_LIMIT = 256 * 2**20  # = precision._report_reader.MAX_REPORT_BYTES: a larger report cannot be read back

# Bytes per item, measured on numpy runs (tracemalloc peaks, report files) and rounded up: the estimate stays above
# what was measured (an mlp run recording all 1000 steps peaked at 111 MiB, estimated 114 MiB). The batch schedule
# and the scalar table are made a chunk (record_every steps) at a time (precision.data.BatchSchedule,
# precision.optim.ScalarTable): they no longer grow with steps.
_SCALAR_BYTES_PER_STEP = 640  # the optimizer scalar rows of one chunk and their temporaries, per step of the chunk
_RESULT_BYTES, _RESULT_BYTES_PER_RECORD = 4096, 1024  # a Result in memory (drift point dicts, step times)
_REPORT_BYTES, _REPORT_BYTES_PER_RECORD = 2048, 160  # its JSON in the report file (measured ~130 per record)
_IN_FLIGHT_TRAJECTORIES = 5  # params snapshots, their stacked copy, the comparison's temporaries


@dataclasses.dataclass(frozen=True)
class GridEstimate:
    """What a grid costs, estimated from the specs alone (no data is loaded): see :func:`estimate_grid`."""
    runs: int  # trainings: every spec, plus one float64 reference per distinct reference spec
    steps: int  # training steps of all those runs
    work: int  # multiply-adds of one forward pass per step, summed: steps x rows per step x params
    memory_bytes: int  # peak: cached datasets and references, results, and the largest run in flight
    schedule_bytes: int  # the minibatch schedules held: per distinct dataset one epoch's permutation and one
    # chunk's rows (record_every x batch size int64); independent of steps
    trajectory_bytes: int  # recorded params: references held plus the largest run in flight (records x params x 8)
    report_bytes: int  # the report file

    def exceeded(self) -> list[str]:
        """The limits this grid is above, each as 'what (limit ...)'; empty when it fits."""
        over = []
        if self.memory_bytes > MEMORY_LIMIT:
            over.append(f"estimated memory {_bytes(self.memory_bytes)} (limit {_bytes(MEMORY_LIMIT)}; batch "
                        f"schedules {_bytes(self.schedule_bytes)}, recorded params {_bytes(self.trajectory_bytes)})")
        if self.work > WORK_LIMIT:
            over.append(f"{self.work:.3g} multiply-adds (steps x batch rows x params over {self.runs} trainings, "
                        f"references included; limit {WORK_LIMIT:.0e})")
        if self.report_bytes > REPORT_LIMIT:
            over.append(f"a report of about {_bytes(self.report_bytes)} (precision show/compare/plot and --resume "
                        f"read at most {_bytes(REPORT_LIMIT)})")
        return over


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class _Cost:
    """One spec's sizes, independent of its step count (so the estimate can be redone for another one)."""
    dataset_key: tuple  # what the runner caches a dataset by (steps left out)
    reference_key: tuple  # what it caches a reference trajectory by (steps left out)
    steps: int
    record_every: int
    params: int
    rows: int  # rows per step
    minibatch: bool  # a schedule is made (one epoch's permutation and a chunk's rows, int64, at a time)
    data_bytes: int  # the arrays of the dataset other than the schedule
    trainings: int = 1  # 2 for gradient accumulation: the run and the same run in one batch
    n_train: int = 0  # rows of the train split: one epoch's permutation


def _cost(spec: RunSpec) -> _Cost:
    problem = get_problem(spec.problem)
    info = data_set(spec.data)
    n_train, n_test = info.split()
    classes = classes_for(problem, spec.data)
    layout = problem.layout(info.features, classes if problem.task == "multiclass" else 0)
    params = sum(_prod(shape) for _, shape in layout)
    minibatch = spec.batch_size is not None and spec.batch_size < n_train
    return _Cost(dataset_key=(spec.problem, spec.data, spec.seed, spec.batch_size),
                 reference_key=(spec.problem, spec.data, spec.seed, spec.batch_size, spec.optimizer,
                                spec.record_every, spec.accum_steps),
                 steps=spec.steps, record_every=spec.record_every, params=params,
                 rows=spec.batch_size if minibatch else n_train, minibatch=minibatch, n_train=n_train,
                 data_bytes=(n_train + n_test) * (info.features + 1) * 8 + params * 8,
                 trainings=2 if spec.accum_steps > 1 else 1)


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def _records(steps: int, record_every: int) -> int:
    return -(-steps // record_every) + 1  # 0, r, 2r, ... below steps, and steps itself


def _estimate(costs: list[_Cost], steps: int | None = None, noise_floor: int = 0) -> GridEstimate:
    datasets: dict[tuple, int] = {}
    schedules: dict[tuple, int] = {}
    references: dict[tuple, tuple[int, int, int]] = {}  # key -> (trajectory bytes, steps, work)
    work = total_steps = results = report = in_flight = in_flight_trajectory = 0
    for c in costs:
        n = c.steps if steps is None else steps
        records = _records(n, c.record_every)
        trajectory = records * c.params * 8
        key = c.dataset_key + (n,)
        datasets[key] = c.data_bytes
        chunk = min(n, c.record_every)
        schedules[key] = (c.n_train + chunk * c.rows) * 8 if c.minibatch else 0
        references[c.reference_key + (n,)] = (trajectory, n, n * c.rows * c.params)
        work += c.trainings * n * c.rows * c.params
        total_steps += c.trainings * n
        results += _RESULT_BYTES + records * _RESULT_BYTES_PER_RECORD
        report += _REPORT_BYTES + records * _REPORT_BYTES_PER_RECORD
        in_flight = max(in_flight, _IN_FLIGHT_TRAJECTORIES * trajectory + _SCALAR_BYTES_PER_STEP * chunk)
        in_flight_trajectory = max(in_flight_trajectory, _IN_FLIGHT_TRAJECTORIES * trajectory)
    held_references = sum(t for t, _, _ in references.values())
    schedule_bytes = sum(schedules.values())
    # Noise floors (precision.floors): K more float64 trainings per reference (K - 1 reseeded, 1 reordered), whose
    # K + 1 trajectories are held together while one reference's floors are measured.
    per_reference = 1 + noise_floor
    floor_bytes = (noise_floor + 1) * max((t for t, _, _ in references.values()), default=0) if noise_floor else 0
    return GridEstimate(
        runs=sum(c.trainings for c in costs) + per_reference * len(references),
        steps=total_steps + per_reference * sum(n for _, n, _ in references.values()),
        work=work + per_reference * sum(w for _, _, w in references.values()),
        memory_bytes=(sum(datasets.values()) + schedule_bytes + held_references + results + in_flight
                      + floor_bytes + CALIBRATION_BYTES),  # run() times its calibration kernel too
        schedule_bytes=schedule_bytes, trajectory_bytes=held_references + in_flight_trajectory,
        report_bytes=report)


def estimate_grid(specs: Iterable[RunSpec], noise_floor: int = 0) -> GridEstimate:
    """Estimate what running ``specs`` costs, from the specs alone (no data is loaded, nothing is imported).

    Counts what the runner holds at once: every distinct dataset (its arrays, and its minibatch schedule's epoch
    permutation and chunk of rows: the schedule is made a chunk at a time) and reference trajectory (records x
    params x 8 bytes) stays cached for the whole run, every result until the report is written, plus the largest
    run in flight (its trajectory about three times over and one chunk's scalar rows). Nothing but the records
    grows with steps. ``work`` sums steps x rows per step x params over the specs and their references;
    ``noise_floor`` K adds K float64 trainings per reference (its noise floors) and their trajectories."""
    return _estimate([_cost(spec) for spec in specs], noise_floor=noise_floor)


def _largest_steps(costs: list[_Cost], noise_floor: int = 0) -> int:
    """The largest common step count with which ``costs`` fits every limit (0 if none does)."""
    lo, hi = 0, max(c.steps for c in costs)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _estimate(costs, mid, noise_floor).exceeded():
            hi = mid - 1
        else:
            lo = mid
    return lo


def check_grid(specs: Iterable[RunSpec], *, force: bool = False, cli_names: bool = False,
               noise_floor: int = 0) -> GridEstimate:
    """Check a whole grid before any run starts, loading no data; return its estimate, or raise one SpecError.

    Checked, in this order: each problem fits its data set (regression, binary or multiclass labels; from the
    DATA_SETS table); a batch size is at most the data set's training rows (larger is full batch under another
    name: ask for full batch with None, 'full' on the command line); each data set's optional package
    (scikit-learn) is installed; the size estimate (:func:`estimate_grid`) is within MEMORY_LIMIT, WORK_LIMIT and
    REPORT_LIMIT, unless ``force``; every backend can run on at least one of the devices its specs ask for (an
    unavailable device next to an available one stays an "unavailable" result). Each message names the bad value
    and the valid choices; ``cli_names`` names values by their command-line options (``--batch-size 0``)."""
    specs = list(specs)
    name = (lambda option, field, value: f"{option} {value}") if cli_names else \
        (lambda option, field, value: f"{field} {value!r}")

    misfits = {}  # "problem:data" -> why it does not fit (the rule make_dataset applies to the loaded labels)
    for p, d in dict.fromkeys((s.problem, s.data) for s in specs):
        if (why := fit_error(get_problem(p), d, classes_for(get_problem(p), d))) is not None:
            misfits[f"{p}:{d}"] = why
    if misfits:
        first, *others = misfits
        more = f" (also {', '.join(others[:3])}{' ...' if len(others) > 3 else ''})" if others else ""
        raise SpecError(f"{misfits[first]}{more}")

    for bs, data in dict.fromkeys((s.batch_size, s.data) for s in specs if s.batch_size is not None):
        n_train = data_set(data).split()[0]
        if bs > n_train:
            full = "'full'" if cli_names else "None"
            raise SpecError(f"{name('--batch-size', 'batch size', bs)} is larger than the {n_train} training rows of "
                            f"data set {data!r}; valid: 1..{n_train}, or {full} for full batch")

    for data in dict.fromkeys(s.data for s in specs):
        needs = data_set(data).needs
        if needs and importlib.util.find_spec(needs) is None:
            raise SpecError(f"data set {data!r} needs scikit-learn: pip install 'precision[data]'")

    costs = [_cost(spec) for spec in specs]
    estimate = _estimate(costs, noise_floor=noise_floor)
    over = estimate.exceeded()
    if over and not force:
        steps = {c.steps for c in costs}
        runs = f"{len(costs)} run{'s' if len(costs) != 1 else ''}"
        fits = _largest_steps(costs, noise_floor) if len(steps) == 1 else None  # one step count: say how many would fit
        if fits:
            what = (f"{name('--steps', 'steps', steps.pop())} is too many for this grid of {runs}; at most {fits} "
                    f"steps fit the limits")
        else:
            what = f"this grid of {runs} is too large{' even at 1 step' if fits == 0 else ''}"
        force_it = "--force" if cli_names else "force=True"
        raise SpecError(f"{what}: {'; '.join(over)}; lower the steps, the runs or the recording (record_every), "
                        f"or pass {force_it}")

    devices: dict[str, list[str]] = {}
    for spec in specs:
        devices.setdefault(spec.backend, [])
        if spec.device not in devices[spec.backend]:
            devices[spec.backend].append(spec.device)
    for backend, devs in devices.items():
        avail = [backend_availability(backend, d) for d in devs]
        if not any(a.available for a in avail):
            usable = [b for b in BACKENDS if any(backend_availability(b, d).available for d in devs)]
            reason, extra = avail[0].reason, BACKENDS[backend][1]
            if extra and "cpu" in devs and "pip install" not in reason:  # on the CPU, installing it is the fix
                reason += f" (pip install 'precision[{extra}]')"
            raise SpecError(f"{name('--backend', 'backend', backend)} cannot run on {'/'.join(devs)} here: "
                            f"{reason}; usable here: {', '.join(usable) or 'none'}")
    return estimate
