"""Run specs: build each dataset once, train each spec, compare with its float64 reference, collect results.

One failing configuration never loses the others: unavailable backends and errors become results with a status.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ._atomic import check_folder_target, write_atomic
from .backends import backend_availability, get_backend
from .calibration import Calibrator
from .data import Dataset, make_dataset
from .drift import compare, fingerprint
from .errors import PrecisionError, SpecError
from .accumulation import accumulation_figures
from .audit import audit_summary
from .floors import Floors, check_floor_seeds, judge, measure_floors
from .matrix import check_grid
from .report import Report, Result, environment, now_utc
from .spec import RunSpec
from .trajectory import Trajectory

__all__ = ["run", "run_one", "train", "dataset_for", "check_dataset", "validate", "Serving", "with_serving",
           "with_floors"]


def dataset_for(spec: RunSpec) -> Dataset:
    return make_dataset(spec.problem, spec.data, spec.seed, spec.steps, spec.batch_size)


def check_dataset(spec: RunSpec, dataset: Dataset) -> None:
    """Raise one SpecError naming every field in which ``dataset`` was made for another spec than ``spec``: its
    problem, data, seed, steps or batch size (``dataset_for(spec)`` makes the right one)."""
    if not isinstance(dataset, Dataset):
        raise SpecError(f"dataset {type(dataset).__name__} is not a Dataset; make one with "
                        "precision.make_dataset(problem, data, seed, steps, batch_size)")
    made_for = dataset.made_for()
    wanted = {"problem": spec.problem, "data": spec.data, "seed": spec.seed, "steps": spec.steps,
              "batch_size": spec.batch_size}
    differ = [f"{field} {made_for[field]!r} (the spec has {value!r})" for field, value in wanted.items()
              if made_for[field] != value]
    if differ:
        raise SpecError(f"the dataset was made for another spec: {', '.join(differ)}; pass "
                        f"precision.runner.dataset_for(spec), or no dataset")


def train(spec: RunSpec, dataset: Dataset | None = None) -> Trajectory:
    """Train one spec and return its raw trajectory (raises UnavailableError if its backend cannot run).

    Without ``dataset``, the spec's own is made (``dataset_for(spec)``); a dataset made for another problem, data
    set, seed, step count or batch size is refused with one SpecError naming the fields that differ."""
    from .errors import UnavailableError
    if dataset is not None:
        check_dataset(spec, dataset)
    avail = backend_availability(spec.backend, spec.device)
    if not avail.available:
        raise UnavailableError(avail.reason)
    return get_backend(spec.backend).train(spec, dataset if dataset is not None else dataset_for(spec))


class _Cache:
    """Datasets and reference trajectories, each made once per key."""

    def __init__(self):
        self.datasets: dict[tuple, Dataset] = {}
        self.references: dict[RunSpec, Trajectory] = {}
        self.floor_sets: dict[tuple[RunSpec, int], Floors] = {}

    @staticmethod
    def key(spec: RunSpec) -> tuple:
        return (spec.problem, spec.data, spec.seed, spec.steps, spec.batch_size)

    def dataset(self, spec: RunSpec) -> Dataset:
        key = self.key(spec)
        if key not in self.datasets:
            self.datasets[key] = dataset_for(spec)
        return self.datasets[key]

    def reference(self, spec: RunSpec) -> Trajectory:
        ref_spec = spec.reference()
        if ref_spec not in self.references:
            self.references[ref_spec] = train(ref_spec, self.dataset(ref_spec))
        return self.references[ref_spec]

    def floors(self, spec: RunSpec, seeds: int) -> Floors:
        """The noise floors of ``spec``'s reference configuration (precision.floors), measured once per reference."""
        ref_spec = spec.reference()
        key = (ref_spec, seeds)
        if key not in self.floor_sets:
            backend = get_backend(ref_spec.backend)
            self.floor_sets[key] = measure_floors(self.dataset(ref_spec), lambda ds: backend.train(ref_spec, ds),
                                                  seeds)
        return self.floor_sets[key]


def _result(spec: RunSpec, traj: Trajectory, ref: Trajectory, dataset: Dataset) -> Result:
    drift = compare(traj, ref, dataset, spec.policy.params)
    return Result(
        spec=spec.to_dict(), status="diverged" if traj.diverged_at is not None else "ok",
        time_per_step_s=traj.time_per_step_s, compile_s=traj.compile_s, final_loss=drift.final_loss,
        bits_of_agreement=drift.bits_of_agreement, rel_l2=drift.rel_l2, max_ulp=drift.max_ulp,
        loss_gap=drift.loss_gap, flip_rate=drift.flip_rate, diverged_at=traj.diverged_at,
        fingerprint=fingerprint(traj.final_params), step_times_s=tuple(map(float, traj.step_times_s)),
        drift=tuple(dataclasses.asdict(point) for point in drift.trajectory), audit=audit_summary(spec, traj))


