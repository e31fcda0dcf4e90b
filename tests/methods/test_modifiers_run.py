"""kd+logit_std and dkd+ctkd end to end in a quickstart-sized suite (real models, real MLflow in SQLite, tiny
synthetic data): they run beside the plain methods, record the modifier, share the teacher, and `kdbench
methods` lists the modifiers. (Bit-identical resume: tests/e2e/test_resume.py, variants kd+logit_std, dkd+ctkd.)"""

import io
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench.cli import main
from kdbench.config.load import load_suite
from kdbench.plan import make_plan
from kdbench.run.executors.inprocess import InProcessExecutor as Executor

SUITE = {
    "name": "modifiers",
    "data": {"dataset": "synthetic", "train_size": 96, "test_size": 32, "num_classes": 4, "image_size": 16},
    "augment": {"crop_padding": 2, "flip": True},
    "teachers": ["cifar_resnet14"],
    "students": ["cifar_resnet8"],
    "methods": ["kd", {"method": "kd", "modify": "logit_std", "params": {"T": 2, "kd_weight": 9}}, "dkd",
                {"method": "dkd", "modify": {"ctkd": {"curriculum_epochs": 2}}}],
    "seeds": [0],
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "schedule": "step", "milestones": [2]},
}


def test_kd_logit_std_and_dkd_ctkd_run_and_record_their_modifier(write_suite):
    path = write_suite(SUITE)
    plan = make_plan(load_suite(path), Path(path))
    outcome = Executor(plan, None, "cpu", console=Console(file=io.StringIO())).run()
    assert not outcome.failed, outcome.failed
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("modifiers").experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run}'")
    students = {r.data.tags["kdbench.method"]: r for r in runs if r.data.tags["kdbench.role"] == "student"}
    assert sorted(students) == ["dkd", "dkd+ctkd", "kd", "kd+logit_std"]
    assert len([r for r in runs if r.data.tags["kdbench.role"] == "teacher"]) == 1  # one teacher for every entry
    assert all(r.info.status == "FINISHED" for r in runs)
    std, ctkd = students["kd+logit_std"].data, students["dkd+ctkd"].data
    assert std.params["modify.name"] == "logit_std" and std.params["method.T"] == "2"
    assert "modify.name" not in students["kd"].data.params
    assert ctkd.params["modify.name"] == "ctkd" and ctkd.params["modify.params.curriculum_epochs"] == "2"
    temperatures = client.get_metric_history(students["dkd+ctkd"].info.run_id, "ctkd_T")
    assert len(temperatures) == 3 and len({m.value for m in temperatures}) == 3  # learned: it moves every epoch
    assert {"train_ce", "train_tckd", "train_nckd"} <= set(ctkd.metrics)
    assert std.params["config_hash"] != students["kd"].data.params["config_hash"]


def test_kdbench_methods_lists_the_new_methods_and_the_modifiers(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["kdbench", "methods"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None)
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"reviewkd", "mlkd", "ttm", "wttm", "logit_std", "ctkd"} <= names
    assert "modifiers" in out
