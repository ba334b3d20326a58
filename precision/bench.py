"""``precision bench``: the headline performance ratios of one run, and the CPU features that explain them.

Every ratio is of two figures measured in the same process, back to back (a shared machine moves single figures
by up to 2x between runs; the ratios of one run move much less). Times are the fastest of ``repeats``.

* **kernels** (one in-place Adam step over N parameters, :func:`precision.kernels.inplace_case`; inputs restored
  outside the timed region): per backend, ``vs_reference`` = reference time / backend time (the share of the
  in-place memory reference's throughput reached: 1.0 = as fast as moving Adam's 7 arrays with one add each) and
  ``vs_best_peer`` = best peer time / backend time (> 1: faster than the fastest installed torch / optax Adam of
  that storage);
* **16-bit**: per backend, time of the fp16, bf16 (pure) and torch-bf16 (bf16 storage, fp32 math) step / time of
  the fp32 step, at the largest N (numpy's 16-bit steps at the smallest N only: its float16 / bfloat16 ufuncs take
  seconds at 1e7);
* **loops**: a whole training step (fp32 Adam, batch 128, CASE_STEPS steps per call) per backend and per loop peer
  (torch autograd + fused Adam, optax + jit), and backend / best peer (< 1: faster than the peer);
* **cpu**: model name, the SIMD features (AVX-512 with its FP16 / BF16 subsets, AVX2, F16C, FMA) and cache sizes.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

from .kernels import INPLACE_BACKENDS, INPLACE_FORMATS, inplace_case, inplace_skip_reason, time_inplace
from .peers import KERNEL_PEERS, LOOP_PEERS, loop_peer, loop_peer_skip_reason, peer_available, time_loop

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "cpu_info", "collect", "format_report", "OWN_BACKENDS"]

DEFAULT_SIZES = (10**6, 10**7)
QUICK_SIZES = (10**5,)
OWN_BACKENDS = ("numpy", "numba", "jax")
LOOP_PROBLEMS = ("logreg:breast_cancer", "mlp:digits")
NUMPY_16BIT_MAX_N = 10**6
_FLAGS = {"avx512f": "AVX512F", "avx512_fp16": "AVX512_FP16", "avx512_bf16": "AVX512_BF16", "avx2": "AVX2",
          "f16c": "F16C", "fma": "FMA"}


def cpu_info() -> dict:
    """Model name, SIMD features that set these figures, cache sizes (from /proc/cpuinfo and /sys; numpy's
    feature table where /proc is missing)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if flags:
        features = {name: flag in flags for flag, name in _FLAGS.items()}
    else:
        from .machine import cpu_features
        numpy_table = cpu_features()
        features = {"AVX512F": numpy_table["AVX512F"], "AVX512_FP16": numpy_table["AVX512FP16"],
                    "AVX512_BF16": numpy_table["AVX512BF16"], "AVX2": numpy_table["AVX2"],
                    "F16C": numpy_table["F16C"], "FMA": numpy_table["FMA3"]}
    caches = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return {"model": model, "features": features, "caches": caches}


def _kernel_grid(sizes):
    largest, smallest = max(sizes), min(sizes)
    for n in sizes:
        for backend in INPLACE_BACKENDS + KERNEL_PEERS:
            for storage in INPLACE_FORMATS:
                if storage != "fp32" and n != largest and not (backend == "numpy" and n == smallest):
                    continue  # 16-bit figures: at the largest N (numpy: at the smallest)
                if backend == "numpy" and storage != "fp32" and n > NUMPY_16BIT_MAX_N and n != smallest:
                    continue
                yield backend, storage, n


