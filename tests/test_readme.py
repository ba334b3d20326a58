"""Every command and the Python snippet of README.md, executed as written (steps scaled down), so an example can
never drift from the tool.

* ``precision ...`` lines run in order in one scratch folder (later ones read what earlier ones wrote), with
  ``--steps`` scaled down to STEPS; each must exit as documented, without a traceback.
* The Python snippet runs with ``steps=200`` scaled down the same way.
* ``pip install`` lines must name extras that pyproject.toml defines; the two set-up commands must be what .ci/run
  and the quick start run; ``asv``, ``pytest`` and ``pytest-benchmark`` lines are parsed by their own tools
  (``--help`` of the subcommand, ``--collect-only``), not run: they take minutes and write history.
* A command that fits none of these rules fails the test, so a new kind of example gets a rule.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
STEPS = 6  # enough for two record steps at --record-every 3, so drift, plots and compare have something to show
BIN = Path(sys.executable).parent


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, comments dropped, split as the shell would."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


ALL = [argv for block in code_blocks("bash") for argv in commands(block)]
PRECISION = [argv for argv in ALL if argv[0] == "precision"]


def scaled(argv: list[str]) -> list[str]:
    """``precision run``, ``precision sweep``, ``precision ablate`` and ``precision remedies`` with --steps STEPS
    --record-every 3 and no progress line; other commands unchanged."""
    if argv[1] == "bench":  # the smallest kernels, no whole loops: the command's output, not its figures
        return argv[:2] + ["--sizes", "10000", "--repeats", "1", "--no-loops"]
    if argv[1] not in ("run", "sweep", "ablate", "remedies"):
        return argv
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--steps", "--record-every"):
            skip = True
            continue
        out.append(arg)
    return out + ["--steps", str(STEPS), "--record-every", "3", "--quiet"]


def _run(argv, cwd, timeout=900):
    env = dict(os.environ, PYTHONWARNINGS="error::DeprecationWarning:precision")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _gpu_available() -> bool:
    from precision.backends import backend_availability
    return backend_availability("jax", "gpu").available


def test_readme_has_the_examples_this_test_knows():
    assert len(PRECISION) >= 10, PRECISION
    assert code_blocks("python"), "the Python API snippet"


def test_every_precision_command_runs_as_documented(tmp_path):
    for argv in PRECISION:
        # the README's example data files are named from the repository root
        cmd = [str(BIN / "precision"), *(str(REPO / a) if a.startswith("tests/data/") else a
                                          for a in scaled(argv)[1:])]
        proc = _run(cmd, tmp_path)
        shown = " ".join(argv)
        assert "Traceback" not in proc.stderr + proc.stdout, (shown, proc.stderr[-2000:])
        if "--device" in argv and "gpu" in argv[argv.index("--device") + 1] and not _gpu_available():
            # "on a machine with an NVIDIA GPU": here, one line that names the device, before any training.
            assert proc.returncode == 2, (shown, proc.returncode, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1 and "gpu" in proc.stderr, proc.stderr
            continue
        # compare exits 1 when it finds a regression: a valid outcome of these tiny runs (timing noise)
        allowed = (0, 1) if argv[1] == "compare" else (0,)
        assert proc.returncode in allowed, (shown, proc.returncode, proc.stderr[-2000:])
        assert proc.stdout.strip(), shown
    # What the examples say they write exists.
    for written in ("before.json", "after.json", "results/report.json", "plots/before-drift.png",
                    "plots/before-tradeoff.svg", "results/report-drift.png"):
        assert (tmp_path / written).is_file(), written
    assert any((tmp_path / "traj").glob("*.npz"))


def test_python_snippet_runs(tmp_path):
    (snippet,) = code_blocks("python")
    assert "steps=200" in snippet
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("steps=200", f"steps={STEPS}"), encoding="utf-8")
    proc = _run([sys.executable, str(script)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logreg:breast_cancer" in proc.stdout and (tmp_path / "report.json").is_file()


def _extras() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_install_lines_name_real_extras_and_the_set_up_commands_are_what_ci_runs():
    extras = _extras()
    for argv in ALL:
        for arg in argv:
            match = re.fullmatch(r"\.\[([a-z,]+)\]", arg)
            if match:
                assert set(match.group(1).split(",")) <= extras, (argv, extras)
    ci = (REPO / ".ci" / "run").read_text()
    setups = [line for block in code_blocks("bash") for line in block.splitlines() if line.startswith("python3 -m venv")]
    assert len(setups) == 2, setups  # exactly two set-up commands: the main job and the tests
    main_job, tests = setups
    assert main_job.endswith("&& precision run")
    for step in ("python -m pip install -e '.[all]'", "python -m pytest -n auto --dist loadfile"):
        assert step in tests and step.split(" -e ")[0] in ci, step
    assert "-e '.[all]'" in ci and ci.rstrip().endswith("python -m pytest -n auto --dist loadfile")


def _tool_rule(argv: list[str]) -> list[str] | None:
    """How a command that is not run is checked: its tool parses it (None: it is run elsewhere or is set-up)."""
    if argv[0] == "precision" or argv[:2] in (["python3", "-m"],):
        return None
    if argv[:4] == ["python", "-m", "pip", "install"]:
        return None  # extras checked above; installing is the set-up, not an example to rerun here
    if argv[0] == "asv":
        return [str(BIN / "asv"), argv[1], "--help"]
    if argv[0] == "pytest-benchmark":
        return [str(BIN / "pytest-benchmark"), argv[1], "--help"]
    if argv[:3] == ["python", "-m", "pytest"]:
        # every option must parse; --benchmark-compare needs saved runs, so collection alone is asked for (and
        # pytest-benchmark's "nothing saved, no benchmark ran" warning is what collection alone gives)
        return [sys.executable, "-m", "pytest", *argv[3:], "--collect-only", "-q", "-p", "no:cacheprovider",
                "-W", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning"]
    raise AssertionError(f"a README command with no rule in tests/test_readme.py: {' '.join(argv)}")


def test_tool_commands_parse(tmp_path):
    checked = 0
    for argv in ALL:
        rule = _tool_rule(argv)
        if rule is None:
            continue
        proc = _run(rule, REPO, timeout=300)
        output = proc.stdout + proc.stderr
        if any(a.startswith("--benchmark-compare") for a in argv) and "Can't compare" in output:
            # parsed; no saved run to compare with here: a warning (bare --benchmark-compare) or, when a named run
            # is missing, the documented exit status 4
            assert proc.returncode in (0, 4), (" ".join(argv), output[-1500:])
        else:
            assert proc.returncode == 0, (" ".join(argv), proc.stdout[-1500:], proc.stderr[-1500:])
        assert "Traceback" not in output, (" ".join(argv), output[-1500:])
        checked += 1
    assert checked >= 10, checked
