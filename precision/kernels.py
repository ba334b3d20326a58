"""Kernel-level benchmark cases: one optimizer update step over N parameters, per backend and storage format.

A case is (backend, optimizer, storage format, N). Its ``step()`` runs one full update of a *pure* policy (params,
optimizer state and arithmetic all in the storage format) at step ``KERNEL_STEP`` with the scalars of
:func:`precision.optim.scalar_table`, reading the input buffers p, g, m, v and writing *other* output buffers
(out of place, as optax does): the inputs are never written, so every timed repeat does the same work on the
same data. The buffers are made once, from a seed, when the case is built.

Every case times a finite update. The inputs are one block of ``KERNEL_BLOCK`` seeded values at the scales of a
mid-training step, repeated to length N, so every N holds the same element tuples and the update (elementwise in
every backend) is finite at every N exactly when it is finite on the block (tests/test_benchcases.py checks the
block on every backend). Adam uses ``eps = KERNEL_ADAM_EPS`` = 1e-4 in every format instead of the default 1e-8:
1e-8 rounds to 0 in fp16 (its smallest subnormal is 6e-8), and then an element whose v and g^2 underflow divides
0 by 0, so numpy fp16 Adam at N = 1e7 timed an update with ~1,000 NaN (and divide-by-zero warnings). 1e-4 is a
normal fp16 number (>= 2^-14) and the eps commonly used for fp16 Adam; the same eps in every format keeps the
formats' times comparable (same arithmetic, same data).

Backends:

* ``numpy``: :func:`precision.backends.numpy_backend.update.update` on float64 / float32 / float16 / ml_dtypes
  bfloat16 arrays (its results are new arrays: out of place by nature);
* ``numba``: the numba backend's fused kernels (:mod:`precision.backends.numba_backend.kernels`); fp16 and bf16 are
  stored as uint16 bit patterns (views of the same float16 / bfloat16 bytes), decoded, updated with per-op
  rounding, re-encoded;
* ``jax``: the JAX backend's update, jitted ahead of time on the CPU (out of place: new device arrays); XLA's FMA
  contraction and flush-to-zero apply (docs/jax.md);
* ``memory-reference``: Adam's memory traffic (read p, g, m, v; write p, m, v) with one add per written array, in
  numba, single-threaded: the floor an Adam step of that storage width can reach here. SGD has no reference.

Both numba kernels are single-threaded loops (no ``parallel=True``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import numpy as np

from .errors import choice_error
from .formats import FORMATS, Format, to_format
from .optim import OptimizerSpec, make_optimizer, scalar_table

__all__ = ["KERNEL_BACKENDS", "KERNEL_OPTIMIZERS", "KERNEL_FORMATS", "KERNEL_SIZES", "KERNEL_STEP", "KERNEL_BLOCK",
           "KERNEL_ADAM_EPS", "UpdateCase", "update_case", "kernel_skip_reason", "bytes_per_step"]

KERNEL_BACKENDS = ("numpy", "numba", "jax", "memory-reference")
KERNEL_OPTIMIZERS = ("adam", "sgd")
KERNEL_FORMATS = ("fp64", "fp32", "fp16", "bf16")
KERNEL_SIZES = (10**4, 10**5, 10**6, 10**7)
KERNEL_STEP = 10  # past step 1: SGD's momentum buffer is in use, Adam's bias corrections are not trivial
KERNEL_BLOCK = 10**4  # the inputs repeat with this period: it divides every N in KERNEL_SIZES
KERNEL_ADAM_EPS = 1e-4  # representable (normal) in fp16, where the default 1e-8 rounds to 0: see the module doc


@dataclasses.dataclass(frozen=True, eq=False)
class UpdateCase:
    backend: str
    optimizer: str
    storage: str
    n: int
    inputs: tuple[np.ndarray, ...]  # (p, g, state...) in the storage dtype; never written
    step: Callable[[], None]  # one update; writes only the output buffers
    outputs: Callable[[], tuple[np.ndarray, ...]]  # (p, state...) after the last step(), in the storage dtype

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.optimizer}/{self.storage}/n={self.n:.0e}"


def bytes_per_step(optimizer: str, storage: str, n: int) -> int:
    """Bytes an update must move: Adam reads p, g, m, v and writes p, m, v; SGD with momentum reads p, g, buf and
    writes p, buf."""
    arrays = 7 if optimizer == "adam" else 5
    return arrays * n * FORMATS[storage].dtype.itemsize


def kernel_skip_reason(backend: str, optimizer: str, storage: str) -> str | None:
    """Why a case cannot run here, or None (choices are validated first)."""
    for kind, value, choices in (("backend", backend, KERNEL_BACKENDS), ("optimizer", optimizer, KERNEL_OPTIMIZERS),
                                 ("storage format", storage, KERNEL_FORMATS)):
        if value not in choices:
            raise choice_error(f"kernel {kind}", value, choices)
    if backend == "memory-reference" and optimizer != "adam":
        return "the memory reference has Adam's traffic only"
    if backend in ("numba", "memory-reference") and importlib.util.find_spec("numba") is None:
        return "numba is not installed: pip install 'precision[numba]'"
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        return "jax is not installed: pip install 'precision[jax]'"
    return None


def _optimizer(name: str) -> OptimizerSpec:
    return make_optimizer("adam", eps=KERNEL_ADAM_EPS) if name == "adam" else make_optimizer("sgd", momentum=0.9)


def _inputs(fmt: Format, n: int, seed: int) -> list[np.ndarray]:
    """p, g, m, v in the storage dtype: the scales of a mid-training step (v >= 0), one KERNEL_BLOCK of seeded
    values repeated to length n (so the block's update is every n's update, element for element)."""
    if n % KERNEL_BLOCK:
        raise ValueError(f"kernel case size {n} is not a multiple of KERNEL_BLOCK = {KERNEL_BLOCK}")
    rng = np.random.default_rng(seed)
    scales = (0.5, 1e-2, 1e-3, 1e-4)
    values = [rng.standard_normal(KERNEL_BLOCK) * s for s in scales]
    values[3] = np.abs(values[3])
    return [np.ascontiguousarray(np.tile(to_format(v, fmt), n // KERNEL_BLOCK)) for v in values]


def update_case(backend: str, optimizer: str, storage: str, n: int, seed: int = 0) -> UpdateCase:
    """Build a case's buffers and its step function. Raises SpecError for unknown names; call
    :func:`kernel_skip_reason` first for cases that cannot run on this machine."""
    reason = kernel_skip_reason(backend, optimizer, storage)
    if reason is not None:
        from .errors import UnavailableError
        raise UnavailableError(f"kernel case {backend}/{optimizer}/{storage}: {reason}")
    fmt, opt = FORMATS[storage], _optimizer(optimizer)
    p, g, m, v = _inputs(fmt, n, seed)
    state = [m, v] if opt.is_adam else [m]
    row = scalar_table(opt, KERNEL_STEP, fmt)[KERNEL_STEP - 1]
    make = {"numpy": _numpy_step, "numba": _numba_step, "jax": _jax_step, "memory-reference": _reference_step}[backend]
    step, outputs = make(opt, fmt, row, p, g, state)
    return UpdateCase(backend, optimizer, storage, n, (p, g, *state), step, outputs)


def _numpy_step(opt, fmt, row, p, g, state):
    from .backends.numpy_backend.update import update

    scalars = row.astype(fmt.dtype)
    box = {}

    def step():
        box["out"] = update(opt, KERNEL_STEP, scalars, p, g, state)

    def outputs():
        new_p, new_state = box["out"]
        return (new_p, *new_state)
    return step, outputs


def _jax_step(opt, fmt, row, p, g, state):
    from .backends.jax_backend.kernels import compiled_update

    run, _ = compiled_update(opt, fmt, KERNEL_STEP, row, p, g, state)  # compiled here, outside the timed step
    box = {}

    def step():
        box["out"] = run()

    def outputs():
        new_p, new_state = box["out"]
        return tuple(np.asarray(a) for a in (new_p, *new_state))
    return step, outputs


def _numba_step(opt, fmt, row, p, g, state):
    from .backends.numba_backend import kernels
    from .backends.numba_backend.rounding import static_code
    from .backends.numba_backend.update import optimizer_flags

    code = static_code(fmt)
    _, decoupled, l2, momentum, nesterov = optimizer_flags(opt)
    narrow = fmt.bits == 16
    carrier_row = row.astype(np.float64 if fmt.name == "fp64" else np.float32)
    to_kernel = (lambda a: a.view(np.uint16)) if narrow else (lambda a: a)
    ins = [to_kernel(a) for a in (p, g, *state)]
    outs = [np.empty_like(a) for a in ins[:1] + ins[2:]]
    if opt.is_adam:
        def step():
            kernels.adam_step(*ins, *outs, carrier_row, decoupled, l2, code)
    else:
        def step():
            kernels.sgd_step(ins[0], ins[1], ins[2], outs[0], outs[1], carrier_row, False, l2, momentum, nesterov,
                             code)

    def outputs():
        return tuple(a.view(fmt.dtype) for a in outs)
    return step, outputs


def _reference_step(opt, fmt, row, p, g, state):
    from .backends.numba_backend import kernels

    narrow = fmt.bits == 16
    ins = [a.view(np.uint16) if narrow else a for a in (p, g, *state)]
    outs = [np.empty_like(a) for a in ins[:1] + ins[2:]]
    kernel = kernels.memory_reference16 if narrow else kernels.memory_reference

    def step():
        kernel(*ins, *outs)

    def outputs():
        return tuple(a.view(fmt.dtype) for a in outs)
    return step, outputs
