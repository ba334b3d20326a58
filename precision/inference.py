"""Serving a trained model in another format: inference parity against float64, and batch invariance.

A model trained in one format is often served in a narrower one. :func:`inference_parity` measures what that costs
on the test split: the trained params evaluated by a backend's forward pass in each format against the same params
evaluated in fp64 *on the same backend*, so that the figures are the serving format's alone (not the difference
between two backends' summation orders). :func:`batch_invariance` asks whether a sample's logits depend on which
other samples share its batch: the same forward pass over the test split cut into batches of several sizes, and at
every position of a batch, compared bit for bit.

The forward passes (``precision.backends.<name>_backend.forward``) keep each backend's training rounding contract:
params and rows rounded once to the compute format C, products exact and summed in the accumulator A, one rounding
to C, elementwise ops rounded to C. Definitions, the contract and measured figures: docs/inference.md.

Everything here is float64 on the host, and every figure is JSON-ready: finite floats, ints, bools or None (JSON
has no NaN or inf; ``nonfinite`` counts the logits that overflowed instead).
"""

from __future__ import annotations

import importlib

import numpy as np

from .backends import BACKENDS, get_backend
from .data import Dataset
from .formats import Format, get_format, ulp
from .problems import get_problem

__all__ = ["INFER_FORMATS", "BATCH_SIZES", "POSITION_BATCH", "accumulator_for", "forward", "inference_parity",
           "batch_invariance", "batched_logits"]

INFER_FORMATS = ("fp64", "fp32", "bf16", "fp16", "fp8_e4m3fn")
BATCH_SIZES = (1, 3, 32, 128, None)  # None: the whole test split as one batch
POSITION_BATCH = 32  # batch size of the position check: each sample visits every position of such a batch

_FP32, _FP64 = get_format("fp32"), get_format("fp64")


def accumulator_for(fmt: Format | str) -> Format:
    """The suite's accumulator rule (precision/policy.py): fp64 sums for fp64, fp32 for everything narrower
    (every backend here accumulates at least in fp32, as numpy's float16 ``dot`` and GPU tensor cores do)."""
    return _FP64 if get_format(fmt) == _FP64 else _FP32


def forward(backend: str, problem: str, params: np.ndarray, X: np.ndarray, fmt: Format | str,
            layout) -> np.ndarray:
    """Logits of ``params`` on rows ``X`` by ``backend``'s forward pass, computed in ``fmt`` with the accumulator
    rule, as float64 values. Raises UnavailableError when the backend's framework is missing (its reason)."""
    get_backend(backend)  # UnavailableError with the reason, before importing the forward module
    module = importlib.import_module(f"{BACKENDS[backend][0]}.forward")
    fmt = get_format(fmt)
    return module.forward_logits(problem, params, X, fmt, accumulator_for(fmt), layout)


def batched_logits(backend: str, problem: str, params: np.ndarray, X: np.ndarray, fmt: Format | str, layout,
                   batch_size: int | None) -> np.ndarray:
    """:func:`forward` over consecutive batches of ``batch_size`` rows (the last one ragged; None: one batch),
    concatenated in row order: what a server answering requests of that size returns."""
    n = len(X)
    size = n if batch_size is None else int(batch_size)
    if size <= 0:
        raise ValueError(f"batch size {batch_size!r} must be positive (or None for one batch)")
    parts = [forward(backend, problem, params, X[i:i + size], fmt, layout) for i in range(0, n, size)]
    return np.concatenate(parts) if parts else forward(backend, problem, params, X, fmt, layout)


# ---------------------------------------------------------------------------------------------------- parity --


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _rows(z: np.ndarray) -> np.ndarray:
    """Whether each sample's logits are all finite."""
    finite = np.isfinite(z)
    return finite if finite.ndim == 1 else finite.all(axis=1)


