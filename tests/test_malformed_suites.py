"""The malformed-suite collection: every file in tests/malformed_suites is answered with exit code 2 and one
line naming the file, the field and what was expected (the file's first line: `# expect: ...`), without a
traceback and without writing anything."""

import sys
from pathlib import Path

import pytest

from kdbench.cli import main

CASES = sorted((Path(__file__).parent / "malformed_suites").glob("*.yaml"))


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_the_collection_is_large():
    assert len(CASES) >= 20


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_suite(path, monkeypatch, capsys, tmp_path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--data-root", str(tmp_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("kdbench: error: ") and str(path) in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "store").exists()


def test_unreadable_data_root(monkeypatch, capsys, tmp_path):
    suite = tmp_path / "mnist.yaml"
    suite.write_text("name: m\ndata: {dataset: mnist}\nteachers: [mnist_mlp_100x2]\nstudents: [mnist_mlp_30x2]\n"
                     "methods: [kd]\nseeds: [0]\ntrain: {epochs: 1}\n")
    code, err = run_cli(monkeypatch, capsys, "run", str(suite), "--data-root", str(tmp_path / "missing"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert str(tmp_path / "missing") in lines[0] and "--data-root" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "a,b"], "--seeds: expected comma-separated non-negative integers"),
    (["--epochs", "0"], "--epochs: expected a positive integer"),
    (["--methods", "fitnetz"], "--methods: fitnetz not in"),
])
def test_bad_options(args, expected, monkeypatch, capsys, write_suite):
    code, err = run_cli(monkeypatch, capsys, "run", str(write_suite()), "--dry-run", *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
