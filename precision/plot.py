"""Pictures of a report: drift over training steps, and the runtime-versus-drift trade-off.

``plot_report(report, out_prefix)`` writes ``<prefix>-drift.png/.svg`` (bits of agreement with the fp64 reference
at every record step; one panel per problem x data x optimizer settings, one line per policy x backend) and
``<prefix>-tradeoff.png/.svg`` (time per step, log scale, against final bits of agreement; same panels).
``figures(report)`` returns the same two figures without writing anything. docs/plots.md says how to read them.

What a reader can rely on:

* one colour per policy in every figure of every report: presets have fixed colours, in the table's policy order;
  other policies take a colour of the remaining palette chosen by a hash of their name (moved to the next free one
  when two policies of one report hash alike);
* one line style and marker per backend (and device), fixed too; markers are staggered along the line, each backend
  on its own record steps, so backends whose lines coincide still show all their markers. Where runs of a policy
  have exactly equal drift trajectories the panel's legend says "identical on numpy, numba, jax";
* every diverged run has its own marker, the backend's shape drawn hollow, at the step it diverged;
* the faint reference line of each params format sits at its precision p, labelled in the right margin (labels
  pushed apart, never on the curves). p = -log2(u) for the unit roundoff u = 2^-p: the bits of agreement that one
  rounding of every parameter would leave. It is not a ceiling: a whole-vector relative error after one rounding
  is at most u, so agreement starts at or above p;
* a panel whose runs all errored or were unavailable shows a note saying so, with the count;
* when the report has noise floors (``precision run --noise-floor``), each drift panel shows the seed floor as a
  grey band (bits of agreement between float64 runs of other seeds: what reseeding alone gives) and the order floor
  as a dotted line (the float64 reference against itself with its sums reordered: bits above it are order noise).

matplotlib is an optional extra; figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot, so nothing opens a window or touches global state.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from ._atomic import write_atomic
from ._plot_layout import (_Panel, _caption, _empty_panel, _has_drift, _has_tradeoff, _join, _layout, _panels,
                           _params_formats, _reference_lines, _y_top)
from ._plot_style import (_DIVERGED_SIZE, _LEGEND_LINE, _REFERENCE_COLOR, SUFFIXES, _colors, _matplotlib,
                          _policy_rank, _runner, _size, _Styles, _text, policy_color)
from ._terminal import clip
from .drift import MAX_BITS
from .errors import PrecisionError
from .report import Report, Result

__all__ = ["plot_report", "figures", "figure_paths", "FIGURE_NAMES", "SUFFIXES", "policy_color"]

# --- the drift figure -------------------------------------------------------------------------------------------

def _trajectory_key(r: Result) -> tuple:
    return tuple((p.get("step"), p.get("rel_l2"), p.get("bits")) for p in r.drift)


def _identical_groups(runs) -> list[list[str]]:
    """Backends whose runs have exactly equal drift trajectories (two or more each), in backend order."""
    groups: dict[tuple, list[str]] = {}
    for r in runs:
        if r.drift:
            groups.setdefault(_trajectory_key(r), []).append(_runner(r))
    return [names for names in groups.values() if len(names) > 1]


def _policy_note(policy: str, runs) -> str:
    """The legend entry of one policy in one panel: its name, which backends coincide exactly, where runs diverged."""
    lines = [_text(policy)]
    groups = _identical_groups(runs)
    if groups:
        lines.append("identical on " + "; on ".join(_join(g) for g in groups))
    steps: dict[int, list[str]] = {}
    for r in runs:
        if r.status == "diverged" and r.diverged_at is not None:
            steps.setdefault(r.diverged_at, []).append(_runner(r))
    if steps:
        lines.append("diverged " + "; ".join(f"at step {s} on {_join(names)}" for s, names in sorted(steps.items())))
    return "\n  ".join(lines)


def _not_drawn_note(runs) -> str:
    counts = Counter(r.status for r in runs)
    what = ", ".join(f"{n} {_text(s)}" for s, n in sorted(counts.items()))
    names = _join(sorted({f"{r.spec['policy_name']} on {_runner(r)}" for r in runs}))
    return clip(f"not drawn: {what} ({names})", 90)


def _drift_legend_lines(panel: _Panel) -> int:
    by_policy = panel.by_policy(_has_drift)
    lines = sum(1 + bool(_identical_groups(runs)) + any(r.status == "diverged" for r in runs)
                for runs in by_policy.values())
    return math.ceil(lines / 2) + (1 if panel.not_drawn(_has_drift) else 0)


def _drift_figure(results, colors, styles, Figure, FigureCanvasAgg):
    from matplotlib.lines import Line2D
    from matplotlib.transforms import offset_copy
    panels = _panels(results)
    drawn = [r for r in results if _has_drift(r)]
    top = _y_top([p["bits"] for r in drawn for p in r.drift] + list(_params_formats(drawn).values()))
    extra = [(_LEGEND_LINE * (_drift_legend_lines(p) + 1) if p.by_policy(_has_drift) else 0.0) for p in panels]
    fig, axes = _layout(len(panels), Figure, FigureCanvasAgg, extra_height=extra, footer=0.5)
    labels_by_ax = {}
    n_run = n_div = 0
    for j, (ax, panel) in enumerate(zip(axes, panels)):
        by_policy = panel.by_policy(_has_drift)
        if not by_policy:
            _empty_panel(ax, j, panel, _has_drift, "drift")
            continue
        handles, texts = [], []
        diverged_rows = 0
        for policy, runs in by_policy.items():
            color = colors[policy]
            row_diverged = False
            for r in runs:
                runner = _runner(r)
                if r.drift:
                    steps = [p["step"] for p in r.drift]
                    bits = [0.0 if p["bits"] is None else p["bits"] for p in r.drift]
                    ax.plot(steps, bits, color=color, gid=f"run-{n_run}", **styles.line_kwargs(runner, len(steps)))
                    n_run += 1
                if r.status == "diverged" and r.diverged_at is not None:
                    # One hollow marker per run, in its backend's shape: backends side by side, policies stacked.
                    i, k = styles.index(runner), len(styles.runners)
                    shift = offset_copy(ax.transData, fig=fig, x=(i - (k - 1) / 2) * 11,
                                        y=diverged_rows * 12, units="points")
                    ax.plot([r.diverged_at], [0.0], transform=shift, linestyle="none",
                            marker=styles.style[runner][1], markersize=_size(styles.style[runner][1], _DIVERGED_SIZE),
                            markerfacecolor="white",
                            markeredgecolor=color, markeredgewidth=2.0, clip_on=False, zorder=10,
                            gid=f"diverged-{n_div}")
                    n_div += 1
                    row_diverged = True
            diverged_rows += row_diverged
            handles.append(Line2D([], [], color=color, linewidth=2.5))
            texts.append(_policy_note(policy, runs))
        skipped = panel.not_drawn(_has_drift)
        if skipped:
            handles.append(Line2D([], [], linestyle="none"))
            texts.append(_not_drawn_note(skipped))
        floors = next((r.floors for runs in by_policy.values() for r in runs if r.floors), None)
        if floors is not None:
            floor_handles = _floor_band(ax, floors)
            handles += [h for h, _ in floor_handles]
            texts += [t for _, t in floor_handles]
        labels_by_ax[ax] = _reference_lines(ax, j, [r for runs in by_policy.values() for r in runs])
        ax.set_title(_text(panel.title), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("bits of agreement with fp64")
        ax.set_ylim(-0.03 * top, top)
        ax.grid(True, alpha=0.3)
        # The policies of this panel, with what the data say about them, under the panel (never over the curves).
        ax.legend(handles, texts, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncols=2, fontsize=7.5,
                  frameon=False, handlelength=1.8, columnspacing=1.5, borderaxespad=0)
    _figure_legend(fig, "Drift from the float64 reference (higher is better)", styles, diverged=n_div > 0,
                   reference=any(labels_by_ax.values()))
    _caption(fig, labels_by_ax)
    return fig


def _bits(rel) -> float:
    """Bits of agreement of a relative distance, as the report's drift points have them (None: not finite)."""
    if rel is None or not math.isfinite(rel):
        return 0.0
    return MAX_BITS if rel == 0.0 else min(MAX_BITS, max(0.0, -math.log2(rel)))


