"""precision plot / plot_report: PNG and SVG files for drift and the trade-off, from the API, the CLI and
``precision run --plot``; a clear error without matplotlib or without anything to plot; and figures a reader can
trust: one colour per policy in every figure, backends told apart where their lines coincide (and said to be
identical), one marker per diverged run, reference labels off the curves and apart, failed panels explained.

Reports are built by hand (no training), so the whole file runs in seconds; figures are inspected as matplotlib
objects through ``precision.plot.figures``, the function ``plot_report`` saves."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from precision.cli import main as cli_main
from precision.errors import PrecisionError
from precision.policy import get_policy
from precision.report import Report, Result

matplotlib = pytest.importorskip("matplotlib", reason="plotting is the optional extra precision[plot]")
import matplotlib.colors  # noqa: E402
import matplotlib.image  # noqa: E402
import matplotlib.text  # noqa: E402

from precision.plot import figures, plot_report, policy_color  # noqa: E402  (after the skip)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BACKENDS = ("numpy", "numba", "jax")
OPTIMIZER = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
             "betas": [0.9, 0.999], "eps": 1e-8}


def _result(problem="logreg", optimizer="sgd", policy="fp32", backend="numpy", device="cpu", *, status="ok",
            bits=None, diverged_at=None, time=1e-5, message="") -> Result:
    """One hand-made result: ``bits`` is the drift trajectory's bits at steps 0, 10, 20, ..."""
    policy_text = str(get_policy(policy)) if "=" not in policy else policy
    spec = {"problem": problem, "data": "synthetic", "optimizer": {**OPTIMIZER, "name": optimizer},
            "policy": policy_text, "policy_name": policy, "backend": backend, "device": device, "steps": 60,
            "seed": 0, "batch_size": 128, "record_every": 10,
            "id": f"{problem}:synthetic/{optimizer}/{policy}/{backend}-{device}"}
    drift = tuple({"step": 10 * i, "rel_l2": 2.0 ** -b if b else None, "bits": b} for i, b in enumerate(bits or ()))
    if status in ("error", "unavailable"):
        return Result(spec=spec, status=status, message=message or f"{backend} cannot run")
    final = drift[-1]["bits"] if drift else None
    return Result(spec=spec, status=status, time_per_step_s=time, bits_of_agreement=final,
                  rel_l2=None if status == "diverged" else 2.0 ** -final, diverged_at=diverged_at, drift=drift)


def _hand_report() -> Report:
    """Three panels. logreg sgd: fp32 differs between backends; bf16 and fp16 are identical on all three, fp16
    diverging at step 20 on each; one fp32 run on a GPU is unavailable. mlp adam: every run errored or was
    unavailable. logreg adam: one run."""
    results = []
    for i, backend in enumerate(BACKENDS):
        results.append(_result(backend=backend, bits=[25.0 + 0.1 * i, 23.5, 23.0 - 0.2 * i, 22.8, 22.7, 22.6, 22.6],
                               time=(1 + i) * 1e-5))
        results.append(_result(policy="bf16", backend=backend, bits=[9.0, 7.5, 6.6, 6.2, 6.1, 6.0, 6.0],
                               time=(2 + i) * 1e-5))
        results.append(_result(policy="fp16", backend=backend, status="diverged", bits=[12.0, 10.5, 0.0],
                               diverged_at=20, time=(3 + i) * 1e-5))
    results.append(_result(device="gpu", status="unavailable", message="no CUDA device"))
    results += [_result("mlp", "adam", backend=b, status="error", message="RuntimeError: boom\nin a kernel")
                for b in ("numpy", "numba")]
    results.append(_result("mlp", "adam", backend="jax", status="unavailable"))
    results.append(_result(optimizer="adam", policy="bf16-mixed", backend="numba", bits=[9.0, 9.2, 9.1]))
    return Report(results=tuple(results), environment={"python": "3"}, created="")


@pytest.fixture(scope="module")
def report() -> Report:
    return _hand_report()


@pytest.fixture(scope="module")
def figs(report):
    return figures(report)


