"""What differs between two reports' environments that can change the numbers without any change of code.

A fingerprint that changes between two reports is a code change only when nothing else changed: package versions,
the CPU and its features, XLA_FLAGS and thread settings, the BLAS library and its kernel (precision.machine). This
module lists those differences; ``precision compare`` prints them next to the fingerprint changes.
"""

from __future__ import annotations

import dataclasses
import json

__all__ = ["EnvChange", "environment_differences", "NOT_RECORDED"]

NOT_RECORDED = "(not recorded)"


@dataclasses.dataclass(frozen=True)
class EnvChange:
    key: str  # dotted path, e.g. "numerics.env.XLA_FLAGS" or "versions.jax"
    old: str
    new: str


def _flatten(env: dict) -> dict[str, str]:
    """The numerics-relevant entries of a report's environment as dotted key -> text."""
    out: dict[str, str] = {}
    for key in ("python", "platform", "cpu", "cpu_count"):
        if key in env:
            out[key] = str(env[key])
    for name, version in (env.get("versions") or {}).items():
        if name != "precision":  # the code under comparison itself, not its environment
            out[f"versions.{name}"] = str(version)
    numerics = env.get("numerics")
    if not isinstance(numerics, dict):
        return out
    out["numerics.machine"] = str(numerics.get("machine"))
    for section in ("cpu_features", "xla_cpu"):
        for name, value in (numerics.get(section) or {}).items():
            out[f"numerics.{section}.{name}"] = str(value)
    # Settings: an unset variable is a value too ("unset"), so setting XLA_FLAGS shows as a difference.
    for name, value in (numerics.get("env") or {}).items():
        out[f"numerics.env.{name}"] = str(value)
    # The loaded BLAS/OpenMP libraries as one sorted list: several can share a name (numpy's and scipy's OpenBLAS),
    # and their load order says nothing about numerics.
    libs = numerics.get("blas") or []
    out["numerics.blas"] = json.dumps(sorted(json.dumps(lib, sort_keys=True) for lib in libs))
    return out


def environment_differences(old_env: dict, new_env: dict) -> list[EnvChange]:
    """Every numerics-relevant entry that differs, sorted by key. An entry present in one report only is a
    difference ("unset" for environment variables, NOT_RECORDED otherwise: an older report may lack the record)."""
    old, new = _flatten(old_env or {}), _flatten(new_env or {})
    old_has, new_has = "numerics.machine" in old, "numerics.machine" in new
    changes = []
    if old_has != new_has:  # one report predates the record: say so once instead of listing every entry
        changes.append(EnvChange("numerics", "recorded" if old_has else NOT_RECORDED,
                                 "recorded" if new_has else NOT_RECORDED))
        old = {k: v for k, v in old.items() if not k.startswith("numerics.")}
        new = {k: v for k, v in new.items() if not k.startswith("numerics.")}
    for key in sorted(old.keys() | new.keys()):
        # An environment variable set on one side only was unset on the other; anything else was not recorded.
        missing = "unset" if key.startswith("numerics.env.") else NOT_RECORDED
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes.append(EnvChange(key, a, b))
    return sorted(changes, key=lambda c: c.key)
