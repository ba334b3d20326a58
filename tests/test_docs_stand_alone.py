"""The repository's docs stand alone: no file cites notes that live outside the repository, and every doc a file
points to under docs/ exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Notes kept beside the repository by its developers, which a reader of the repository does not have.
OUTSIDE = re.compile(r"NUMERICS\.md|DESIGN\.md|STYLE\.md|\.\./shared")


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in names.splitlines():
        if name.endswith((".py", ".md", ".json", ".toml", ".cfg", ".txt")) or name == ".ci/run":
            yield REPO / name


def test_no_file_cites_notes_outside_the_repository():
    this = Path(__file__).resolve()
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in _tracked_text_files() if path.resolve() != this
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, offenders


def test_every_cited_doc_exists():
    cited = set()
    for path in _tracked_text_files():
        cited |= set(re.findall(r"docs/[A-Za-z0-9_-]+\.md", path.read_text(encoding="utf-8")))
    assert cited, "the README and modules point to docs/"
    missing = sorted(doc for doc in cited if not (REPO / doc).is_file())
    assert not missing, missing
