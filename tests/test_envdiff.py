"""precision.envdiff: the environment differences that can change numerics without a code change."""

from __future__ import annotations

import copy

from precision.envdiff import NOT_RECORDED, EnvChange, environment_differences
from precision.report import environment


def test_same_environment_has_no_differences():
    env = environment()
    assert environment_differences(env, copy.deepcopy(env)) == []


def test_each_kind_of_difference_is_named():
    old = environment()
    new = copy.deepcopy(old)
    new["numerics"]["env"]["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    new["numerics"]["cpu_features"]["AVX512FP16"] = not old["numerics"]["cpu_features"]["AVX512FP16"]
    new["versions"]["jax"] = "0.0.1"
    new["git_commit"] = "another commit"  # the code itself: not an environment difference
    new["numerics"]["blas"] = [dict(lib, num_threads=lib["num_threads"] + 1) for lib in old["numerics"]["blas"]]
    changes = {c.key: c for c in environment_differences(old, new)}
    assert changes["numerics.env.XLA_FLAGS"] == EnvChange("numerics.env.XLA_FLAGS",
                                                           old["numerics"]["env"].get("XLA_FLAGS", "unset"),
                                                           "--xla_cpu_multi_thread_eigen=false")
    assert "numerics.cpu_features.AVX512FP16" in changes
    assert changes["versions.jax"].new == "0.0.1"
    assert "git_commit" not in changes
    assert "numerics.blas" in changes


def test_blas_load_order_is_not_a_difference():
    # numpy's and scipy's OpenBLAS both load; which comes first depends on import order, not on numerics.
    old = environment()
    new = copy.deepcopy(old)
    libs = [{"internal_api": "openblas", "version": v, "architecture": "Haswell"} for v in ("0.3.30", "0.3.31")]
    old["numerics"]["blas"], new["numerics"]["blas"] = libs, libs[::-1]
    assert environment_differences(old, new) == []


def test_a_report_without_the_record_is_one_difference():
    new = environment()
    old = {k: v for k, v in new.items() if k != "numerics"}
    changes = environment_differences(old, new)
    assert changes == [EnvChange("numerics", NOT_RECORDED, "recorded")]
