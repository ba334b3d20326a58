"""The JAX backend: the training loop jit-compiled (ahead of time) as a ``lax.scan`` over chunks of steps, arrays
in the policy's dtypes on the spec's device ("cpu" or "gpu"), float64 only inside a scoped x64 setting.

How it works and every expected difference from the numpy reference: docs/jax.md.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np

from ...data import Dataset
from ...errors import UnavailableError
from ...formats import get_format, to_format
from ...policy import Policy
from ...spec import DEVICES, RunSpec
from ...trajectory import Trajectory
from ..step_rules import ScalerState, host_scalars, initial_scaler, micro_batches
from ..base import Availability, ScalerLog, drive_chunks, record_schedule
from ..numpy_backend import targets_for
from ..numpy_backend.ops import convert as host_convert
from .ops import check_policy
from .loop import Carry, LoopSpec, chunk_inputs, compile_chunk, initial_carry, lower_chunk, remedy_inputs
from .update import structure

__all__ = ["BACKEND", "JaxBackend", "needs_x64", "jax_device", "lower"]

_FP64 = get_format("fp64")


def needs_x64(policy: Policy) -> bool:
    """Whether any quantity of the policy lives in float64 (JAX then needs x64 to hold it)."""
    formats = (policy.params, policy.compute, policy.accum, policy.state, policy.master, policy.update)
    # by the carrier: a custom format of more than fp32's range or precision is held in float64 too
    return any(f is not None and f.dtype == np.float64 for f in formats)


def jax_device(device: str) -> jax.Device:
    """The first JAX device of kind ``device``; UnavailableError (with JAX's reason) when there is none."""
    if device not in DEVICES:
        raise UnavailableError(f"unknown device {device!r}; valid choices: {', '.join(DEVICES)}")
    try:
        found = jax.devices(device)
    except RuntimeError as exc:  # jax: "Unknown backend: 'gpu' requested, but no platforms ... are present"
        raise UnavailableError(f"the jax backend has no {device} device here: {exc}") from None
    if not found:
        raise UnavailableError(f"the jax backend has no {device} device here")
    return found[0]


class JaxBackend:
    name = "jax"

    def availability(self, device: str) -> Availability:
        try:
            jax_device(device)
        except UnavailableError as exc:
            return Availability(False, str(exc))
        return Availability(True)

    def devices(self) -> tuple[str, ...]:
        return tuple(d for d in DEVICES if self.availability(d).available)

    def train(self, spec: RunSpec, dataset: Dataset) -> Trajectory:
        device = jax_device(spec.device)
        # Scoped: the x64 flag is restored on exit, so no other JAX code in the process sees it changed. Set
        # either way, so a user's global x64 setting cannot change how a narrow policy traces.
        with jax.enable_x64(needs_x64(spec.policy)):
            return _train(spec, dataset, device)


class _Prepared(NamedTuple):
    loop: LoopSpec
    data: tuple  # (X, T, scale, unscale, remedy) on the device (remedy: loop.remedy_inputs, {} without remedies)
    inputs: Callable  # (start, stop) -> StepInputs of that chunk on the device, made when the chunk runs
    carry: Carry
    first: tuple  # (start, stop) of the first chunk


def _prepare(spec: RunSpec, dataset: Dataset, device: jax.Device) -> _Prepared:
    """Everything a run feeds its compiled program, made on the host as the reference makes it, then placed. The
    chunks' inputs (batch rows and scalar rows) are made per chunk (``inputs(start, stop)``): nothing held grows
    with steps, except the whole scalar table that dynamic loss scaling indexes by the applied-update count."""
    pol, opt = spec.policy, spec.optimizer
    check_policy(pol)  # a format XLA would compute in unrounded (an emulated compute or update format): refused
    X = host_convert(dataset.X_train, _FP64, pol.compute)
    T = host_convert(targets_for(dataset, dataset.y_train), _FP64, pol.compute)
    # Host scalars by the shared rules (step_rules.host_scalars: float64, rounded once), passed typed (0-d arrays).
    scalars = host_scalars(pol, opt, spec.steps, dataset.batch_size)
    micro_batches(dataset.batch_size, spec.accum_steps)  # K larger than the batch: SpecError before any tracing
    scale = to_format(scalars.seed_scale, pol.compute)  # exact: already rounded to C
    unscale = to_format(1.0 if scalars.unscale is None else scalars.unscale, pol.update)  # unused without ls
    table = scalars.table  # optim.ScalarTable: rows made per chunk, exact in U (rounded to U by scalar_rows)

    marks = record_schedule(spec.steps, spec.record_every)
    chunk_steps = int(max(np.diff(marks)))  # every chunk has this length; shorter ones are padded
    batch = 0 if dataset.batches is None else int(dataset.batches.shape[1])
    dynamic = pol.dynamic_scale is not None
    loop = LoopSpec(problem=spec.problem, layout=tuple(dataset.layout), optimizer=structure(opt), policy=pol,
                    chunk_steps=chunk_steps, x_shape=X.shape, t_shape=T.shape, batch=batch,
                    n_params=dataset.n_params, has_unscale=pol.loss_scale is not None, device=device,
                    accum_steps=spec.accum_steps, table_rows=int(table.shape[0]) if dynamic else 0)

    def inputs(start: int, stop: int):
        return chunk_inputs(table.rows(start, stop).astype(pol.update.dtype), dataset.batch_rows(start, stop),
                            start, stop, chunk_steps, device)

    remedy = remedy_inputs(pol, spec.seed, np.asarray(table).astype(pol.update.dtype) if dynamic else None)
    return _Prepared(loop, jax.device_put((X, T, scale, unscale, remedy), device), inputs,
                     initial_carry(dataset.init_params, pol, opt, device), (marks[0], marks[1]))


def lower(spec: RunSpec, dataset: Dataset):
    """The run's chunk program, traced and lowered but not compiled (``.as_text()`` shows its StableHLO): how the
    policy's dtypes appear in the program."""
    with jax.enable_x64(needs_x64(spec.policy)):
        prepared = _prepare(spec, dataset, jax_device(spec.device))
        return lower_chunk(prepared.loop, spec.optimizer,
                           (prepared.carry, prepared.inputs(*prepared.first), *prepared.data))


def _train(spec: RunSpec, dataset: Dataset, device: jax.Device) -> Trajectory:
    prepared = _prepare(spec, dataset, device)
    box = {"carry": prepared.carry}
    program, compile_s = compile_chunk(prepared.loop, spec.optimizer,
                                       (prepared.carry, prepared.inputs(*prepared.first), *prepared.data))
    # dynamic loss scaling: the scaler lives in the carry; the host's record of it is updated after each chunk
    log = ScalerLog(initial_scaler(spec.policy)) if spec.policy.dynamic_scale is not None else None

    def run_chunk(start: int, stop: int) -> int | None:
        out = program.run(box["carry"], prepared.inputs(start, stop), *prepared.data)  # old carry donated
        carry, skipped = (out, None) if log is None else out
        box["carry"] = carry = jax.block_until_ready(carry)
        if log is not None:
            log.state = ScalerState(np.float32(carry.scaler.scale), np.int32(carry.scaler.tracker))
            flags = np.asarray(skipped)[:stop - start]  # padding steps are never flagged; cut them anyway
            log.skipped.extend(int(s) for s in np.flatnonzero(flags) + start + 1)
        bad = int(carry.diverged_at)
        return bad or None

    def stored() -> tuple:
        carry = box["carry"]
        return np.array(carry.weights), np.array(carry.params), [np.array(s) for s in carry.state]

    return drive_chunks(spec, run_chunk, snapshot=lambda: np.asarray(box["carry"].params).astype(np.float64),
                        final_params=lambda: np.array(box["carry"].params), compile_s=compile_s, scaler=log,
                        stored=stored, dataset=dataset)


BACKEND = JaxBackend()
