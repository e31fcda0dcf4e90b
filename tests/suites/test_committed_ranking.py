"""The committed cross-study ranking (results/ranking/) is what `kdbench rank` makes from the committed studies'
stores, byte for byte, and the command it names is the one that makes it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdbench.cli import main

from conftest import REPO

RANKING = REPO / "results" / "ranking"
STUDIES = ["study_mnist", "study_fashion_mnist", "study_fashion_mnist_cnn", "study_cifar10"]


def test_the_committed_ranking_regenerates_byte_for_byte(tmp_path, monkeypatch):
    if not all((REPO / "results" / s / "mlflow.db").is_file() for s in STUDIES):
        pytest.skip("the committed studies' stores are not present")
    command = (RANKING / "ranking.md").read_text().split("Regenerate: `")[1].split("`")[0]
    assert command == "kdbench rank " + " ".join(f"results/{s}" for s in STUDIES) + " --out results/ranking --by-label"
    monkeypatch.chdir(REPO)  # the stores name their suite files relative to the repository's root
    # The committed command, its output redirected: the 'Regenerate' line names results/ranking either way.
    monkeypatch.setattr(sys, "argv", ["kdbench", "rank", *(f"results/{s}" for s in STUDIES), "--out",
                                      "results/ranking", "--by-label"])
    monkeypatch.setattr("kdbench.commands.write_ranking", _redirect(tmp_path))
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in RANKING.iterdir() if p.name != "README.md")
    for name in written:
        assert (tmp_path / name).read_bytes() == (RANKING / name).read_bytes(), name


def _redirect(folder: Path):
    from kdbench.report.rank_output import write_ranking

    return lambda ranking, out, command: write_ranking(ranking, folder, command)
