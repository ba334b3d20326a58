"""Plot styles: one colour per policy and one line style and marker per backend, fixed across every figure of
every report (precision/plot.py draws with them)."""

from __future__ import annotations

import hashlib

from ._terminal import safe_text
from .errors import PrecisionError
from .report import Result
from .table import POLICY_ORDER

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
    "#17becf",  # torch-bf16
    "#00796b",  # bf16-sr
    "#e6ab02",  # bf16-kahan
    "#c51b7d",  # torch-amp-fp16
    # for other policies: hues apart from the presets' (no second blue, green or red)
    "#bcbd22", "#0b2e6f", "#6a3d9a", "#b15928", "#01665e",
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


