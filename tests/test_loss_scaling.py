"""Dynamic loss scaling (``ls=dynamic``): torch.amp.GradScaler's rule, checked step for step against torch, and what
skipping a step means for the optimizer (step_rules.REMEDY_RULES "dynamic", docs/remedies.md)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from precision.backends import backend_availability, get_backend
from precision.backends.step_rules import ScalerState, initial_scaler, scaler_update
from precision.runner import dataset_for
from precision.errors import SpecError
from precision.matrix import DEFAULT_CASES
from precision.optim import make_optimizer
from precision.policy import PRESETS, DynamicScale, parse_policy
from precision.spec import RunSpec

from test_conformance import ALL_BACKENDS, crafted, same_bits

FP16_MAX = 65504.0


def our_scales(found_inf: list[bool], ds: DynamicScale) -> list[float]:
    """The scale after each step, by step_rules.scaler_update."""
    state, out = ScalerState(np.float32(ds.init), np.int32(0)), []
    for inf in found_inf:
        with np.errstate(over="ignore"):  # a growth past float32's max is computed, then not taken
            state = scaler_update(np, state, np.bool_(inf), ds)
        out.append(float(state.scale))
    return out


def torch_run(grads: list[np.ndarray], ds: DynamicScale):
    """torch.amp.GradScaler on the CPU driving Adam on 4 fp32 params: each step's gradient is ``g * scale`` rounded
    to fp16 (what an fp16 backward pass produces from the scaled loss: inf above 65504), then
    ``scaler.step`` / ``scaler.update``. Returns (scale after each step, skipped steps, Adam's step count)."""
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float32))
    opt = torch.optim.Adam([p], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=ds.init, growth_factor=ds.growth, backoff_factor=ds.backoff,
                                  growth_interval=ds.interval)
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily by the first scale(loss)
    scales, skipped = [], []
    for step, g in enumerate(grads, start=1):
        scale = scaler.get_scale()
        p.grad = (torch.from_numpy(g).to(torch.float32) * scale).to(torch.float16).to(torch.float32)
        before = opt.state[p].get("step", torch.tensor(0.0)).item() if p in opt.state else 0
        scaler.step(opt)
        after = opt.state[p]["step"].item() if p in opt.state else 0
        if after == before:
            skipped.append(step)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, skipped, int(opt.state[p]["step"].item()) if p in opt.state else 0


# Gradients of magnitude ~1..8 against init 2^16: 8 * 2^16 > 65504 overflows fp16, so the first steps back off until
# 8 * scale fits (scale <= 2^12 fits 8 * 4096 = 32768); a growth interval of 3 then grows the scale back into
# overflow every few steps: the sequence mixes skips, backoffs and growths.
GRADS = [np.array([1.0, -2.0, 8.0 if step % 7 else 0.5, 0.25]) for step in range(40)]


@pytest.mark.parametrize("ds", [DynamicScale(interval=3), DynamicScale(init=2.0 ** 20, growth=4.0, backoff=0.25,
                                                                        interval=2)])
def test_scale_and_skips_match_torch_grad_scaler(ds):
    scales, skipped, adam_steps = torch_run(GRADS, ds)
    # ours: found_inf is the fp16 overflow of the scaled gradient, the same test torch's unscale_ makes
    found_inf, state, ours = [], initial_scaler(dataclasses.replace(PRESETS["torch-amp-fp16"], dynamic_scale=ds)), []
    for g in GRADS:
        with np.errstate(over="ignore"):  # the overflow is the point
            scaled16 = (g * np.float64(state.scale)).astype(np.float16)
        inf = not np.all(np.isfinite(scaled16.astype(np.float32) * (np.float32(1) / state.scale)))
        found_inf.append(inf)
        state = scaler_update(np, state, np.bool_(inf), ds)
        ours.append(float(state.scale))
    assert ours == scales
    assert [i for i, inf in enumerate(found_inf, start=1) if inf] == skipped
    assert adam_steps == len(GRADS) - len(skipped)  # a skipped step does not advance Adam's step count
    assert skipped and len(set(scales)) > 2, "the sequence must exercise skips, backoffs and growths"


def test_growth_that_would_overflow_float32_keeps_the_scale():
    # torch: a grown scale that is not finite is not taken, and the tracker restarts
    ds = DynamicScale(init=2.0 ** 126, growth=4.0, interval=1)
    assert our_scales([False, False, True, False], ds) == [2.0 ** 126, 2.0 ** 126, 2.0 ** 125, 2.0 ** 127]


