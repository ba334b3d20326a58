"""RunSpec: everything a run depends on, frozen; its ``id`` names the result."""

from __future__ import annotations

import dataclasses

from .data import DATA_SOURCES, MAX_SEED, check_seed
from .errors import SpecError, choice_error
from .optim import OptimizerSpec
from .policy import PRESETS, Policy
from .problems import get_problem

__all__ = ["RunSpec", "DEVICES", "MAX_COUNT"]

DEVICES = ("cpu", "gpu")
# Steps, batch size and record_every are stored in a report as JSON integers its schema caps at a signed 64-bit
# value; seeds also (check_seed). A larger count is refused here rather than written to a report nothing can read.
MAX_COUNT = MAX_SEED


@dataclasses.dataclass(frozen=True)
class RunSpec:
    problem: str
    optimizer: OptimizerSpec
    policy: Policy
    backend: str = "numpy"
    device: str = "cpu"
    data: str = "synthetic"
    steps: int = 200
    seed: int = 0
    batch_size: int | None = 128  # None: full batch
    record_every: int = 20

    def __post_init__(self):
        # Structural checks only, all cheap: a spec that passes them can be handed to run() and, at worst, becomes an
        # "error" or "unavailable" result; it never stops the other specs from running.
        from .backends import BACKENDS  # here, not at the top: the backends package imports this module

        if not isinstance(self.optimizer, OptimizerSpec):
            raise SpecError(f"optimizer {self.optimizer!r} is not an OptimizerSpec; use make_optimizer(name)")
        if not isinstance(self.policy, Policy):
            raise SpecError(f"policy {self.policy!r} is not a Policy; use get_policy(name)")
        get_problem(self.problem)  # raises, naming the valid problems
        if self.backend not in BACKENDS:  # a name check only: no framework is imported
            raise choice_error("backend", self.backend, BACKENDS)
        if self.data not in DATA_SOURCES:
            raise choice_error("data set", self.data, DATA_SOURCES)
        for name in ("steps", "record_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
                raise SpecError(f"{name} {value!r} must be a positive integer" +
                                (f" (at most {MAX_COUNT})" if isinstance(value, int) and value > 0 else ""))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):  # a report stores a JSON integer
            raise SpecError(f"seed {self.seed!r} must be an integer")
        check_seed(self.seed)  # the range numpy.random.default_rng and a report both take
        bs = self.batch_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or not 0 < bs <= MAX_COUNT):
            raise SpecError(f"batch size {bs!r} must be a positive integer or None for full batch ('full' on the "
                            f"command line)")
        if self.device not in DEVICES:
            raise choice_error("device", self.device, DEVICES)

    @property
    def policy_name(self) -> str:
        return self.policy.name

    @property
    def id(self) -> str:
        """Stable, readable identity: the same string for the same run on any machine and commit."""
        batch = "full" if self.batch_size is None else str(self.batch_size)
        return (f"{self.problem}:{self.data}/{self.optimizer}/{self.policy.name}/{self.backend}-{self.device}"
                f"/steps={self.steps},bs={batch},seed={self.seed},rec={self.record_every}")

    def reference(self) -> "RunSpec":
        """The float64 numpy run this one is measured against."""
        return dataclasses.replace(self, policy=PRESETS["fp64"], backend="numpy", device="cpu")

    def to_dict(self) -> dict:
        return {
            "id": self.id, "problem": self.problem, "data": self.data,
            "optimizer": dataclasses.asdict(self.optimizer) | {"betas": list(self.optimizer.betas)},
            "policy": str(self.policy), "policy_name": self.policy.name, "backend": self.backend,
            "device": self.device, "steps": self.steps, "seed": self.seed, "batch_size": self.batch_size,
            "record_every": self.record_every,
        }