def run_one(spec: RunSpec, cache: _Cache | None = None, save_params: Path | None = None, *,
            dataset: Dataset | None = None, noise_floor: int = 0, serve: Serving | None = None) -> Result:
    """Run one spec to a Result; never raises for the run's own failures (only KeyboardInterrupt passes).

    ``dataset``, when given, is used for the run and its reference; one made for another spec raises SpecError
    (the caller's mistake, not the run's), naming the fields that differ. ``noise_floor`` K > 0 adds the noise
    floors of the reference (K seeds and one reordered run, precision.floors) and the result's verdict; ``serve``
    adds inference parity and batch invariance of the trained model (precision.inference) to a finished run."""
    cache = cache or _Cache()
    if dataset is not None:
        check_dataset(spec, dataset)
        cache.datasets[cache.key(spec)] = dataset
    try:
        avail = backend_availability(spec.backend, spec.device)  # inside: a framework may fail to import oddly
        if not avail.available:
            return Result(spec=spec.to_dict(), status="unavailable", message=avail.reason)
        dataset = cache.dataset(spec)
        ref = cache.reference(spec)
        traj = get_backend(spec.backend).train(spec, dataset)
        result = _result(spec, traj, ref, dataset)
        if spec.accum_steps > 1:  # what accumulating changed: the same run in one batch, same backend and policy
            one_batch = get_backend(spec.backend).train(dataclasses.replace(spec, accum_steps=1), dataset)
            result = dataclasses.replace(result, accumulation=accumulation_figures(spec, traj, one_batch, dataset))
        if noise_floor:
            result = with_floors(result, cache.floors(spec, noise_floor))
        if serve is not None and result.status == "ok":
            result = with_serving(result, spec, dataset, traj.params[-1], serve)
    except Exception as exc:  # one failing configuration never loses the others' results
        return Result(spec=spec.to_dict(), status="error", message=_message(exc))
    if save_params is not None:
        try:
            save_trajectory(save_params, spec, traj)
        except Exception as exc:  # the measurements stand; the status says the params file is missing
            return dataclasses.replace(result, status="error", message=f"params not saved: {_message(exc)}")
    return result


def with_floors(result: Result, floors: Floors) -> Result:
    """``result`` with its reference's floors and, when it finished without diverging, its verdict."""
    verdict = None
    if result.status == "ok":
        verdict = judge(result.rel_l2, result.flip_rate, result.loss_gap, floors).to_dict()
    return dataclasses.replace(result, floors=floors.to_dict(), verdict=verdict)


@dataclasses.dataclass(frozen=True)
class Serving:
    """What to measure about serving each trained model: inference parity in ``formats`` (precision.inference,
    against fp64 on the same backend), and batch invariance in the policy's compute format when ``batches``."""

    formats: tuple[str, ...] = ()
    batches: bool = False

    def __post_init__(self):
        from .formats import get_format
        for name in self.formats:
            get_format(name)  # a SpecError naming the format and the valid ones


def with_serving(result: Result, spec: RunSpec, dataset: Dataset, params: np.ndarray, serve: Serving) -> Result:
    """``result`` with the serving figures of its final ``params``. They are extra measurements: if one fails, the
    result keeps its status and says in its message what is missing."""
    from .inference import batch_invariance, inference_parity
    changes, missing = {}, []
    if serve.formats:
        try:
            changes["inference"] = tuple(inference_parity(spec.backend, dataset, params, serve.formats))
        except Exception as exc:
            missing.append(f"inference parity not measured: {_message(exc)}")
    if serve.batches:
        try:
            changes["batch_invariance"] = (batch_invariance(spec.backend, dataset, params, spec.policy.compute),)
        except Exception as exc:
            missing.append(f"batch invariance not measured: {_message(exc)}")
    if missing:
        changes["message"] = "; ".join([result.message, *missing] if result.message else missing)
    return dataclasses.replace(result, **changes)


def _reused_with_floors(result: Result, spec: RunSpec, cache: _Cache, seeds: int) -> Result:
    """A result reused by --resume from a run without floors, given them now; if they cannot be measured, the
    result stays as it was (its measurements do not depend on them)."""
    try:
        return with_floors(result, cache.floors(spec, seeds))
    except Exception:
        return result


