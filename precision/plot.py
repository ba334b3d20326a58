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
* a panel whose runs all errored or were unavailable shows a note saying so, with the count.

matplotlib is an optional extra; figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot, so nothing opens a window or touches global state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import textwrap
from collections import Counter
from pathlib import Path

from ._atomic import write_atomic
from ._terminal import clip, safe_text
from .errors import PrecisionError
from .policy import get_policy
from .report import Report, Result
from .table import POLICY_ORDER

__all__ = ["plot_report", "figures", "SUFFIXES", "policy_color"]

SUFFIXES = (".png", ".svg")
_PANEL_SIZE = (5.6, 3.3)  # inches per panel's axes and labels, without its legend
_LEGEND_LINE = 0.165  # inches per line of a panel's legend
_DPI = 110

# Policy colours. The presets take the first ones, in the table's policy order (fp32 blue, bf16-mixed orange, ...);
# the rest is the palette other policies are hashed into. No light grey: that is the reference lines' colour.
_PALETTE = (
    "#333333",  # fp64
    "#1f77b4",  # fp32
    "#ff7f0e",  # bf16-mixed
    "#9467bd",  # fp16-mixed
    "#8c564b",  # fp16-mixed-ls
    "#2ca02c",  # bf16
    "#d62728",  # fp16
    "#e377c2",  # fp8-mixed
    # for other policies: hues apart from the presets' (no second blue, green or red)
    "#17becf", "#bcbd22", "#0b2e6f", "#e6ab02", "#00796b", "#c51b7d",
)
_PRESET_COLORS = dict(zip(POLICY_ORDER, _PALETTE))
_OTHER_COLORS = _PALETTE[len(POLICY_ORDER):]

# Backend (and device) styles: line style, marker. Fixed for the known ones; others take the spare ones in order.
_RUNNER_STYLES = {
    "numpy": ("-", "o"),
    "numba": ("--", "s"),
    "jax": (":", "^"),
    "numba-gpu": ("-.", "D"),
    "jax-gpu": ((0, (4, 1.5, 1, 1.5, 1, 1.5)), "v"),
    "numpy-gpu": ((0, (6, 2)), "P"),
}
_SPARE_STYLES = (((0, (1, 1)), "X"), ((0, (8, 2, 2, 2)), "h"), ((0, (3, 3)), "*"), ((0, (5, 1, 1, 1)), "p"))
_RUNNER_ORDER = tuple(_RUNNER_STYLES)
_LINE_WIDTHS = (3.2, 1.9, 1.2)  # the first backend wide and light underneath, the next ones thinner on top
_DIVERGED_SIZE = 10
_MARKER_SCALE = {"^": 1.2, "v": 1.2, "D": 0.85, "*": 1.3}  # triangles look smaller than squares of equal size
_REFERENCE_COLOR = "0.62"
_REFERENCE_GAP_PT = 10.5  # least vertical distance between two reference labels
_SPEC_NOT_PANEL = frozenset({"id", "policy", "policy_name", "backend", "device"})
_STATUS_VERB = {"error": "errored", "unavailable": "were unavailable"}
_STATUS_WORD = {"error": "errored"}

REFERENCE_NOTE = (
    r"Grey lines: p, the precision of each params format, $p=-\log_2(u)$ for its unit roundoff $u=2^{-p}$: the bits "
    "of agreement that one rounding of every parameter would leave. It is not a ceiling: after one rounding the "
    "whole vector's relative L2 error is at most u, so agreement starts at or above p (most values exactly "
    "representable, errors under half an ulp). Below its p line a run has lost more than one rounding's worth; "
    "above it, less.")


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PrecisionError("plotting needs matplotlib: pip install 'precision[plot]'") from None
    return Figure, FigureCanvasAgg


def _text(value: object) -> str:
    """Report text as plain figure text: control characters escaped as in the terminal, and every ``$`` escaped,
    since matplotlib reads text between two of them as mathtext and raises at draw time on what it cannot parse
    (a policy named "$\\frac$" would otherwise crash the plot)."""
    return safe_text(value).replace("$", r"\$")


