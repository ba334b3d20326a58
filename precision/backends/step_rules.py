"""The per-step rules of training: the one statement that every backend's loop follows.

Three things are stated here, each once, as data and as small pure functions:

1. **The conversion chain of one training step** (:data:`STEP_CHAIN`): which quantity moves from which format to
   which, in which order. :func:`apply_step` is that chain written once against an array namespace ``xp`` and a
   ``convert(x, src, dst)``; the numpy backend (``numpy_backend/__init__.py``, the reference) and the JAX backend
   (``jax_backend/loop.py``, under ``lax.scan``) both call it, the way both call
   :func:`precision.backends.array_math.update`. The numba backend (``numba_backend/loops.py``, ``apply_update``)
   runs the same chain per element in a float64 carrier; it cannot call Python, so its docstring points here and
   tests/test_conformance.py checks it against :func:`reference_step`.
2. **The divergence rule** (:data:`DIVERGENCE_CHECKED`, :func:`all_finite`): a run diverges at the first step whose
   new weights *or* new params are not all finite. That step is completed (weights, state and params all stored)
   and its state is what the backend reports; training stops there. Step 0 (the initial point) is not checked.
3. **The scalar and initial-value rules** (:data:`SCALAR_RULES`, :func:`host_scalars`, :func:`initial_values`):
   every host scalar is computed in float64 and rounded once to the format it is used in; weights start as the
   float64 init rounded once to W, params as those weights converted to P, state at zero in S.
4. **Gradient accumulation** (:data:`ACCUMULATION`, :data:`ACCUMULATION_CHAIN`, :func:`micro_batches`,
   :func:`accumulate`): with ``RunSpec.accum_steps`` K > 1, link 2 of the chain (the gradient in C) is computed
   from K consecutive micro-batches of the step's batch, each with the whole batch's seed scale, summed in order in
   A and rounded once to C. K = 1 is the chain as it was, the same code in every backend.

5. **The remedies** (:data:`REMEDY_RULES`, docs/remedies.md): stochastic rounding of the stored weights (and
   state), Kahan-compensated weight updates, and dynamic loss scaling (:func:`scaler_update`, :func:`dynamic_seed`,
   :func:`dynamic_unscale`, :func:`sr_key`): what each changes in the chain, written once here.

tests/test_conformance.py is the executable form of these rules: every backend in ``BACKENDS`` must give the same
outcomes on its crafted cases (docs/conformance.md).

Formats are named by :class:`precision.policy.Policy` attributes: ``params`` (P), ``compute`` (C), ``accum`` (A),
``state`` (S), ``weights`` (W = master or params), ``update`` (U: the policy's ``u=`` when given, else wider(W, S)).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..errors import SpecError
from ..formats import get_format, round_to, wider
from ..optim import OptimizerSpec, ScalarTable, state_size
from ..policy import Policy

__all__ = ["Link", "STEP_CHAIN", "DIVERGENCE_CHECKED", "DIVERGENCE_RULE", "SCALAR_RULES", "STATE_STORE_RULES", "StepResult",
           "apply_step", "all_finite", "state_store", "moment_format", "conversion_sequence", "HostScalars", "host_scalars",
           "initial_values", "reference_step", "ACCUMULATION", "ACCUMULATION_CHAIN", "micro_batches", "accumulate",
           "REMEDY_RULES", "KAHAN_CHAIN", "sr_key", "SR_WEIGHTS_TENSOR", "sr_state_tensor", "kahan_store",
           "scaler_update", "dynamic_seed", "dynamic_unscale", "ScalerState", "initial_scaler", "optimizer_state_size"]


@dataclasses.dataclass(frozen=True)
class Link:
    """One link of the step chain: ``quantity`` goes from format ``src`` to ``dst`` (Policy attribute names); an
    operation computed in one format has ``src == dst``. ``per`` is "array" or "state vector" (repeated for each
    of the optimizer's state vectors: 0 for plain SGD, 1 for momentum, 2 for Adam)."""

    quantity: str
    src: str
    dst: str
    what: str
    per: str = "array"

    @property
    def is_conversion(self) -> bool:
        return self.src != self.dst


# The chain of one step, in order. apply_step below is this table as code; conversion_sequence expands it for a
# policy (tests/test_conformance.py checks that the numpy and JAX loops make exactly these conversions).
STEP_CHAIN: tuple[Link, ...] = (
    Link("params", "params", "compute", "params converted to the compute format for the forward/backward pass"),
    Link("gradient", "compute", "compute",
         "forward and backward pass in C: each elementwise op rounded to C, products accumulated in A and rounded "
         "once to C; the seed is (out - target) * round(ls / batch, C)"),
    Link("gradient", "compute", "update", "the gradient converted to the update format"),
    Link("gradient", "update", "update", "times round(1 / ls, U) when the policy has a loss scale (exact: a power "
                                         "of two), else untouched"),
    Link("weights", "weights", "update", "weights (master, or params without one) read into U"),
    Link("state", "state", "update", "each state vector read into U", per="state vector"),
    Link("update", "update", "update",
         "the optimizer (op order of precision.optim), every op rounded to U; without u= in the policy each new "
         "moment is rounded to S and read back at once (state_store) and used as stored; with u= it is used as "
         "computed in U (torch's fused kernels: STATE_STORE_RULES)"),
    Link("weights", "update", "weights", "new weights stored: round(update result, W)"),
    Link("state", "update", "state", "new state stored: round(., S)", per="state vector"),
    Link("params", "weights", "params", "new params: round(new weights, P)"),
)

# Link 2 of STEP_CHAIN when K > 1, in order: what a backend's ``gradient(params_c)`` does (accumulate() below is it as
# code). ``per`` "micro-batch" links repeat for each of the K micro-batches.
ACCUMULATION_CHAIN = (
    Link("micro-gradient", "compute", "compute",
         "a micro-batch's gradient in C, as link 2 computes a batch's, seed round(ls / B, C) with B the whole batch",
         per="micro-batch"),
    Link("micro-gradient", "compute", "accum", "converted to A (exact: A is at least as wide as C)", per="micro-batch"),
    Link("gradient", "accum", "accum", "summed in order, micro-batch 1 first; each addition rounded to A"),
    Link("gradient", "accum", "compute", "the sum rounded once to C: link 2's result"),
)

# How a new moment (Adam's m and v, SGD's momentum buffer) is used by the rest of the update, by policy: the one
# place the chain depends on whether the policy states its update format (``u=``, Policy.update_math).
STATE_STORE_RULES = {
    "default": "no u= (U = wider(W, S)): each new moment is rounded to S and read back into U at once, and the rest "
               "of the update uses the stored value (a moment in a narrow S costs two roundings per step; link 9 "
               "then rounds a value already in S, exactly)",
    "update_math": "u= given: the moment stays in U as computed and the rest of the update uses it; it is rounded "
                   "to S once, when stored (link 9), as torch's fused optimizers (_fused_adam, _fused_sgd) keep "
                   "exp_avg in opmath registers while storing it in the param dtype (docs/torch_parity.md)",
    "same": "S equal to U: no rounding either way; both rules give the same values",
}

DIVERGENCE_CHECKED = ("weights", "params")
DIVERGENCE_RULE = ("diverged_at is the first step (1-based) after which the new weights or the new params are not "
                   "all finite; that step is completed (weights, state, params stored) and its values are what is "
                   "reported; no later step runs. Narrow params can overflow while fp32 master weights are finite "
                   "(fp16 params above 65504), so checking the weights alone is not enough.")

SCALAR_RULES = {
    "seed_scale": "round((ls or 1) / batch_size, C): the gradient seed's factor, folded into (out - target) * it",
    "unscale": "round(1 / ls, U) when the policy has a loss scale (multiplied into the gradient in U), else none "
               "(a backend that multiplies unconditionally uses exactly 1.0)",
    "optimizer": "precision.optim.scalar_table(opt, steps, U): float64 on the host, rounded once to U",
    "data": "X and targets rounded once from float64 to C, up front",
    "initial": "weights = round(init, W) from float64; params = convert(weights, W -> P); state = zeros in S",
}


# Gradient accumulation (RunSpec.accum_steps = K). Each entry is one decision and the reason for it;
# docs/accumulation.md derives what it does to the numbers.
ACCUMULATION = {
    "split": "the step's batch (the same rows as without accumulation, in the same order) is split into K consecutive "
             "micro-batches with numpy.array_split's sizes: the first B mod K have ceil(B/K) rows, the rest "
             "floor(B/K) (sizes differ by at most one; K <= B, else SpecError naming K and 1..B)",
    "seed": "each micro-batch's gradient is today's gradient of its rows, computed in C exactly as link 2 computes a "
            "batch's, with the seed scale of the WHOLE batch, round(ls / B, C): it is that micro-batch's share of "
            "the batch mean (torch/HF loops divide each micro-batch's loss by the number of micro-batches for equal "
            "sizes; dividing by B keeps the mean exact for unequal sizes too)",
    "sum": "the micro-gradients are converted to A and summed in order, micro-batch 1 first (the sum starts as "
           "micro-batch 1's gradient, as torch's .grad is assigned by the first backward and added to by the next), "
           "each addition rounded to A",
    "round": "the sum is rounded once to C; the step chain then goes on unchanged from link 3 (gradient C -> U, "
             "unscale, update)",
    "identity": "K = 1 is the chain without accumulation, bit for bit: every backend runs its unchanged code path",
}


# The remedies (docs/remedies.md derives what each does to the numbers). Each entry is one decision.
REMEDY_RULES = {
    "sr": "r=sr: link 8 (new weights stored) rounds the update result stochastically to W with "
          "precision.stochastic.round_stochastic (its U carrier: float32 for U up to fp32, float64 for fp64), key "
          "sr_key(seed, stream) and tensor id SR_WEIGHTS_TENSOR, counter (element index in the flat parameter "
          "vector, step mod 2^32). Links 9 and 10 stay round-to-nearest; P = round(W, P) too, so with W = P the "
          "params are the stochastically rounded weights",
    "sr-state": "r=sr-state: link 9 too, state vector i with tensor id sr_state_tensor(i) (needs u=: each moment "
                "is then rounded once, when stored)",
    "kahan": "r=kahan: the state gains a last vector, the compensation c in S (zeros at step 0). The optimizer "
             "returns its update split as (base, delta) with new weights = base + delta (base: the weights, after "
             "AdamW's decay; delta: minus the step; the same ops as without the split). KAHAN_CHAIN, in U: "
             "t = delta + c; y = base + t; w = round(y, W); c = round(t - (w - base), S): the part of t that "
             "the stored weights missed, carried into the next step (optimi's buffer; with U = W it is Fast2Sum)",
    "dynamic": "ls=dynamic: the scale (float32, starts at init) multiplies the seed: seed = round(round(1/B, C) * "
               "scale, C), the product exact in wider(C, fp32) (a power of two); the gradient in U is multiplied by "
               "round(1/scale, U) (exact: computed in float32 from a power of two, as torch's reciprocal). A step "
               "whose unscaled gradient is not all finite is skipped when skip=yes: weights, state and params "
               "stay as they were, the divergence rule does not look at it, and the optimizer's step count does "
               "not advance (the next update uses the scalar table's row of the applied-update count, and "
               "momentum's first step is the first applied one), as torch skips optimizer.step(). Then the scale "
               "is updated by scaler_update (torch's _amp_update_scale_). Every applied step is then the chain",
}

KAHAN_CHAIN = (
    Link("update", "update", "update", "t = delta + c, c the compensation read into U"),
    Link("weights", "update", "update", "y = base + t"),
    Link("weights", "update", "weights", "new weights stored: round(y, W)"),
    Link("state", "update", "state", "new compensation: round(t - (w - base), S), w read back into U"),
)

SR_WEIGHTS_TENSOR = 0
_SR_TENSORS_PER_STREAM = 8  # weights and up to 7 state vectors per stream (Adam: 2)
_M32 = 0xFFFFFFFF


def sr_state_tensor(i: int) -> int:
    """The generator's tensor id of state vector ``i`` under ``r=sr-state``."""
    return SR_WEIGHTS_TENSOR + 1 + i


def sr_key(seed: int, stream: int) -> tuple[int, int]:
    """(seed word, tensor-id offset) of a run's stochastic rounding: the run's seed folded to 32 bits (its two
    halves xored; seeds below 2^32 are themselves) and the stream's block of tensor ids. Every backend adds the
    tensor id to the offset and passes the step mod 2^32 (precision.stochastic's four 32-bit fields)."""
    seed = int(seed)
    return (seed ^ (seed >> 32)) & _M32, int(stream) * _SR_TENSORS_PER_STREAM


def optimizer_state_size(pol: Policy, n_state: int) -> int:
    """State vectors the optimizer itself uses (``n_state`` stored ones less Kahan's compensation)."""
    return n_state - 1 if pol.kahan else n_state


def kahan_store(convert: Callable, pol: Policy, base, delta, comp):
    """:data:`KAHAN_CHAIN`: (new weights in W, new compensation in S) from the split update (``base``, ``delta``,
    in U) and the stored compensation ``comp`` (S)."""
    t = delta + convert(comp, pol.state, pol.update)
    w = convert(base + t, pol.update, pol.weights)
    c = convert(t - (convert(w, pol.weights, pol.update) - base), pol.update, pol.state)
    return w, c


class ScalerState(NamedTuple):
    """Dynamic loss scaling's state: the scale (float32) and the count of finite steps since the last change (the
    growth tracker, int32), as torch keeps them."""
    scale: object
    tracker: object


def initial_scaler(pol: Policy) -> ScalerState:
    return ScalerState(np.float32(pol.dynamic_scale.init), np.int32(0))


def scaler_update(xp, state: ScalerState, found_inf, ds) -> ScalerState:
    """torch's ``_amp_update_scale_`` (aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp) for the
    :class:`precision.policy.DynamicScale` ``ds``, array-generic (numpy scalars, or traced under jit): a step with an
    inf/NaN gradient multiplies the scale by backoff and resets the tracker; otherwise the tracker counts up and,
    reaching ``interval``, multiplies the scale by growth (only when the result is finite) and resets. float32
    products of powers of two: exact until they leave float32's range."""
    scale, tracker = state
    successful = tracker + xp.int32(1)
    grown = scale * xp.float32(ds.growth)
    at_interval = successful >= xp.int32(ds.interval)
    new_scale = xp.where(found_inf, scale * xp.float32(ds.backoff),
                         xp.where(at_interval & xp.isfinite(grown), grown, scale))
    new_tracker = xp.where(found_inf | at_interval, xp.int32(0), successful)
    return ScalerState(new_scale.astype(xp.float32), new_tracker.astype(xp.int32))


def dynamic_seed(convert: Callable, pol: Policy, base_seed, scale):
    """The seed scale of a step under dynamic loss scaling: round(base_seed * scale, C), with ``base_seed`` =
    round(1/B, C) (a typed scalar of C) and ``scale`` float32, multiplied in wider(C, fp32) where the product of a
    C value and a power of two is exact (:data:`REMEDY_RULES` "dynamic")."""
    wide = wider(pol.compute, _FP32)
    return convert(convert(base_seed, pol.compute, wide) * convert(scale, _FP32, wide), wide, pol.compute)


def dynamic_unscale(xp, convert: Callable, pol: Policy, scale):
    """round(1/scale, U): the reciprocal computed in float32 (exact for a power of two in range), as torch's
    ``scale.double().reciprocal().float()``, then converted to U."""
    return convert(xp.float32(1) / scale, _FP32, pol.update)


class StepResult(NamedTuple):
    weights: object  # W
    state: list  # S, one array per state vector
    params: object  # P
    finite: object  # xp boolean scalar: the divergence rule's verdict on this step (True: not diverged)
    gradient_finite: object = True  # with check_gradient: whether the unscaled gradient in U was all finite


def all_finite(xp, weights, params):
    """The divergence rule: True when the new weights and the new params are all finite (``xp`` boolean scalar, so
    it also traces under ``jit``)."""
    return xp.all(xp.isfinite(weights)) & xp.all(xp.isfinite(params))


def state_store(convert: Callable, pol: Policy) -> Callable:
    """``store_state`` for :func:`precision.backends.array_math.update` (:data:`STATE_STORE_RULES`): a new moment
    rounded to S and read back into U, so the update goes on with the value as stored; identity when S is U, and
    when the policy states its update format (``u=``: the moment is used as computed and rounded once by link 9)."""
    if pol.state == pol.update or pol.stores_state_once:
        return lambda x: x
    return lambda x: convert(convert(x, pol.update, pol.state), pol.state, pol.update)


def moment_format(pol: Policy):
    """The format a new moment is rounded to inside the update before the rest of the update uses it
    (:data:`STATE_STORE_RULES`): S when it is stored and read back at once, U when it is used as computed (``u=``,
    or S equal to U). The numba loop takes it as a format code; :func:`state_store` is the same rule for ``xp``."""
    return pol.update if pol.stores_state_once else pol.state


def apply_step(xp, convert: Callable, pol: Policy, gradient: Callable, update: Callable, weights, params,
               state: Sequence, unscale=None, *, stochastic: Callable | None = None,
               check_gradient: bool = False) -> StepResult:
    """One training step, :data:`STEP_CHAIN` in order, array-generic.

    ``xp``: the array namespace (numpy or jax.numpy); ``convert(x, src, dst)``: the backend's exact format
    conversion; ``gradient(params_c)``: the flat gradient in C of params already in C (the backend binds data,
    batch rows and the seed scale); ``update(w, g, state)``: the optimizer in U returning (w, state), with the
    step's scalars and :func:`state_store` bound; ``unscale``: round(1/ls, U) as a typed scalar, or None.
    ``weights``, ``params``, ``state``: the stored values (W, P, S; under ``r=kahan`` the last state vector is the
    compensation). Returns the new stored values and the divergence rule's verdict.

    The remedies (:data:`REMEDY_RULES`): under ``r=kahan`` ``update`` is called with ``split=True`` and returns
    (base, delta, state); under ``r=sr`` / ``r=sr-state`` ``stochastic(x, fmt, tensor)`` rounds the U values ``x``
    to ``fmt``'s storage (the backend binds the run's key and the step). ``check_gradient``: also report whether
    the unscaled gradient is all finite (dynamic loss scaling skips the step when it is not)."""
    g = convert(gradient(convert(params, pol.params, pol.compute)), pol.compute, pol.update)
    if unscale is not None:
        g = g * unscale
    gradient_finite = xp.all(xp.isfinite(g)) if check_gradient else True
    w_read = convert(weights, pol.weights, pol.update)
    if pol.kahan:
        *opt_state, comp = state
        base, delta, state_u = update(w_read, g, [convert(x, pol.state, pol.update) for x in opt_state], split=True)
        w, comp = kahan_store(convert, pol, base, delta, comp)
        new_state = [convert(x, pol.update, pol.state) for x in state_u] + [comp]
    else:
        w_u, state_u = update(w_read, g, [convert(x, pol.state, pol.update) for x in state])
        if pol.stochastic:
            w = stochastic(w_u, pol.weights, SR_WEIGHTS_TENSOR)
        else:
            w = convert(w_u, pol.update, pol.weights)
        if pol.rounding == "sr-state":
            new_state = [stochastic(x, pol.state, sr_state_tensor(i)) for i, x in enumerate(state_u)]
        else:
            new_state = [convert(x, pol.update, pol.state) for x in state_u]
    p = convert(w, pol.weights, pol.params)
    return StepResult(w, new_state, p, all_finite(xp, w, p), gradient_finite)


def micro_batches(batch_size: int, accum_steps: int) -> tuple[tuple[int, int], ...]:
    """The (start, stop) row positions of the K = ``accum_steps`` micro-batches within a step's batch of
    ``batch_size`` rows: consecutive, in order, with numpy.array_split's sizes (the first ``B mod K`` one row
    longer). K larger than the batch is refused with a SpecError naming K and the valid range."""
    k, b = accum_steps, batch_size
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise SpecError(f"accum_steps {k!r} must be a positive integer (1: no gradient accumulation)")
    if k > b:
        raise SpecError(f"accum_steps {k} exceeds the batch's {b} rows; valid range: 1..{b} (each micro-batch "
                        f"needs at least one row)")
    q, r = divmod(int(b), int(k))
    bounds, start = [], 0
    for i in range(int(k)):
        stop = start + q + (1 if i < r else 0)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def accumulate(convert: Callable, pol: Policy, micro_gradients) -> object:
    """:data:`ACCUMULATION_CHAIN` as code: the micro-gradients (an iterable of flat gradients in C, micro-batch 1
    first, e.g. a generator computing each when asked) converted to A, summed in order and rounded once to C."""
    total = None
    for g in micro_gradients:
        g = convert(g, pol.compute, pol.accum)
        total = g if total is None else total + g
    return convert(total, pol.accum, pol.compute)


def conversion_sequence(pol: Policy, n_state: int, accum_steps: int = 1) -> list[tuple]:
    """The (src, dst) Format pairs that :data:`STEP_CHAIN` converts, in order, for ``pol`` and ``n_state`` state
    vectors, including the round trip of each new moment through S inside the update (:func:`state_store`, for an
    optimizer whose moments are stored: Adam's m and v, SGD's buffer; none under ``u=``, :data:`STATE_STORE_RULES`), and with ``accum_steps`` K > 1 link 2 as
    :data:`ACCUMULATION_CHAIN` (K conversions C -> A, then A -> C) after link 1. Conversions between equal formats
    are listed too (a backend's ``convert`` returns its input then)."""
    seq = []
    for link in STEP_CHAIN:
        if link.quantity == "gradient" and link.src == link.dst == "compute" and accum_steps > 1:
            seq += [(pol.compute, pol.accum)] * accum_steps + [(pol.accum, pol.compute)]
            continue
        if link.quantity == "update":
            if pol.state != pol.update and not pol.stores_state_once:
                seq += [(pol.update, pol.state), (pol.state, pol.update)] * n_state
            continue
        if not link.is_conversion:
            continue
        seq += [(getattr(pol, link.src), getattr(pol, link.dst))] * (n_state if link.per == "state vector" else 1)
    return seq


class HostScalars(NamedTuple):
    """Host scalars of a run, as float64 values already rounded to their formats (exact in them)."""
    seed_scale: float  # in C
    unscale: float | None  # in U; None without a loss scale
    table: ScalarTable  # (steps, len(SCALAR_COLUMNS)) float64 rounded to U, made a chunk at a time (rows(start, stop))


def host_scalars(pol: Policy, opt: OptimizerSpec, steps: int, batch_size: int) -> HostScalars:
    """:data:`SCALAR_RULES` for one run. An empty batch has no mean: SpecError naming the value."""
    if batch_size <= 0:
        raise SpecError(f"batch size {batch_size!r} must be positive (an empty batch has no mean gradient)")
    seed = float(round_to(np.float64((pol.loss_scale or 1.0) / batch_size), pol.compute))
    unscale = float(round_to(np.float64(1.0 / pol.loss_scale), pol.update)) if pol.loss_scale else None
    return HostScalars(seed, unscale, ScalarTable(opt, steps, pol.update))


_FP32 = get_format("fp32")


def initial_values(init_params: np.ndarray, pol: Policy, opt: OptimizerSpec) -> tuple:
    """(weights in W, params in P, [state in S]) as numpy arrays of the formats' dtypes: the float64 init rounded
    once to W, params converted from those weights (two roundings when W is narrower than fp64, the same in every
    backend), zero state. Overflow (an init beyond P's range) is a value here, not a warning: the first step's
    divergence check reports it."""
    from .numpy_backend.ops import convert  # here, not at the top: numpy_backend imports this module

    fp64 = get_format("fp64")
    with np.errstate(over="ignore", invalid="ignore"):
        weights = convert(np.asarray(init_params, dtype=np.float64), fp64, pol.weights)
        params = convert(weights, pol.weights, pol.params)
    n_state = state_size(opt) + (1 if pol.kahan else 0)  # r=kahan: the compensation, last
    state = [np.zeros(np.shape(init_params), dtype=pol.state.dtype) for _ in range(n_state)]
    return weights, params, state


def reference_step(pol: Policy, opt: OptimizerSpec, step: int, scalars_row: np.ndarray, weights, state,
                   grad_compute, unscale: float | None = None) -> StepResult:
    """The reference step on numpy arrays, given the gradient already computed in C (``grad_compute``): what a
    backend's update part (links 3-10 of :data:`STEP_CHAIN`, and the divergence verdict) must produce bit for bit
    when it makes the reference's operations (numba does; JAX contracts FMAs, docs/jax.md). ``weights`` (W) and
    ``state`` (S) as stored; ``scalars_row`` and ``unscale`` as float64 values from :func:`host_scalars`."""
    from .array_math import update as array_update
    from .numpy_backend.ops import convert

    row = np.asarray(scalars_row, dtype=np.float64).astype(pol.update.dtype)
    typed_unscale = None if unscale is None else np.asarray(unscale, dtype=np.float64).astype(pol.update.dtype)[()]
    store = state_store(convert, pol)
    with np.errstate(all="ignore"):
        params = convert(weights, pol.weights, pol.params)  # only link 1 reads them; the gradient is given
        return apply_step(np, convert, pol, lambda params_c: grad_compute,
                          lambda w, g, st: array_update(np, opt, step, row, w, g, st, store),
                          weights, params, state, typed_unscale)
