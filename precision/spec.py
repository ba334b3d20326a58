"""RunSpec: everything a run depends on, frozen; its ``id`` names the result."""

from __future__ import annotations

import dataclasses

from .data import MAX_SEED, check_data_source, check_seed, data_set
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
    # Gradient accumulation: each step's batch split into this many consecutive micro-batches whose gradients are
    # summed in the accumulator format (precision.backends.step_rules.ACCUMULATION, docs/accumulation.md). 1: none.
    accum_steps: int = 1

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
        check_data_source(self.data)  # a data file's name only: its content is checked by the grid check
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
        self._check_accum_steps()

    def _check_accum_steps(self) -> None:
        """accum_steps: a positive integer, at most the rows of one step's batch (each micro-batch needs a row): the
        batch size, or the train split's rows for a full batch or a batch at least that large (make_dataset then
        trains on the full batch). The rows come from the data set's table (precision.data.DATA_SETS): nothing is
        loaded. A dataset made by hand is checked again when training starts (step_rules.micro_batches)."""
        k = self.accum_steps
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= MAX_COUNT:
            raise SpecError(f"accum_steps {k!r} must be a positive integer (1: no gradient accumulation)")
        if k == 1:
            return
        train_rows, _ = data_set(self.data).split()
        rows = train_rows if self.batch_size is None else min(self.batch_size, train_rows)
        if k > rows:
            batch = "full batch" if rows == train_rows else f"batch size {self.batch_size}"
            raise SpecError(f"accum_steps {k} exceeds the {rows} rows of one step ({batch} of {self.data!r}); valid "
                            f"range: 1..{rows} (each micro-batch needs at least one row)")

    @property
    def policy_name(self) -> str:
        return self.policy.name

    @property
    def id(self) -> str:
        """Stable, readable identity: the same string for the same run on any machine and commit."""
        batch = "full" if self.batch_size is None else str(self.batch_size)
        # accum_steps 1 adds nothing: the ids (and so the reports) of runs without accumulation are unchanged.
        accum = "" if self.accum_steps == 1 else f",accum={self.accum_steps}"
        return (f"{self.problem}:{self.data}/{self.optimizer}/{self.policy.name}/{self.backend}-{self.device}"
                f"/steps={self.steps},bs={batch},seed={self.seed},rec={self.record_every}{accum}")

    def reference(self) -> "RunSpec":
        """The float64 numpy run this one is measured against. It keeps ``accum_steps``: the reference of an
        accumulated run accumulates the same way, so its drift measures the formats only."""
        return dataclasses.replace(self, policy=PRESETS["fp64"], backend="numpy", device="cpu")

    def to_dict(self) -> dict:
        return {
            "id": self.id, "problem": self.problem, "data": self.data,
            "optimizer": dataclasses.asdict(self.optimizer) | {"betas": list(self.optimizer.betas)},
            "policy": str(self.policy), "policy_name": self.policy.name, "backend": self.backend,
            "device": self.device, "steps": self.steps, "seed": self.seed, "batch_size": self.batch_size,
            "record_every": self.record_every, "accum_steps": self.accum_steps,
        } | self._data_file()

    def _data_file(self) -> dict:
        """A data file's content hash (sha256), so a report says which data it was measured on."""
        from .owndata import is_file_source, load_file
        return {"data_sha256": load_file(self.data).sha256} if is_file_source(self.data) else {}