# --- colours and styles ---------------------------------------------------------------------------------------

def _policy_rank(name: str) -> tuple[int, str]:
    return (POLICY_ORDER.index(name) if name in POLICY_ORDER else len(POLICY_ORDER), name)


def _hash_slot(name: str) -> int:
    # sha256, not hash(): Python salts str hashes per process, and a colour must not change between runs.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def policy_color(name: str) -> str:
    """The colour a policy has in every figure: fixed for the presets, hashed into the other colours for the rest
    (``_colors`` moves a policy on when another of the same report already has its colour)."""
    if name in _PRESET_COLORS:
        return _PRESET_COLORS[name]
    return _OTHER_COLORS[_hash_slot(name) % len(_OTHER_COLORS)]


def _colors(results) -> dict[str, str]:
    """Policy name -> colour for one report: the fixed colours, except that two non-preset policies never share one
    while free colours remain (names in sorted order, each from its hashed colour on to the next free one)."""
    colors = {}
    taken = set()
    for name in sorted({r.spec["policy_name"] for r in results} - set(_PRESET_COLORS)):
        slot = _hash_slot(name) % len(_OTHER_COLORS)
        for step in range(len(_OTHER_COLORS)):
            color = _OTHER_COLORS[(slot + step) % len(_OTHER_COLORS)]
            if color not in taken:
                break
        else:
            color = _OTHER_COLORS[slot]
        taken.add(color)
        colors[name] = color
    for r in results:
        name = r.spec["policy_name"]
        colors.setdefault(name, _PRESET_COLORS.get(name))
    return colors


def _size(marker: str, size: float) -> float:
    return size * _MARKER_SCALE.get(marker, 1.0)


def _runner(r: Result) -> str:
    """The backend's name, with the device unless it is the cpu: "numba", "jax-gpu"."""
    backend, device = r.spec["backend"], r.spec["device"]
    return backend if device == "cpu" else f"{backend}-{device}"


def _runner_rank(name: str) -> tuple[int, str]:
    return (_RUNNER_ORDER.index(name) if name in _RUNNER_ORDER else len(_RUNNER_ORDER), name)


class _Styles:
    """Line style, marker, width and marker stagger per backend of one report."""

    def __init__(self, results):
        self.runners = sorted({_runner(r) for r in results}, key=_runner_rank)
        spare = iter(_SPARE_STYLES * (1 + len(self.runners)))
        self.style = {name: _RUNNER_STYLES[name] if name in _RUNNER_STYLES else next(spare) for name in self.runners}

    def index(self, runner: str) -> int:
        return self.runners.index(runner)

    def line_kwargs(self, runner: str, n_points: int) -> dict:
        i, k = self.index(runner), len(self.runners)
        linestyle, marker = self.style[runner]
        # Each backend marks its own record steps (i, i + k, ...), so lines that coincide still show every
        # backend's marker; too short a line to share out marks every point, shapes nested by size.
        markevery = (i, k) if k > 1 and n_points >= 2 * k else None
        if k == 1:
            return dict(linestyle=linestyle, marker=marker, markersize=4, linewidth=1.6, zorder=2)
        return dict(linestyle=linestyle, marker=marker, markevery=markevery,
                    markersize=max(3.5, 6.5 - 1.2 * i) if markevery is None else 5.5,
                    linewidth=_LINE_WIDTHS[min(i, len(_LINE_WIDTHS) - 1)], alpha=0.5 if i == 0 else 1.0,
                    zorder=2 + i)


# --- grouping ---------------------------------------------------------------------------------------------------

def _settings(r: Result) -> dict:
    """Everything in a spec except the policy and the backend: runs with equal settings share a panel."""
    return {k: v for k, v in r.spec.items() if k not in _SPEC_NOT_PANEL}


def _settings_key(r: Result) -> str:
    return json.dumps(_settings(r), sort_keys=True, default=str)


def _flat(settings: dict) -> dict:
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update({kk: vv for kk, vv in v.items() if kk != "name"})
        else:
            out[k] = v
    return out


