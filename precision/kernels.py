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

In place: :func:`inplace_case` (below) builds the in-place Adam cases that training loops and torch.optim run,
with an in-place memory reference and the torch / optax peers of :mod:`precision.peers`; ``precision bench``
(:mod:`precision.bench`) prints their ratios. The out-of-place cases above are unchanged.
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


# --- In-place Adam: what training loops and torch.optim do ------------------------------------------------------
#
# An in-place case updates p, m, v in the arrays it reads (numba: ``adam_step_inplace``; numpy: typed ufuncs with
# ``out=``; JAX: a jitted update whose p, m, v arguments are donated, so XLA writes the results into their buffers;
# the peers of :mod:`precision.peers`: torch.optim's fused / foreach Adam and AdamW, optax's adam under jit with
# donation). Every repeat does the same work on the same data: ``reset()`` restores the inputs from a pristine copy
# *outside* the timed region (:func:`time_inplace`, pytest-benchmark's ``setup=``, asv's per-sample ``setup`` with
# ``number = 1``), so a timed step always starts from the seeded mid-training state, never from the previous
# repeat's output. The memory reference in place reads p, g, m, v and writes p, m, v (7 arrays, exactly Adam's
# bytes) with one add per written array: the floor an in-place Adam step of that storage width reaches here.
#
# Formats: ``fp32``, ``fp16``, ``bf16`` are pure policies (storage and every operation in the format, as the
# out-of-place cases); ``torch-bf16`` is bf16 storage with fp32 update math, p, m, v each rounded to bf16 once when
# stored (3 roundings per element: precision's ``torch-bf16`` preset, what torch's fused bf16 Adam does).

INPLACE_BACKENDS = ("numpy", "numba", "jax", "memory-reference")
INPLACE_FORMATS = ("fp32", "fp16", "bf16", "torch-bf16")
INPLACE_STORAGE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "torch-bf16": "bf16"}
INPLACE_MATH = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "torch-bf16": "fp32"}

__all__ += ["INPLACE_BACKENDS", "INPLACE_FORMATS", "INPLACE_STORAGE", "INPLACE_MATH", "InplaceCase", "inplace_case",
            "inplace_skip_reason", "inplace_backends", "time_inplace", "inplace_reference_outputs"]


@dataclasses.dataclass(frozen=True, eq=False)
class InplaceCase:
    backend: str
    storage: str  # an INPLACE_FORMATS name
    n: int
    inputs: tuple[np.ndarray, ...]  # pristine (p, g, m, v) in the storage dtype; never written
    reset: Callable[[], None]  # restore the working buffers from ``inputs`` (outside the timed region)
    step: Callable[[], None]  # one in-place Adam step on the working buffers
    outputs: Callable[[], tuple[np.ndarray, ...]]  # (p, m, v) after the last step, in the storage dtype

    @property
    def label(self) -> str:
        return f"{self.backend}/adam/{self.storage}/n={self.n:.0e}/inplace"


def inplace_backends() -> tuple[str, ...]:
    """Own backends, then the peers (:data:`precision.peers.KERNEL_PEERS`)."""
    from .peers import KERNEL_PEERS
    return INPLACE_BACKENDS + KERNEL_PEERS


def inplace_skip_reason(backend: str, storage: str) -> str | None:
    """Why an in-place case cannot run here, or None. Raises SpecError for unknown names."""
    from .peers import KERNEL_PEERS, peer_skip_reason
    if backend not in INPLACE_BACKENDS + KERNEL_PEERS:
        raise choice_error("in-place kernel backend", backend, INPLACE_BACKENDS + KERNEL_PEERS)
    if storage not in INPLACE_FORMATS:
        raise choice_error("in-place kernel format", storage, INPLACE_FORMATS)
    if backend in KERNEL_PEERS:
        return peer_skip_reason(backend, storage)
    return kernel_skip_reason(backend, "adam", INPLACE_STORAGE[storage])


def time_inplace(case: InplaceCase, repeats: int) -> float:
    """The fastest of ``repeats`` timed steps, each from freshly restored inputs (one untimed warm-up step first)."""
    import time
    case.reset()
    case.step()
    best = float("inf")
    for _ in range(repeats):
        case.reset()
        t0 = time.perf_counter()
        case.step()
        best = min(best, time.perf_counter() - t0)
    return best


def _inplace_inputs(storage: str, n: int, seed: int) -> list[np.ndarray]:
    return _inputs(FORMATS[INPLACE_STORAGE[storage]], n, seed)


def inplace_case(backend: str, storage: str, n: int, seed: int = 0) -> InplaceCase:
    """Build an in-place Adam case (buffers, compiled step). Call :func:`inplace_skip_reason` first."""
    reason = inplace_skip_reason(backend, storage)
    if reason is not None:
        from .errors import UnavailableError
        raise UnavailableError(f"in-place kernel case {backend}/{storage}: {reason}")
    pristine = tuple(_inplace_inputs(storage, n, seed))
    for a in pristine:
        a.flags.writeable = False
    opt = _optimizer("adam")
    math = FORMATS[INPLACE_MATH[storage]]
    row = scalar_table(opt, KERNEL_STEP, math)[KERNEL_STEP - 1]
    from .peers import KERNEL_PEERS, peer_inplace_step
    if backend in KERNEL_PEERS:
        reset, step, outputs = peer_inplace_step(backend, storage, opt, pristine)
    else:
        make = {"numpy": _numpy_inplace, "numba": _numba_inplace, "jax": _jax_inplace,
                "memory-reference": _reference_inplace}[backend]
        reset, step, outputs = make(opt, storage, row, pristine)
    return InplaceCase(backend, storage, n, pristine, reset, step, outputs)


