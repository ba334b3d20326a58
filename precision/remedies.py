"""Which remedy? The field's fixes for low-precision training measured side by side on identical runs.

:data:`REMEDIES` lists the recipes (pure bf16, the fp32-master recipe, stochastic rounding, Kahan updates, torch's
fp32 opmath, fp16 with a static or a dynamic loss scale); :func:`plan_remedies` builds the same runs for each of
them (same data, init, batches and seed: only the arithmetic differs) and :func:`tabulate` puts what each buys
(bits of agreement with the float64 reference, recovered over pure bf16) next to what it costs (time per step
against pure bf16's in the same run, bytes per parameter). docs/remedies.md explains each recipe and reads the
table; ``precision remedies`` prints it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from ._terminal import clip
from .audit import mean_stagnation
from .optim import OptimizerSpec, make_optimizer, state_size
from .policy import Policy, get_policy

__all__ = ["REMEDIES", "BASELINE", "memory_per_param", "plan_remedies", "RemedyRow", "tabulate",
           "format_remedies"]

# (preset, what it is): the rows of the table, in this order. The baseline is the first.
REMEDIES = (
    ("bf16", "pure bf16: params, math, state bf16; every op rounded to bf16"),
    ("bf16-mixed", "bf16 math, fp32 master weights and state (Micikevicius et al. 2018)"),
    ("torch-bf16", "bf16 params and state, fp32 opmath, one rounding per stored tensor (torch fused AdamW)"),
    ("bf16-sr", "torch-bf16 + stochastic rounding of the weights (torchao bf16 AdamW, Gupta et al. 2015)"),
    ("bf16-kahan", "torch-bf16 + a bf16 Kahan compensation buffer (optimi, Zamirai et al. 2020)"),
    ("fp16-mixed", "fp16 math, fp32 master weights and state, no loss scale"),
    ("torch-amp-fp16", "fp16-mixed + dynamic loss scaling (torch.amp.GradScaler's defaults)"),
)
BASELINE = REMEDIES[0][0]


def memory_per_param(pol: Policy, opt: OptimizerSpec) -> int:
    """Bytes kept per parameter between steps: the params, the master copy, the optimizer's state vectors and
    Kahan's compensation, each at its storage dtype's size (an emulated format counts its carrier: tf32 is stored
    in 4 bytes). Gradients and activations, which live only during a step, are not counted."""
    size = pol.params.dtype.itemsize + (pol.master.dtype.itemsize if pol.master is not None else 0)
    return size + (state_size(opt) + (1 if pol.kahan else 0)) * pol.state.dtype.itemsize


def plan_remedies(problem=None, data=None, optimizer: str = "adam", backend: str = "numpy", steps: int = 200,
                  seed: int = 0, batch_size: int | None = 128, lr: float | None = None, *, device: str = "cpu",
                  record_every: int = 20, policies=None) -> tuple:
    """The specs of the remedies table: every case (the suite's default cases, logreg on breast_cancer and mlp on
    digits, unless ``problem`` / ``data`` are given) x optimizer x backend x remedy. ``policies`` replaces
    :data:`REMEDIES`' presets (the first is the baseline)."""
    from .ablate import _names
    from .matrix import DEFAULT_CASES, build_specs

    problems, datas = _names(problem), _names(data)
    if problems is None and datas is None:
        cases = list(DEFAULT_CASES)
    else:
        cases = list(itertools.product(problems or ["logreg"], datas or ["synthetic"]))
    pols = [get_policy(p) for p in (_names(policies) or [name for name, _ in REMEDIES])]
    specs = []
    for (prob, dat), opt, back in itertools.product(cases, _names(optimizer) or ["adam"], _names(backend) or ["numpy"]):
        specs += build_specs([prob], [opt], pols, backends=[back], devices=[device], data=[dat], seeds=[seed],
                             steps=steps, batch_size=batch_size, lr=lr, record_every=record_every)
    return tuple(specs)


@dataclasses.dataclass(frozen=True)
class RemedyRow:
    case: str  # problem:data optimizer backend-device
    policy: str
    status: str
    bits: float | None
    recovered: float | None  # bits minus the baseline's in the same case
    flip_rate: float | None
    time_per_step_s: float | None
    time_ratio: float | None  # time per step over the baseline's, same case, same run
    bytes_per_param: int
    stagnation: float | None  # mean over record steps (precision.audit)
    skipped: int | None  # steps skipped by dynamic loss scaling
    message: str = ""


