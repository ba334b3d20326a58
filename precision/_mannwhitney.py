"""The two-sided Mann-Whitney U test, exact in integers for small samples (precision compare's noise test), and
how its p-values are printed."""

from __future__ import annotations

import math
from typing import Sequence

from .errors import PrecisionError

__all__ = ["SIGNIFICANCE_LEVEL", "mann_whitney_p", "smallest_p", "format_p"]

SIGNIFICANCE_LEVEL = 0.05
_EXACT_MAX_SAMPLES = 60  # n1 + n2 up to which the U distribution is computed exactly (integers, instant)


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that ``x`` and ``y`` come from the same distribution.

    Exact (the U distribution counted with integers, as the coefficients of the Gaussian binomial
    [n1+n2 choose n1]_q) when there are no ties and n1 + n2 <= 60; otherwise the normal approximation with tie
    and continuity corrections. Same conventions as ``scipy.stats.mannwhitneyu``.
    """
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise PrecisionError("the Mann-Whitney test needs at least one sample on each side")
    combined = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks, ties, i = [0.0] * len(combined), [], 0
    while i < len(combined):  # midranks over runs of equal values
        j = i
        while j + 1 < len(combined) and combined[j + 1][0] == combined[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    u1 = sum(r for r, (_, side) in zip(ranks, combined) if side == 0) - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)  # by symmetry, P(U >= max) is the one-sided tail that doubles to two-sided
    if not ties and n1 + n2 <= _EXACT_MAX_SAMPLES:
        counts = _u_counts(n1, n2)
        tail = sum(counts[int(u):])
        return min(1.0, 2.0 * tail / sum(counts))
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1))
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term))
    if sigma == 0.0:
        return 1.0  # every sample equal: nothing separates them
    z = (u - n1 * n2 / 2.0 - 0.5) / sigma
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0)))


def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p-value :func:`mann_whitney_p` can give for samples of sizes ``n1`` and ``n2``
    (every sample of one side below every sample of the other, no ties). When it is not below
    SIGNIFICANCE_LEVEL the test cannot find any change, however large: 2 / C(n1 + n2, n1) when exact, so n1 = n2 = 2
    gives 0.333, 3 and 3 give 0.1, 3 and 4 give 0.057, 4 and 4 give 0.029."""
    return mann_whitney_p(range(n1), range(n1, n1 + n2))


def format_p(p: float | None) -> str:
    """``p`` with 3 significant digits, or more where 3 would put it on the other side of SIGNIFICANCE_LEVEL or
    on it (0.0504 prints as 0.0504, 0.04996 as 0.04996, never as 0.05)."""
    if p is None:
        return "-"
    below = p < SIGNIFICANCE_LEVEL
    for digits in range(3, 18):
        text = f"{p:.{digits}g}"
        shown = float(text)
        if (shown < SIGNIFICANCE_LEVEL) == below and (shown != SIGNIFICANCE_LEVEL or p == SIGNIFICANCE_LEVEL):
            return text
    return repr(p)


def _u_counts(n1: int, n2: int) -> list[int]:
    """counts[u] = number of orderings of n1 x's and n2 y's with U = u: the coefficients of
    prod_{k=1..n1} (1 - q^(n2+k)) / (1 - q^k), computed exactly in integers."""
    degree = n1 * n2
    coeffs = [1] + [0] * degree
    for k in range(1, n1 + 1):
        for i in range(degree, n2 + k - 1, -1):  # times (1 - q^(n2+k)), highest power first
            coeffs[i] -= coeffs[i - n2 - k]
        for i in range(k, degree + 1):  # divided by (1 - q^k): a running sum with stride k (exact division)
            coeffs[i] += coeffs[i - k]
    return coeffs
