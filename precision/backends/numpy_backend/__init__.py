"""The numpy backend: arrays held in the policy's formats (numpy float16/32/64, ml_dtypes bfloat16 and fp8),
numpy ufuncs and BLAS doing the math, Python stepping the loop."""

from __future__ import annotations

import numpy as np

from ...data import Dataset
from ...formats import get_format
from ...optim import scalar_table, state_size
from ...policy import Policy
from ...spec import RunSpec
from ...trajectory import Trajectory
from ..base import Availability, drive_chunks
from .models import gradient
from .ops import FormatOps, convert
from .update import update

__all__ = ["BACKEND", "NumpyBackend", "targets_for"]


def targets_for(dataset: Dataset, y: np.ndarray) -> np.ndarray:
    """Regression targets, 0/1 labels, or one-hot rows (float64), as the problem's loss wants them."""
    if dataset.problem in ("softmax", "mlp"):
        return np.eye(dataset.classes)[y.astype(np.int64)]
    return np.asarray(y, dtype=np.float64)


class NumpyBackend:
    name = "numpy"

    def availability(self, device: str) -> Availability:
        if device != "cpu":
            return Availability(False, f"the numpy backend runs on the CPU only (asked for {device!r})")
        return Availability(True)

    def devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def train(self, spec: RunSpec, dataset: Dataset) -> Trajectory:
        pol: Policy = spec.policy
        compute = FormatOps(pol.compute, pol.accum)
        upd = FormatOps(pol.update, pol.accum)
        X = convert(dataset.X_train, _FP64, pol.compute)
        T = convert(targets_for(dataset, dataset.y_train), _FP64, pol.compute)
        scale = compute.scalar((pol.loss_scale or 1.0) / dataset.batch_size)
        unscale = upd.scalar(1.0 / pol.loss_scale) if pol.loss_scale else None
        table = scalar_table(spec.optimizer, spec.steps, pol.update).astype(pol.update.dtype)

        weights = convert(dataset.init_params, _FP64, pol.weights)
        params = convert(weights, pol.weights, pol.params)
        state = [np.zeros_like(dataset.init_params, dtype=pol.state.dtype)
                 for _ in range(state_size(spec.optimizer))]
        store_state = (lambda x: x) if pol.state == pol.update else (
            lambda x: convert(convert(x, pol.update, pol.state), pol.state, pol.update))
        box = {"weights": weights, "params": params, "state": state}

        def run_chunk(start: int, stop: int):
            w, p, st = box["weights"], box["params"], box["state"]
            with np.errstate(all="ignore"):  # overflow and NaN are results here, reported as diverged_at
                for step in range(start + 1, stop + 1):
                    rows = dataset.batch(step)
                    g = gradient(spec.problem, compute, convert(p, pol.params, pol.compute), X[rows], T[rows],
                                 scale, dataset.layout)
                    g = convert(g, pol.compute, pol.update)
                    if unscale is not None:
                        g = g * unscale
                    w_u, st_u = update(spec.optimizer, step, table[step - 1], convert(w, pol.weights, pol.update),
                                       g, [convert(x, pol.state, pol.update) for x in st], store_state)
                    w = convert(w_u, pol.update, pol.weights)
                    st = [convert(x, pol.update, pol.state) for x in st_u]
                    p = convert(w, pol.weights, pol.params)
                    # Narrow params can overflow while the master copy is still finite (fp16 params > 65504).
                    if not (np.isfinite(w).all() and np.isfinite(p).all()):
                        box.update(weights=w, params=p, state=st)
                        return step
            box.update(weights=w, params=p, state=st)
            return None

        return drive_chunks(spec, run_chunk, snapshot=lambda: box["params"].astype(np.float64),
                            final_params=lambda: box["params"].copy())


_FP64 = get_format("fp64")
BACKEND = NumpyBackend()
