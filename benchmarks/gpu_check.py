"""GPU check for the JAX backend and the numba backend's CUDA kernels: the default matrix on an NVIDIA GPU, with
run-to-run bitwise determinism and CPU-vs-GPU drift.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR [--deterministic-ops] [--steps N]

Runs precision's default matrix (precision.matrix.default_specs, backends numpy + jax + numba) with every JAX spec
and every numba spec on the GPU. JAX: each GPU spec three times, twice with the same compiled program (run-to-run
determinism) and once recompiled (does compilation, e.g. autotuning, pick other kernels?), plus once on the CPU for
comparison. numba (numba-cuda kernels, docs/numba_cuda.md): each GPU spec twice (determinism: fingerprints equal)
and once on the CPU backend (meant to be bit-identical). Then a kernel bandwidth figure (an in-place fp32 Adam
update on N = 1e8 elements, timed with CUDA events, compile excluded, as a fraction of the peak computed from the
GPU's memory clock and bus width) and an audit of the numba kernels' PTX for FMA contraction and flush-to-zero.
Writes

    DIR/report.json      the standard precision report of the matrix (numpy on CPU, jax and numba on GPU)
    DIR/gpu_check.json   device, flags, per-spec fingerprints of every repeat, GPU-vs-CPU differences (also per
                         backend and policy), bandwidth, PTX audit, timings

and prints the table and a summary. Without a GPU it prints one line and exits 0 (the CUDA simulator,
NUMBA_ENABLE_CUDASIM=1, does not count as a GPU). Needs only numpy, ml_dtypes, and jax (with CUDA) and/or numba with
numba-cuda; the two real data sets of the default matrix need scikit-learn, and without it the same problems run on
synthetic data (the report says so). Nothing is downloaded.
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


def _jax_available(device: str) -> tuple[bool, str]:
    try:
        import jax  # noqa: F401
    except ImportError as exc:
        return False, f"jax is not installed ({exc})"
    from precision.backends import backend_availability
    avail = backend_availability("jax", device)
    return avail.available, (avail.reason.splitlines()[0] if avail.reason else "")


def _numba_gpu_available(device: str) -> tuple[bool, str]:
    """numba-cuda on a real GPU (never the simulator: it is not a GPU, and it would take hours here)."""
    if device != "gpu":
        return False, "the numba GPU check needs --device gpu"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1 selects numba's CUDA simulator, which is not a GPU"
    try:
        from precision.backends import backend_availability
        avail = backend_availability("numba", "gpu")
    except Exception as exc:  # numba itself missing or broken: one line
        return False, f"numba: {type(exc).__name__}: {exc}"
    return avail.available, (avail.reason.splitlines()[0] if avail.reason else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.deterministic_ops:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
    jax_ok, jax_why = _jax_available(args.device)
    numba_ok, numba_why = _numba_gpu_available(args.device)
    if not (jax_ok or numba_ok):
        print(f"gpu_check: no {args.device} here for the jax backend ({jax_why}) nor for numba-cuda ({numba_why}); "
              "nothing to check")
        return 0
    return _check(args, jax_ok, numba_ok)


def _matrix(steps: int | None, device: str, backends: tuple[str, ...]):
    """The default matrix (numpy + the given GPU backends), jax moved to ``device`` and numba to the GPU; synthetic
    data when scikit-learn is missing."""
    from precision.matrix import default_specs
    note = ""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        note = "scikit-learn is not installed: the default problems ran on synthetic data"
    specs = []
    for spec in default_specs(backends=("numpy",) + backends):
        if note:
            spec = dataclasses.replace(spec, data="synthetic")
        if steps:
            spec = dataclasses.replace(spec, steps=steps)
        if spec.backend == "jax":
            spec = dataclasses.replace(spec, device=device)
        if spec.backend == "numba":
            spec = dataclasses.replace(spec, device="gpu")
        specs.append(spec)
    return specs, note


def _drift_by_policy(checks: list[dict]) -> dict:
    """{backend: {policy: specs, bit-identical to the CPU, max rel_l2 GPU vs CPU}} over the checks."""
    out: dict = {}
    for c in checks:
        row = out.setdefault(c["backend"], {}).setdefault(c["policy"], {"specs": 0, "equal_to_cpu": 0,
                                                                          "max_rel_l2": 0.0})
        row["specs"] += 1
        row["equal_to_cpu"] += int(c["equal_to_cpu"])
        drift = c["rel_l2_gpu_vs_cpu"]
        row["max_rel_l2"] = None if (drift is None or row["max_rel_l2"] is None) else max(row["max_rel_l2"], drift)
    return out


def _numba_extras() -> dict:
    """The Adam bandwidth figure and the PTX audit (precision.backends.numba_cuda.bandwidth / .ptx)."""
    from numba import cuda

    from precision.backends.numba_cuda.bandwidth import measure_adam_bandwidth
    from precision.backends.numba_cuda.ptx import LIBDEVICE_FMA_KERNELS, audit_ptx
    extras = {}
    try:
        extras["bandwidth"] = measure_adam_bandwidth()
    except Exception as exc:  # e.g. too little memory: keep the rest of the check
        extras["bandwidth"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        cc = cuda.get_current_device().compute_capability
        audit = audit_ptx(tuple(cc))
        extras["ptx_audit"] = audit
        extras["ptx_contracted"] = sorted(k for k, v in audit.items()
                                          if (v["fma"] or v["ftz"]) and k not in LIBDEVICE_FMA_KERNELS)
    except Exception as exc:
        extras["ptx_audit"] = {"error": f"{type(exc).__name__}: {exc}"}
        extras["ptx_contracted"] = None
    return extras


def _check(args, jax_ok: bool, numba_ok: bool) -> int:
    import numpy as np

    from precision.drift import fingerprint, rel_l2
    from precision.report import Report, environment, finite_or_none, now_utc, write_json_atomic
    from precision.runner import _Cache, run_one, train
    from precision.table import format_table

    backends = (("jax",) if jax_ok else ()) + (("numba",) if numba_ok else ())
    specs, note = _matrix(args.steps, args.device, backends)
    cache = _Cache()
    t0 = time.perf_counter()
    results = [run_one(spec, cache) for spec in specs]
    matrix_s = time.perf_counter() - t0

    def compare(spec, first, second, on_cpu) -> dict:
        prints = [first.fingerprint, fingerprint(second.final_params)]
        return {"id": spec.id, "backend": spec.backend, "policy": spec.policy.name, "status": first.status,
                "fingerprints": prints, "deterministic_same_program": prints[0] == prints[1],
                "equal_to_cpu": prints[0] == fingerprint(on_cpu.final_params),
                "rel_l2_gpu_vs_cpu": finite_or_none(rel_l2(second.final_params.astype(np.float64),
                                                    on_cpu.final_params.astype(np.float64))),
                "time_per_step_s": first.time_per_step_s, "compile_s": first.compile_s,
                "cpu_time_per_step_s": on_cpu.time_per_step_s}

    checks, numba_checks = [], []
    for spec, first in zip(specs, results):
        if spec.backend == "numpy" or first.status == "error":
            continue
        dataset = cache.dataset(spec)
        second = train(spec, dataset)  # jax: the compiled program is cached, the same executable as `first`
        on_cpu = train(dataclasses.replace(spec, device="cpu"), dataset)
        check = compare(spec, first, second, on_cpu)
        if spec.backend == "jax":
            from precision.backends.jax_backend import loop as jax_loop
            jax_loop.clear_compile_cache()
            recompiled = train(spec, dataset)
            check["fingerprints"].append(fingerprint(recompiled.final_params))
            check["deterministic_recompiled"] = check["fingerprints"][0] == check["fingerprints"][2]
            checks.append(check)
        else:
            numba_checks.append(check)
    errors = [r.spec.id for r in results if r.status == "error"]

    report = Report(results=tuple(results), environment=environment(), created=now_utc())
    args.out.mkdir(parents=True, exist_ok=True)
    report.save(args.out / "report.json")
    summary = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "note": note, "matrix_wall_s": matrix_s,
               "errors": errors, "drift_by_policy": _drift_by_policy(checks + numba_checks)}
    if jax_ok:
        import jax
        device = jax.devices(args.device)[0]
        summary.update({
            "device": getattr(device, "device_kind", str(device)), "jax": jax.__version__, "jax_specs": len(checks),
            "deterministic_same_program": sum(c["deterministic_same_program"] for c in checks),
            "deterministic_recompiled": sum(c["deterministic_recompiled"] for c in checks),
            "equal_to_cpu": sum(c["equal_to_cpu"] for c in checks), "checks": checks})
    if numba_ok:
        from numba import cuda
        name = getattr(cuda.get_current_device(), "name", "CUDA device")
        summary.setdefault("device", name.decode() if isinstance(name, bytes) else str(name))
        summary.update({
            "numba_specs": len(numba_checks),
            "numba_deterministic": sum(c["deterministic_same_program"] for c in numba_checks),
            "numba_equal_to_cpu": sum(c["equal_to_cpu"] for c in numba_checks), "numba_checks": numba_checks})
        summary.update(_numba_extras())
    write_json_atomic(args.out / "gpu_check.json", summary)

    print(format_table(report))
    if note:
        print(f"note: {note}")
    print(f"device: {summary.get('device')}  XLA_FLAGS={summary['xla_flags'] or '(none)'}")
    if jax_ok:
        print(f"jax {summary['jax']} determinism: {summary['deterministic_same_program']}/{len(checks)} "
              f"jax-{args.device} specs bitwise identical run to run (same program), "
              f"{summary['deterministic_recompiled']}/{len(checks)} after recompiling; "
              f"{summary['equal_to_cpu']}/{len(checks)} bitwise equal to the jax-cpu run")
    if numba_ok:
        print(f"numba-cuda determinism: {summary['numba_deterministic']}/{len(numba_checks)} numba-gpu specs bitwise "
              f"identical run to run; {summary['numba_equal_to_cpu']}/{len(numba_checks)} bitwise equal to the numba "
              "CPU backend")
        bw = summary.get("bandwidth", {})
        if "gb_per_s" in bw:
            frac = bw["fraction_of_peak"]
            print(f"fp32 Adam in place, N = {bw['n']:.0e}: {bw['median_ms']:.3f} ms, {bw['gb_per_s']:.0f} GB/s"
                  + (f" = {frac:.2f} of the {bw['peak_gb_per_s']:.0f} GB/s peak" if frac else ""))
        else:
            print(f"bandwidth: {bw.get('error')}")
        print(f"PTX audit: contracted or flushing kernels (expected none): {summary.get('ptx_contracted')}")
    for backend, rows in summary["drift_by_policy"].items():
        for policy, row in rows.items():
            print(f"  drift {backend} {policy}: {row['equal_to_cpu']}/{row['specs']} equal to CPU, max rel_l2 "
                  f"{row['max_rel_l2']}")
    for c in checks + numba_checks:
        if not (c["deterministic_same_program"] and c.get("deterministic_recompiled", True)):
            print(f"  not deterministic: {c['id']}")
    for spec_id in errors:
        print(f"  error: {spec_id}")
    print(f"matrix wall time {matrix_s:.1f} s; wrote {args.out / 'report.json'} and {args.out / 'gpu_check.json'}")
    failed = [c for c in checks + numba_checks if not c["deterministic_same_program"]]
    return 1 if (failed or (numba_ok and summary.get("ptx_contracted"))) else 0


if __name__ == "__main__":
    sys.exit(main())
