"""Bad suites: exit code 2, one line naming the file, the field and what was expected; nothing in MLflow."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from kdbench.config.schema import SuiteError
from kdbench.config.load import load_suite

CASES = {
    "unknown model": ({"students": ["cifar_resnet9000"]}, "students.0", "matches no model"),
    "unknown method": ({"methods": ["baseline", "kdd"]}, "methods.1", "did you mean 'kd'"),
    "unknown method parameter": ({"methods": [{"kd": {"temperature": 4}}]}, "methods.0.temperature", "has no parameter"),
    "wrong type": ({"seeds": "zero"}, "seeds", "expected a valid list"),
    "wrong type nested": ({"train": {"epochs": "many"}}, "train.epochs", "integer"),
    "negative number": ({"train": {"epochs": 2, "lr": -0.1}}, "train.lr", "greater than 0"),
    "missing field": ({"students": None}, "students", "required field is missing"),
    "unknown key": ({"seeds": [0], "seed": 3}, "seed", "did you mean 'seeds'"),
    "bad dataset": ({"data": {"dataset": "cifar1000"}}, "data.dataset", "expected 'cifar100'"),
    "method param type": ({"methods": [{"kd": {"T": "hot"}}]}, "methods.0.T", "expected float"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_suite_names_file_field_and_expectation(case, write_suite):
    overrides, field, expected = CASES[case]
    path = write_suite(overrides)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert f"'{field}'" in message
    assert expected in message


def test_yaml_syntax_error_names_line(write_suite):
    path = write_suite(text="name: x\nteachers: [a, b\nstudents: [c]\n")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value).startswith(f"{path}: YAML syntax error at line")


def test_cli_exits_2_with_one_line_and_writes_nothing(write_suite, tmp_path):
    path = write_suite({"methods": ["baseline", "nosuchmethod"]})
    proc = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kdbench: error: ") and str(path) in lines[0] and "methods.1" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "store").exists()


def test_good_suite_loads_and_shipped_suites_validate(write_suite):
    suite = load_suite(write_suite())
    assert [m.label for m in suite.methods] == ["baseline", "kd"]
    repo = REPO
    for path in sorted((repo / "suites").rglob("*.yaml")):
        load_suite(path)


def test_validate_command_summarises_and_writes_nothing(write_suite, tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    path = write_suite()
    monkeypatch.setattr(sys, "argv", ["kdbench", "validate", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith(f"{path}: valid. tiny: 1 pairs x 2 methods (baseline, kd) x 1 seeds = 2 cells; 3 jobs"), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