def collect(sizes=DEFAULT_SIZES, repeats: int = 5, loops: bool = True, loop_repeats: int = 3,
            progress: Callable[[str], None] | None = None) -> dict:
    """Measure everything and return the report (JSON-ready): ``cpu``, ``peers`` (availability), ``kernels``
    (seconds per case), ``ratios`` and ``loops``."""
    say = progress or (lambda text: None)
    sizes = tuple(sorted(int(n) for n in sizes))
    report = {"cpu": cpu_info(), "sizes": list(sizes), "repeats": repeats,
              "peers": {module: peer_available(module) or "available" for module in ("torch", "optax")},
              "kernels": [], "skipped": []}
    times = {}
    for backend, storage, n in _kernel_grid(sizes):
        reason = inplace_skip_reason(backend, storage)
        if reason is not None:
            report["skipped"].append({"backend": backend, "storage": storage, "n": n, "reason": reason})
            continue
        say(f"kernel {backend} {storage} n={n:.0e}")
        case = inplace_case(backend, storage, n)
        seconds = time_inplace(case, repeats)
        del case
        times[backend, storage, n] = seconds
        report["kernels"].append({"backend": backend, "storage": storage, "n": n, "seconds": seconds})
    report["ratios"] = _ratios(times, sizes)
    report["loops"] = _loops(loop_repeats, say) if loops else None
    return report


def _best_peer(times, storage, n):
    found = [(t, b) for (b, s, size), t in times.items()
             if b in KERNEL_PEERS and "adamw" not in b and s == storage and size == n]  # Adam against Adam
    return min(found) if found else (None, None)


def _ratios(times, sizes) -> dict:
    out = {"adam": [], "sixteen_bit": []}
    for n in sizes:
        for storage in ("fp32", "torch-bf16"):
            peer_t, peer = _best_peer(times, storage, n)
            ref_s = times.get(("memory-reference", "bf16" if storage == "torch-bf16" else storage, n))
            for backend in OWN_BACKENDS:
                t = times.get((backend, storage, n))
                if t is None or (storage != "fp32" and n != max(sizes)):
                    continue
                out["adam"].append({
                    "backend": backend, "storage": storage, "n": n, "seconds": t,
                    "vs_reference": ref_s / t if ref_s else None,
                    "best_peer": peer, "vs_best_peer": peer_t / t if peer_t else None})
    for backend in OWN_BACKENDS + ("memory-reference",) + KERNEL_PEERS:
        for n in sizes:
            base = times.get((backend, "fp32", n))
            row = {s: times[backend, s, n] / base for s in INPLACE_FORMATS[1:] if base and (backend, s, n) in times}
            if row:
                out["sixteen_bit"].append({"backend": backend, "n": n, **row})
    return out