class _Panel:
    def __init__(self, runs: list[Result]):
        first = runs[0].spec
        self.base = f"{first['problem']}:{first['data']}  {first['optimizer']['name']}"
        self.settings = _flat(_settings(runs[0]))
        self.runs = sorted(runs, key=lambda r: (_policy_rank(r.spec["policy_name"]), _runner_rank(_runner(r))))
        self.title = self.base

    def by_policy(self, drawable) -> dict[str, list[Result]]:
        out: dict[str, list[Result]] = {}
        for r in self.runs:
            if drawable(r):
                out.setdefault(r.spec["policy_name"], []).append(r)
        return out

    def not_drawn(self, drawable) -> list[Result]:
        return [r for r in self.runs if not drawable(r)]


def _panels(results) -> list[_Panel]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(_settings_key(r), []).append(r)
    panels = [_Panel(runs) for runs in groups.values()]
    panels.sort(key=lambda p: (p.base, json.dumps(p.settings, sort_keys=True, default=str)))
    # Settings that differ between panels of one problem and optimizer go in their titles ("lr=0.01  seed=1").
    by_base: dict[str, list[_Panel]] = {}
    for p in panels:
        by_base.setdefault(p.base, []).append(p)
    for same in by_base.values():
        keys = sorted({k for p in same for k in p.settings})
        varying = [k for k in keys if len({json.dumps(p.settings.get(k), default=str) for p in same}) > 1]
        for p in same:
            details = "  ".join(f"{k}={p.settings.get(k)}" for k in varying)
            p.title = f"{p.base}  {details}" if details else p.base
    return panels


def _has_drift(r: Result) -> bool:
    return bool(r.drift) or (r.status == "diverged" and r.diverged_at is not None)


def _has_tradeoff(r: Result) -> bool:
    return bool(r.time_per_step_s) and r.bits_of_agreement is not None


def _join(names) -> str:
    return ", ".join(_text(n) for n in names)


# --- shared panel pieces ----------------------------------------------------------------------------------------

