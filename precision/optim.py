"""Optimizer specifications and their per-step scalars.

Every backend implements the same update, op for op, with torch.optim semantics; each line below is one
operation rounded to the policy's *update format* U (``Policy.update``), and values are stored rounded to their
storage formats (moments: state format S; weights: ``Policy.weights`` W). Scalars come from
:func:`scalar_table`: computed in float64 on the host, then rounded once to U (never ``1 - beta`` in bf16, where
``bfloat16(0.999) == 1``).

SGD (torch.optim.SGD, dampening 0)::

    if weight_decay:   g = g + wd * p                  # wd*p, then +
    if momentum:       buf = g                          # step 1
                       buf = mu * buf + g               # later steps; stored in S
                       d = g + mu * buf if nesterov else buf
    else:              d = g
    p = p - lr * d                                      # lr*d, then -

Adam / AdamW (torch.optim.Adam, AdamW; bias corrections bc_k = 1 - beta_k^t in float64)::

    if adamw:          p = p * (1 - lr * wd)            # decoupled decay, scalar from the host
    elif weight_decay: g = g + wd * p
    m = b1 * m + (1 - b1) * g                           # b1*m, (1-b1)*g, +; stored in S
    v = b2 * v + (1 - b2) * (g * g)                     # g*g, b2*v, (1-b2)*gg, +; stored in S
    denom = sqrt(v) / sqrt(bc2) + eps                   # sqrt, /, +
    p = p - (lr / bc1) * m / denom                      # (lr/bc1)*m, / denom, -

torch writes m with ``lerp`` and v with ``addcmul``; in float64 these agree with the order above to ~1e-16 per
step (tests/test_optim_reference.py checks 100 steps against torch within 1e-13 relative). U is the policy's ``u=``
when it states one (then each new moment is used as computed and rounded to S once, when stored); torch's fused
kernel on bf16 params computes m and v as fused multiply-adds, the one difference from this order that the
``torch-bf16`` preset keeps (docs/torch_parity.md).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ._lazy_rows import LazyRows
from .errors import SpecError, choice_error
from .formats import Format, round_to

__all__ = ["OptimizerSpec", "OPTIMIZERS", "make_optimizer", "scalar_table", "scalar_rows", "ScalarTable",
           "SCALAR_COLUMNS", "state_size"]

OPTIMIZERS = ("sgd", "adam", "adamw")
_DEFAULTS = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
}

# Columns of the per-step scalar table, in order; backends index them by these positions.
SCALAR_COLUMNS = ("lr", "weight_decay", "momentum", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                  "sqrt_bc2", "eps", "step_size", "decay")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise choice_error("optimizer", self.name, OPTIMIZERS)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SpecError(f"learning rate {self.lr!r} must be a positive finite number")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise SpecError("nesterov needs sgd with momentum > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"betas {self.betas!r} must lie in [0, 1)")
        if self.weight_decay < 0 or self.momentum < 0 or self.eps < 0:
            raise SpecError("weight_decay, momentum and eps must be >= 0")

    @property
    def is_adam(self) -> bool:
        return self.name in ("adam", "adamw")

    def __str__(self) -> str:
        """Canonical short form; only hyperparameters that apply to this optimizer appear."""
        if self.name == "sgd":
            fields = [f"lr={self.lr:g}", f"momentum={self.momentum:g}"]
            if self.nesterov:
                fields.append("nesterov")
        else:
            fields = [f"lr={self.lr:g}", f"betas={self.betas[0]:g}/{self.betas[1]:g}", f"eps={self.eps:g}"]
        if self.weight_decay:
            fields.append(f"wd={self.weight_decay:g}")
        return f"{self.name}({','.join(fields)})"


def make_optimizer(name: str, **overrides) -> OptimizerSpec:
    """An optimizer with its documented defaults; ``None`` overrides are ignored."""
    if name not in OPTIMIZERS:
        raise choice_error("optimizer", name, OPTIMIZERS)
    kwargs = dict(_DEFAULTS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return OptimizerSpec(name=name, **kwargs)


def state_size(opt: OptimizerSpec) -> int:
    """Number of state vectors (each as long as the params): Adam m and v, SGD's momentum buffer."""
    return 2 if opt.is_adam else (1 if opt.momentum else 0)


def scalar_table(opt: OptimizerSpec, steps: int, fmt: Format) -> np.ndarray:
    """Per-step scalars, shape (steps, len(SCALAR_COLUMNS)), row t-1 for step t.

    Computed in float64 (bias corrections 1 - beta^t would lose everything in bf16), then rounded once to the
    update format ``fmt``, so every backend casts exactly the same values. A run takes them a chunk at a time
    (:func:`scalar_rows`, :class:`ScalarTable`): the same values, without a table that grows with steps.
    """
    return scalar_rows(opt, 0, steps, fmt)


def scalar_rows(opt: OptimizerSpec, start: int, stop: int, fmt: Format) -> np.ndarray:
    """Rows start .. stop - 1 of :func:`scalar_table` (steps start+1 .. stop), computed alone: (stop - start,
    len(SCALAR_COLUMNS)), each value the same float64 formula rounded once to ``fmt``."""
    t = np.arange(start + 1, stop + 1, dtype=np.float64)
    b1, b2 = map(float, opt.betas)
    # beta^t with Python's float pow (the C library's, as torch.optim computes it), not numpy's array power: that
    # dispatches to a SIMD kernel that is 1 ulp off for ~5% of t here and differs by CPU, and 1 - beta2^t
    # magnifies 1 ulp of beta2^t ~1000x (tests/test_optim_reference.py).
    bc1 = np.array([1.0 - b1**k for k in range(start + 1, stop + 1)], dtype=np.float64)
    bc2 = np.array([1.0 - b2**k for k in range(start + 1, stop + 1)], dtype=np.float64)
    columns = {
        "lr": np.full_like(t, opt.lr),
        "weight_decay": np.full_like(t, opt.weight_decay),
        "momentum": np.full_like(t, opt.momentum),
        "beta1": np.full_like(t, b1),
        "one_minus_beta1": np.full_like(t, 1.0 - b1),
        "beta2": np.full_like(t, b2),
        "one_minus_beta2": np.full_like(t, 1.0 - b2),
        "sqrt_bc2": np.sqrt(bc2),
        "eps": np.full_like(t, opt.eps),
        "step_size": opt.lr / bc1,
        "decay": np.full_like(t, 1.0 - opt.lr * opt.weight_decay),
    }
    table = np.stack([columns[name] for name in SCALAR_COLUMNS], axis=1).reshape(len(t), len(SCALAR_COLUMNS))
    return round_to(table, fmt)


class ScalarTable(LazyRows):
    """:func:`scalar_table` of a run, made a chunk at a time: ``rows(start, stop)`` (float64, rounded to the update
    format), ``table[i]`` the row of step i + 1. Nothing is held, so memory does not grow with steps."""

    def __init__(self, opt: OptimizerSpec, steps: int, fmt: Format):
        self.opt, self.steps, self.fmt = opt, int(steps), fmt

    @property
    def shape(self) -> tuple[int, int]:
        return (self.steps, len(SCALAR_COLUMNS))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start .. stop - 1 (steps, or applied-update counts, start+1 .. stop); 0 <= start <= stop <= steps."""
        if not 0 <= start <= stop <= self.steps:
            raise IndexError(f"scalar rows {start}..{stop} are outside the table's 0..{self.steps}")
        return scalar_rows(self.opt, start, stop, self.fmt)

