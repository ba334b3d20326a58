"""precision ablate: the one-field ablation list derived from the policy grammar, its runs, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import precision.runner
from precision.ablate import (FIELDS, ablate, ablation_policies, format_ablation, plan_ablation, reference_policy,
                              unchanged_fields)
from precision.errors import SpecError
from precision.policy import PRESETS, parse_policy
from precision.report import load_report

MIXED_REFERENCE = "p=fp64,c=fp64,a=fp64,s=fp64,m=fp64"
NARROWER = "accumulation format fp32 is narrower than compute fp64"


def rows(policy, reference="fp64"):
    """(direction, field, before, after, policy text, valid) of each ablation."""
    return [(a.direction, a.field, a.before, a.after, a.text, a.valid) for a in ablation_policies(policy, reference)]


def mixed_rows(x: str, ls: str = "") -> list[tuple]:
    """The expected list for '{x}-mixed' (p=x,c=x,a=fp32,s=fp32,m=fp32) and its loss-scaled form, from the grammar."""
    tail = f",ls={ls}" if ls else ""
    out = [
        ("raise", "params", x, "fp64", f"p=fp64,c={x},a=fp32,s=fp32,m=fp32{tail}", True),
        ("raise", "compute", x, "fp64", f"p={x},c=fp64,a=fp32,s=fp32,m=fp32{tail}", False),
        ("raise", "accum", "fp32", "fp64", f"p={x},c={x},a=fp64,s=fp32,m=fp32{tail}", True),
        ("raise", "state", "fp32", "fp64", f"p={x},c={x},a=fp32,s=fp64,m=fp32{tail}", True),
        ("raise", "master", "fp32", "fp64", f"p={x},c={x},a=fp32,s=fp32,m=fp64{tail}", True),
    ]
    if ls:
        out.append(("raise", "loss_scale", ls, "none", f"{x}-mixed", True))  # removing it gives the preset
    out += [
        ("lower", "params", "fp64", x, f"p={x},c=fp64,a=fp64,s=fp64,m=fp64", True),
        ("lower", "compute", "fp64", x, f"p=fp64,c={x},a=fp64,s=fp64,m=fp64", True),
        ("lower", "accum", "fp64", "fp32", "p=fp64,c=fp64,a=fp32,s=fp64,m=fp64", False),
        ("lower", "state", "fp64", "fp32", "p=fp64,c=fp64,a=fp64,s=fp32,m=fp64", True),
        ("lower", "master", "fp64", "fp32", "p=fp64,c=fp64,a=fp64,s=fp64,m=fp32", True),
    ]
    if ls:
        out.append(("lower", "loss_scale", "none", ls, f"p=fp64,c=fp64,a=fp64,s=fp64,m=fp64,ls={ls}", True))
    return out


@pytest.mark.parametrize("policy, expected, unchanged", [
    ("bf16-mixed", mixed_rows("bf16"), ["loss_scale"]),
    ("fp16-mixed", mixed_rows("fp16"), ["loss_scale"]),
    ("fp16-mixed-ls", mixed_rows("fp16", "1024"), []),
])
def test_ablation_list_of_the_mixed_presets(policy, expected, unchanged):
    assert rows(policy) == expected
    assert unchanged_fields(policy) == unchanged
    assert str(reference_policy(policy)) == MIXED_REFERENCE  # a master copy because the policy has one


def test_each_ablation_changes_exactly_its_field():
    for name in PRESETS:
        for a in ablation_policies(name):
            if not a.valid:
                continue
            differ = [f for f in FIELDS if getattr(a.policy, f) != getattr(a.start, f)]
            assert differ == [a.field], (name, a)
            assert parse_policy(str(a.policy)) == a.policy  # the row's policy string runs as written


def test_refused_combinations_are_listed_with_the_reason():
    refused = [a for a in ablation_policies("bf16-mixed") if not a.valid]
    assert [(a.direction, a.field) for a in refused] == [("raise", "compute"), ("lower", "accum")]
    for a in refused:
        assert a.policy is None and a.reason == NARROWER
        with pytest.raises(SpecError, match=NARROWER):  # the text is what Policy itself refuses
            parse_policy(a.text)


def test_ablating_the_reference_itself_changes_nothing():
    assert ablation_policies("fp64") == []
    # u, a dynamic loss scale and a rounding mode are fields only where stated
    assert unchanged_fields("fp64") == [f for f in FIELDS if f not in ("update_math", "dynamic_scale", "rounding")]
    assert reference_policy("fp64") == PRESETS["fp64"]
    assert ablation_policies("fp32", reference="fp32") == []


def test_remedies_are_ablated_where_the_policy_states_them():
    """bf16-sr: raising r removes stochastic rounding (torch-bf16); lowering it is refused (the fp64 reference's
    update is its weights' format: nothing left to round). torch-amp-fp16: raising ls removes dynamic scaling."""
    rows = {(a.direction, a.field): a for a in ablation_policies("bf16-sr")}
    assert rows["raise", "rounding"].policy == PRESETS["torch-bf16"]
    assert not rows["lower", "rounding"].valid and "r=sr needs an update format wider" in rows["lower", "rounding"].reason
    rows = {(a.direction, a.field): a for a in ablation_policies("torch-amp-fp16")}
    assert rows["raise", "dynamic_scale"].policy == PRESETS["fp16-mixed"]
    assert rows["lower", "dynamic_scale"].policy.dynamic_scale == PRESETS["torch-amp-fp16"].dynamic_scale


def test_update_math_is_ablated_where_the_policy_states_it():
    """torch-bf16 (u=fp32): raising u computes the update in fp64; lowering it to fp32 under fp64 weights and state is
    refused (u is at least as wide as they are); raising params, state or master to fp64 under u=fp32 is refused too."""
    u_rows = [r for r in rows("torch-bf16") if r[1] == "update_math"]
    assert u_rows == [("raise", "update_math", "fp32", "fp64", "p=bf16,c=bf16,a=fp32,s=bf16,u=fp64", True),
                      ("lower", "update_math", "none", "fp32", "p=fp64,c=fp64,a=fp64,s=fp64,u=fp32", False)]
    refused = {r[1] for r in rows("torch-bf16") if r[0] == "raise" and not r[5]}
    assert refused == {"params", "compute", "state", "master"}


def test_without_master_raising_it_adds_a_copy_and_there_is_no_lower_row():
    master = [r for r in rows("bf16") if r[1] == "master"]
    assert master == [("raise", "master", "none", "fp64", "p=bf16,c=bf16,a=fp32,s=bf16,m=fp64", True)]
    assert reference_policy("bf16") == PRESETS["fp64"]
    # Params already in the reference format: a master copy would change nothing, so no row.
    assert [r for r in rows("p=fp64,c=fp32,a=fp32,s=fp32") if r[1] == "master"] == []
    # A field already at the reference's value has no lower row (nor a raise row).
    assert {r[1] for r in rows("p=fp64,c=fp64,a=fp64,s=fp32")} == {"state"}


def test_reference_fp32():
    assert rows("bf16-mixed", "fp32") == [
        ("raise", "params", "bf16", "fp32", "p=fp32,c=bf16,a=fp32,s=fp32,m=fp32", True),
        ("raise", "compute", "bf16", "fp32", "p=bf16,c=fp32,a=fp32,s=fp32,m=fp32", True),
        ("lower", "params", "fp32", "bf16", "p=bf16,c=fp32,a=fp32,s=fp32,m=fp32", True),
        ("lower", "compute", "fp32", "bf16", "p=fp32,c=bf16,a=fp32,s=fp32,m=fp32", True),
    ]
    assert unchanged_fields("bf16-mixed", "fp32") == ["accum", "state", "master", "loss_scale"]
    with pytest.raises(SpecError, match="narrower than params fp64"):
        ablation_policies("fp64", reference="fp32")
    with pytest.raises(SpecError, match="unknown reference format 'bf16'; valid choices: fp64, fp32"):
        ablation_policies("bf16-mixed", reference="bf16")


# ---- runs (the Python API) ----------------------------------------------------------------------------------------

CASE = dict(problem="logreg", data="breast_cancer", steps=20)


@pytest.fixture(scope="module")
def bf16_mixed():
    return ablate("bf16-mixed", **CASE)


def test_rows_and_deltas(bf16_mixed):
    table = bf16_mixed
    group = table.group("logreg", "breast_cancer")
    assert [(r.direction, r.field) for r in group] == [("base", None), ("reference", None)] + [
        (a.direction, a.field) for a in table.ablations]
    base, ref = group[0], group[1]
    assert base.policy == "bf16-mixed" and ref.policy == MIXED_REFERENCE
    for r in group[2:]:
        if r.status == "invalid":
            assert r.bits is None and r.spec_id is None and r.message == NARROWER
            continue
        assert r.status == "ok"
        start = base if r.direction == "raise" else ref
        assert r.delta_bits == pytest.approx(r.bits - start.bits)
        assert r.same == (r.fingerprint == start.fingerprint)
    # One result per distinct spec; every row's id is in the report.
    ids = [r.id for r in table.report.results]
    assert len(ids) == len(set(ids)) == 2 + sum(a.valid for a in table.ablations)
    text = format_ablation(table)
    assert "logreg:breast_cancer  adam  numpy-cpu" in text and "invalid: " + NARROWER in text
    markdown = format_ablation(table, markdown=True)
    assert "| row | field | change | policy | bits | delta | same | flips | loss_gap | status |" in markdown


def test_master_copy_reference_is_float64_bit_for_bit(bf16_mixed):
    # The reference of a policy with master weights is fp64 with an fp64 master copy: every conversion is the
    # identity, so it computes exactly what plain fp64 does (and so does fp64 with a power-of-two loss scale).
    ref = bf16_mixed.group("logreg", "breast_cancer")[1]
    plain = ablate("fp32", **CASE).group("logreg", "breast_cancer")[1]
    assert plain.policy == "fp64"
    assert ref.bits == plain.bits == 53.0 and ref.fingerprint == plain.fingerprint


def test_a_raise_row_that_is_the_reference_runs_once():
    table = ablate("p=fp64,c=fp64,a=fp64,s=fp32", **CASE)
    base, ref, raise_state, lower_state = table.rows
    assert (raise_state.direction, raise_state.field, lower_state.direction) == ("raise", "state", "lower")
    assert raise_state.spec_id == ref.spec_id and raise_state.fingerprint == ref.fingerprint
    assert raise_state.bits == ref.bits == 53.0 and ref.policy == "fp64"
    assert lower_state.spec_id == base.spec_id and lower_state.same is False
    assert len(table.report.results) == 2


def test_base_row_is_a_normal_run(bf16_mixed):
    base = bf16_mixed.group("logreg", "breast_cancer")[0]
    specs = precision.build_specs(["logreg"], ["adam"], ["bf16-mixed"], data=["breast_cancer"], steps=20)
    (result,) = precision.run(specs).results
    assert result.id == base.spec_id and result.fingerprint == base.fingerprint
    assert result.bits_of_agreement == base.bits


def test_one_failing_run_keeps_the_others(monkeypatch):
    real = precision.runner.get_backend
    broken = parse_policy("p=bf16,c=bf16,a=fp32,s=fp32,m=fp64")  # the raise-master row of bf16-mixed

    class Backend:
        def __init__(self, name):
            self.inner = real(name)

        def train(self, spec, dataset):
            if spec.policy == broken:
                raise RuntimeError("broken on purpose (test)")
            return self.inner.train(spec, dataset)

    monkeypatch.setattr(precision.runner, "get_backend", Backend)
    table = ablate("bf16-mixed", **CASE)
    by_field = {(r.direction, r.field): r for r in table.rows}
    assert by_field["raise", "master"].status == "error" and "broken on purpose" in by_field["raise", "master"].message
    assert by_field["raise", "master"].delta_bits is None
    assert all(r.status in ("ok", "invalid") for k, r in by_field.items() if k != ("raise", "master"))


def test_plan_defaults_and_lists():
    plan = plan_ablation("bf16-mixed")
    assert [(g.problem, g.data, g.optimizer, g.backend) for g in plan.groups] == [
        ("logreg", "breast_cancer", "adam", "numpy"), ("mlp", "digits", "adam", "numpy")]
    assert {s.steps for s in plan.specs} == {200}
    plan = plan_ablation("bf16-mixed", problem="softmax", data=["synthetic", "digits"], optimizer="sgd,adam")
    assert len(plan.groups) == 4
    with pytest.raises(SpecError, match="unknown policy 'bf17'"):
        plan_ablation("bf17")
    with pytest.raises(SpecError, match="unknown format 'bf17'"):
        plan_ablation("p=bf17")


# ---- the command line ---------------------------------------------------------------------------------------------

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "precision", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_happy_path_and_report(tmp_path):
    out = tmp_path / "ablation.json"
    proc = cli("ablate", "fp16-mixed-ls", "--problem", "logreg", "--data", "breast_cancer", "--steps", "20",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert "logreg:breast_cancer  adam  numpy-cpu" in lines
    assert any(line.startswith("raise      loss_scale  1024 -> none  fp16-mixed ") for line in lines), proc.stdout
    assert f"report written to {out}" in lines[-1]
    report = load_report(out)  # a normal, schema-valid precision report
    assert {r.status for r in report.results} == {"ok"}
    # The base row's run is the one precision run makes: same id, same final params.
    run_out = tmp_path / "run.json"
    proc = cli("run", "--problem", "logreg", "--data", "breast_cancer", "--optimizer", "adam", "--policy",
               "fp16-mixed-ls", "--backend", "numpy", "--steps", "20", "--out", str(run_out))
    assert proc.returncode == 0, proc.stderr
    (normal,) = json.loads(run_out.read_text())["results"]
    assert report.by_id()[normal["spec"]["id"]].fingerprint == normal["fingerprint"]


def test_cli_markdown_and_diverged_is_finished():
    # Pure fp16 Adam on digits diverges at once (eps rounds to 0): a result, so exit 0.
    proc = cli("ablate", "fp16", "--problem", "mlp", "--data", "digits", "--steps", "5", "--markdown")
    assert proc.returncode == 0, proc.stderr
    assert "| base | - | - | fp16 | 0.0 | - | - | - | nan | diverged at 1 |" in proc.stdout
    assert "diverged)" in proc.stdout.splitlines()[-1]


def test_cli_exit_1_when_a_run_errors(tmp_path, broken_sklearn):
    env = broken_sklearn("load_digits", "digits file unreadable (test)")
    proc = cli("ablate", "fp32", "--problem", "softmax", "--data", "synthetic,digits", "--steps", "5", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "precision ablate: error: 9 of 18 runs failed; their messages are in the table"]
    assert "softmax:synthetic  adam  numpy-cpu" in proc.stdout
    assert "error: OSError: digits file unreadable" in proc.stdout


BAD = [
    (["bf17"], "unknown policy 'bf17'; valid choices: fp64"),
    (["p=bf17,c=bf16"], "unknown format 'bf17'; valid choices: fp64, fp32"),
    (["p=bf16,a=fp16"], "accumulation format 'fp16' is not supported; valid choices: fp32, fp64"),
    (["bf16-mixed", "--steps", "0"], "--steps 0 must be a positive integer"),
    (["bf16-mixed", "--steps", "x"], "--steps 'x' is not an integer"),
    (["bf16-mixed", "--reference", "bf16"], "unknown reference format 'bf16'; valid choices: fp64, fp32"),
    (["bf16-mixed", "--problem", "logreg", "--data", "digits"], "'digits' has 10 classes"),
    (["bf16-mixed", "--optimizer", "adamx"], "unknown optimizer 'adamx'; valid choices: sgd, adam, adamw"),
    (["bf16-mixed", "--problem", "logreg,"], "--problem 'logreg,' is empty or has an empty item; valid choices"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path):
    out = tmp_path / "r.json"
    proc = cli("ablate", *args, "--out", str(out))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    assert lines[0].startswith("precision ablate: error: ") and message in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_directory_is_refused(tmp_path):
    proc = cli("ablate", "bf16-mixed", "--out", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    assert list(tmp_path.iterdir()) == []



def test_sigterm_exits_130_and_saves_only_finished_results(tmp_path):
    # Whatever the moment the signal lands (importing, checking, training): exit 130, one line, no traceback; a
    # report exists only if results had finished, and then it is a valid report of fewer results than the runs.
    import signal
    import time
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "precision", "ablate", "bf16-mixed", "--problem", "logreg",
                             "--data", "breast_cancer", "--steps", "5000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and "interrupted" in lines[0], stderr
    assert stdout == ""
    if out.exists():
        n = len(load_report(out).results)
        assert 0 < n < 10 and f"{n} of 10 results saved to {out}" in lines[0]
    else:
        assert list(tmp_path.iterdir()) == []


def test_docs_list_every_option():
    import argparse
    from pathlib import Path

    from precision.commands import ablate as command
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    (sub,) = parser._subparsers._group_actions[0].choices.values()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "ablation.md").read_text(encoding="utf-8")
    options = [s for action in sub._actions for s in action.option_strings if s.startswith("--") and s != "--help"]
    assert options and all(f"`{o}" in docs for o in options), [o for o in options if f"`{o}" not in docs]
    for status in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert status in docs
