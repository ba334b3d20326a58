"""Forward and backward passes on numpy arrays: the shared op sequence of :mod:`precision.backends.array_math`."""

from __future__ import annotations

import functools

import numpy as np

from .. import array_math

__all__ = ["gradient"]

gradient = functools.partial(array_math.gradient, np)
gradient.__doc__ = array_math.gradient.__doc__
