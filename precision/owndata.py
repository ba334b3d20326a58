"""Your own data: ``--data PATH.npz`` or ``--data PATH.csv:COLUMN`` (docs/own_data.md).

* ``.npz``: arrays ``X`` (rows x features) and ``y`` (rows), optionally ``X_test`` and ``y_test`` (both or neither;
  without them the rows are split 80/20 by the run's seed, as the built-in data sets are).
* ``.csv``: a header row naming the columns, numbers in every cell; ``:COLUMN`` names the target column, every other
  column is a feature.

The task is inferred from the target: a target whose values are all integers and take 2 distinct values is binary,
3..MAX_CLASSES distinct integer values multiclass (labels mapped to 0..K-1 in increasing order), anything else a
regression. A regression problem (linreg) trains on any numeric target; logreg needs a binary one, softmax and mlp
a binary or multiclass one. Every malformed file is one SpecError line naming the file and the problem: a missing
file, array or column, a cell that is not a number, NaN or inf, a feature count that differs between the splits,
one class, a constant target, too few rows.

A file is read once per process (cached by path, size and modification time); its content hash (sha256) is what
the report records next to the path, so a report says which data it was measured on.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import SpecError

__all__ = ["FILE_SUFFIXES", "MAX_CLASSES", "MIN_ROWS", "is_file_source", "parse_source", "FileData", "load_file",
           "infer_task"]

FILE_SUFFIXES = (".npz", ".csv")
MAX_CLASSES = 100  # more distinct integer targets than this are a regression (counts, scores)
MIN_ROWS = 10  # rows of a file without a test split: 8 train and 2 test at the 80/20 split


def is_file_source(data: str) -> bool:
    """Whether ``data`` names a file (``PATH.npz``, ``PATH.csv`` or ``PATH.csv:COLUMN``) rather than a built-in
    data set."""
    path, _ = _split(data)
    return path.lower().endswith(FILE_SUFFIXES)


def _split(data: str) -> tuple[str, str | None]:
    head, sep, tail = str(data).rpartition(":")
    if sep and head.lower().endswith(".csv"):
        return head, tail
    return str(data), None


def parse_source(data: str) -> tuple[Path, str | None]:
    """(path, target column) of a file source; SpecError for a CSV without a target column or an npz with one."""
    path, column = _split(data)
    if path.lower().endswith(".csv") and not column:
        raise SpecError(f"data file {path!r}: name the target column as {path}:COLUMN")
    if path.lower().endswith(".npz") and column is not None:
        raise SpecError(f"data file {path!r}: an .npz file has its target in array 'y'; drop ':{column}'")
    return Path(path), column


@dataclasses.dataclass(frozen=True, eq=False)
class FileData:
    """A loaded data file: float64 features and targets as in the file, the test split when the file has one, the
    inferred task and class count (0: regression), and the content hash."""
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray | None
    y_test: np.ndarray | None
    task: str  # "regression", "binary", "multiclass"
    classes: int
    sha256: str

    def labels(self, y: np.ndarray) -> np.ndarray:
        """Targets of a classification file as int64 labels 0..K-1 (the distinct values in increasing order)."""
        values = np.unique(self.y if self.y_test is None else np.concatenate([self.y, self.y_test]))
        return np.searchsorted(values, y).astype(np.int64)

    @property
    def train_rows(self) -> int | None:
        """Rows of the file's own train split, None when the rows are split by seed."""
        return None if self.X_test is None else len(self.X)

    @property
    def samples(self) -> int:
        return len(self.X) + (0 if self.X_test is None else len(self.X_test))


_CACHE: dict[tuple, FileData] = {}


