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
    expected = path.read_bytes().decode("utf-8", "replace").splitlines()[0].removeprefix("# expect: ")
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
    (["--seeds=-1"], "--seeds: expected comma-separated non-negative integers"),
    (["--seeds", "0,0"], "--seeds: expected comma-separated non-negative integers, each once"),
    (["--epochs", "0"], "--epochs: expected a positive integer"),
    (["--methods", "fitnetz"], "--methods: fitnetz not in"),
])
def test_bad_options(args, expected, monkeypatch, capsys, write_suite):
    code, err = run_cli(monkeypatch, capsys, "run", str(write_suite()), "--dry-run", *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["run", "report", "validate", "pairs"])
def test_a_name_that_escapes_results_is_refused_by_every_command(command, monkeypatch, capsys, tmp_path):
    """`name: ../../escaped` would make `kdbench report` write outside results/: refused before any path is made."""
    path = CASES[[p.stem for p in CASES].index("name_traversal")]
    (tmp_path / "work" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "a")
    code, err = run_cli(monkeypatch, capsys, command, str(path))
    assert code == 2 and "field 'name'" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "work"]


def test_a_suite_file_too_large_is_refused_before_parsing(monkeypatch, capsys, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: huge\ndescription: '" + "x" * (1 << 20) + "'\n")
    code, err = run_cli(monkeypatch, capsys, "validate", str(path))
    assert code == 2 and err.strip() == f"kdbench: error: {path}: suite file larger than 1024 KiB; a suite is a few kB of YAML"


def test_yaml_bombs_are_refused_fast():
    """A billion-laughs bomb (10^9 strings once expanded) is refused in well under a second, in constant memory."""
    import time

    from kdbench.config.schema import SuiteError
    from kdbench.config.load import load_suite
    for name in ("yaml_bomb_description", "yaml_bomb_model_kwargs", "yaml_recursive_alias"):
        start = time.perf_counter()
        with pytest.raises(SuiteError, match="refused"):
            load_suite(CASES[[p.stem for p in CASES].index(name)])
        assert time.perf_counter() - start < 2
