"""GPU check for the JAX backend: the default matrix on an NVIDIA GPU, with run-to-run bitwise determinism.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR [--deterministic-ops] [--steps N]

Runs precision's default matrix (precision.matrix.default_specs, backends numpy + jax) with every JAX spec on
the GPU, each GPU spec three times: twice with the same compiled program (run-to-run determinism) and once
recompiled (does compilation, e.g. autotuning, pick other kernels?), plus once on the CPU for comparison. Writes

    DIR/report.json      the standard precision report of the matrix (numpy on CPU, jax on GPU)
    DIR/gpu_check.json   device, flags, per-spec fingerprints of every repeat, GPU-vs-CPU differences, timings

and prints the table and a determinism summary. Without a GPU it prints one line and exits 0. Needs only numpy,
ml_dtypes and jax (with CUDA); the two real data sets of the default matrix need scikit-learn, and without it the
same problems run on synthetic data (the report says so). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and gpu_check.json")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the matrix's)")
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                        help="where the jax specs run; cpu is a dry run of this script on a machine without a GPU")
    parser.add_argument("--deterministic-ops", action="store_true",
                        help="set XLA_FLAGS=--xla_gpu_deterministic_ops=true (before jax is imported)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.deterministic_ops:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
    try:
        import jax  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: jax is not installed ({exc}); nothing to check")
        return 0
    from precision.backends import backend_availability
    avail = backend_availability("jax", args.device)
    if not avail.available:
        print(f"gpu_check: no {args.device} for the jax backend here ({avail.reason.splitlines()[0]}); "
              "nothing to check")
        return 0
    return _check(args)


def _matrix(steps: int | None, device: str):
    """The default matrix (numpy + jax), jax moved to ``device``; synthetic data when scikit-learn is missing."""
    from precision.matrix import default_specs
    note = ""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        note = "scikit-learn is not installed: the default problems ran on synthetic data"
    specs = []
    for spec in default_specs(backends=("numpy", "jax")):
        if note:
            spec = dataclasses.replace(spec, data="synthetic")
        if steps:
            spec = dataclasses.replace(spec, steps=steps)
        if spec.backend == "jax":
            spec = dataclasses.replace(spec, device=device)
        specs.append(spec)
    return specs, note


def _check(args) -> int:
    import jax
    import numpy as np

    from precision.backends.jax_backend import loop as jax_loop
    from precision.drift import fingerprint, rel_l2
    from precision.report import Report, environment, finite_or_none, now_utc, write_json_atomic
    from precision.runner import _Cache, run_one, train
    from precision.table import format_table

    specs, note = _matrix(args.steps, args.device)
    cache = _Cache()
    t0 = time.perf_counter()
    results = [run_one(spec, cache) for spec in specs]
    matrix_s = time.perf_counter() - t0

    checks = []
    for spec, first in zip(specs, results):
        if spec.backend != "jax":
            continue
        dataset = cache.dataset(spec)
        same_program = train(spec, dataset)  # the compiled program is cached: same executable as `first`
        jax_loop.clear_compile_cache()
        recompiled = train(spec, dataset)
        on_cpu = train(dataclasses.replace(spec, device="cpu"), dataset)
        prints = [first.fingerprint, fingerprint(same_program.final_params), fingerprint(recompiled.final_params)]
        checks.append({
            "id": spec.id, "status": first.status, "fingerprints": prints,
            "deterministic_same_program": prints[0] == prints[1],
            "deterministic_recompiled": prints[0] == prints[2],
            "equal_to_cpu": prints[0] == fingerprint(on_cpu.final_params),
            "rel_l2_gpu_vs_cpu": finite_or_none(rel_l2(same_program.final_params.astype(np.float64),
                                                on_cpu.final_params.astype(np.float64))),
            "time_per_step_s": first.time_per_step_s, "compile_s": first.compile_s,
            "cpu_time_per_step_s": on_cpu.time_per_step_s,
        })

    report = Report(results=tuple(results), environment=environment(), created=now_utc())
    args.out.mkdir(parents=True, exist_ok=True)
    report.save(args.out / "report.json")
    device = jax.devices(args.device)[0]
    summary = {
        "device": getattr(device, "device_kind", str(device)), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "note": note, "matrix_wall_s": matrix_s,
        "jax_specs": len(checks),
        "deterministic_same_program": sum(c["deterministic_same_program"] for c in checks),
        "deterministic_recompiled": sum(c["deterministic_recompiled"] for c in checks),
        "equal_to_cpu": sum(c["equal_to_cpu"] for c in checks),
        "checks": checks,
    }
    write_json_atomic(args.out / "gpu_check.json", summary)

    print(format_table(report))
    if note:
        print(f"note: {note}")
    print(f"device: {summary['device']}  jax {jax.__version__}  XLA_FLAGS={summary['xla_flags'] or '(none)'}")
    print(f"determinism: {summary['deterministic_same_program']}/{len(checks)} jax-{args.device} specs bitwise "
          f"identical run to run (same program), {summary['deterministic_recompiled']}/{len(checks)} after "
          f"recompiling; {summary['equal_to_cpu']}/{len(checks)} bitwise equal to the jax-cpu run")
    for c in checks:
        if not (c["deterministic_same_program"] and c["deterministic_recompiled"]):
            print(f"  not deterministic: {c['id']}")
    print(f"matrix wall time {matrix_s:.1f} s; wrote {args.out / 'report.json'} and {args.out / 'gpu_check.json'}")
    failed = [c for c in checks if not c["deterministic_same_program"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