def _message(exc: Exception) -> str:
    if isinstance(exc, PrecisionError):
        return str(exc)
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})"


def save_trajectory(folder: Path, spec: RunSpec, traj: Trajectory) -> Path:
    """The params trajectory of one run as .npz (float64 values at the record steps, final params as stored)."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in spec.id)
    final_bits = traj.final_params.view(np.dtype(f"u{traj.final_params.dtype.itemsize}"))  # npz has no bf16/fp8
    return write_atomic(Path(folder) / f"{safe}.npz", lambda tmp: np.savez(
        tmp, steps=traj.record_steps, params=traj.params, final_params=final_bits,
        final_dtype=str(traj.final_params.dtype), id=spec.id))


def validate(specs: Iterable[RunSpec], *, force: bool = False, cli_names: bool = False,
             noise_floor: int = 0) -> list[RunSpec]:
    """The specs as a list, or one SpecError, before anything runs. First each spec: not a RunSpec, or an id that
    repeats (a report holds one result per id), naming the bad ones (the first three, and how many more); RunSpec
    checks its own fields when made. Then the grid as a whole, loading no data (precision.matrix.check_grid):
    problem/data fit, batch sizes, optional packages, the size estimate (unless ``force``) and backends."""
    specs = list(specs)
    problems, seen = [], set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, RunSpec):
            problems.append(f"#{i} is a {type(spec).__name__}, not a RunSpec")
        elif spec.id in seen:
            problems.append(f"#{i} repeats id {spec.id!r}")
        else:
            seen.add(spec.id)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise SpecError(f"{len(problems)} bad spec(s), nothing was run: {'; '.join(problems[:3])}{more}")
    check_floor_seeds(noise_floor)
    check_grid(specs, force=force, cli_names=cli_names, noise_floor=noise_floor)
    return specs


def run(specs: Iterable[RunSpec], progress: Callable[[int, int, RunSpec, Result], None] | None = None,
        save_params: str | Path | None = None, *, finished: Mapping[str, Result] | None = None,
        on_result: Callable[[Result], None] | None = None, force: bool = False, noise_floor: int = 0,
        serve: Serving | None = None) -> Report:
    """Run every spec and return a Report with one result per spec, in spec order.

    Every spec, the grid as a whole (:func:`validate`: problem/data fit, batch sizes, optional packages, backends,
    and a size estimate refused above precision.matrix's MEMORY_LIMIT, WORK_LIMIT and REPORT_LIMIT unless
    ``force=True``) and the ``save_params`` folder are checked before anything runs, raising one SpecError; after
    that, a spec's own failure is an "error" or "unavailable" result, never an exception. ``finished`` maps spec
    ids to results to reuse instead of running (``precision run --resume``). ``on_result(result)`` is called as
    each result is known, reused ones included, before ``progress(i, n, spec, result)``: the CLI checkpoints there,
    so a crash keeps what finished.

    ``noise_floor`` K > 0 (K >= 2; precision.floors.FLOOR_SEEDS is the default the CLI uses) adds to every result
    the noise floors of its reference configuration (K float64 seeds and one reordered run, measured once per
    reference) and its verdict: within seed noise, above seed noise or order-dominated. ``serve`` (a Serving) adds,
    to every run that finished without diverging, its inference parity in the given formats and its batch
    invariance (precision.inference).

    The report also holds the timings of a calibration kernel (precision.calibration), measured before the first
    spec and after the last, which ``precision compare`` divides times by to cancel the machine's load.
    """
    specs = validate(specs, force=force, noise_floor=noise_floor)
    if save_params is not None:
        check_folder_target(save_params, "save_params")  # a file there would turn every result into an error
    finished = finished or {}
    cache = _Cache()
    calibrator = Calibrator()
    calibrator.measure()
    results = []
    for i, spec in enumerate(specs, 1):
        result = finished.get(spec.id)
        if result is None:
            result = run_one(spec, cache, Path(save_params) if save_params else None, noise_floor=noise_floor,
                             serve=serve)
        elif noise_floor and result.floors is None and result.status in ("ok", "diverged"):
            result = _reused_with_floors(result, spec, cache, noise_floor)
        results.append(result)
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress(i, len(specs), spec, result)
    calibrator.measure()
    return Report(results=tuple(results), environment=environment(), created=now_utc(),
                  calibration=calibrator.result())
