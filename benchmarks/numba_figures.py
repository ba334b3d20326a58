"""The numba backend's headline figures (docs/numba.md), each measured in one run. Not an asv benchmark (no
``time_`` / ``track_`` names; asv imports it during discovery and finds nothing to run).

    NUMBA_NUM_THREADS=1 python benchmarks/numba_figures.py kernels      # update step ratios at N = 1e7
    NUMBA_NUM_THREADS=1 python benchmarks/numba_figures.py bf16-hardware  # bf16 step with vcvtneps2bf16 (inexact)
    NUMBA_NUM_THREADS=1 python benchmarks/numba_figures.py logreg       # whole-loop logreg, every backend
    NUMBA_NUM_THREADS=1 python benchmarks/numba_figures.py mlp          # whole-loop MLPs, every backend
    NUMBA_NUM_THREADS=1 python benchmarks/numba_figures.py mlp-ratio    # numba / jax per step on mlp, robustly
    NUMBA_NUM_THREADS=1 python benchmarks/numba_figures.py mlp-products  # what order and no-FMA cost
    python benchmarks/numba_figures.py matrix                           # default matrix: numba's cold/warm share
    python benchmarks/numba_figures.py agreement                        # numba vs numpy, final params

Timings are minima over interleaved repeats (kernels) or over interleaved whole runs (logreg), so that another
process on a shared machine inflates them as little as possible. ``kernels`` and ``logreg`` pin the process to one
CPU first (every backend's threads included: JAX's runtime threads would otherwise run on the other cores), so the
figures are single-core figures, comparable between backends and between runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def kernels(n: int, repeats: int) -> None:
    from precision.kernels import update_case

    names = [("memory-reference", "adam", "fp32"), ("memory-reference", "adam", "bf16"), ("numba", "adam", "fp32"),
             ("numba", "adam", "bf16"), ("numba", "adam", "fp16"), ("numpy", "adam", "fp32")]
    cases = {name: update_case(*name, n) for name in names}
    for case in cases.values():
        case.step()  # compile, first-touch the outputs
    best = dict.fromkeys(names, float("inf"))
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            case.step()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{'/'.join(name):28s} {seconds * 1e3:8.2f} ms")
    fp32 = best[("numba", "adam", "fp32")]
    reference = best[("memory-reference", "adam", "fp32")]
    print(f"fp32 Adam throughput / memory reference: {reference / fp32:.2f}")
    print(f"bf16 Adam time / fp32 Adam time:         {best[('numba', 'adam', 'bf16')] / fp32:.2f}")
    print(f"fp16 Adam time / fp32 Adam time:         {best[('numba', 'adam', 'fp16')] / fp32:.2f}")
    print(f"numpy fp32 Adam throughput / reference:  {reference / best[('numpy', 'adam', 'fp32')]:.2f}")


def bf16_hardware(n: int, repeats: int) -> None:
    """Would AVX512_BF16's conversion make the bf16 step fast? The pure-bf16 Adam step with every rounding done by
    LLVM's float -> bfloat truncation (``vcvtneps2bf16`` where the CPU has AVX512_BF16; it flushes subnormals, so
    this kernel is NOT exact and is not part of the backend), against the exact kernel and fp32, in one run."""
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from precision.backends.numba_backend.rounding import static_code, target_has
    from precision.backends.numba_backend.storage import decode16

    if not target_has("avx512bf16"):
        # Without the instruction LLVM lowers fptrunc-to-bfloat to a runtime call (__truncsfbf2) that numba's JIT
        # does not link: calling such a kernel crashes the process. Nothing to measure on this CPU.
        print("bf16 vcvtneps2bf16: not measured: this CPU (or NUMBA_CPU_FEATURES) has no AVX512_BF16")
        return
    from precision.backends.numba_backend.update import COL, row_scalars
    from precision.formats import FORMATS
    from precision.kernels import KERNEL_STEP, update_case
    from precision.optim import make_optimizer, scalar_table

    class BFloat(ir.types._BaseFloatType):
        null, intrinsic_name = "0.0", "bf16"

        def __str__(self):
            return "bfloat"
    BFloat._create_instance()

    @intrinsic
    def round_hw(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.fptrunc(args[0], BFloat()), ir.FloatType())
        return types.float32(types.float32), codegen

    @intrinsic
    def encode_hw(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], BFloat()), ir.IntType(16))
        return types.uint16(types.float32), codegen

    b1, omb1, b2, omb2 = COL["beta1"], COL["one_minus_beta1"], COL["beta2"], COL["one_minus_beta2"]
    sqrt_bc2, eps, step_size = COL["sqrt_bc2"], COL["eps"], COL["step_size"]

    @numba.njit(error_model="numpy")
    def adam_hw(p, g, m, v, p_out, m_out, v_out, row, code):
        # update.adam_element's 13 roundings for plain Adam, each one hardware conversion
        r = row_scalars(row)
        for i in range(p.size):
            gi, mi, vi = decode16(g[i], code), decode16(m[i], code), decode16(v[i], code)
            mi = round_hw(round_hw(r[b1] * mi) + round_hw(r[omb1] * gi))
            vi = round_hw(round_hw(r[b2] * vi) + round_hw(r[omb2] * round_hw(gi * gi)))
            denom = round_hw(round_hw(round_hw(np.sqrt(vi)) / r[sqrt_bc2]) + r[eps])
            w = round_hw(decode16(p[i], code) - round_hw(round_hw(r[step_size] * mi) / denom))
            p_out[i], m_out[i], v_out[i] = encode_hw(w), encode_hw(mi), encode_hw(vi)

    fp32, exact = update_case("numba", "adam", "fp32", n), update_case("numba", "adam", "bf16", n)
    row = scalar_table(make_optimizer("adam"), KERNEL_STEP, FORMATS["bf16"])[KERNEL_STEP - 1].astype(np.float32)
    ins = [a.view(np.uint16) for a in exact.inputs]
    outs = [np.empty_like(ins[0]) for _ in range(3)]
    code = static_code("bf16")

    def hardware():
        adam_hw(*ins, *outs, row, code)
    cases = {"numba/adam/fp32": fp32.step, "numba/adam/bf16 exact": exact.step, "bf16 vcvtneps2bf16": hardware}
    for step in cases.values():
        step()
    same = all(np.array_equal(a.view(np.uint16), b) for a, b in zip(exact.outputs(), outs))
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:24s} {seconds * 1e3:8.2f} ms  {seconds / best['numba/adam/fp32']:.2f} x fp32")
    print(f"hardware rounding equals the exact kernel on these inputs (all normal): {same}")


def _per_step(specs, dataset_of, runs: int) -> dict:
    """Each spec's training time per step (the loop's own figure: compile and setup excluded), the minimum over
    ``runs`` interleaved rounds: one whole run of each backend per round, so that a busy spell of a shared machine
    slows every backend alike."""
    from precision.runner import train

    for spec in specs:
        train(spec, dataset_of(spec))  # compile / warm
    per_step = {spec.backend: float("inf") for spec in specs}
    for _ in range(runs):
        for spec in specs:
            per_step[spec.backend] = min(per_step[spec.backend], train(spec, dataset_of(spec)).time_per_step_s)
    return per_step


def _available_backends() -> list:
    from precision.backends import backend_availability
    return [b for b in ("numpy", "numba", "jax") if backend_availability(b, "cpu").available]


def logreg(runs: int) -> None:
    import precision
    from precision.runner import dataset_for

    specs = precision.build_specs(["logreg"], ["adam"], ["fp32"], backends=_available_backends(), batch_size=None,
                                  steps=1000, record_every=100)
    dataset = dataset_for(specs[0])
    per_step = _per_step(specs, lambda spec: dataset, runs)
    for backend, seconds in per_step.items():
        print(f"{backend:6s} {seconds * 1e6:8.1f} us/step")
    if "numba" in per_step:
        print(f"numpy / numba: {per_step['numpy'] / per_step['numba']:.1f}x; "
              f"numba / best backend: {per_step['numba'] / min(per_step.values()):.2f}")


MLP_CASES = (("mlp", 200), ("mlp-256x256", 40))  # (problem, steps): digits, batch 128, Adam


def mlp(runs: int, policies=("fp32", "bf16-mixed")) -> None:
    """Whole-loop time per step of the default MLP (one hidden layer of 32) and of mlp-256x256 (84,490 parameters)
    on digits, every backend, per policy, each ratio from one run."""
    import precision
    from precision.runner import dataset_for

    for problem, steps in MLP_CASES:
        for policy in policies:
            specs = precision.build_specs([problem], ["adam"], [policy], backends=_available_backends(),
                                          data=["digits"], steps=steps, record_every=steps)
            dataset = dataset_for(specs[0])
            per_step = _per_step(specs, lambda spec: dataset, runs)
            best = min(per_step.values())
            print(f"{problem:12s} {policy:10s} " + "  ".join(
                f"{b} {t * 1e6:7.0f} us ({t / best:.2f}x)" for b, t in per_step.items()))


def mlp_ratio(rounds: int, problem: str = "mlp", policy: str = "fp32", steps=(100, 400)) -> None:
    """numba's steady per-step time on ``problem`` (digits, Adam) over JAX's, robust to a shared machine's slow
    spells: each round runs both backends at ``steps[0]`` and ``steps[1]`` steps back to back, and its ratio is
    that of the two slopes (time per extra step, so JAX's fixed per-run cost drops out). Prints the median and
    quartiles of the per-round ratios, the median ratio of the longer runs' own per-step figures (what a run of
    that length reports), and the slopes from each backend's minima."""
    import statistics

    import precision
    from precision.runner import dataset_for, train

    backends = ("numba", "jax")
    specs = {(b, n): precision.build_specs([problem], ["adam"], [policy], backends=[b], data=["digits"], steps=n,
                                           record_every=n)[0] for b in backends for n in steps}
    data = {key: dataset_for(spec) for key, spec in specs.items()}
    for key, spec in specs.items():
        train(spec, data[key])  # compile / warm
    short, long = steps
    slopes, whole, best = [], [], dict.fromkeys(specs, float("inf"))
    for _ in range(rounds):
        seconds = {key: train(spec, data[key]).time_per_step_s * spec.steps for key, spec in specs.items()}
        best = {key: min(best[key], seconds[key]) for key in specs}
        slope = {b: (seconds[(b, long)] - seconds[(b, short)]) / (long - short) for b in backends}
        slopes.append(slope["numba"] / slope["jax"])
        whole.append(seconds[("numba", long)] / seconds[("jax", long)])
    quartiles = statistics.quantiles(slopes, n=4)
    minima = {b: (best[(b, long)] - best[(b, short)]) / (long - short) for b in backends}
    print(f"{problem} {policy}: numba / jax per extra step, median of {rounds} rounds {statistics.median(slopes):.3f} "
          f"(quartiles {quartiles[0]:.3f} .. {quartiles[2]:.3f}); {long}-step runs' own figure, median ratio "
          f"{statistics.median(whole):.3f}; slopes of the minima: numba {minima['numba'] * 1e6:.1f} us, "
          f"jax {minima['jax'] * 1e6:.1f} us ({minima['numba'] / minima['jax']:.3f})")