def _layout(n: int, Figure, FigureCanvasAgg, *, extra_height: list[float] | None = None, header: float = 0.9,
            footer: float = 0.0):
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    extra = extra_height or [0.0] * n
    row_heights = [_PANEL_SIZE[1] + max(extra[r * cols:(r + 1) * cols]) for r in range(rows)]
    fig = Figure(figsize=(_PANEL_SIZE[0] * cols + 0.9 * cols, sum(row_heights) + header + footer), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"height_ratios": row_heights}).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _empty_panel(ax, index: int, panel: _Panel, drawable, what: str) -> None:
    """The note that replaces a panel none of whose runs can be drawn: how many, and why."""
    runs = panel.not_drawn(drawable)
    counts = Counter(r.status for r in runs)
    n = len(runs)
    runs_text = f"{n} run{'s' if n != 1 else ''}"
    if set(counts) <= set(_STATUS_VERB):
        verbs = " or ".join(_STATUS_VERB[s] for s in sorted(counts))
        head = f"all {runs_text} of this panel {verbs}" if n > 1 else f"its one run {verbs.replace('were', 'was')}"
    else:
        head = f"none of its {runs_text} has {what} to draw"
    lines = [f"nothing to draw: {head}"]
    if len(counts) > 1 or not set(counts) <= set(_STATUS_VERB):
        lines.append("(" + ", ".join(f"{c} {_STATUS_WORD.get(s, _text(s))}" for s, c in sorted(counts.items())) + ")")
    first = next((r.message for r in runs if r.message), "")
    if first:
        lines.append(clip(f"e.g. {safe_text(first)}", 70, middle=True).replace("$", r"\$"))
    ax.set_title(_text(panel.title), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("0.8")
    ax.text(0.5, 0.5, "\n".join(lines), transform=ax.transAxes, ha="center", va="center", fontsize=9,
            color="0.3", gid=f"empty-panel-{index}")


def _params_formats(runs) -> dict[str, int]:
    """Params format name -> precision p, for the formats of these runs (not fp64: that is the reference)."""
    seen = {}
    for r in runs:
        try:
            fmt = get_policy(r.spec["policy"]).params
        except (PrecisionError, KeyError, TypeError, ValueError):
            continue
        if fmt.name != "fp64":
            seen.setdefault(fmt.name, fmt.precision)
    return seen


def _reference_lines(ax, index: int, runs) -> list:
    """A faint line at each params format's precision p, labelled in the right margin; the labels move apart
    whenever the figure is drawn (``_label_class``)."""
    from matplotlib.transforms import IdentityTransform
    group: list = []
    for k, (name, p) in enumerate(sorted(_params_formats(runs).items(), key=lambda item: item[1])):
        ax.axhline(p, color=_REFERENCE_COLOR, linewidth=0.9, linestyle=(0, (6, 2)), zorder=1,
                   gid=f"reference-{index}-{k}")
        label = _label_class()(_text(f"{name} p={p}"), (1.0, p), xycoords=("axes fraction", "data"),
                               xytext=(8, 0), textcoords="offset points", ha="left", va="center", fontsize=7,
                               color="0.35", annotation_clip=False, clip_on=False,
                               arrowprops=dict(arrowstyle="-", color=_REFERENCE_COLOR, linewidth=0.7,
                                               shrinkA=0, shrinkB=0))
        label.set_transform(IdentityTransform())  # as Axes.annotate does
        label.group = group
        group.append(label)
        ax.add_artist(label)
    return group


_LABEL_CLASS = None


def _label_class():
    """An Annotation that, when drawn, first moves the reference labels of its panel apart vertically (at least
    _REFERENCE_GAP_PT points), each joined to its line by a short leader. Placed at draw time, where the layout is
    final, so the figure needs no extra layout pass; defined on first use, as matplotlib is imported lazily."""
    global _LABEL_CLASS
    if _LABEL_CLASS is None:
        from matplotlib.text import Annotation

        class ReferenceLabel(Annotation):
            group: list  # the labels of its panel, this one included

            def draw(self, renderer):
                _place_labels(self.group)
                super().draw(renderer)

        _LABEL_CLASS = ReferenceLabel
    return _LABEL_CLASS


def _place_labels(labels) -> None:
    if not labels:
        return
    ax = labels[0].axes
    dpi = ax.figure.dpi
    gap = _REFERENCE_GAP_PT * dpi / 72
    targets = [ax.transData.transform((0, label.xy[1]))[1] for label in labels]
    order = sorted(range(len(labels)), key=lambda i: targets[i])
    pos = {}
    last = -math.inf
    for i in order:
        pos[i] = max(targets[i], last + gap)
        last = pos[i]
    top = ax.bbox.y1 + gap / 2
    nxt = math.inf
    for i in reversed(order):  # pushed past the top: back down, keeping the gaps
        pos[i] = min(pos[i], top, nxt - gap)
        nxt = pos[i]
    for i, label in enumerate(labels):
        label.xyann = (8, (pos[i] - targets[i]) * 72 / dpi)


def _caption(fig, labels_by_ax) -> None:
    """What the grey lines mean, under the panels, wrapped to the figure's width."""
    if any(labels_by_ax.values()):
        chars = int(fig.get_figwidth() * 72 / 4.4)  # about 4.4 points a character at 7.5 points
        lines = math.ceil(len(REFERENCE_NOTE) / chars)
        even = math.ceil(len(REFERENCE_NOTE) / lines) + 12  # lines of about equal length, no short last one
        text = "\n".join(textwrap.wrap(REFERENCE_NOTE, min(chars, even), break_on_hyphens=False))
        fig.supxlabel(text, fontsize=7.5, color="0.25", ha="center")


def _y_top(values) -> float:
    top = max([v for v in values if v is not None] or [0.0])
    return min(54.0, max(12.0, math.ceil((top + 3) / 2) * 2))


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


def plot_report(report: Report, out_prefix: str | os.PathLike) -> list[Path]:
    """Write the drift and trade-off figures as PNG and SVG next to ``out_prefix``; return the paths written."""
    made = figures(report)
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in made.items():
        for suffix in SUFFIXES:
            written.append(_save_atomic(fig, prefix.with_name(f"{prefix.name}-{name}{suffix}")))
    return written
