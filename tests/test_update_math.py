"""The policy grammar's update-math format ``u=`` (Policy.update_math) and the ``torch-bf16`` preset.

Rules (precision/policy.py, step_rules.STATE_STORE_RULES): without ``u`` nothing changes (U = wider(W, S), each
new moment rounded to S and read back at once); with ``u`` the optimizer computes in it op by op, uses each new
moment as computed, and rounds new weights to W and each moment to S once, when stored. A ``u`` narrower than
wider(W, S) is refused. The comparison against torch itself is tests/test_torch_parity.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from precision.backends import backend_availability, get_backend, step_rules
from precision.data import make_dataset
from precision.drift import fingerprint
from precision.errors import SpecError
from precision.formats import get_format
from precision.optim import make_optimizer
from precision.policy import PRESETS, parse_policy
from precision.spec import RunSpec

FP32, BF16 = get_format("fp32"), get_format("bf16")
TORCH_BF16 = "p=bf16,c=bf16,a=fp32,s=bf16,u=fp32"

# str() of every preset before u= existed (commit f9764af): printing, and so every run id, is unchanged.
OLD_PRESETS = {
    "fp64": "p=fp64,c=fp64,a=fp64,s=fp64",
    "fp32": "p=fp32,c=fp32,a=fp32,s=fp32",
    "fp16": "p=fp16,c=fp16,a=fp32,s=fp16",
    "bf16": "p=bf16,c=bf16,a=fp32,s=bf16",
    "fp16-mixed": "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32",
    "bf16-mixed": "p=bf16,c=bf16,a=fp32,s=fp32,m=fp32",
    "fp16-mixed-ls": "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=1024",
    "fp8-mixed": "p=fp8_e4m3fn,c=fp8_e4m3fn,a=fp32,s=fp32,m=fp32",
}


# -- grammar ------------------------------------------------------------------------------------------------------

def test_u_parses_prints_and_round_trips():
    pol = parse_policy(TORCH_BF16)
    assert pol == PRESETS["torch-bf16"] and pol.name == "torch-bf16"
    assert str(pol) == TORCH_BF16
    assert pol.update_math == FP32 and pol.update == FP32 and pol.weights == BF16 and pol.state == BF16
    assert pol.stores_state_once
    for short, text in (("p=fp16,u=fp64", "p=fp16,c=fp16,a=fp32,s=fp16,u=fp64"),
                        ("p=bf16,s=fp8_e5m2,m=fp32,ls=1024,u=fp64", "p=bf16,c=bf16,a=fp32,s=fp8_e5m2,m=fp32,ls=1024,u=fp64"),
                        ("p=fp32,u=fp32", "p=fp32,c=fp32,a=fp32,s=fp32,u=fp32")):
        assert str(parse_policy(short)) == text and parse_policy(text) == parse_policy(short)
    # order of the fields in the text does not matter; printing puts u last
    assert str(parse_policy("u=fp32,p=bf16,s=bf16,c=bf16")) == TORCH_BF16


@pytest.mark.parametrize("text, narrow, least", [
    ("p=fp32,s=bf16,u=bf16", "bf16", "fp32 = wider(weights fp32, state bf16)"),
    ("p=bf16,m=fp32,s=bf16,u=bf16", "bf16", "fp32 = wider(weights fp32, state bf16)"),
    ("p=bf16,s=fp32,u=fp16", "fp16", "fp32 = wider(weights bf16, state fp32)"),
    ("p=fp64,u=fp32", "fp32", "fp64 = wider(weights fp64, state fp64)"),
])
def test_a_narrower_u_is_refused_naming_both(text, narrow, least):
    with pytest.raises(SpecError) as info:
        parse_policy(text)
    message = str(info.value)
    assert "\n" not in message
    assert message == f"update math format {narrow} is narrower than {least}"


def test_u_equal_to_the_default_is_accepted_and_changes_nothing_where_S_is_U():
    pol = parse_policy("p=bf16,u=bf16")
    assert pol.update == BF16 and not pol.stores_state_once and str(pol) == "p=bf16,c=bf16,a=fp32,s=bf16,u=bf16"
    assert pol != PRESETS["bf16"]  # a different policy (and id), the same numbers (test below)


def test_policies_without_u_are_unchanged():
    for name, text in OLD_PRESETS.items():
        pol = PRESETS[name]
        assert str(pol) == text and parse_policy(text) == pol and pol.update_math is None
        assert not pol.stores_state_once
    assert list(PRESETS)[:len(OLD_PRESETS)] == list(OLD_PRESETS)  # new presets come after the old ones
    assert "u" not in str(parse_policy("p=bf16,c=bf16,a=fp32,s=bf16,m=fp32"))


# -- the chain ----------------------------------------------------------------------------------------------------

def test_conversion_sequence_has_no_moment_round_trip_under_u():
    """S narrower than U: without u each moment makes a U -> S -> U round trip inside the update; with u none (it is
    rounded to S once, by the link that stores state)."""
    without = parse_policy("p=bf16,c=bf16,a=fp32,s=bf16,m=fp32")  # U = fp32 by the default rule
    with_u = parse_policy("p=bf16,c=bf16,a=fp32,s=bf16,m=fp32,u=fp32")
    assert without.update == with_u.update == FP32
    seq_without = step_rules.conversion_sequence(without, 2)
    seq_with = step_rules.conversion_sequence(with_u, 2)
    # U -> S: 2 round trips + 2 stores + W -> P; S -> U: gradient C -> U, 2 state reads + 2 round trips
    assert seq_without.count((FP32, BF16)) == 5 and seq_without.count((BF16, FP32)) == 5
    assert seq_with.count((FP32, BF16)) == 3 and seq_with.count((BF16, FP32)) == 3  # no round trips
    assert step_rules.moment_format(without) == BF16 and step_rules.moment_format(with_u) == FP32
    assert set(step_rules.STATE_STORE_RULES) == {"default", "update_math", "same"}


def _tiny_logreg(steps=6):
    return make_dataset("logreg", steps=steps, batch_size=16, seed=3)


def _train(backend, policy, opt, dataset, steps=6):
    spec = RunSpec(problem="logreg", optimizer=opt, policy=policy, backend=backend, steps=steps, batch_size=16,
                   seed=3, record_every=1)
    return get_backend(backend).train(spec, dataset)


def test_reference_step_rounds_each_tensor_once():
    """torch-bf16's step is the fp32 update of bf16 inputs with each result rounded once: computed here directly in
    float32 (precision.optim's op order) and compared bit for bit with step_rules.reference_step."""
    import ml_dtypes
    pol, opt = PRESETS["torch-bf16"], make_optimizer("adamw", lr=1e-2)
    rng = np.random.default_rng(1)
    n, steps = 257, 8
    sc = step_rules.host_scalars(pol, opt, steps, batch_size=1)
    w, _, st = step_rules.initial_values(rng.standard_normal(n), pol, opt)
    f32 = np.float32
    for t in range(1, steps + 1):
        g = (rng.standard_normal(n) * 0.1).astype(f32).astype(ml_dtypes.bfloat16)
        ref = step_rules.reference_step(pol, opt, t, sc.table[t - 1], w, st, g)
        s = dict(zip(__import__("precision.optim", fromlist=["SCALAR_COLUMNS"]).SCALAR_COLUMNS,
                     sc.table[t - 1].astype(f32)))
        wu, gu, m, v = w.astype(f32), g.astype(f32), st[0].astype(f32), st[1].astype(f32)
        wu = wu * s["decay"]
        m = s["beta1"] * m + s["one_minus_beta1"] * gu
        v = s["beta2"] * v + s["one_minus_beta2"] * (gu * gu)
        wu = wu - s["step_size"] * m / (np.sqrt(v) / s["sqrt_bc2"] + s["eps"])
        bf = ml_dtypes.bfloat16
        assert np.array_equal(ref.weights.view(np.uint16), wu.astype(bf).view(np.uint16)), t
        assert np.array_equal(ref.state[0].view(np.uint16), m.astype(bf).view(np.uint16)), t
        assert np.array_equal(ref.state[1].view(np.uint16), v.astype(bf).view(np.uint16)), t
        w, st = ref.weights, ref.state


@pytest.mark.parametrize("opt", ["adam", "sgd-momentum"])
def test_u_changes_the_numbers_only_where_a_moment_is_narrower_than_U(opt):
    optimizer = make_optimizer("adam", lr=1e-2) if opt == "adam" else make_optimizer("sgd", lr=0.05, momentum=0.9)
    ds = _tiny_logreg()
    pure = _train("numpy", PRESETS["bf16"], optimizer, ds).params
    same_u = _train("numpy", parse_policy("p=bf16,u=bf16"), optimizer, ds).params
    assert np.array_equal(pure, same_u)  # u equal to the default and S = U: the same run
    mixed = _train("numpy", PRESETS["bf16-mixed"], optimizer, ds).params
    mixed_u = _train("numpy", parse_policy("p=bf16,c=bf16,a=fp32,s=fp32,m=fp32,u=fp32"), optimizer, ds).params
    assert np.array_equal(mixed, mixed_u)  # S = U = fp32: both rules agree
    torch_bf16 = _train("numpy", PRESETS["torch-bf16"], optimizer, ds).params
    assert not np.array_equal(pure, torch_bf16)


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd-momentum"])
@pytest.mark.parametrize("policy", ["torch-bf16", "p=fp16,c=fp16,a=fp32,s=fp8_e5m2,m=bf16,u=fp32"])
def test_numba_is_numpy_bit_for_bit_under_u(policy, opt):
    """bf16/fp16 compute on logreg: numba promises numpy's bits (docs/numba.md), so also with u=."""
    if not backend_availability("numba", "cpu").available:
        pytest.skip("numba unavailable")
    pol = PRESETS.get(policy) or parse_policy(policy)
    optimizer = (make_optimizer("sgd", lr=0.05, momentum=0.9) if opt == "sgd-momentum"
                 else make_optimizer(opt, lr=1e-2))
    ds = _tiny_logreg()
    ref = _train("numpy", pol, optimizer, ds)
    got = _train("numba", pol, optimizer, ds)
    assert got.diverged_at == ref.diverged_at
    assert np.array_equal(got.params.view(np.uint64), ref.params.view(np.uint64))


# -- fingerprints of the existing presets ----------------------------------------------------------------------------
# sha256 over the sorted {run id: fingerprint} of 48 numpy runs (logreg and mlp on synthetic data; adam, adamw,
# sgd with momentum 0.9; the 8 presets that existed before u=; 20 steps, batch 32), generated at commit f9764af
# (before u=) on the development machine: the training path of every policy without u= is untouched. numpy's BLAS
# orders fp32 sums by CPU, so another machine may print other fingerprints (then this test says so, listing them).
OLD_FINGERPRINTS_SHA256 = "6673514737b633d2969b6aadbfaa0beb877db0d51a6527404ec241b7a5e73ba2"


def test_fingerprints_of_the_old_presets_are_unchanged():
    out = {}
    for problem in ("logreg", "mlp"):
        ds = make_dataset(problem, steps=20, batch_size=32)
        for opt in ("adam", "adamw", "sgd"):
            optimizer = make_optimizer(opt, momentum=0.9) if opt == "sgd" else make_optimizer(opt)
            for name in OLD_PRESETS:
                spec = RunSpec(problem=problem, optimizer=optimizer, policy=PRESETS[name], backend="numpy", steps=20,
                               batch_size=32)
                out[spec.id] = fingerprint(get_backend("numpy").train(spec, ds).final_params)
    assert len(out) == 48
    digest = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    assert digest == OLD_FINGERPRINTS_SHA256, json.dumps(out, indent=1, sort_keys=True)
