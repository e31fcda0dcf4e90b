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
    (["--seeds", "4294967296"], "--seeds: expected comma-separated non-negative integers, each once, at most 4294967295"),
    (["--seeds", ",".join(map(str, range(10001)))], "and 10000 of them"),
    (["--epochs", "0"], "--epochs: expected a positive integer"),
    (["--epochs", "999999937"], "--epochs: expected a positive integer of at most 100000, got 999999937"),
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


def test_a_huge_prime_epoch_count_is_refused_at_once_by_every_command(tmp_path):
    """`epochs: 999999937` (a typo) used to make even `--dry-run` hang, choosing the route interval by trying every
    divisor: now the schema bounds every number that sizes work, and the refusal takes no longer than start-up."""
    import subprocess
    import time

    path = CASES[[p.stem for p in CASES].index("epochs_huge_prime")]
    for command in (["validate"], ["run", "--dry-run"], ["pairs"]):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kdbench.cli", *command, str(path)], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        took = time.perf_counter() - start
        assert proc.returncode == 2 and "expected less than or equal to 100000, got 999999937" in proc.stderr
        assert took < 150, f"{command}: {took:.1f} s"  # start-up (imports) only, on a loaded machine: no hang


def test_the_largest_epoch_counts_allowed_plan_in_moments(write_suite):
    """Planning cost does not grow with the numbers a suite gives: the largest prime epoch count allowed (99,991),
    its route interval chosen, teachers and students planned, with --epochs too, in well under a second each."""
    import time

    from kdbench.commands import load_plan

    path = write_suite({"methods": ["baseline", "kd", "rco", "eskd"], "train": {"epochs": 99991, "batch_size": 32},
                        "teacher": {"train": {"epochs": 99991}}, "seeds": [0, 4294967295]})
    load_plan(path)  # imports and model statistics, cached for the process
    for epochs in (None, 99989):
        start = time.perf_counter()
        plan = load_plan(path, epochs=epochs)
        assert time.perf_counter() - start < 2
        teacher = next(j for j in plan.jobs if j.role == "teacher")
        assert teacher.train.epochs == (epochs or 99991) and teacher.route_every == (epochs or 99991)


def test_numbers_in_exponent_form_are_numbers(write_suite):
    """Strict number fields refuse strings; PyYAML alone reads `5e-4` (no dot: YAML 1.1) as the string "5e-4",
    so the suite loader reads it as YAML 1.2 does, a float, in fields and method params alike."""
    from kdbench.config.load import load_suite

    suite = load_suite(write_suite(text="name: e\ndata: {dataset: synthetic, train_size: 64, test_size: 32}\n"
                                        "teachers: [cifar_resnet14]\nstudents: [cifar_resnet8]\n"
                                        "methods: [{kd: {T: 4e0}}]\nseeds: [0]\n"
                                        "train: {epochs: 1, lr: 5e-2, weight_decay: 5E-4}\n"))
    assert (suite.train.lr, suite.train.weight_decay, suite.methods[0].params["T"]) == (0.05, 0.0005, 4.0)