@pytest.mark.parametrize("text, message", [
    ("p=fp16,m=fp32,ls=dynamic(init=3)", "init=3.0 must be a power of two"),
    ("p=fp16,m=fp32,ls=dynamic(growth=0.5)", "growth=0.5 must be above 1"),
    ("p=fp16,m=fp32,ls=dynamic(backoff=2)", "backoff=2.0 must be below 1"),
    ("p=fp16,m=fp32,ls=dynamic(interval=0)", "interval=0 must be a positive integer"),
    ("p=fp16,m=fp32,ls=dynamic(skip=maybe)", "skip='maybe'"),
    ("p=fp16,m=fp32,ls=dynamic(speed=2)", "unknown dynamic loss scale setting 'speed'"),
    ("p=fp16,m=fp32,ls=dynamic,ls=8", "given twice"),
])
def test_bad_dynamic_settings_are_one_line_errors(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(text)


def test_every_setting_round_trips_through_the_grammar():
    text = "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=dynamic(init=1024,growth=4,backoff=0.25,interval=7,skip=no)"
    pol = parse_policy(text)
    assert pol.dynamic_scale == DynamicScale(1024.0, 4.0, 0.25, 7, False) and str(pol) == text
    assert str(PRESETS["torch-amp-fp16"]).endswith("ls=dynamic")


# Full batch, fp32 math: a power-of-two scale is exact in fp32's normal range, so an applied step of the scaled run
# is bit for bit the unscaled run's step. Starting at 2^127 the scaled gradient overflows fp32 until the scale has
# backed off enough; the run then must equal the unscaled run of (steps - skipped) steps: the optimizer's step
# count (Adam's bias corrections) counts applied updates only, as torch's does.
LINREG = crafted("linreg", [[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], [2.0, -1.0, 0.75], [0.1, -0.2, 0.05])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opt", ["adam", "sgd-momentum"])
def test_skipped_steps_do_not_advance_the_optimizer(backend, opt):
    if backend != "jax":
        check_skips(backend, opt)
        return
    # XLA contracts a multiply and an add into one FMA wherever it finds them (docs/jax.md); the unscale multiply of
    # a loss-scaled program changes which products it fuses, so with FMA even a static ls=1024 fp32 run differs from
    # the unscaled one in the last bit (measured). Without FMA instructions (--xla_cpu_max_isa=AVX) the scaled and
    # unscaled JAX programs are bit-identical, as in numpy and numba: the check runs in a process with that flag.
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX")
    code = f"from test_loss_scaling import check_skips; check_skips('jax', {opt!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def check_skips(backend: str, opt: str) -> None:
    optimizer = (make_optimizer("adam", lr=0.01) if opt == "adam" else
                 make_optimizer("sgd", lr=0.01, momentum=0.9))
    scaled = parse_policy("p=fp32,ls=dynamic(init=170141183460469231731687303715884105728,interval=100000)")
    steps = 30
    spec = RunSpec(problem="linreg", optimizer=optimizer, policy=scaled, backend=backend, steps=steps,
                   batch_size=None, record_every=1)
    traj = get_backend(backend).train(spec, LINREG)
    skipped = traj.skipped_steps.tolist()
    # the gradient is O(1): 2^127 * g overflows until the scale is about 2^124 or less
    assert 1 <= len(skipped) <= 8 and skipped == list(range(1, len(skipped) + 1)), skipped
    assert traj.loss_scale[0] == 2.0 ** 127 and traj.loss_scale[-1] == 2.0 ** (127 - len(skipped))
    for k in skipped:  # a skipped step leaves the params as they were
        assert same_bits(traj.params[k], traj.params[k - 1])
    plain = dataclasses.replace(spec, policy=PRESETS["fp32"], steps=steps - len(skipped))
    assert same_bits(get_backend(backend).train(plain, LINREG).final_params, traj.final_params)


AVAILABLE = [b for b in ("numpy", "numba", "jax") if backend_availability(b, "cpu").available]
PROBLEM_CASES = ([pytest.param(p, d, b, id=f"{p}:{d}-{b}") for p, d in DEFAULT_CASES for b in AVAILABLE] +
                 [pytest.param(p, "synthetic", "numpy", id=f"{p}:synthetic-numpy")
                  for p in ("linreg", "logreg", "softmax", "mlp")])


@pytest.mark.parametrize("problem, data, backend", PROBLEM_CASES)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_fp16_with_dynamic_scaling_trains_without_divergence(opt, problem, data, backend):
    # the default matrix's cases and optimizers in every backend, and the four problems on synthetic data
    spec = RunSpec(problem=problem, data=data, optimizer=make_optimizer(opt), policy=PRESETS["torch-amp-fp16"],
                   backend=backend, steps=200)
    traj = get_backend(backend).train(spec, dataset_for(spec))
    assert traj.diverged_at is None and np.isfinite(traj.final_params.astype(np.float64)).all()
    assert len(traj.loss_scale) == len(traj.record_steps) and math.log2(traj.loss_scale[-1]).is_integer()