def load_file(data: str) -> FileData:
    """The file named by ``data``, checked (module docstring); cached per process."""
    path, column = parse_source(data)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SpecError(f"data file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    key = (str(path.resolve()), column, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SpecError(f"data file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        arrays = _read_npz(path, raw) if column is None else _read_csv(path, raw, column)
        _CACHE[key] = _checked(path, *arrays, hashlib.sha256(raw).hexdigest())
    return _CACHE[key]


def _read_npz(path: Path, raw: bytes):
    import io
    import zipfile
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise SpecError(f"data file {str(path)!r} is not a readable .npz file ({exc})") from None
    missing = [name for name in ("X", "y") if name not in arrays]
    if missing:
        raise SpecError(f"data file {str(path)!r} has no array {' or '.join(repr(m) for m in missing)}; it has "
                        f"{', '.join(repr(n) for n in arrays) or 'no arrays'} (expected X, y and optionally "
                        f"X_test, y_test)")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise SpecError(f"data file {str(path)!r} has {'X_test' if 'X_test' in arrays else 'y_test'} without "
                        f"{'y_test' if 'X_test' in arrays else 'X_test'}: give both or neither")
    out = []
    for name in ("X", "y", "X_test", "y_test"):
        a = arrays.get(name)
        if a is not None and a.dtype.kind not in "biuf":
            raise SpecError(f"data file {str(path)!r}: array {name!r} holds {a.dtype} values, not numbers")
        out.append(None if a is None else np.asarray(a, dtype=np.float64))
    return tuple(out)


def _read_csv(path: Path, raw: bytes, column: str):
    try:
        rows = list(csv.reader(raw.decode("utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SpecError(f"data file {str(path)!r} is not a readable CSV file ({exc})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise SpecError(f"data file {str(path)!r} is empty")
    header = [h.strip() for h in rows[0]]
    if column not in header:
        raise SpecError(f"data file {str(path)!r} has no column {column!r}; its columns: {', '.join(header)}")
    values = np.empty((len(rows) - 1, len(header)))
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise SpecError(f"data file {str(path)!r}, line {i}: {len(row)} cells, the header has {len(header)}")
        for j, cell in enumerate(row):
            try:
                values[i - 2, j] = float(cell)
            except ValueError:
                raise SpecError(f"data file {str(path)!r}, line {i}, column {header[j]!r}: {cell.strip()!r} is not a "
                                f"number") from None
    target = header.index(column)
    return np.delete(values, target, axis=1), values[:, target], None, None


def infer_task(y: np.ndarray) -> tuple[str, int]:
    """(task, classes) of targets ``y`` (module docstring)."""
    values = np.unique(y)
    if np.all(np.isfinite(values)) and np.all(values == np.round(values)) and 2 <= len(values) <= MAX_CLASSES:
        return ("binary", 2) if len(values) == 2 else ("multiclass", len(values))
    return "regression", 0


def _checked(path: Path, X, y, X_test, y_test, sha256: str) -> FileData:
    name = repr(str(path))
    for label, a, dims in (("X", X, 2), ("y", y, 1), ("X_test", X_test, 2), ("y_test", y_test, 1)):
        if a is None:
            continue
        if a.ndim != dims:
            raise SpecError(f"data file {name}: {label} has {a.ndim} dimensions, expected {dims}")
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.argwhere(bad)[0]
            where = f"row {first[0]}" + (f", feature {first[1]}" if dims == 2 else "")
            raise SpecError(f"data file {name}: {label} has {int(bad.sum())} NaN or infinite value(s) (first at "
                            f"{where}); remove or impute them first")
    if len(X) != len(y):
        raise SpecError(f"data file {name}: X has {len(X)} rows, y has {len(y)}")
    if X.shape[1] == 0:
        raise SpecError(f"data file {name}: no feature columns")
    if X_test is not None:
        if len(X_test) != len(y_test) or X_test.shape[1] != X.shape[1]:
            raise SpecError(f"data file {name}: X_test is {X_test.shape[0]} x {X_test.shape[1]} with {len(y_test)} "
                            f"targets; expected {X.shape[1]} features and one target per row")
        if len(X) < 2 or len(X_test) < 1:
            raise SpecError(f"data file {name}: {len(X)} train and {len(X_test)} test rows; at least 2 and 1 needed")
    elif len(X) < MIN_ROWS:
        raise SpecError(f"data file {name} has {len(X)} rows; at least {MIN_ROWS} are needed (80/20 train/test split)")
    task, classes = infer_task(y if y_test is None else np.concatenate([y, y_test]))
    all_y = y if y_test is None else np.concatenate([y, y_test])
    if len(np.unique(all_y)) == 1:
        raise SpecError(f"data file {name}: the target has one value ({all_y[0]:g}) in every row: nothing to learn "
                        f"(one class, or a constant regression target)")
    return FileData(X, y, X_test, y_test, task, classes, sha256)
