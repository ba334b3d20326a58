"""A calibration kernel timed in the same run as the benchmarks, so that ``precision compare`` can tell a slower
machine (load from other processes, a throttled CPU) from slower code.

The kernel is a fixed, small workload shaped like the suite's own: one out-of-place float32 Adam update of
``CALIBRATION_N`` = 1e6 parameters in numpy (read p, g, m, v; write new p, m, v into separate buffers; about ten
elementwise passes over 4 MB arrays, so both memory bandwidth and arithmetic count). Its buffers are made once
from a fixed seed; every repeat does the same work on the same data. It needs numpy only, so every run has it.

:func:`precision.runner.run` times ``REPEATS_PER_PHASE`` repeats before the first spec and as many after the last,
so load during the run is sampled at both ends; the report keeps every repeat and their median
(``"calibration"``, docs/reports.md). The whole measurement costs about 0.1 to 0.3 s per ``run()`` (making the
buffers and 10 repeats of 5 to 15 ms); docs/compare.md says how compare uses it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

__all__ = ["Calibration", "Calibrator", "CALIBRATION_KERNEL", "CALIBRATION_N", "CALIBRATION_BYTES", "REPEATS_PER_PHASE", "calibrate"]

CALIBRATION_N = 1_000_000
CALIBRATION_KERNEL = "numpy-adam-fp32-out-of-place-n=1e6"
REPEATS_PER_PHASE = 5
# Memory the calibrator holds while a run() lasts: 8 float32 arrays of CALIBRATION_N, plus up to 4 temporaries
# while its inputs are drawn and scaled (precision.matrix adds it to every grid's memory estimate).
CALIBRATION_BYTES = 12 * CALIBRATION_N * 4

# Adam at step 10 with the usual hyperparameters (the scalars only set the values; the work is the same).
_LR, _B1, _B2, _EPS, _STEP = 1e-3, 0.9, 0.999, 1e-8, 10


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The calibration kernel's timings in one run: ``seconds`` per repeat, in the order measured."""

    kernel: str
    seconds: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "seconds", tuple(float(s) for s in self.seconds))

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "seconds": list(self.seconds), "median_s": self.median_s}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        """From a report's ``"calibration"`` object; the median is recomputed from the repeats."""
        return cls(kernel=data["kernel"], seconds=tuple(data["seconds"]))


class Calibrator:
    """The kernel's buffers, made once (and the kernel run once untimed, so page faults of the output buffers are
    not timed); :meth:`measure` adds timed repeats, :meth:`result` returns them as a :class:`Calibration`."""

    def __init__(self, n: int = CALIBRATION_N, seed: int = 0):
        import numpy as np  # here: reading a report (precision.report imports Calibration) needs no numpy
        self._np = np
        rng = np.random.default_rng(seed)
        f32 = np.float32
        # Uniform values at the scales of a mid-training step (v >= 0); uniform is the cheapest to draw.
        self.p, self.g, self.m = ((rng.random(n, dtype=f32) - f32(0.5)) * f32(s) for s in (1.0, 2e-2, 2e-3))
        self.v = rng.random(n, dtype=f32) * f32(1e-4)
        self.p_out, self.m_out, self.v_out, self.tmp = (np.empty(n, f32) for _ in range(4))
        self.seconds: list[float] = []
        self._step()

    def _step(self) -> None:
        np = self._np
        f32 = np.float32
        p, g, m, v, tmp = self.p, self.g, self.m, self.v, self.tmp
        np.multiply(m, f32(_B1), out=self.m_out)                       # m' = b1 m + (1 - b1) g
        np.multiply(g, f32(1 - _B1), out=tmp)
        np.add(self.m_out, tmp, out=self.m_out)
        np.multiply(g, g, out=tmp)                                      # v' = b2 v + (1 - b2) g^2
        np.multiply(tmp, f32(1 - _B2), out=tmp)
        np.multiply(v, f32(_B2), out=self.v_out)
        np.add(self.v_out, tmp, out=self.v_out)
        np.multiply(self.v_out, f32(1 / (1 - _B2**_STEP)), out=tmp)     # p' = p - lr m'/bc1 / (sqrt(v'/bc2) + eps)
        np.sqrt(tmp, out=tmp)
        np.add(tmp, f32(_EPS), out=tmp)
        np.divide(self.m_out, tmp, out=tmp)
        np.multiply(tmp, f32(_LR / (1 - _B1**_STEP)), out=tmp)
        np.subtract(p, tmp, out=self.p_out)

    def measure(self, repeats: int = REPEATS_PER_PHASE) -> None:
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._step()
            self.seconds.append(time.perf_counter() - t0)

    def result(self) -> Calibration:
        return Calibration(CALIBRATION_KERNEL, tuple(self.seconds))


def calibrate(repeats: int = 2 * REPEATS_PER_PHASE) -> Calibration:
    """Time the kernel ``repeats`` times now (run() splits them between its start and its end)."""
    calibrator = Calibrator()
    calibrator.measure(repeats)
    return calibrator.result()
