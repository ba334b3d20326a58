"""The optimizer variants every backend test crosses with policies: each branch of the update in precision.optim."""

from __future__ import annotations

from precision.optim import make_optimizer

OPTIMIZER_CASES = {
    "sgd": dict(momentum=0.0),
    "sgd-wd": dict(momentum=0.0, weight_decay=0.01),
    "sgd-momentum": dict(momentum=0.9),
    "sgd-nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": dict(),
    "adam-wd": dict(weight_decay=0.01),
    "adamw": dict(),
}


def optimizer(case: str):
    return make_optimizer(case.split("-")[0], **OPTIMIZER_CASES[case])