def tabulate(report, baseline: str | None = None) -> list[RemedyRow]:
    """One row per result of ``report`` (a remedies run), grouped by case; ``recovered`` and ``time_ratio`` are
    against the case's ``baseline`` policy (default: the first policy of the report)."""
    results = list(report.results)
    if not results:
        return []
    baseline = baseline or results[0].spec["policy_name"]
    cases: dict[str, list] = {}
    for r in results:
        s = r.spec
        key = f"{s['problem']}:{s['data']}  {s['optimizer']['name']}  {s['backend']}-{s['device']}"
        cases.setdefault(key, []).append(r)
    rows = []
    for key, group in cases.items():
        base = next((r for r in group if r.spec["policy_name"] == baseline), None)
        for r in group:
            pol = get_policy(r.spec["policy"])
            opt = make_optimizer(r.spec["optimizer"]["name"])
            recovered = (r.bits_of_agreement - base.bits_of_agreement
                         if base is not None and _finite(r.bits_of_agreement) and _finite(base.bits_of_agreement)
                         else None)
            ratio = (r.time_per_step_s / base.time_per_step_s
                     if base is not None and r.time_per_step_s and base.time_per_step_s else None)
            audit = r.audit or {}
            rows.append(RemedyRow(key, r.spec["policy_name"], r.status, r.bits_of_agreement, recovered, r.flip_rate,
                                  r.time_per_step_s, ratio, memory_per_param(pol, opt), mean_stagnation(audit),
                                  audit.get("skipped"), r.message))
    return rows


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _fmt(x, spec: str, signed: bool = False) -> str:
    if x is None:
        return "-"
    return format(x, ("+" if signed else "") + spec)


COLUMNS = ("policy", "bits", "recovered", "flips", "us/step", "x baseline", "bytes/param", "stagnation", "skipped",
           "status")


def _cells(row: RemedyRow) -> list[str]:
    status = row.status if not row.message else f"{row.status}: {clip(row.message, 60)}"
    return [row.policy, _fmt(row.bits, ".1f"), _fmt(row.recovered, ".1f", signed=True), _fmt(row.flip_rate, ".3f"),
            _fmt(None if row.time_per_step_s is None else row.time_per_step_s * 1e6, ".1f"),
            _fmt(row.time_ratio, ".2f"), str(row.bytes_per_param), _fmt(row.stagnation, ".3f"),
            "-" if row.skipped is None else str(row.skipped), status]


def format_remedies(rows: list[RemedyRow], markdown: bool = False) -> str:
    """The table, one block per case (text, or GitHub markdown)."""
    blocks = []
    for case, group in itertools.groupby(rows, key=lambda r: r.case):
        cells = [_cells(r) for r in group]
        if markdown:
            lines = [f"**{case}**", "", "| " + " | ".join(COLUMNS) + " |",
                     "|" + "|".join(" --- " if i == 0 or i == len(COLUMNS) - 1 else " ---: " for i in
                                   range(len(COLUMNS))) + "|"]
            lines += ["| " + " | ".join(c) + " |" for c in cells]
        else:
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
            lines = [case, "  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip(),
                     "  ".join("-" * w for w in widths)]
            lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_remedies(rows: list[RemedyRow], out_prefix, colors: dict[str, str] | None = None) -> list:
    """``<prefix>-remedies.png/.svg``: bits recovered over the baseline against time per step relative to it, one
    marker per remedy, one panel per case. ``colors``: policy name -> colour (``_plot_style._colors`` of the
    report: each preset's colour of every other figure); default: :func:`policy_color`."""
    from pathlib import Path

    from ._plot_style import SUFFIXES, _matplotlib, policy_color
    from .plot import _save_atomic

    Figure, FigureCanvasAgg = _matplotlib()
    cases = list(dict.fromkeys(r.case for r in rows))
    ncols = min(3, len(cases))  # at most three panels a row: one row per case group stays readable
    nrows = -(-len(cases) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(cases):]:
        ax.set_visible(False)
    for ax, case in zip(axes, cases):
        for r in (r for r in rows if r.case == case):
            if r.recovered is None or r.time_ratio is None:
                continue
            color = (colors or {}).get(r.policy) or policy_color(r.policy)
            ax.scatter([r.time_ratio], [r.recovered], color=color, s=46, zorder=3,
                       edgecolor="black", linewidth=0.5)
            ax.annotate(r.policy, (r.time_ratio, r.recovered), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.axvline(1, color="0.6", linewidth=0.8)
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("time per step / baseline's (same run)")
        ax.set_ylabel("bits of agreement recovered over the baseline")
        ax.grid(alpha=0.3)
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return [_save_atomic(fig, prefix.with_name(prefix.name + f"-remedies{suffix}")) for suffix in SUFFIXES]