def _panels(fig) -> dict:
    """Visible axes by title (the figure legend is not an axes)."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def _gid_lines(ax, prefix):
    return [line for line in ax.get_lines() if (line.get_gid() or "").startswith(prefix)]


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _rgb(color) -> tuple:
    return tuple(round(c, 4) for c in matplotlib.colors.to_rgb(color))


# --- what the figures show --------------------------------------------------------------------------------------

def test_drift_lines_styles_and_divergence_markers(figs, report):
    panels = _panels(figs["drift"])
    assert set(panels) == {"logreg:synthetic  sgd", "logreg:synthetic  adam", "mlp:synthetic  adam"}
    all_runs = [line for ax in panels.values() for line in _gid_lines(ax, "run-")]
    assert len(all_runs) == sum(1 for r in report.results if r.drift)  # one line per run with drift
    ax = panels["logreg:synthetic  sgd"]
    runs = _gid_lines(ax, "run-")
    assert len(runs) == 9
    fp32 = [line for line in runs if _rgb(line.get_color()) == _rgb(policy_color("fp32"))]
    assert len(fp32) == 3
    # Backends told apart: their own line style and marker, and markers on different record steps.
    assert len({(str(line.get_linestyle()), line.get_marker()) for line in fp32}) == 3
    assert len({str(line.get_markevery()) for line in fp32}) == 3
    # One divergence marker per diverged run, in its backend's shape, all three apart.
    diverged = [line for a in panels.values() for line in _gid_lines(a, "diverged-")]
    assert len(diverged) == sum(r.status == "diverged" for r in report.results) == 3
    assert len({line.get_marker() for line in diverged}) == 3
    assert {tuple(line.get_xdata()) for line in diverged} == {(20,)}
    assert all(_rgb(line.get_markeredgecolor()) == _rgb(policy_color("fp16")) for line in diverged)
    assert len({tuple(line.get_transform().transform((20, 0))) for line in diverged}) == 3  # drawn side by side


def test_identical_backends_said_in_the_legend(figs):
    texts = _legend_texts(_panels(figs["drift"])["logreg:synthetic  sgd"])
    by_policy = {t.split("\n")[0]: t for t in texts}
    assert "identical on numpy, numba, jax" in by_policy["bf16"]
    assert "identical" not in by_policy["fp32"]  # differ after step 10
    assert "identical on numpy, numba, jax" in by_policy["fp16"]
    assert "diverged at step 20 on numpy, numba, jax" in by_policy["fp16"]
    assert any(t.startswith("not drawn: 1 unavailable (fp32 on numpy-gpu)") for t in texts)


def test_a_failed_panel_says_so(figs):
    for fig in figs.values():
        ax = _panels(fig)["mlp:synthetic  adam"]
        assert not ax.get_lines() and not ax.collections
        (note,) = [t for t in ax.texts if (t.get_gid() or "").startswith("empty-panel")]
        text = note.get_text()
        assert "all 3 runs of this panel errored or were unavailable" in text
        assert "2 errored, 1 unavailable" in text
        assert "\\n" in text and "\n in a kernel" not in text  # the message escaped, as on the terminal


def test_one_colour_per_policy_in_both_figures_and_every_report(figs):
    def colours(fig, role):
        out = {}
        for ax in _panels(fig).values():
            for line in _gid_lines(ax, role):
                out.setdefault(line.get_gid(), set()).add(_rgb(line.get_color() if role == "run-"
                                                               else line.get_markerfacecolor()))
        return {c for cs in out.values() for c in cs}

    drift = colours(figs["drift"], "run-")
    presets = {_rgb(policy_color(p)) for p in ("fp32", "bf16", "fp16", "bf16-mixed")}
    assert drift == presets
    trade = set()
    for ax in _panels(figs["tradeoff"]).values():
        trade |= {_rgb(line.get_markerfacecolor()) for line in ax.get_lines()
                  if line.get_gid() is None and line.get_marker() not in ("None", "", None)}
        trade |= {_rgb(line.get_markeredgecolor()) for line in _gid_lines(ax, "diverged-")}
    assert trade == presets
    # Fixed, not assigned in order of appearance: a report of fp16 alone draws it in fp16's colour too.
    alone = Report(results=(_result(policy="fp16", bits=[11.0, 10.0]),), environment={})
    (line,) = _gid_lines(_panels(figures(alone)["drift"])["logreg:synthetic  sgd"], "run-")
    assert _rgb(line.get_color()) == _rgb(policy_color("fp16"))


def test_other_policies_hash_to_distinct_stable_colours():
    names = ["p=bf16,c=fp32", "p=fp16,c=fp32", "p=bf16,c=bf16,a=fp32,s=fp32,m=fp32"]
    results = tuple(_result(policy=name, bits=[9.0, 8.0]) for name in names)
    fig = figures(Report(results=results, environment={}))["drift"]
    lines = _gid_lines(next(iter(_panels(fig).values())), "run-")
    colours = [_rgb(line.get_color()) for line in lines]
    assert len(set(colours)) == 3
    assert not set(colours) & {_rgb(policy_color(p)) for p in ("fp32", "bf16", "fp16", "bf16-mixed", "fp64")}
    assert policy_color(names[0]) == policy_color(names[0])  # sha256, not the salted hash()


def _text_box(label, renderer):
    """The label's text alone (an Annotation's own extent also holds its leader, which reaches down to the line)."""
    return matplotlib.text.Text.get_window_extent(label, renderer)


def test_reference_labels_apart_and_off_the_curves(figs):
    fig = figs["drift"]
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    ax = _panels(fig)["logreg:synthetic  sgd"]
    labels = [t for t in ax.texts if " p=" in t.get_text()]
    assert sorted(t.get_text() for t in labels) == ["bf16 p=8", "fp16 p=11", "fp32 p=24"]
    boxes = [_text_box(t, renderer) for t in labels]
    right = ax.get_window_extent(renderer).x1
    assert all(box.x0 >= right for box in boxes)  # in the right margin, not over the curves
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    caption = fig.get_supxlabel()
    assert "not a ceiling" in caption and "one rounding" in caption


def test_labels_pushed_apart_when_formats_are_close():
    results = (_result(policy="p=fp8_e5m2,c=fp32", bits=[4.0, 3.0]), _result(policy="p=fp8_e4m3fn,c=fp32",
                                                                             bits=[5.0, 4.0]),
               _result(policy="fp64", bits=[53.0, 53.0]))
    fig = figures(Report(results=results, environment={}))["drift"]
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    ax = next(iter(_panels(fig).values()))
    boxes = [_text_box(t, renderer) for t in ax.texts if " p=" in t.get_text()]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1])  # p=3 and p=4 are 1 bit apart on a 54-bit axis


# --- files, CLI, errors -----------------------------------------------------------------------------------------

def _check_files(paths, prefix):
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{prefix}-{kind}.{ext}" for kind in ("drift", "tradeoff") for ext in ("png", "svg"))
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC)
            pixels = matplotlib.image.imread(path)[..., :3]
            # Axes, text and grid are gray; only data are drawn in color. A figure whose data went missing has no
            # saturated pixel.
            saturated = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.2
            assert saturated.sum() >= 50
        else:
            assert data.lstrip().startswith(b"<?xml") and b"<svg" in data and data.rstrip().endswith(b"</svg>")


def test_plot_report_writes_png_and_svg(tmp_path, report):
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        paths = plot_report(report, tmp_path / "sub" / "report")
    _check_files(paths, "report")
    assert all(p.parent == tmp_path / "sub" for p in paths)
    assert not list((tmp_path / "sub").glob(".*tmp"))  # atomic writes leave no temp files behind
    # The SVG carries its text as text: panel titles, backends, policies and their notes.
    svg = (tmp_path / "sub" / "report-drift.svg").read_text()
    for text in ("logreg:synthetic  sgd", "mlp:synthetic  adam", "numpy", "numba", "jax", "bf16-mixed",
                 "identical on numpy, numba, jax", "diverged at step 20", "not a ceiling"):
        assert text in svg


def test_report_text_is_escaped(tmp_path):
    evil = "$\\frac$\x1b[31m"
    results = (_result(policy="fp32", bits=[20.0, 19.0]),
               dataclasses.replace(_result(policy="fp16", bits=[9.0, 8.0]),
                                   spec={**_result(policy="fp16", bits=[1.0]).spec, "policy_name": evil, "id": "x"}))
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figures(Report(results=results, environment={}))["drift"].savefig(tmp_path / "e.svg", format="svg")
    svg = (tmp_path / "e.svg").read_text()
    assert "\x1b" not in svg and "\\x1b[31m" in svg


def test_cli_plot(tmp_path):
    small = Report(results=(_result(bits=[20.0, 19.0]), _result(policy="bf16", bits=[8.0, 7.0])), environment={})
    path = small.save(tmp_path / "in" / "rep.json")
    proc = subprocess.run([sys.executable, "-m", "precision", "plot", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_files(list((tmp_path / "out").iterdir()), "rep")
    assert proc.stdout.count("plot written to") == 4


def test_run_with_plot_writes_next_to_the_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli_main(["run", "--problem", "logreg", "--data", "breast_cancer", "--policy", "fp32", "--optimizer",
                     "sgd", "--backend", "numpy", "--steps", "20", "--record-every", "10", "--out", str(out),
                     "--quiet", "--plot"])
    assert code == 0
    _check_files([p for p in tmp_path.iterdir() if p.suffix not in (".json", ".jsonl")], "r")
    capsys.readouterr()


def test_nothing_to_plot_is_an_error(tmp_path, report):
    unavailable = dataclasses.replace(report, results=tuple(r for r in report.results
                                                            if r.status == "unavailable"))
    with pytest.raises(PrecisionError, match="nothing to plot.*unavailable"):
        plot_report(unavailable, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_names_the_extra(tmp_path, report, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(PrecisionError, match=r"pip install 'precision\[plot\]'"):
        plot_report(report, tmp_path / "x")
    assert not list(tmp_path.iterdir())
