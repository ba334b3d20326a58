"""Pictures of a report: drift over training steps, and the runtime-versus-drift trade-off.

``plot_report(report, out_prefix)`` writes ``<prefix>-drift.png/.svg`` (bits of agreement with the fp64 reference
at every record step; one panel per problem x optimizer, one line per backend x policy) and
``<prefix>-tradeoff.png/.svg`` (time per step, log scale, against final bits of agreement; same panels).
matplotlib is an optional extra; figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot, so nothing opens a window or touches global state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ._atomic import write_atomic
from ._terminal import safe_text
from .errors import PrecisionError
from .policy import get_policy
from .report import Report, Result
from .table import POLICY_ORDER

__all__ = ["plot_report", "SUFFIXES"]

SUFFIXES = (".png", ".svg")
_BACKEND_STYLE = {"numpy": ("-", "o"), "numba": ("--", "s"), "jax": (":", "^")}
_FALLBACK_STYLE = ("-.", "D")
_PANEL_SIZE = (5.6, 3.6)  # inches per panel
_DPI = 110


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PrecisionError("plotting needs matplotlib: pip install 'precision[plot]'") from None
    return Figure, FigureCanvasAgg


def _panel_key(r: Result) -> tuple[str, str]:
    s = r.spec
    return f"{s['problem']}:{s['data']}", s["optimizer"]["name"]


def _policy_rank(name: str) -> tuple[int, str]:
    return (POLICY_ORDER.index(name) if name in POLICY_ORDER else len(POLICY_ORDER), name)


def _colors(results) -> dict[str, str]:
    """One color per policy, the same in every panel and both figures (tab10, in the table's policy order)."""
    names = sorted({r.spec["policy_name"] for r in results}, key=_policy_rank)
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _layout(n: int, Figure, FigureCanvasAgg):
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(_PANEL_SIZE[0] * cols + 2.4, _PANEL_SIZE[1] * rows + 0.6), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _text(value: str) -> str:
    """Report text as plain figure text: control characters escaped as in the terminal, and every ``$`` escaped,
    since matplotlib reads text between two of them as mathtext and raises at draw time on what it cannot parse
    (a policy named "$\\frac$" would otherwise crash the plot)."""
    return safe_text(value).replace("$", r"\$")


def _label(r: Result) -> str:
    return _text(f"{r.spec['policy_name']} / {r.spec['backend']}-{r.spec['device']}")


def _style(r: Result) -> tuple[str, str]:
    return _BACKEND_STYLE.get(r.spec["backend"], _FALLBACK_STYLE)


def _precision_lines(ax, results, colors) -> None:
    """A faint line at each params format's precision p: about where bits of agreement top out (-log2 of the
    rounding error of the reference itself is p + ~1)."""
    seen = {}
    for r in results:
        try:
            fmt = get_policy(r.spec["policy"]).params
        except PrecisionError:
            continue
        if fmt.name != "fp64":
            seen.setdefault(fmt.name, fmt.precision)
    for name, p in seen.items():
        ax.axhline(p, color="0.75", linewidth=0.8, zorder=0)
        ax.annotate(f"{name} p={p}", (1.0, p), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.45")


def _legend(fig, axes) -> None:
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        order = sorted(handles, key=lambda lab: (_policy_rank(lab.split(" / ")[0]), lab))
        fig.legend([handles[k] for k in order], order, loc="outside right upper", fontsize=8,
                   title="policy / backend", title_fontsize=8)


def _group(results):
    panels: dict[tuple[str, str], list[Result]] = {}
    for r in sorted(results, key=lambda r: (_panel_key(r), _policy_rank(r.spec["policy_name"]),
                                            r.spec["backend"])):
        panels.setdefault(_panel_key(r), []).append(r)
    return panels


def _drift_figure(results, colors, Figure, FigureCanvasAgg):
    panels = _group(r for r in results if r.drift)
    fig, axes = _layout(len(panels), Figure, FigureCanvasAgg)
    for ax, ((case, optimizer), rows) in zip(axes, panels.items()):
        for r in rows:
            steps = [p["step"] for p in r.drift]
            bits = [0.0 if p["bits"] is None else p["bits"] for p in r.drift]
            line, marker = _style(r)
            # numpy, the reference backend, wide and light underneath: other backends that agree with it
            # stay visible on top of it instead of being hidden.
            wide = r.spec["backend"] == "numpy"
            ax.plot(steps, bits, linestyle=line, marker=marker, markersize=3, linewidth=2.4 if wide else 1.3,
                    alpha=0.55 if wide else 1.0, zorder=2 if wide else 3, color=colors[r.spec["policy_name"]],
                    label=_label(r))
            if r.status == "diverged":
                ax.plot([steps[-1]], [bits[-1]], marker="x", markersize=9, markeredgewidth=2,
                        color=colors[r.spec["policy_name"]])
                ax.annotate(f"diverged at {r.diverged_at}", (steps[-1], bits[-1]), xytext=(4, 4),
                            textcoords="offset points", fontsize=7)
        _precision_lines(ax, rows, colors)
        ax.set_title(_text(f"{case}  {optimizer}"), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("bits of agreement with fp64")
        ax.set_ylim(0, 54)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Drift from the float64 reference (higher is better; diverged runs marked x)", fontsize=11)
    _legend(fig, axes)
    return fig


def _tradeoff_figure(results, colors, Figure, FigureCanvasAgg):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    panels = _group(r for r in results if r.time_per_step_s and r.bits_of_agreement is not None)
    fig, axes = _layout(len(panels), Figure, FigureCanvasAgg)
    for ax, ((case, optimizer), rows) in zip(axes, panels.items()):
        for r in rows:
            _, marker = _style(r)
            diverged = r.status == "diverged"
            ax.scatter([r.time_per_step_s * 1e6], [r.bits_of_agreement], s=46, marker="x" if diverged else marker,
                       color=colors[r.spec["policy_name"]], label=_label(r), zorder=3)
        ax.set_xscale("log")
        # 1-2-5 ticks in plain numbers: a decade or less of range otherwise gets one or two labels
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(_text(f"{case}  {optimizer}"), fontsize=10)
        ax.set_xlabel("time per step (µs, log scale)")
        ax.set_ylabel("final bits of agreement with fp64")
        ax.set_ylim(-1, 54)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Precision/speed trade-off (up and left is better; diverged runs marked x)", fontsize=11)
    _legend(fig, axes)
    return fig


def _save_atomic(fig, path: Path) -> Path:
    # No date stamp in the SVG: a re-plot of the same report differs only where matplotlib salts ids.
    metadata = {"Date": None} if path.suffix == ".svg" else {}
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], metadata=metadata))


def plot_report(report: Report, out_prefix: str | os.PathLike) -> list[Path]:
    """Write the drift and trade-off figures as PNG and SVG next to ``out_prefix``; return the paths written."""
    Figure, FigureCanvasAgg = _matplotlib()
    results = [r for r in report.results if r.drift or r.time_per_step_s]
    if not any(r.drift for r in results):
        statuses = sorted({r.status for r in report.results}) or ["no results"]
        raise PrecisionError(f"nothing to plot: no result in the report has drift figures (statuses: "
                             f"{', '.join(statuses)})")
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    colors = _colors(results)
    written = []
    for name, make in (("drift", _drift_figure), ("tradeoff", _tradeoff_figure)):
        fig = make(results, colors, Figure, FigureCanvasAgg)
        for suffix in SUFFIXES:
            written.append(_save_atomic(fig, prefix.with_name(f"{prefix.name}-{name}{suffix}")))
    return written
