"""precision: how far training drifts from a float64 reference at each float width, recipe and backend.

Python API (mirrors ``precision run``)::

    import precision
    specs = precision.build_specs(["logreg"], ["adam"], ["fp32", "bf16"], data=["breast_cancer"])
    report = precision.run(specs)
    report.save("report.json")
    print(precision.format_table(precision.load_report("report.json")))
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that ``import precision`` (and
# the ``precision`` command, which imports this package first) costs milliseconds instead of numpy's ~0.3 s:
# the command line then installs its Ctrl-C / SIGTERM handling before anything slow is imported.
_EXPORTS = {
    "data": ("Dataset", "make_dataset"),
    "drift": ("bits_of_agreement", "fingerprint", "max_ulp", "rel_l2"),
    "errors": ("PrecisionError", "ReportError", "SpecError", "UnavailableError"),
    "formats": ("FORMATS", "Format", "get_format", "round_to", "to_format", "ulp"),
    "matrix": ("build_specs", "default_specs"),
    "optim": ("OptimizerSpec", "make_optimizer"),
    "policy": ("PRESETS", "Policy", "get_policy", "parse_policy"),
    "problems": ("PROBLEMS", "get_problem"),
    "report": ("Report", "Result", "load_report"),
    "runner": ("Serving", "run", "run_one", "train"),
    "spec": ("RunSpec",),
    "table": ("format_report", "format_table"),
    "trajectory": ("Trajectory",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*_MODULE_OF, "__version__"]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        # A submodule (``precision.runner``) is an attribute once imported; make it one on first access too, as
        # it was when this package imported everything eagerly.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'precision' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools and IDEs see
    from .data import Dataset, make_dataset  # noqa: F401
    from .drift import bits_of_agreement, fingerprint, max_ulp, rel_l2  # noqa: F401
    from .errors import PrecisionError, ReportError, SpecError, UnavailableError  # noqa: F401
    from .formats import FORMATS, Format, get_format, round_to, to_format, ulp  # noqa: F401
    from .matrix import build_specs, default_specs  # noqa: F401
    from .optim import OptimizerSpec, make_optimizer  # noqa: F401
    from .policy import PRESETS, Policy, get_policy, parse_policy  # noqa: F401
    from .problems import PROBLEMS, get_problem  # noqa: F401
    from .report import Report, Result, load_report  # noqa: F401
    from .runner import Serving, run, run_one, train  # noqa: F401
    from .spec import RunSpec  # noqa: F401
    from .table import format_report, format_table  # noqa: F401
    from .trajectory import Trajectory  # noqa: F401