def _working_copies(pristine):
    work = [np.empty_like(a) for a in pristine]

    def reset():
        for dst, src in zip(work, pristine):
            np.copyto(dst, src)
    reset()
    return work, reset


def _numba_inplace(opt, storage, row, pristine):
    from .backends.numba_backend import kernels
    from .backends.numba_backend.rounding import static_code
    from .backends.numba_backend.update import optimizer_flags

    work, reset = _working_copies(pristine)
    stored = FORMATS[INPLACE_STORAGE[storage]]
    narrow = stored.bits == 16
    ins = [a.view(np.uint16) if narrow else a for a in work]
    cu, cst = static_code(INPLACE_MATH[storage]), static_code(stored)
    _, decoupled, l2, _, _ = optimizer_flags(opt)
    carrier_row = row.astype(np.float32)

    def step():
        kernels.adam_step_inplace(*ins, carrier_row, decoupled, l2, cu, cst)

    def outputs():
        return (work[0], work[2], work[3])
    return reset, step, outputs


def _reference_inplace(opt, storage, row, pristine):
    from .backends.numba_backend import kernels

    work, reset = _working_copies(pristine)
    narrow = work[0].dtype.itemsize == 2
    ins = [a.view(np.uint16) if narrow else a for a in work]
    kernel = kernels.memory_reference16_inplace if narrow else kernels.memory_reference_inplace

    def step():
        kernel(*ins)

    def outputs():
        return (work[0], work[2], work[3])
    return reset, step, outputs


def _numpy_inplace(opt, storage, row, pristine):
    """Adam with typed ufuncs writing into p, m, v (``out=``), op for op as
    :func:`precision.backends.array_math.update` (so bit-identical to the out-of-place numpy step); two scratch
    arrays of the math dtype. ``torch-bf16``: the bf16 arrays are widened into float32 work arrays, updated there, and
    rounded back into the bf16 arrays (numpy / ml_dtypes casts: round to nearest even)."""
    work, reset = _working_copies(pristine)
    math = FORMATS[INPLACE_MATH[storage]].dtype
    s = {name: math.type(row[i]) for i, name in enumerate(_scalar_columns())}
    widen = work[0].dtype != math
    wide = [np.empty(a.shape, math) for a in work] if widen else work
    t1, t2 = np.empty(work[0].shape, math), np.empty(work[0].shape, math)

    def step():
        if widen:
            for dst, src in zip(wide, work):
                np.copyto(dst, src, casting="unsafe")
        p, g, m, v = wide
        np.multiply(s["beta1"], m, out=m)
        np.multiply(s["one_minus_beta1"], g, out=t1)
        np.add(m, t1, out=m)
        np.multiply(g, g, out=t1)
        np.multiply(s["one_minus_beta2"], t1, out=t1)
        np.multiply(s["beta2"], v, out=v)
        np.add(v, t1, out=v)
        np.sqrt(v, out=t1)
        np.divide(t1, s["sqrt_bc2"], out=t1)
        np.add(t1, s["eps"], out=t1)
        np.multiply(s["step_size"], m, out=t2)
        np.divide(t2, t1, out=t2)
        np.subtract(p, t2, out=p)
        if widen:
            for i in (0, 2, 3):
                np.copyto(work[i], wide[i], casting="unsafe")

    def outputs():
        return (work[0], work[2], work[3])
    return reset, step, outputs


def _scalar_columns():
    from .optim import SCALAR_COLUMNS
    return SCALAR_COLUMNS


def _jax_inplace(opt, storage, row, pristine):
    """The JAX backend's update under ``jax.jit`` with p, m, v donated (XLA reuses their buffers for the results).
    ``torch-bf16``: widened to float32 inside the program, updated, rounded back to bf16."""
    import jax
    import jax.numpy as jnp

    from .backends.jax_backend.update import update

    math = FORMATS[INPLACE_MATH[storage]]
    stored_dtype = pristine[0].dtype

    def fn(p, g, m, v, r):
        if math.dtype != stored_dtype:
            p, g, m, v = (a.astype(math.dtype) for a in (p, g, m, v))
        new_p, (new_m, new_v) = update(opt, KERNEL_STEP, r, p, g, [m, v])
        return tuple(a.astype(stored_dtype) for a in (new_p, new_m, new_v))

    r = jnp.asarray(row.astype(math.dtype))
    box = {}
    compiled = jax.jit(fn, donate_argnums=(0, 2, 3))

    def reset():
        box["args"] = [jax.device_put(np.array(a)) for a in pristine]
        jax.block_until_ready(box["args"])

    def step():
        p, g, m, v = box["args"]
        new_p, new_m, new_v = jax.block_until_ready(compiled(p, g, m, v, r))
        box["args"] = [new_p, g, new_m, new_v]

    def outputs():
        p, _, m, v = box["args"]
        return tuple(np.asarray(a) for a in (p, m, v))
    reset()
    return reset, step, outputs


def inplace_reference_outputs(storage: str, n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(p, m, v) after one step from the case's inputs, by the out-of-place numpy update in the math format, each
    result rounded once to the storage format: what every exact in-place case must write, bit for bit."""
    from .backends.numpy_backend.update import update

    p, g, m, v = _inplace_inputs(storage, n, seed)
    opt = _optimizer("adam")
    math = FORMATS[INPLACE_MATH[storage]]
    row = scalar_table(opt, KERNEL_STEP, math)[KERNEL_STEP - 1].astype(math.dtype)
    wide = [a.astype(math.dtype) for a in (p, g, m, v)]
    new_p, (new_m, new_v) = update(opt, KERNEL_STEP, row, wide[0], wide[1], wide[2:])
    return tuple(a.astype(p.dtype) for a in (new_p, new_m, new_v))
