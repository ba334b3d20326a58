"""Backend registry. Backends are imported lazily: a missing optional framework makes its backend unavailable
(with the reason and the extra to install), never an import error for the rest of the suite."""

from __future__ import annotations

import importlib

from ..errors import choice_error
from .base import Availability, Backend

__all__ = ["BACKENDS", "get_backend", "backend_availability", "Availability", "Backend"]

# name -> (module holding BACKEND, pip extra that installs its framework)
BACKENDS = {
    "numpy": ("precision.backends.numpy_backend", None),
    "numba": ("precision.backends.numba_backend", "numba"),
    "jax": ("precision.backends.jax_backend", "jax"),
}
_loaded: dict[str, object] = {}


def get_backend(name: str) -> Backend:
    """The backend object; raises UnavailableError (with the reason) when its framework cannot be imported."""
    if name not in BACKENDS:
        raise choice_error("backend", name, BACKENDS)
    if name not in _loaded:
        module_name, extra = BACKENDS[name]
        try:
            _loaded[name] = importlib.import_module(module_name).BACKEND
        except ImportError as exc:
            from ..errors import UnavailableError
            hint = f" (pip install 'precision[{extra}]')" if extra else ""
            raise UnavailableError(f"backend {name!r} is unavailable: {exc}{hint}") from None
    return _loaded[name]


def backend_availability(name: str, device: str = "cpu") -> Availability:
    from ..errors import UnavailableError
    try:
        backend = get_backend(name)
    except UnavailableError as exc:
        return Availability(False, str(exc))
    return backend.availability(device)