def _floor_band(ax, floors: dict) -> list:
    """The noise floors of a panel's reference, drawn behind the runs: a grey band where two float64 runs of other
    seeds agree (min..max over the seed pairs, per record step), and a dotted line at the agreement of the float64
    reference with itself summed in another order (above it, bits are order noise). Returns legend entries."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    steps = floors["steps"]
    low = [_bits(hi) for _, _, hi in floors["seed_rel_l2_by_step"]]
    high = [_bits(lo) for lo, _, _ in floors["seed_rel_l2_by_step"]]
    ax.fill_between(steps, low, high, color="0.55", alpha=0.18, linewidth=0, zorder=0, gid="seed-floor")
    order = [_bits(v) for v in floors["order_rel_l2_by_step"]]
    ax.plot(steps[1:], order[1:], color="0.25", linestyle=":", linewidth=1.2, zorder=1, gid="order-floor")
    seeds = floors["seeds"]
    return [(Patch(color="0.55", alpha=0.3), f"seed floor: fp64, {seeds} seeds (pairs, min..max)"),
            (Line2D([], [], color="0.25", linestyle=":"), "order floor: fp64, reordered sums")]


def _figure_legend(fig, title: str, styles, *, diverged: bool, reference: bool, policies: dict | None = None):
    """The figure's heading: its title over one row saying what the colours (trade-off only), line styles, markers
    and grey lines mean. (A legend "outside upper center" and a suptitle overlap under constrained layout.)"""
    from matplotlib.lines import Line2D
    handles, texts = [], []
    for name, color in (policies or {}).items():
        handles.append(Line2D([], [], color=color, marker="s", markersize=8, linestyle="none"))
        texts.append(_text(name))
    for runner in styles.runners:
        linestyle, marker = styles.style[runner]
        handles.append(Line2D([], [], color="0.15", linestyle="none" if policies else linestyle, marker=marker,
                              markersize=6, linewidth=1.4))
        texts.append(_text(runner))
    if diverged:
        handles.append(Line2D([], [], color="0.15", linestyle="none", marker="o", markersize=9,
                              markerfacecolor="white", markeredgewidth=2))
        texts.append("diverged (hollow, backend's shape)")
    if reference:
        handles.append(Line2D([], [], color=_REFERENCE_COLOR, linestyle=(0, (6, 2)), linewidth=1))
        texts.append("p of the params format (see below)")
    # As many columns as fit the figure's width (measured: a legend wider than the figure is cut at both sides).
    # Rows filled evenly (legends fill column by column).
    renderer = fig.canvas.get_renderer()
    for rows in range(1, len(handles) + 1):
        ncols = math.ceil(len(handles) / rows)
        legend = fig.legend(handles, texts, loc="outside upper center", ncols=ncols, fontsize=8, handlelength=2.6,
                            frameon=False, title=title, title_fontsize=11)
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width * 0.97:
            break
        legend.remove()


# --- the trade-off figure ---------------------------------------------------------------------------------------

def _tradeoff_figure(results, colors, styles, Figure, FigureCanvasAgg):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    panels = _panels(results)
    drawn = [r for r in results if _has_tradeoff(r)]
    top = _y_top([r.bits_of_agreement for r in drawn] + list(_params_formats(drawn).values()))
    fig, axes = _layout(len(panels), Figure, FigureCanvasAgg, footer=0.5)
    labels_by_ax = {}
    n_div = 0
    for j, (ax, panel) in enumerate(zip(axes, panels)):
        by_policy = panel.by_policy(_has_tradeoff)
        if not by_policy:
            _empty_panel(ax, j, panel, _has_tradeoff, "timings")
            continue
        for policy, runs in by_policy.items():
            for r in runs:
                runner = _runner(r)
                diverged = r.status == "diverged"
                marker = styles.style[runner][1]
                ax.plot([r.time_per_step_s * 1e6], [r.bits_of_agreement], linestyle="none",
                        marker=marker, markersize=_size(marker, 9 if diverged else 7.5),
                        markerfacecolor="white" if diverged else colors[policy],
                        markeredgecolor=colors[policy] if diverged else "white",
                        markeredgewidth=2 if diverged else 0.8, zorder=3 + styles.index(runner), clip_on=False,
                        gid=f"diverged-{n_div}" if diverged else None)
                n_div += diverged
        labels_by_ax[ax] = _reference_lines(ax, j, [r for runs in by_policy.values() for r in runs])
        ax.set_xscale("log")
        # 1-2-5 ticks in plain numbers: a decade or less of range otherwise gets one or two labels
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(_text(panel.title), fontsize=10)
        ax.set_xlabel("time per step (µs, log scale)")
        ax.set_ylabel("final bits of agreement with fp64")
        ax.set_ylim(-0.03 * top, top)
        ax.grid(True, which="both", alpha=0.3)
    policies = {name: colors[name] for name in sorted({r.spec["policy_name"] for r in drawn}, key=_policy_rank)}
    _figure_legend(fig, "Precision/speed trade-off (up and left is better)", styles, diverged=n_div > 0,
                   reference=any(labels_by_ax.values()), policies=policies)
    _caption(fig, labels_by_ax)
    return fig


# --- entry points -----------------------------------------------------------------------------------------------

def figures(report: Report) -> dict:
    """The drift and trade-off figures of a report, as ``{"drift": Figure, "tradeoff": Figure}`` (matplotlib
    Figures on an Agg canvas; nothing written). Raises PrecisionError when no result has drift to draw."""
    Figure, FigureCanvasAgg = _matplotlib()
    results = list(report.results)
    if not any(_has_drift(r) for r in results):
        statuses = sorted({r.status for r in results}) or ["no results"]
        raise PrecisionError(f"nothing to plot: no result in the report has drift figures (statuses: "
                             f"{', '.join(statuses)})")
    colors = _colors(results)
    styles = _Styles([r for r in results if _has_drift(r) or _has_tradeoff(r)])
    return {"drift": _drift_figure(results, colors, styles, Figure, FigureCanvasAgg),
            "tradeoff": _tradeoff_figure(results, colors, styles, Figure, FigureCanvasAgg)}


def _save_atomic(fig, path: Path) -> Path:
    # No date stamp in the SVG: a re-plot of the same report differs only where matplotlib salts ids.
    metadata = {"Date": None} if path.suffix == ".svg" else {}
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], metadata=metadata))


FIGURE_NAMES = ("drift", "tradeoff")  # the keys of figures(); each is written as <prefix>-<name><suffix>


def figure_paths(out_prefix: str | os.PathLike) -> dict[tuple[str, str], Path]:
    """The files :func:`plot_report` writes for ``out_prefix``, keyed by (figure name, suffix) (precision run
    checks them before training)."""
    prefix = Path(out_prefix)
    return {(name, suffix): prefix.with_name(f"{prefix.name}-{name}{suffix}")
            for name in FIGURE_NAMES for suffix in SUFFIXES}


def plot_report(report: Report, out_prefix: str | os.PathLike) -> list[Path]:
    """Write the drift and trade-off figures as PNG and SVG next to ``out_prefix``; return the paths written."""
    made = figures(report)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    return [_save_atomic(made[name], path) for (name, _), path in figure_paths(out_prefix).items()]

