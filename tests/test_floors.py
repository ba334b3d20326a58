"""Noise floors and verdicts (precision/floors.py): the reseeded and reordered datasets, the rank test, the verdict
rules, and the two cases the verdicts exist for: float64 runs never read as a precision effect, and full-batch
linear regression with Adam is order-dominated."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from precision.backends import get_backend
from precision.floors import (FLOOR_SEEDS, ORDER_SHARE, SEED_LEVEL, Floors, check_floor_seeds, judge, measure_floors,
                              rank_p_value, reordered, reseeded)
from precision.errors import SpecError
from precision.matrix import build_specs
from precision.optim import make_optimizer
from precision.policy import get_policy
from precision.runner import dataset_for, run
from precision.spec import RunSpec

U64 = 2.0 ** -53


def _spec(problem="logreg", data="breast_cancer", optimizer="adam", batch_size=128, seed=0, steps=40, policy="fp64"):
    return RunSpec(problem, make_optimizer(optimizer), get_policy(policy), data=data, batch_size=batch_size,
                   seed=seed, steps=steps)


def _floors(spec, seeds=FLOOR_SEEDS) -> Floors:
    ref = spec.reference()
    return measure_floors(dataset_for(ref), lambda ds: get_backend("numpy").train(ref, ds), seeds)


def test_reseeded_keeps_the_split_and_redraws_init_and_schedule():
    ds = dataset_for(_spec())
    assert reseeded(ds, 0) is ds
    other, again = reseeded(ds, 1), reseeded(ds, 1)
    for name in ("X_train", "y_train", "X_test", "y_test"):
        assert np.array_equal(getattr(other, name), getattr(ds, name))
    assert not np.array_equal(other.init_params, ds.init_params)
    assert other.batches.shape == ds.batches.shape and not np.array_equal(other.batches, ds.batches)
    assert np.array_equal(other.init_params, again.init_params) and np.array_equal(other.batches, again.batches)
    assert not np.array_equal(reseeded(ds, 2).init_params, other.init_params)


def test_reordered_changes_only_the_order_of_each_batch():
    ds = dataset_for(_spec())
    rev = reordered(ds)
    assert np.array_equal(np.sort(rev.batches, axis=1), np.sort(ds.batches, axis=1))
    assert not np.array_equal(rev.batches, ds.batches)
    full = dataset_for(_spec(batch_size=None))
    rev_full = reordered(full)
    assert np.array_equal(rev_full.X_train, full.X_train[::-1]) and np.array_equal(rev_full.y_train,
                                                                                   full.y_train[::-1])


def test_rank_p_value_is_the_exact_rank_test():
    sample = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert rank_p_value(2.0, sample) == pytest.approx(1 / 11)  # above all 10: the smallest p, 1/(n+1)
    assert rank_p_value(0.0, sample) == 1.0
    assert rank_p_value(0.75, sample) == pytest.approx(4 / 11)  # 0.8, 0.9, 1.0 at or above, plus x itself
    assert rank_p_value(0.0, [0.0] * 10) == 1.0  # ties count against rejection
    # The level is attainable with the default K: 10 pairs give 1/11 <= SEED_LEVEL.
    assert 1 / (FLOOR_SEEDS * (FLOOR_SEEDS - 1) // 2 + 1) <= SEED_LEVEL


def test_rank_test_holds_its_level_under_the_null():
    """Exchangeable draws: x and 10 others from one distribution. The test rejects when x is above all 10, which
    happens with probability exactly 1/11; over N trials the count is Binomial(N, 1/11), so it lies within
    4 standard deviations of N/11 except with probability < 1e-4."""
    rng = np.random.default_rng(0)
    n_trials, n = 4000, 10
    draws = rng.random((n_trials, n + 1))
    rejections = sum(rank_p_value(row[0], row[1:]) <= SEED_LEVEL for row in draws)
    p = 1 / (n + 1)
    assert abs(rejections - n_trials * p) <= 4 * math.sqrt(n_trials * p * (1 - p))


def _floor(**changes) -> Floors:
    base = dict(seeds=5, steps=(0, 10), seed_rel_l2=(1.0,) * 10, seed_loss_gap=(0.01,) * 10,
                seed_flip_rate=tuple(np.linspace(0.01, 0.05, 10)), order_rel_l2=1e-16, order_loss_gap=0.0,
                order_flip_rate=0.0, seed_rel_l2_by_step=((1.0, 1.0, 1.0),) * 2, order_rel_l2_by_step=(0.0, 1e-16))
    return Floors(**(base | changes))


def test_judge_rules():
    floors = _floor()
    assert judge(0.0, 0.0, 0.0, floors).label == "within seed noise"  # the reference itself
    assert judge(1e-3, 0.03, 1e-3, floors).label == "within seed noise"
    above = judge(1e-3, 0.2, 1e-3, floors)
    assert above.label == "above seed noise" and above.metric == "flip_rate" and above.p_value == pytest.approx(1 / 11)
    assert above.ratio_seed == pytest.approx(0.2 / 0.03)
    # the order floor wins: a drift the reference moves by more than ORDER_SHARE of is not a property of formats
    assert judge(1e-16 / ORDER_SHARE * 0.99, 0.2, 1e-3, floors).label == "order-dominated"
    assert judge(1e-16 / ORDER_SHARE * 1.01, 0.2, 1e-3, floors).label == "above seed noise"
    regression = _floor(seed_flip_rate=None, order_flip_rate=None)
    assert judge(1e-3, None, 0.5, regression).metric == "loss_gap"
    assert judge(1e-3, None, 0.5, regression).label == "above seed noise"
    assert judge(1e-3, None, 0.001, regression).label == "within seed noise"


def test_order_share_keeps_printed_bits_stable():
    """ORDER_SHARE is the largest o/x for which a reference moved by o cannot move -log2(x), printed to one decimal,
    by half a digit: -log2(1 - ORDER_SHARE) == 0.05."""
    assert -math.log2(1 - ORDER_SHARE) == pytest.approx(0.05)


def test_floor_seeds_checked():
    assert check_floor_seeds(0) == 0 and check_floor_seeds(5) == 5
    for bad in (1, -1, 65, True, 2.5):
        with pytest.raises(SpecError, match="2..64"):
            check_floor_seeds(bad)


@pytest.fixture(scope="module")
def default_problem_report():
    specs = build_specs(["logreg", "mlp"], ["adam"], ["fp64", "fp32", "bf16-mixed", "bf16"],
                        backends=("numpy", "numba", "jax"), data=("breast_cancer",), steps=60)
    specs = [s for s in specs if s.problem == "logreg"] + [
        dataclasses.replace(s, data="digits") for s in specs if s.problem == "mlp"]
    return run(specs, noise_floor=FLOOR_SEEDS)


def test_float64_runs_are_never_above_seed_noise(default_problem_report):
    """An fp64 run differs from the fp64 numpy reference by summation order only. The reference itself (numpy,
    rel_l2 = 0) is within seed noise by construction (p = 1); the other backends' fp64 runs are within seed noise or,
    where their whole drift is order noise of the size the reordered reference shows, order-dominated; never above."""
    fp64 = [r for r in default_problem_report.results if r.spec["policy_name"] == "fp64"]
    assert len(fp64) == 6 and all(r.status == "ok" for r in fp64)
    for r in fp64:
        assert r.verdict["label"] != "above seed noise", r.id
        if r.spec["backend"] == "numpy":
            assert r.rel_l2 == 0.0 and r.verdict["label"] == "within seed noise" and r.verdict["p_value"] == 1.0
        else:
            # order noise: within a few float64 roundings per step of the reference
            assert r.rel_l2 < 1e3 * U64, r.id


def test_every_finished_result_has_floors_and_a_verdict(default_problem_report):
    for r in default_problem_report.results:
        assert r.floors is not None and r.floors["seeds"] == FLOOR_SEEDS
        assert len(r.floors["seed_rel_l2"]) == FLOOR_SEEDS * (FLOOR_SEEDS - 1) // 2
        assert (r.verdict is not None) == (r.status == "ok")


def test_full_batch_linreg_adam_is_order_dominated():
    """Full-batch linreg on standardised data starting from b = 0: the bias gradient mean(X w + b - y) is exactly 0
    on paper (X and y have mean 0), so what the fp64 reference computes for it is rounding noise of the sum's
    order, and Adam divides it by sqrt(v) of the same noise: steps of ~lr instead of ~0. Unamplified, reordering
    1024 rows moves the params by at most ~steps x rows x u64 = 20 x 1024 x 2^-53 by step 20; the order floor shows
    more than 1000 times that, and the fp32 results are order-dominated (their bits are not a property of fp32)."""
    spec = _spec("linreg", "synthetic", "adam", batch_size=None, seed=3, steps=200, policy="fp32")
    report = run([dataclasses.replace(spec, backend=b) for b in ("numpy", "numba", "jax")], noise_floor=FLOOR_SEEDS)
    floors = report.results[0].floors
    assert floors["steps"][1] == 20
    assert floors["order_rel_l2_by_step"][1] > 1e3 * 20 * 1024 * U64
    for r in report.results:
        assert r.status == "ok" and r.verdict["label"] == "order-dominated", (r.id, r.verdict)


# --- the floors in reports, tables, comparisons and plots ----------------------------------------------------------

def test_floors_reach_the_report_table_and_plot(default_problem_report, tmp_path):
    from precision.report import load_report
    from precision.table import format_table
    path = default_problem_report.save(tmp_path / "r.json")
    loaded = load_report(path)
    assert [r.verdict for r in loaded.results] == [r.verdict for r in default_problem_report.results]
    table = format_table(loaded)
    assert "verdict" in table.splitlines()[0]
    assert table.count("noise floor (fp64, 5 seeds, 10 pairs)") == 2  # one line per (problem, optimizer) group
    pytest.importorskip("matplotlib")
    from precision.plot import figures
    drift = figures(loaded)["drift"]
    gids = [artist.get_gid() for ax in drift.axes for artist in ax.get_children()]
    assert gids.count("seed-floor") == 2 and gids.count("order-floor") == 2  # one band and one line per panel


def test_compare_flags_a_verdict_that_starts_to_matter(default_problem_report):
    from precision.compare import compare_reports
    from precision.report import Report
    old = default_problem_report
    target = next(r for r in old.results if r.verdict and r.verdict["label"] == "within seed noise"
                  and r.spec["policy_name"] != "fp64")
    worse = dataclasses.replace(target, verdict={**target.verdict, "label": "above seed noise"})
    new = Report(results=tuple(worse if r is target else r for r in old.results), environment=old.environment)
    row = next(row for row in compare_reports(old, new).rows if row.id == target.id)
    assert row.regressions == ("verdict within seed noise -> above seed noise",)
    back = next(row for row in compare_reports(new, old).rows if row.id == target.id)
    assert back.improvements == ("verdict above seed noise -> within seed noise",)


@pytest.mark.parametrize("value, message", [
    ("x", "--noise-floor 'x' is not an integer; valid: 0 (off) or 2..64 seeds"),
    ("1", "noise-floor seeds 1 must be an integer in 2..64 (0: no floors)"),
])
def test_cli_refuses_a_bad_noise_floor_in_one_line(value, message, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "precision", "run", "--problem", "logreg", "--steps", "5",
                           "--noise-floor", value, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_grid_estimate_counts_the_floor_runs():
    """K floor seeds add K float64 trainings per distinct reference (K - 1 reseeded, 1 reordered)."""
    from precision.matrix import estimate_grid
    specs = build_specs(["logreg"], ["adam"], ["fp32", "bf16"], data=("breast_cancer",), steps=50)
    plain, floored = estimate_grid(specs), estimate_grid(specs, noise_floor=5)
    assert plain.runs == 3 and floored.runs == 3 + 5  # one shared reference
    assert floored.work == plain.work + 5 * (plain.work // 3) and floored.memory_bytes > plain.memory_bytes
