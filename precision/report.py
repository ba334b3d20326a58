"""Results and reports: frozen records, versioned JSON written atomically, refused when the version is unknown."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from ._atomic import write_atomic
from ._report_reader import read_report_data
from .calibration import Calibration
from .machine import numerics_environment

__all__ = ["SCHEMA_VERSION", "Result", "Report", "environment", "write_json_atomic", "load_report",
           "finite_or_none"]

SCHEMA_VERSION = 2
# Versions load_report reads. A version 1 report is upgraded on read: the fields version 2 added (floors, verdict,
# inference, batch_invariance, accumulation; spec accum_steps) are absent there, which the records hold as None
# (accum_steps as 1, what every version 1 run did).
READABLE_VERSIONS = (1, 2)


def finite_or_none(x):
    """JSON has no inf/NaN: store them as null (``diverged_at`` and ``status`` say why)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclasses.dataclass(frozen=True)
class Result:
    """One run's record. ``status`` is "ok", "diverged", "unavailable" or "error" (then ``message`` says why);
    metric fields are None where they do not apply."""

    spec: dict
    status: str
    message: str = ""
    time_per_step_s: float | None = None
    compile_s: float | None = None
    final_loss: float | None = None
    bits_of_agreement: float | None = None
    rel_l2: float | None = None
    max_ulp: float | None = None
    loss_gap: float | None = None
    flip_rate: float | None = None
    diverged_at: int | None = None
    fingerprint: str | None = None
    drift: tuple = ()  # ({"step", "rel_l2", "bits"}, ...)
    # Seconds per step of each timed chunk (warm-up excluded): the noise ``precision compare`` tests a time change
    # against. Optional (None in reports written before it existed), so schema version 1 still reads them.
    step_times_s: tuple[float, ...] | None = None
    # Schema version 2 (each None when not measured): the noise floors of the result's reference configuration and
    # the verdict against them (precision.floors), inference parity per served format and batch invariance per
    # format (precision.inference), and the accumulated-vs-one-batch figures (precision.accumulation).
    floors: dict | None = None
    verdict: dict | None = None
    inference: tuple[dict, ...] | None = None
    batch_invariance: tuple[dict, ...] | None = None
    accumulation: dict | None = None
    # What the formats did to the steps (precision.audit): stagnation and underflow at each record step, eps in U,
    # and under dynamic loss scaling the scale history and the skipped steps. Optional like the fields above.
    audit: dict | None = None

    @property
    def id(self) -> str:
        return self.spec["id"]

    def to_dict(self) -> dict:
        return _json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["drift"] = tuple(kwargs.get("drift", ()))
        for key in ("step_times_s", "inference", "batch_invariance"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def _json_ready(value):
    """``value`` with tuples as lists and every non-finite float as None, at any depth (JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return finite_or_none(value)


@dataclasses.dataclass(frozen=True)
class Report:
    results: tuple[Result, ...]
    environment: dict
    created: str = ""
    # The calibration kernel timed in the same run (precision.calibration): what ``precision compare`` divides
    # times by to cancel the machine's load. Optional (None in reports written before it existed, and then left
    # out of the file), so schema version 1 still reads them.
    calibration: Calibration | None = None

    def to_dict(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, "created": self.created, "environment": self.environment,
               "results": [r.to_dict() for r in self.results]}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    def by_id(self) -> dict[str, Result]:
        return {r.id: r for r in self.results}


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write JSON (sorted keys, no NaN) atomically to ``path``."""
    text = json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_report(path: str | os.PathLike) -> Report:
    """Read a report written by :meth:`Report.save`. The file must be a regular file of at most 256 MiB of UTF-8
    JSON, without NaN or Infinity, of a readable schema version (READABLE_VERSIONS), valid against that version's
    precision/schemas/report-v<N>.schema.json (docs/reports.md); anything else raises a one-line ReportError naming
    the file and the problem. A version 1 report is upgraded on read (fields it lacks are None)."""
    data = read_report_data(path, READABLE_VERSIONS)
    # The schema checked every key read here, so building the records cannot fail.
    results = tuple(Result.from_dict(_upgraded(r)) for r in data["results"])
    calibration = Calibration.from_dict(data["calibration"]) if data.get("calibration") is not None else None
    return Report(results=results, environment=data["environment"], created=data["created"],
                  calibration=calibration)


def _upgraded(result: dict) -> dict:
    """A result of any readable version as version 2 has it: a version 1 spec gains accum_steps 1."""
    if "accum_steps" not in result["spec"]:
        result = {**result, "spec": {**result["spec"], "accum_steps": 1}}
    return result


def _version(module: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {name: _version(name) for name in
                     ("precision", "numpy", "ml_dtypes", "numba", "numba-cuda", "jax", "jaxlib", "optax")},
        "git_commit": _git_commit(),
        # What besides the code can change the bits (CPU features, XLA_FLAGS, threads, BLAS): compare lists it.
        "numerics": numerics_environment(),
    }


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
