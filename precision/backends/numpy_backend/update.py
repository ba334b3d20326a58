"""The optimizer update on numpy arrays: the shared op sequence of :mod:`precision.backends.array_math`."""

from __future__ import annotations

import functools

import numpy as np

from .. import array_math

__all__ = ["update"]

update = functools.partial(array_math.update, np)
update.__doc__ = array_math.update.__doc__