def _log_probs(problem: str, z: np.ndarray) -> np.ndarray:
    """Log-probabilities of the predicted distribution, in float64 from the logits' float64 values: logreg's
    (log p, log(1 - p)) as a 2-class distribution, softmax's rows otherwise. Stable forms (logaddexp, max shift),
    so that the float64 evaluation adds no error of its own that could hide a format's."""
    if problem == "logreg":
        return -np.stack([np.logaddexp(0.0, -z), np.logaddexp(0.0, z)], axis=-1)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _predict(problem: str, z: np.ndarray) -> np.ndarray:
    """Labels as precision.problems predicts them (z > 0 for logreg, argmax otherwise)."""
    return (z > 0).astype(np.int64) if problem == "logreg" else np.argmax(z, axis=1)


def _parity_row(problem: str, fmt: Format, z: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    """One format's figures: ``z`` (served in ``fmt``) against ``ref`` (fp64 on the same backend).

    Samples whose served logits are not finite count as flips and as wrong answers (a server would return no
    valid answer), and are left out of the distances (KL, max_abs_diff, max_logit_ulp), which are None when no
    sample is left; ``nonfinite`` counts them, logit by logit."""
    ok_ref, ok = _rows(ref), _rows(z)
    both = ok_ref & ok
    classifier = get_problem(problem).is_classifier
    out = {"format": fmt.name, "flip_rate": None, "kl_mean": None, "kl_max": None, "max_abs_diff": None,
           "max_logit_ulp": None, "accuracy_change": None, "nonfinite": int(np.sum(~np.isfinite(z)))}
    if both.any():
        zb, rb = z[both], ref[both]
        out["max_logit_ulp"] = _finite_or_none(np.max(np.abs(zb - rb) / ulp(rb, fmt)))
        if classifier:
            lq, lp = _log_probs(problem, zb), _log_probs(problem, rb)
            # KL >= 0 in exact arithmetic; cancellation can leave -1e-17: clipped (0 stays exactly 0)
            kl = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)
            out["kl_mean"], out["kl_max"] = _finite_or_none(kl.mean()), _finite_or_none(kl.max())
            out["max_abs_diff"] = _finite_or_none(np.max(np.abs(np.exp(lq) - np.exp(lp))))
        else:
            out["max_abs_diff"] = _finite_or_none(np.max(np.abs(zb - rb)))
    if classifier:
        with np.errstate(invalid="ignore"):
            pred, pred_ref = _predict(problem, z), _predict(problem, ref)
        if ok_ref.any():
            flips = (pred != pred_ref) | ~ok
            out["flip_rate"] = float(np.mean(flips[ok_ref]))
        labels = np.asarray(y).astype(np.int64)
        accuracy = np.mean((pred == labels) & ok)
        accuracy_ref = np.mean((pred_ref == labels) & ok_ref)
        out["accuracy_change"] = float(accuracy - accuracy_ref)
    return out


def inference_parity(backend: str, dataset: Dataset, params: np.ndarray,
                     formats=INFER_FORMATS) -> list[dict]:
    """The trained model ``params`` (float64 values) served on ``dataset.X_test`` in each format, against the same
    model in fp64 on the same backend: one JSON-ready dict per format with format, flip_rate, kl_mean, kl_max
    (KL(p_fp64 || p_format) of the predicted distributions), max_abs_diff (of the predictions: regression outputs,
    or probabilities), max_logit_ulp (in ulps of the format at the fp64 logit), accuracy_change (on y_test) and
    nonfinite (logits that overflowed). Classifier-only figures are None for linreg."""
    problem = dataset.problem
    params = np.asarray(params, dtype=np.float64)
    with np.errstate(all="ignore"):
        ref = forward(backend, problem, params, dataset.X_test, _FP64, dataset.layout)
        rows = []
        for name in formats:
            fmt = get_format(name)
            # fp64 too is a second, separate pass: its row then shows that the pass is deterministic
            z = forward(backend, problem, params, dataset.X_test, fmt, dataset.layout)
            rows.append(_parity_row(problem, fmt, z, ref, dataset.y_test))
    return rows