def mlp_products(repeats: int) -> None:
    """What the fixed order and the no-FMA rule cost in the MLPs' matrix products (fp32, batch 128, every product of
    one step), thread CPU time of 300 calls, the minimum over ``repeats``: the backend's product (``linalg.matmul``,
    register tiles, ascending k, multiply then add); the same tile loop on operands zero-padded to whole tiles,
    once as the backend computes (``tile``) and once with each multiply-add fused into one FMA (``fused_tile``,
    one rounding: NOT the backend's arithmetic, and free of nothing else), so that their ratio is the price of the
    rule alone; and numpy's BLAS on one thread (its own order, FMA)."""
    import numba
    import numpy as np

    from precision.backends.numba_backend import linalg
    from precision.backends.numba_backend.rounding import static_code
    from precision.backends.numba_backend.tile import ROWS, fused_tile, tile

    @numba.njit(error_model="numpy")
    def tiles(A, B, out, fused):  # A rows a multiple of ROWS, B columns of 16 (float32 tiles)
        n_k = A.shape[1]
        for j in range(0, B.shape[1], 16):
            for i in range(0, A.shape[0], ROWS):
                if fused:
                    fused_tile(A, i * n_k, n_k, 1, B, j, B.shape[1], n_k, out, i * out.shape[1] + j, out.shape[1])
                else:
                    tile(A, i * n_k, n_k, 1, B, j, B.shape[1], n_k, out, i * out.shape[1] + j, out.shape[1])

    code = static_code("fp32")
    shapes = {"mlp": [(128, 64, 32), (128, 32, 10), (32, 128, 10), (128, 10, 32), (64, 128, 32)],
              "mlp-256x256": [(128, 64, 256), (128, 256, 256), (128, 256, 10), (256, 128, 10), (128, 10, 256),
                              (256, 128, 256), (128, 256, 256), (64, 128, 256)]}
    rng = np.random.default_rng(0)

    def seconds(fn, *args):
        fn(*args)
        best = float("inf")
        for _ in range(repeats):
            start = time.thread_time()
            for _ in range(300):
                fn(*args)
            best = min(best, (time.thread_time() - start) / 300)
        return best

    for problem, products in shapes.items():
        total = dict.fromkeys(("ordered", "tiles", "fused", "blas"), 0.0)
        for m, k, n in products:
            A = rng.standard_normal((m, k)).astype(np.float32)
            B = rng.standard_normal((k, n)).astype(np.float32)
            acc, out = linalg.acc_pair(n, False)[0], np.zeros((m, n))
            total["ordered"] += seconds(linalg.matmul, A, B, acc, out, code)
            Ap = np.zeros((-(-m // ROWS) * ROWS, k), np.float32)
            Bp = np.zeros((k, -(-n // 16) * 16), np.float32)
            Ap[:m], Bp[:, :n] = A, B
            padded = np.zeros((Ap.shape[0], Bp.shape[1]))
            total["tiles"] += seconds(tiles, Ap, Bp, padded, False)
            total["fused"] += seconds(tiles, Ap, Bp, padded, True)
            total["blas"] += seconds(np.matmul, A, B)
        macs = sum(m * k * n for m, k, n in products)
        print(f"{problem:12s} " + "  ".join(f"{name} {t * 1e6:7.1f} us ({macs / t / 1e9:4.1f} GMAC/s)"
                                            for name, t in total.items())
              + f"  no-FMA rule costs {total['tiles'] / total['fused']:.2f}x")


_MATRIX = """
import time, precision
from precision.matrix import default_specs
start = time.perf_counter()
report = precision.run(default_specs({backends!r}))
print(time.perf_counter() - start)
"""


def matrix() -> None:
    """Wall time of the default matrix with numpy alone and with numpy + numba, in fresh processes; the numba share
    cold (an empty numba cache folder) and warm (the same folder again)."""
    def timed(backends, env):
        out = subprocess.run([sys.executable, "-c", _MATRIX.format(backends=backends)], env=env, check=True,
                             capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        numpy_only = timed(["numpy"], env)
        cold = timed(["numpy", "numba"], env)
        warm = timed(["numpy", "numba"], env)
    print(f"numpy alone {numpy_only:.1f} s; numpy + numba cold {cold:.1f} s, warm {warm:.1f} s")
    print(f"numba's share: cold {cold - numpy_only:.1f} s, warm {warm - numpy_only:.1f} s")


def agreement(policies=None) -> None:
    """rel_l2(numba, numpy) of the final params per preset (all, or ``policies``): 4 problems x {sgd, adam,
    adamw}, 200 steps, batch 128, synthetic data; how many runs are bit-identical, how many diverge (at the same
    step in both, or it fails)."""
    import dataclasses

    import numpy as np

    from precision.drift import rel_l2
    from precision.matrix import build_specs
    from precision.policy import PRESETS
    from precision.runner import dataset_for, train

    for policy in policies or PRESETS:
        rels, identical, diverged = [], 0, 0
        for problem in ("linreg", "logreg", "softmax", "mlp"):
            for optimizer in ("sgd", "adam", "adamw"):
                (spec,) = build_specs([problem], [optimizer], [policy], backends=["numpy"])
                dataset = dataset_for(spec)
                with np.errstate(all="ignore"):
                    ref = train(spec, dataset)
                    got = train(dataclasses.replace(spec, backend="numba"), dataset)
                if ref.diverged_at is not None or got.diverged_at is not None:
                    assert ref.diverged_at == got.diverged_at, (spec.id, ref.diverged_at, got.diverged_at)
                    diverged += 1
                    continue
                identical += ref.final_params.tobytes() == got.final_params.tobytes()
                rels.append(rel_l2(got.params[-1], ref.params[-1]))
        worst = max(rels) if rels else float("nan")
        u = PRESETS[policy].params.unit_roundoff
        print(f"{policy:14s} trained {len(rels):2d}, diverged in both {diverged:2d}, bit-identical {identical:2d}, "
              f"max rel_l2 {worst:.2e} = {worst / u:.2f} u_params")


_PINNED = ("kernels", "bf16-hardware", "logreg", "mlp", "mlp-ratio", "mlp-products")  # single-core figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["kernels", "bf16-hardware", "logreg", "mlp", "mlp-ratio", "mlp-products",
                                           "matrix", "agreement"])
    parser.add_argument("--n", type=float, default=1e7, help="parameters per update step (kernels)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.figure in _PINNED and hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})  # before numba / JAX start their threads
        print(f"pinned to CPU {cpu}")
    if args.figure == "kernels":
        kernels(int(args.n), args.repeats)
    elif args.figure == "bf16-hardware":
        bf16_hardware(int(args.n), args.repeats)
    elif args.figure == "logreg":
        logreg(max(args.repeats // 4, 1))
    elif args.figure == "mlp":
        mlp(max(args.repeats // 4, 1))
    elif args.figure == "mlp-ratio":
        mlp_ratio(3 * args.repeats)
    elif args.figure == "mlp-products":
        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads OpenBLAS: the BLAS column is one thread
        mlp_products(max(args.repeats // 3, 1))
    elif args.figure == "matrix":
        matrix()
    else:
        agreement()


if __name__ == "__main__":
    main()
