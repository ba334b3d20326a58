"""Building spec matrices: the cross product of comma-separated choices, and the built-in default matrix."""

from __future__ import annotations

import itertools
from typing import Iterable

from .backends import BACKENDS, backend_availability
from .errors import SpecError
from .optim import make_optimizer
from .policy import get_policy
from .problems import get_problem
from .spec import RunSpec

__all__ = ["build_specs", "default_specs", "DEFAULT_CASES", "DEFAULT_POLICIES", "split_list"]

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
                record_every: int = 20) -> list[RunSpec]:
    """Every combination of the given choices (validated up front, so a typo fails before any run)."""
    problems = [get_problem(p).name for p in problems]
    opts = [make_optimizer(o, lr=lr) for o in optimizers]
    pols = [get_policy(p) for p in policies]
    for b in backends:
        if b not in BACKENDS:
            from .errors import choice_error
            raise choice_error("backend", b, BACKENDS)
    return [RunSpec(problem=p, optimizer=o, policy=pol, backend=b, device=dev, data=d, steps=steps, seed=s,
                    batch_size=batch_size, record_every=record_every)
            for p, d, o, pol, b, dev, s in itertools.product(problems, data, opts, pols, backends, devices, seeds)]


def default_specs(backends: Iterable[str] | None = None) -> list[RunSpec]:
    """The built-in matrix: DEFAULT_CASES x optimizers x policies x every backend available on the CPU."""
    if backends is None:
        backends = [b for b in BACKENDS if backend_availability(b, "cpu").available]
    specs = []
    for problem, data in DEFAULT_CASES:
        specs += build_specs([problem], DEFAULT_OPTIMIZERS, DEFAULT_POLICIES, backends=tuple(backends),
                             data=(data,))
    return specs
