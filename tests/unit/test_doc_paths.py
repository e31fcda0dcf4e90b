"""Every test file the documentation names exists: tests moved into subject folders once, and the READMEs that
send a reader to them went stale without a failing test."""

from __future__ import annotations

import re

from conftest import REPO

DOCS = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("results/*/README.md"), *REPO.glob("suites/*/README.md")]


def test_every_test_file_the_docs_name_exists():
    named = {(doc.relative_to(REPO), m) for doc in DOCS for m in re.findall(r"tests/[\w/]+\.py", doc.read_text())}
    assert named, "the docs name no test file: the pattern is wrong"
    missing = sorted((str(doc), path) for doc, path in named if not (REPO / path).is_file())
    assert not missing, missing
