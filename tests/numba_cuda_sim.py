"""Helper of tests/test_numba_cuda.py: trains a grid of specs with ``--backend numba --device gpu`` in numba's CUDA
simulator and saves the trajectories. Run in its own process, because NUMBA_ENABLE_CUDASIM must be set before
numba.cuda is first imported (the test process has imported numba already).

    NUMBA_ENABLE_CUDASIM=1 python tests/numba_cuda_sim.py CASES.json OUT.npz
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from precision.backends import get_backend
from precision.backends.numba_cuda import gpu_availability
from precision.data import make_dataset
from precision.optim import make_optimizer
from precision.policy import get_policy
from precision.spec import RunSpec


def spec_of(case: dict, device: str) -> RunSpec:
    """The RunSpec of one case of the grid (the test builds the CPU spec with the same function)."""
    return RunSpec(problem=case["problem"], optimizer=make_optimizer(case["optimizer"], **case.get("overrides", {})),
                   policy=get_policy(case["policy"]), backend="numba", device=device, data=case["data"],
                   steps=case["steps"], batch_size=case["batch"], record_every=1, seed=case.get("seed", 0))


def tanh_inputs() -> np.ndarray:
    """Inputs on which the GPU's tanh64 must give the CPU's bits: both sides of the branch at log(3)/2 and of the
    clamp at 20, tiny and subnormal values, zeros, infinities and NaN."""
    rng = np.random.default_rng(64)
    spans = [rng.uniform(-lim, lim, 2000) for lim in (1e-6, 0.3, 0.6, 1.0, 3.0, 25.0)]
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324, 1e-310, 0.5493061443340549, 19.0, 20.0, 1e300]
    return np.concatenate(spans + [np.array(specials)])


def main(cases_path: str, out_path: str) -> None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("tests/numba_cuda_sim.py: set NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator) before running it")
    np.seterr(all="ignore")  # overflow to inf and NaN are results here, as on the device
    ok, why = gpu_availability()
    if not ok:
        sys.exit(f"the simulator is not available: {why}")
    backend = get_backend("numba")
    out, t0 = {}, time.perf_counter()
    for i, case in enumerate(json.load(open(cases_path))):
        spec = spec_of(case, "gpu")
        traj = backend.train(spec, make_dataset(spec.problem, spec.data, spec.seed, spec.steps, spec.batch_size))
        out[f"{i}/params"] = traj.params
        out[f"{i}/diverged_at"] = np.array(-1 if traj.diverged_at is None else traj.diverged_at)
        out[f"{i}/final"] = traj.final_params.astype(np.float64)
        if traj.loss_scale is not None:
            out[f"{i}/loss_scale"] = np.asarray(traj.loss_scale, dtype=np.float64)
            out[f"{i}/skipped"] = np.asarray(traj.skipped_steps, dtype=np.int64)
    from precision.backends.numba_cuda.device import tanh64
    out["tanh64"] = np.array([tanh64(float(x)) for x in tanh_inputs()])
    out["seconds"] = np.array(time.perf_counter() - t0)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
