"""The array-like face of a table made a chunk at a time (the batch schedule, the optimizer's scalar rows)."""

from __future__ import annotations

import numpy as np

__all__ = ["LazyRows"]


class LazyRows:
    """A (steps, ...) table that makes rows on demand: a subclass defines ``steps`` and ``rows(start, stop)`` (rows
    start .. stop - 1, bounds checked there). It indexes like an array by integer (negative too) and by contiguous
    slice without materialising the rest; ``numpy.asarray`` makes the whole table (tests and small runs only)."""

    steps: int

    def rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            index = int(key) + self.steps if key < 0 else int(key)
            if not 0 <= index < self.steps:
                raise IndexError(f"row {key} is outside the {self.steps} rows made for this run")
            return self.rows(index, index + 1)[0]
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.steps)
            return self.rows(start, max(start, stop))
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        out = self.rows(0, self.steps)
        return out if dtype is None else out.astype(dtype)
