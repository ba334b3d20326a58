"""``precision list``: what this installation can run."""

from __future__ import annotations

from ..backends import BACKENDS, backend_availability
from ..data import DATA_SOURCES
from ..optim import OPTIMIZERS, make_optimizer
from ..policy import PRESETS
from ..problems import PROBLEMS
from ..spec import DEVICES


def add_parser(sub):
    p = sub.add_parser("list", help="show backends (with availability), devices, policies, problems, optimizers")
    p.set_defaults(handler=main)


def main(args) -> int:
    print("backends:")
    for name in BACKENDS:
        for device in DEVICES:
            avail = backend_availability(name, device)
            state = "available" if avail.available else f"unavailable: {avail.reason}"
            print(f"  {name:<6} {device:<4} {state}")
    print("policies (p=params c=compute a=accum s=state m=master ls=loss scale u=update math):")
    for name, policy in PRESETS.items():
        print(f"  {name:<14} {policy}")
    print("problems:")
    for name, problem in PROBLEMS.items():
        print(f"  {name:<8} {problem.task:<10} {problem.description}")
    print("  mlp-WIDTHS[-relu]   multiclass MLP of any width and depth, e.g. mlp-64, mlp-256x256, mlp-256x256-relu "
          "(docs/models.md)")
    print("data:")
    for name, text in DATA_SOURCES.items():
        print(f"  {name:<14} {text}")
    print("optimizers:")
    for name in OPTIMIZERS:
        print(f"  {name:<6} {make_optimizer(name)}")
    return 0
