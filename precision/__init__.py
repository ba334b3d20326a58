"""precision: how far training drifts from a float64 reference at each float width, recipe and backend.

Python API (mirrors ``precision run``)::

    import precision
    specs = precision.build_specs(["logreg"], ["adam"], ["fp32", "bf16"], data=["breast_cancer"])
    report = precision.run(specs)
    report.save("report.json")
    print(precision.format_table(precision.load_report("report.json")))
"""

from .data import Dataset, make_dataset
from .drift import bits_of_agreement, fingerprint, max_ulp, rel_l2
from .errors import PrecisionError, ReportError, SpecError, UnavailableError
from .formats import FORMATS, Format, get_format, round_to, to_format, ulp
from .matrix import build_specs, default_specs
from .optim import OptimizerSpec, make_optimizer
from .policy import PRESETS, Policy, get_policy, parse_policy
from .problems import PROBLEMS, get_problem
from .report import Report, Result, load_report
from .runner import run, run_one, train
from .spec import RunSpec
from .table import format_table
from .trajectory import Trajectory

__version__ = "0.1.0"

__all__ = [
    "Dataset", "make_dataset", "bits_of_agreement", "fingerprint", "max_ulp", "rel_l2", "PrecisionError",
    "ReportError", "SpecError", "UnavailableError", "FORMATS", "Format", "get_format", "round_to", "to_format",
    "ulp", "build_specs", "default_specs", "OptimizerSpec", "make_optimizer", "PRESETS", "Policy", "get_policy",
    "parse_policy", "PROBLEMS", "get_problem", "Report", "Result", "load_report", "run", "run_one", "train",
    "RunSpec", "format_table", "Trajectory", "__version__",
]
