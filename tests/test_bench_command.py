"""``precision bench``: the report's structure at tiny sizes, and peers reported absent (not a crash) when torch or
optax cannot be imported. Speed is never asserted here (benchmarks/, tests/bench/ and docs/performance.md)."""

from __future__ import annotations

import builtins
import json

import pytest

from precision import bench
from precision.cli import COMMANDS, main
from precision.kernels import INPLACE_FORMATS, inplace_skip_reason
from precision.peers import KERNEL_PEERS, loop_peer_skip_reason

TINY = ["--sizes", "10000", "--repeats", "2"]


def test_bench_is_a_command():
    assert "bench" in COMMANDS


def test_report_structure_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--no-loops", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for heading in ("cpu: ", "features: ", "caches: ", "peers: ", "in-place Adam step", "16-bit step / fp32 step",
                    "all kernel times"):
        assert heading in text, text
    assert "whole training step" not in text  # --no-loops
    report = json.loads(out.read_text())
    assert set(report) >= {"cpu", "peers", "kernels", "ratios", "loops", "sizes", "repeats", "wall_s"}
    assert report["loops"] is None and report["sizes"] == [10000] and report["repeats"] == 2
    assert set(report["cpu"]["features"]) == {"AVX512F", "AVX512_FP16", "AVX512_BF16", "AVX2", "F16C", "FMA"}
    measured = {(k["backend"], k["storage"]) for k in report["kernels"]}
    assert all(k["seconds"] > 0 for k in report["kernels"])
    # every case that can run here was measured, every other one is listed with its reason
    skipped = {(s["backend"], s["storage"]) for s in report["skipped"]}
    for backend in bench.INPLACE_BACKENDS + KERNEL_PEERS:
        for storage in INPLACE_FORMATS:
            expected = measured if inplace_skip_reason(backend, storage) is None else skipped
            assert (backend, storage) in expected, (backend, storage)
    rows = {(r["backend"], r["storage"]): r for r in report["ratios"]["adam"]}
    if inplace_skip_reason("numba", "fp32") is None:
        numba = rows["numba", "fp32"]
        assert numba["vs_reference"] > 0 and numba["n"] == 10000
        assert (numba["vs_best_peer"] is None) == (numba["best_peer"] is None)
        sixteen = {r["backend"]: r for r in report["ratios"]["sixteen_bit"]}
        assert set(sixteen["numba"]) >= {"fp16", "bf16", "torch-bf16"}


@pytest.fixture
def no_peers(monkeypatch):
    """torch and optax fail to import (as on an installation without them)."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "optax"):
            raise ImportError(f"No module named {name!r} (test)")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_peers_absent_are_reported_cleanly(no_peers, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "LOOP_PROBLEMS", ("logreg:breast_cancer",))
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--loop-repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torch: torch is not importable" in text and "optax: optax is not importable" in text
    report = json.loads(out.read_text())
    assert not any(k["backend"] in KERNEL_PEERS for k in report["kernels"])
    assert {s["backend"] for s in report["skipped"]} >= set(KERNEL_PEERS)
    assert all(r["best_peer"] is None and r["vs_best_peer"] is None for r in report["ratios"]["adam"])
    loops = {r["who"]: r for r in report["loops"]["rows"]}
    for peer in ("torch", "optax"):
        assert loops[peer]["seconds_per_step"] is None and "not importable" in loops[peer]["absent"]
        assert f"{peer:<8} absent: {peer} is not importable" in text
    assert loops["numpy"]["seconds_per_step"] > 0 and loops["numpy"]["vs_best_peer"] is None


def test_skip_reasons_name_the_missing_peer(no_peers):
    assert "torch is not importable" in inplace_skip_reason("torch-adam-fused", "fp32")
    assert "optax is not importable" in inplace_skip_reason("optax-adam", "fp32")
    assert "torch is not importable" in loop_peer_skip_reason("torch")


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "12345"], "multiple of 10000"),
    (["--sizes", "x"], "comma-separated integers"),
])
def test_bad_sizes_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_inplace_torch_bf16_kernel_keeps_nan_and_inf():
    """The in-place numba kernel rounds fp32 math to bf16 storage without the NaN select (its docstring proves every
    NaN there has a zero low half): NaN inputs, 0/0 and infinities must still come out as NaN / inf, and every
    other element as numpy's reference bit for bit."""
    import numpy as np
    pytest.importorskip("numba")
    from precision.kernels import inplace_case

    n = 10000
    case = inplace_case("numba", "torch-bf16", n)
    p, g, m, v = (np.array(a) for a in case.inputs)
    nan, inf = np.float32("nan"), np.float32("inf")
    for arr, value, at in ((p, nan, 0), (g, nan, 1), (m, nan, 2), (v, nan, 3), (g, inf, 4), (p, -inf, 5)):
        arr[at] = value
    m[6], v[6], g[6] = 0, 0, 0  # 0 / (0 + eps): finite; v = -1: sqrt gives the default NaN
    v[7] = -1
    work = [w.view(np.uint16) for w in (p, g, m, v)]
    from precision.backends.numba_backend import kernels
    from precision.backends.numba_backend.rounding import static_code
    from precision.formats import FORMATS
    from precision.optim import scalar_table
    from precision.kernels import KERNEL_STEP, _optimizer
    row = scalar_table(_optimizer("adam"), KERNEL_STEP, FORMATS["fp32"])[KERNEL_STEP - 1].astype(np.float32)
    want_inputs = [a.astype(np.float32) for a in (p, g, m, v)]
    kernels.adam_step_inplace(*work, row, 0, 0, static_code("fp32"), static_code("bf16"))
    from precision.backends.numpy_backend.update import update
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        new_p, (new_m, new_v) = update(_optimizer("adam"), KERNEL_STEP, row, want_inputs[0], want_inputs[1],
                                       want_inputs[2:])
    for got, want in zip((p, m, v), (new_p, new_m, new_v)):
        want = want.astype(got.dtype).astype(np.float64)
        got = got.astype(np.float64)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    assert np.isnan(p[[0, 1, 2, 3, 7]].astype(np.float64)).all()