def _loops(repeats, say) -> dict:
    from .benchcases import frozen_dataset, get_case, skip_reason
    from .runner import train

    rows = []
    for problem in LOOP_PROBLEMS:
        per, chunk = {}, {}
        for backend in OWN_BACKENDS:
            case = get_case(problem, "adam", "fp32", backend)
            reason = skip_reason(case)
            if reason is not None:
                rows.append({"problem": problem, "who": backend, "seconds_per_step": None, "absent": reason})
                continue
            say(f"loop {problem} {backend}")
            spec = case.spec()
            dataset = frozen_dataset(spec)
            try:
                train(spec, dataset)  # compile / load the cache, warm up
                per[backend] = time_loop(lambda: train(spec, dataset), spec.steps, repeats)
                chunk[backend] = train(spec, dataset).time_per_step_s
            except Exception as exc:  # a broken backend loses its own row, not the report
                rows.append({"problem": problem, "who": backend, "seconds_per_step": None,
                             "absent": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        for peer in LOOP_PEERS:
            reason = loop_peer_skip_reason(peer)
            if reason is not None:
                rows.append({"problem": problem, "who": peer, "seconds_per_step": None, "absent": reason})
                continue
            say(f"loop {problem} {peer}")
            run, steps = loop_peer(peer, problem)
            per[peer] = time_loop(run, steps, repeats)
        peers = {k: v for k, v in per.items() if k in LOOP_PEERS}
        best = min(peers, key=peers.get) if peers else None
        for who, t in per.items():
            rows.append({"problem": problem, "who": who, "seconds_per_step": t,
                         "chunk_seconds_per_step": chunk.get(who),
                         "vs_best_peer": (t / peers[best]) if best and who not in LOOP_PEERS else None,
                         "best_peer": best if who not in LOOP_PEERS else None})
    return {"rows": rows}


def _fmt_t(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _fmt_r(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(report: dict) -> str:
    cpu = report["cpu"]
    lines = [f"cpu: {cpu['model']}",
             "features: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["features"].items()),
             "caches: " + (" ".join(f"{k}={v}" for k, v in cpu["caches"].items()) or "unknown"),
             "peers: " + "; ".join(f"{k}: {v}" for k, v in report["peers"].items()),
             f"repeats: {report['repeats']} (fastest shown); every ratio from this one run", "",
             "in-place Adam step (read p, g, m, v; write p, m, v)",
             "  vs_ref: in-place memory reference time / step time (1.00 = at the memory floor)",
             "  vs_peer: best peer time / step time (> 1: faster than the fastest installed torch / optax Adam)",
             f"  {'backend':<8} {'storage':<11} {'n':>6} {'time':>10} {'vs_ref':>7} {'vs_peer':>8}  best peer"]
    for row in report["ratios"]["adam"]:
        lines.append(f"  {row['backend']:<8} {row['storage']:<11} {row['n']:>6.0e} {_fmt_t(row['seconds']):>10} "
                     f"{_fmt_r(row['vs_reference']):>7} {_fmt_r(row['vs_best_peer']):>8}  {row['best_peer'] or '-'}")
    lines += ["", "all kernel times (fastest of the repeats)",
              f"  {'backend':<20} {'storage':<11} {'n':>6} {'time':>10}"]
    for row in report["kernels"]:
        lines.append(f"  {row['backend']:<20} {row['storage']:<11} {row['n']:>6.0e} {_fmt_t(row['seconds']):>10}")
    lines += ["", "16-bit step / fp32 step (same backend, same n; torch-bf16 = bf16 storage, fp32 math)",
              f"  {'backend':<20} {'n':>6} " + " ".join(f"{s:>10}" for s in INPLACE_FORMATS[1:])]
    for row in report["ratios"]["sixteen_bit"]:
        lines.append(f"  {row['backend']:<20} {row['n']:>6.0e} " +
                     " ".join(f"{_fmt_r(row.get(s)):>10}" for s in INPLACE_FORMATS[1:]))
    if report["loops"] is not None:
        lines += ["", "whole training step, fp32 Adam, batch 128 (per step of a 200-step call; vs_peer = time / best "
                  "peer's: < 1 is faster;", "  chunk: precision's own median chunk time per step, the us/step of "
                  "`precision run`, without the call's fixed costs)",
                  f"  {'problem':<22} {'who':<8} {'per step':>10} {'vs_peer':>8} {'chunk':>10}"]
        for row in report["loops"]["rows"]:
            if row["seconds_per_step"] is None:
                lines.append(f"  {row['problem']:<22} {row['who']:<8} absent: {row['absent']}")
                continue
            lines.append(f"  {row['problem']:<22} {row['who']:<8} {_fmt_t(row['seconds_per_step']):>10} "
                         f"{_fmt_r(row.get('vs_best_peer')):>8} {_fmt_t(row.get('chunk_seconds_per_step')):>10}" +
                         (f"  (best peer: {row['best_peer']})" if row.get("best_peer") else ""))
    if report["skipped"]:
        absent = sorted({f"{r['backend']}/{r['storage']}: {r['reason']}" for r in report["skipped"]})
        lines += ["", "not measured:"] + [f"  {a}" for a in absent]
    return "\n".join(lines)


def save_json(report: dict, path: str | Path) -> None:
    from ._atomic import write_atomic
    text = json.dumps(report, indent=1, sort_keys=True) + "\n"

    def write(temp: str) -> None:
        Path(temp).write_text(text)
    write_atomic(path, write)


def run_bench(sizes, repeats, loops, loop_repeats, progress=None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    report = collect(sizes, repeats, loops, loop_repeats, progress)
    report["wall_s"] = time.perf_counter() - t0
    return report, report["wall_s"]
