"""Plot layout: panels grouped by run settings, figure grids, empty-panel notes, the reference lines and their
margin labels (precision/plot.py draws the figures with them)."""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter

from ._terminal import clip, safe_text
from ._plot_style import (_DPI, _PANEL_SIZE, _REFERENCE_COLOR, _REFERENCE_GAP_PT, _SPEC_NOT_PANEL, _STATUS_VERB,
                          _STATUS_WORD, REFERENCE_NOTE, _policy_rank, _runner, _runner_rank, _text)
from .errors import PrecisionError
from .policy import get_policy
from .report import Result

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


