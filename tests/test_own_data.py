"""Own data (``--data PATH.npz`` / ``--data PATH.csv:COLUMN``, precision.owndata): loading, the task inferred and
checked against the problem, the split and standardisation, and one line for every malformed file."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from precision.data import make_dataset
from precision.errors import SpecError
from precision.optim import make_optimizer
from precision.owndata import infer_task
from precision.policy import PRESETS
from precision.runner import run, validate
from precision.spec import RunSpec

DATA = Path(__file__).parent / "data"
CSV = f"{DATA / 'two_classes.csv'}:label"
NPZ = str(DATA / "three_blobs.npz")


def test_a_csv_trains_with_a_seeded_split_standardised_on_the_training_rows():
    ds = make_dataset("logreg", CSV, seed=3, steps=5, batch_size=32)
    assert ds.classes == 2 and ds.X_train.shape == (192, 5) and ds.X_test.shape == (48, 5)  # 240 rows, 80/20
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-12)  # train statistics only
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=1e-12)
    assert not np.allclose(ds.X_test.mean(axis=0), 0, atol=1e-3)
    again = make_dataset("logreg", CSV, seed=3, steps=5, batch_size=32)
    other = make_dataset("logreg", CSV, seed=4, steps=5, batch_size=32)
    assert np.array_equal(ds.X_train, again.X_train) and not np.array_equal(ds.X_train, other.X_train)


def test_an_npz_keeps_its_own_test_split():
    ds = make_dataset("softmax", NPZ, seed=0)
    raw = np.load(NPZ)
    assert ds.classes == 3 and len(ds.X_train) == 300 and len(ds.X_test) == 90
    mean, std = raw["X"].mean(axis=0), raw["X"].std(axis=0)
    np.testing.assert_allclose(ds.X_test, (raw["X_test"] - mean) / std, rtol=1e-12)
    assert np.array_equal(ds.y_test, raw["y_test"])


def test_runs_report_the_file_and_its_hash():
    specs = [RunSpec(problem=p, data=d, optimizer=make_optimizer("adam"), policy=PRESETS["bf16"], steps=20)
             for p, d in (("logreg", CSV), ("mlp", NPZ), ("linreg", CSV))]
    report = run(validate(specs))
    assert [r.status for r in report.results] == ["ok"] * 3
    digest = hashlib.sha256((DATA / "two_classes.csv").read_bytes()).hexdigest()
    assert report.results[0].spec["data"] == CSV and report.results[0].spec["data_sha256"] == digest


@pytest.mark.parametrize("y, task", [([0, 1, 1, 0], ("binary", 2)), ([3, 1, 2, 2], ("multiclass", 3)),
                                      ([0.5, 1, 2, 3], ("regression", 0)), (list(range(101)), ("regression", 0))])
def test_task_is_inferred_from_the_target(y, task):
    assert infer_task(np.asarray(y, dtype=np.float64)) == task


def test_the_task_must_fit_the_problem():
    with pytest.raises(SpecError, match="problem 'logreg' is binary; data .* has 3 classes"):
        validate([RunSpec(problem="logreg", data=NPZ, optimizer=make_optimizer("adam"), policy=PRESETS["fp32"])])
    # a regression problem reads any numeric target as values: the 0/1 labels of the CSV are a regression target
    assert make_dataset("linreg", CSV).classes == 0


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_text(content)
    return str(path)


ROWS = "".join(f"{i},{i * 2 % 7},{i % 2}\n" for i in range(20))
MALFORMED = {
    "missing column": ("d.csv", "a,b,label\n" + ROWS, ":target", "has no column 'target'; its columns: a, b, label"),
    "no column named": ("d.csv", "a,b,label\n" + ROWS, "", "name the target column as"),
    "a string": ("d.csv", "a,b,label\n1,2,0\n3,x,1\n" + ROWS, ":label", "line 3, column 'b': 'x' is not a number"),
    "NaN": ("d.csv", "a,b,label\n1,nan,0\n" + ROWS, ":label", "X has 1 NaN or infinite value(s) (first at row 0"),
    "one class": ("d.csv", "a,b,label\n" + "".join(f"{i},{i},1\n" for i in range(20)), ":label", "one value (1)"),
    "too few rows": ("d.csv", "a,b,label\n1,2,0\n2,3,1\n3,1,0\n", ":label", "has 3 rows; at least 10 are needed"),
    "ragged row": ("d.csv", "a,b,label\n1,2\n" + ROWS, ":label", "line 2: 2 cells, the header has 3"),
    "empty": ("d.csv", "", ":label", "is empty"),
    "no y": ("d.npz", {"X": np.ones((20, 2))}, "", "has no array 'y'; it has 'X'"),
    "strings in npz": ("d.npz", {"X": np.ones((20, 2)), "y": np.array(["a"] * 20)}, "", "holds <U1 values"),
    "X_test alone": ("d.npz", {"X": np.ones((20, 2)), "y": np.arange(20) % 2, "X_test": np.ones((5, 2))}, "",
                     "has X_test without y_test"),
    "test features": ("d.npz", {"X": np.random.default_rng(0).normal(size=(20, 2)), "y": np.arange(20) % 2,
                                "X_test": np.ones((5, 3)), "y_test": np.arange(5) % 2}, "", "expected 2 features"),
    "rows differ": ("d.npz", {"X": np.ones((20, 2)), "y": np.arange(19) % 2}, "", "X has 20 rows, y has 19"),
    "not an npz": ("d.npz", "plain text", "", "is not a readable .npz file"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_every_malformed_file_is_one_line(tmp_path, case):
    name, content, suffix, message = MALFORMED[case]
    data = _write(tmp_path, name, content) + suffix
    with pytest.raises(SpecError) as err:
        validate([RunSpec(problem="logreg", data=data, optimizer=make_optimizer("adam"), policy=PRESETS["fp32"])])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_command_line_gives_exit_2_and_one_line(tmp_path):
    data = _write(tmp_path, "d.csv", "a,b,label\n1,x,0\n" + ROWS) + ":label"
    proc = subprocess.run([sys.executable, "-m", "precision", "run", "--data", data, "--problem", "logreg",
                           "--backend", "numpy", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'x' is not a number" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    proc = subprocess.run([sys.executable, "-m", "precision", "run", "--data", str(tmp_path / "nothere.npz"),
                           "--problem", "logreg", "--backend", "numpy"], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and proc.stderr.count("\n") == 1
