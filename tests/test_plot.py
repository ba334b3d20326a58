"""precision plot / plot_report: PNG and SVG files for drift and the trade-off, from the API, the CLI and
``precision run --plot``; a clear error without matplotlib or without anything to plot."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from precision import build_specs, run
from precision.cli import main as cli_main
from precision.errors import PrecisionError
from precision.report import Report

matplotlib = pytest.importorskip("matplotlib", reason="plotting is the optional extra precision[plot]")
import matplotlib.image  # noqa: E402

from precision.plot import plot_report  # noqa: E402  (after the skip: the module itself imports lazily anyway)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> Report:
    """Two problems x two optimizers, so both figures have several panels; fp16 Adam on the MLP diverges at step
    1 (its eps underflows), numpy on a GPU is unavailable: the plot must cope with both."""
    specs = build_specs(["logreg"], ["sgd", "adam"], ["fp32", "bf16"], data=["breast_cancer"], steps=40,
                        record_every=10)
    specs += build_specs(["mlp"], ["adam"], ["fp32", "fp16"], data=["digits"], steps=40, record_every=10)
    specs += build_specs(["logreg"], ["sgd"], ["fp32"], data=["breast_cancer"], devices=("gpu",), steps=40)
    result = run(specs)
    assert {r.status for r in result.results} == {"ok", "diverged", "unavailable"}  # the premise
    return result


def _check_files(paths, prefix):
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{prefix}-{kind}.{ext}" for kind in ("drift", "tradeoff") for ext in ("png", "svg"))
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC)
            pixels = matplotlib.image.imread(path)[..., :3]
            # Axes, text and grid are gray; only data are drawn in color. A figure whose data went missing has no
            # saturated pixel; the smallest figure here (one scatter marker and its legend entry) has ~240.
            saturated = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.2
            assert saturated.sum() >= 50
        else:
            assert data.lstrip().startswith(b"<?xml") and b"<svg" in data and data.rstrip().endswith(b"</svg>")


def test_plot_report_writes_png_and_svg(tmp_path, report):
    paths = plot_report(report, tmp_path / "sub" / "report")
    _check_files(paths, "report")
    assert all(p.parent == tmp_path / "sub" for p in paths)
    assert not list((tmp_path / "sub").glob(".*tmp"))  # atomic writes leave no temp files behind


def test_svg_text_names_panels_and_lines(tmp_path, report):
    """The drift SVG carries its text as text: panel titles and every plotted backend x policy in the legend."""
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        paths = plot_report(report, tmp_path / "r")
    svg = next(p for p in paths if p.name == "r-drift.svg").read_text()
    for text in ("logreg:breast_cancer  sgd", "logreg:breast_cancer  adam", "mlp:digits  adam",
                 "fp32 / numpy-cpu", "bf16 / numpy-cpu", "fp16 / numpy-cpu", "diverged at 1"):
        assert text in svg
    assert "gpu" not in svg  # the unavailable result has nothing to draw


def test_cli_plot(tmp_path, report):
    path = report.save(tmp_path / "in" / "rep.json")
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
    _check_files([p for p in tmp_path.iterdir() if p.suffix != ".json"], "r")
    capsys.readouterr()


def test_nothing_to_plot_is_an_error(tmp_path, report):
    unavailable = dataclasses.replace(report, results=tuple(r for r in report.results
                                                            if r.status == "unavailable"))
    with pytest.raises(PrecisionError, match="nothing to plot.*unavailable"):
        plot_report(unavailable, tmp_path / "x")


def test_missing_matplotlib_names_the_extra(tmp_path, report, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(PrecisionError, match=r"pip install 'precision\[plot\]'"):
        plot_report(report, tmp_path / "x")
    assert not list(tmp_path.iterdir())
