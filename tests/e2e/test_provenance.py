"""Trust in the numbers: a method edit retrains its jobs (issue 9.1), collapsed runs never reach a mean (9.4),
and --epochs scales a method's epoch-counted params (9.5)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdbench import registry
from kdbench.cli import main
from kdbench.train.engine import collapse_reason
from kdbench.plan import make_plan
from kdbench.report.cells import pick
from kdbench.config.load import load_suite

PLUGIN = '''"""A method plugin the test edits."""
from kdbench.losses import cross_entropy, kd_loss
from kdbench.method import Method


class Mine(Method):
    name = "mine"
    summary = "CE + weight KD"
    defaults = {{"T": 4.0}}

    def losses(self, batch, student, teacher):
        # {comment}
        return {{"ce": cross_entropy(student.logits, batch.labels),
                "kd": {weight} * kd_loss(student.logits, teacher.logits, self.params["T"])}}
'''
FLAT = '''
from kdbench.method import Method


class Flat(Method):
    name = "flat"
    summary = "a constant loss: the student never learns"

    def losses(self, batch, student, teacher):
        return {"const": student.logits.sum() * 0.0 + 1.0}
'''
SUITE = {
    "name": "prov",
    "data": {"dataset": "synthetic", "train_size": 256, "test_size": 200, "num_classes": 10, "image_size": 28},
    "teachers": ["mnist_mlp_100x2"],
    "students": ["mnist_mlp_30x2"],
    "methods": ["mine"],
    "seeds": [0],
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A KDBENCH_METHODS folder; write(name, text) puts a plugin there and reloads the registry."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.setenv("KDBENCH_METHODS", str(folder))

    def write(name: str, text: str) -> None:
        (folder / f"{name}.py").write_text(text)
        registry.methods.cache_clear()

    yield write
    registry.methods.cache_clear()


def suite_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "prov.yaml"
    path.write_text(yaml.safe_dump({**SUITE, **overrides}, sort_keys=False))
    return path


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    return code, " ".join(capsys.readouterr().err.split())


def child_runs(name="prov"):
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    return client, [r for r in runs if r.data.tags.get("kdbench.role") != "suite"]


# ---------------------------------------------------------------------------------------------- 9.1

def test_method_hash_covers_code_not_comments(tmp_path, plugins):
    plugins("mine", PLUGIN.format(comment="first", weight=0.9))
    path = suite_file(tmp_path, methods=["baseline", "mine"])
    keys = lambda: {(j.role, j.method.label): j.key for j in make_plan(load_suite(path), path).jobs}  # noqa: E731
    first = keys()
    plugins("mine", PLUGIN.format(comment="reworded comment", weight=0.9).replace("edits.", "edits, reworded."))
    assert keys() == first  # comments and docstrings change no number: nothing retrains
    plugins("mine", PLUGIN.format(comment="first", weight=0.5))
    second = keys()
    assert second[("student", "mine")] != first[("student", "mine")]
    assert second[("teacher", "baseline")] == first[("teacher", "baseline")]
    assert second[("student", "baseline")] == first[("student", "baseline")]
    # A teacher trained by `baseline` depends on baseline's code: editing it moves the teacher and its students.
    plan = make_plan(load_suite(path), path)
    teacher = next(j for j in plan.jobs if j.role == "teacher")
    assert teacher.config["method_hash"] == registry.method_hash("baseline")
    assert registry.CONTRACT_MODULES  # and the contract modules are part of every method's hash
    assert registry.method_hash("mine") != registry.method_hash("kd")


def test_editing_a_plugin_retrains_its_jobs_says_so_and_the_report_shows_the_new_number(
        tmp_path, plugins, monkeypatch, capsys):
    from kdbench.report.write import write_report

    plugins("mine", PLUGIN.format(comment="first", weight=0.9))
    path = suite_file(tmp_path)
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")
    assert code == 0 and "2 jobs finished" in err and "jobs retrain" not in err, err
    client, runs = child_runs()
    old = next(r for r in runs if r.data.tags["kdbench.method"] == "mine")
    assert old.data.params["method_hash"] == registry.method_hash("mine")

    plugins("mine", PLUGIN.format(comment="first", weight=0.2))  # a fix in the loss
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")
    assert code == 0, err
    assert "1 jobs retrain because their method's code changed since this suite last ran them (mine)" in err, err
    assert "reused teacher" in err  # the teacher's code did not change
    client, runs = child_runs()
    new = [r for r in runs if r.data.tags["kdbench.method"] == "mine" and r.info.run_id != old.info.run_id]
    assert len(new) == 1 and new[0].data.params["method_hash"] == registry.method_hash("mine")
    assert new[0].data.params["method_hash"] != old.data.params["method_hash"]
    assert new[0].data.tags["kdbench.identity"] == old.data.tags["kdbench.identity"]
    acc_new = client.get_metric_history(new[0].info.run_id, "test_acc")[-1].value
    acc_old = client.get_metric_history(old.info.run_id, "test_acc")[-1].value
    assert acc_new != acc_old

    notes = []
    folder = write_report(path, tmp_path / "results", notice=notes.append)
    row = pd.read_csv(folder / "comparison.csv").set_index("row").loc["mine"]
    assert row.n == 1 and row["mean"] == pytest.approx(acc_new, abs=1e-6)
    assert not notes  # the latest run is today's code
    plugins("mine", PLUGIN.format(comment="first", weight=0.3))  # edited again, not rerun: the report says so
    write_report(path, tmp_path / "results", notice=notes.append)
    assert any("runs of mine in this report were trained by other method code" in n for n in notes), notes


def test_a_cell_never_averages_runs_of_different_method_code():
    runs = pd.DataFrame({"seed": [0, 1, 0], "status": ["FINISHED"] * 3, "test_acc": [50.0, 60.0, 70.0],
                         "method_hash": ["old", "old", "new"], "start_time": [1, 2, 3], "reason": [""] * 3,
                         "protocol": [""] * 3})
    cell = pick(runs, [0, 1])
    assert cell.values == {0: 70.0} and cell.missing == {1: "other method code"}
    assert cell.mean == 70.0


# ---------------------------------------------------------------------------------------------- 9.4

def test_collapse_rule():
    at_chance = [{"train_loss": 2.0, "train_ce": 2.0, "test_acc": 11.0}, {"train_loss": 1.0, "train_ce": 1.0,
                                                                         "test_acc": 11.9}]
    assert "within 2.0 pp of chance (10.00%)" in collapse_reason(at_chance, 10, 10000)
    learned = [dict(h, test_acc=12.5) for h in at_chance]
    assert collapse_reason(learned, 10, 10000) is None
    # A small test split widens the margin to 3 standard errors of a chance-level classifier.
    assert collapse_reason(learned, 10, 200) is not None and collapse_reason(
        [dict(h, test_acc=17.0) for h in at_chance], 10, 200) is None
    flat = [{"train_loss": 1.0, "train_c": 1.0, "test_acc": 40.0}, {"train_loss": 1.0, "train_c": 1.0, "test_acc": 40.0}]
    assert "never fell" in collapse_reason(flat, 10, 10000)
    # DKD's warm-up raises the total while the cross-entropy falls: a healthy run, not a collapse.
    ramp = [{"train_loss": 1.0, "train_ce": 0.9, "train_nckd": 0.1, "test_acc": 40.0},
            {"train_loss": 2.0, "train_ce": 0.5, "train_nckd": 1.5, "test_acc": 60.0}]
    assert collapse_reason(ramp, 10, 10000) is None
    assert collapse_reason(ramp[:1], 10, 10000) is None  # one epoch: no trend to judge


def test_collapsed_run_is_marked_counted_and_kept_out_of_every_mean(tmp_path, plugins, monkeypatch, capsys):
    from kdbench.report.write import write_report

    plugins("flat", FLAT)
    # A 240-epoch suite shrunk by --epochs 2: DKD's 20-epoch warm-up is logged as the 1 epoch it becomes (9.5).
    path = suite_file(tmp_path, methods=["baseline", "flat", "dkd"],
                      train={"epochs": 240, "batch_size": 64, "lr": 0.05, "milestones": [150]})
    args = ("run", str(path), "--device", "cpu", "--epochs", "2")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "3 jobs finished, 0 failed, 1 collapsed" in err and "collapsed baseline" not in err, err
    _, runs = child_runs()
    flat = next(r for r in runs if r.data.tags["kdbench.method"] == "flat")
    assert flat.data.tags["kdbench.status"] == "collapsed"
    assert flat.data.tags["kdbench.collapsed"].startswith("collapsed: ")
    dkd = next(r for r in runs if r.data.tags["kdbench.method"] == "dkd")
    assert dkd.data.params["method.warmup"] == "1" and dkd.data.params["train.epochs"] == "2"
    assert "kdbench.collapsed" not in dkd.data.tags
    code, err = run_cli(monkeypatch, capsys, *args)  # counted again when skipped
    assert "nothing to do: 4 jobs already finished (1 collapsed)" in err, err

    folder = write_report(path, tmp_path / "results")
    table = pd.read_csv(folder / "comparison.csv").set_index("row")
    assert table.loc["flat"].n == 0 and table.loc["flat"].status == "collapsed" and math.isnan(table.loc["flat"]["mean"])
    assert table.loc["baseline"].n == 1
    assert "– (collapsed)" in (folder / "comparison.md").read_text()
    cost = pd.read_csv(folder / "cost.csv").set_index("method")
    assert cost.loc["flat"].finished == 0 and math.isnan(cost.loc["flat"].test_acc)
    assert "collapsed: " in (folder / "report.md").read_text()  # the reason, in the runs without a number

    # In a cell with other seeds, the collapsed seed is left out of the mean and said.
    cell = pick(pd.DataFrame({"seed": [0, 1], "status": ["FINISHED", "COLLAPSED"], "test_acc": [60.0, 10.0],
                              "method_hash": ["h", "h"], "start_time": [1, 2], "reason": ["", "collapsed"],
                              "protocol": ["", ""]}), [0, 1])
    assert cell.mean == 60.0 and cell.note == "1 collapsed"


# ---------------------------------------------------------------------------------------------- 9.5

def test_epochs_scales_epoch_counted_params_in_the_plan(tmp_path):
    path = suite_file(tmp_path, methods=["dkd", {"method": "dkd", "label": "dkd_w120", "params": {"warmup": 120}},
                                         {"prokt": {"teacher_init": "checkpoint", "teacher_epoch": 120}}],
                      train={"epochs": 240, "batch_size": 64, "milestones": [150, 180, 210]})
    full = {j.method.label: j.config["method_params"] for j in make_plan(load_suite(path), path).jobs}
    assert full["dkd"]["warmup"] == 20 and full["dkd_w120"]["warmup"] == 120 and full["prokt"]["teacher_epoch"] == 120
    plan = make_plan(load_suite(path), path, epochs=4)
    short = {j.method.label: j for j in plan.jobs}
    assert short["dkd"].config["method_params"]["warmup"] == 1  # 20 of 240 -> 0.33 of 4: at least 1
    assert short["dkd_w120"].config["method_params"]["warmup"] == 2  # half the schedule stays half
    assert short["prokt"].config["method_params"]["teacher_epoch"] == 2  # the teacher's route epoch 2 of 4
    assert short["prokt"].teacher_epoch == 2