# --------------------------------------------------------------------------------------- batch invariance --


def _batch_label(batch_size: int | None) -> str:
    return "full" if batch_size is None else str(int(batch_size))


def _differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: whether any logit differs bitwise (float64 patterns of format values; any NaN equals any NaN,
    payloads carry no value; +0 and -0 differ)."""
    a, b = np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64)
    same = (a.view(np.uint64) == b.view(np.uint64)) | (np.isnan(a) & np.isnan(b))
    return ~same if same.ndim == 1 else ~same.all(axis=1)


def _max_ulp(a: np.ndarray, ref: np.ndarray, fmt: Format) -> float | None:
    """max |a - ref| in ulps of ``fmt`` at ref, over the logits finite in both (None if there are none)."""
    both = np.isfinite(a) & np.isfinite(ref)
    if not both.any():
        return None
    return _finite_or_none(np.max(np.abs(a[both] - ref[both]) / ulp(ref[both], fmt)))


def _position_check(backend: str, problem: str, params, X, fmt: Format, layout) -> tuple[float | None, float | None]:
    """Each of the first (n // POSITION_BATCH) * POSITION_BATCH samples at every position of a full batch: the
    rows rolled by 1 .. POSITION_BATCH - 1, cut into full batches, evaluated and rolled back, against the unrolled
    batches. Only full batches, so that position (and batch company) is the one thing that changes."""
    n = len(X) // POSITION_BATCH * POSITION_BATCH
    if n == 0:
        return None, None
    X = X[:n]
    base = batched_logits(backend, problem, params, X, fmt, layout, POSITION_BATCH)
    differ, worst = np.zeros(n, dtype=bool), None
    for shift in range(1, POSITION_BATCH):
        rolled = batched_logits(backend, problem, params, np.roll(X, shift, axis=0), fmt, layout, POSITION_BATCH)
        back = np.roll(rolled, -shift, axis=0)
        differ |= _differ(back, base)
        d = _max_ulp(back, base, fmt)
        worst = d if worst is None else (worst if d is None else max(worst, d))
    return float(differ.mean()), worst


def batch_invariance(backend: str, dataset: Dataset, params: np.ndarray, fmt: Format | str,
                     batch_sizes=BATCH_SIZES) -> dict:
    """Whether a test sample's logits depend on its batch: the forward pass (format ``fmt``, the accumulator rule)
    over dataset.X_test in consecutive batches of each size (None: one batch), each compared bit for bit with
    every sample evaluated alone (batch size 1), and each sample at every position of a batch of POSITION_BATCH.

    JSON-ready: format, reference_batch (1), batch_sizes, differ_share and max_ulp per batch size label ("3",
    "full", ...: share of samples with any logit differing bitwise, largest difference in ulps of ``fmt``),
    position_differ_share, position_max_ulp, and invariant (no sample differs anywhere)."""
    fmt = get_format(fmt)
    problem, X = dataset.problem, dataset.X_test
    params = np.asarray(params, dtype=np.float64)
    with np.errstate(all="ignore"):
        ref = batched_logits(backend, problem, params, X, fmt, dataset.layout, 1)
        differ_share, max_ulp = {}, {}
        for size in batch_sizes:
            if size == 1:
                continue
            out = batched_logits(backend, problem, params, X, fmt, dataset.layout, size)
            label = _batch_label(size)
            differ_share[label] = float(_differ(out, ref).mean())
            max_ulp[label] = _max_ulp(out, ref, fmt)
        position_share, position_ulp = _position_check(backend, problem, params, X, fmt, dataset.layout)
    invariant = not any(differ_share.values()) and not position_share
    return {"format": fmt.name, "reference_batch": 1, "batch_sizes": list(batch_sizes),
            "differ_share": differ_share, "max_ulp": max_ulp, "position_differ_share": position_share,
            "position_max_ulp": position_ulp, "invariant": bool(invariant)}
