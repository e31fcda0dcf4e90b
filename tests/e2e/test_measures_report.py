"""The measures beyond accuracy from a real run to the report, and the report back into MLflow.

A tiny suite (a teacher, the student alone and KD, two seeds, a validation split) is run once: every run logs the
measures its role has, the teacher's match a float64 computation from its stored weights, the report's columns,
fidelity.md and figure hold the runs' numbers, and `kdbench report` logs its files as artifacts of the parent run,
read back here from the store. A committed store from before the measures keeps its numbers, with dashes saying why.
"""

from __future__ import annotations

import io
import math
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench.cli import main
from kdbench.config.load import load_suite
from kdbench.data.batches import normalize
from kdbench.data.load import load_data
from kdbench.plan import make_plan
from kdbench.report.artifacts import ARTIFACT_PATH, log_report
from kdbench.report.runs import MEASURES
from kdbench.report.write import write_report
from kdbench.run.executors.inprocess import InProcessExecutor as Executor
from kdbench.storage.store import ModelStore
from kdbench.tracking import Tracker
from kdbench.zoo import create_model

from conftest import REPO, float64_measures

SUITE = {"name": "measures", "data": {"dataset": "synthetic", "train_size": 160, "val_size": 48, "test_size": 90,
                                      "num_classes": 10, "image_size": 28},
         "teachers": ["mnist_mlp_100x2"], "students": ["mnist_mlp_30x2"], "methods": ["baseline", "kd"],
         "seeds": [0, 1], "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}
MEASURES = ("agreement", "kl", "ece", "nll", "brier")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("measures_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    suite_path = root / "measures.yaml"
    suite_path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDBENCH_STORE", str(root / "models"))
        mp.chdir(root)  # the experiment's artifacts go to ./mlruns: this store's own
        plan = make_plan(load_suite(suite_path), suite_path)
        outcome = Executor(plan, None, "cpu", tracker=Tracker(uri), console=Console(file=io.StringIO())).run()
    assert not outcome.failed
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(outcome.parent_run).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run}'")
    return {"root": root, "uri": uri, "suite": suite_path, "parent": outcome.parent_run, "plan": plan,
            "runs": runs, "client": client}


def _role(run) -> tuple[str, str]:
    return run.data.tags["kdbench.role"], run.data.tags["kdbench.method"]


def test_every_run_logs_the_measures_of_its_role_every_epoch(store):
    seen = set()
    for run in store["runs"]:
        role, method = _role(run)
        metrics = run.data.metrics
        has_teacher = role == "student" and method == "kd"
        for split in ("test", "val"):
            for m in MEASURES:
                assert (f"{split}_{m}" in metrics) == (has_teacher or m not in ("agreement", "kl")), (role, method, m)
            assert metrics[f"{split}_nll"] == metrics[f"{split}_loss"]
        history = store["client"].get_metric_history(run.info.run_id, "test_ece")
        assert sorted(h.step for h in history) == [1, 2]
        seen.add((role, method))
    assert seen == {("teacher", "baseline"), ("student", "baseline"), ("student", "kd")}


def test_the_teachers_logged_measures_are_its_stored_weights_in_float64(store):
    plan = store["plan"]
    teacher_job = next(j for j in plan.jobs if j.role == "teacher")
    model = create_model(teacher_job.model, 10, 3)
    model.load_state_dict(ModelStore(store["root"] / "models").load_final(teacher_job.key))
    data = load_data(plan.suite.data.spec(), None, "cpu")
    run = next(r for r in store["runs"] if _role(r)[0] == "teacher")
    for split, name in ((data.test, "test"), (data.val, "val")):
        with torch.no_grad():
            logits = model.eval()(normalize(split.images, data.info, channels_last=False))
        want = float64_measures(logits, split.labels)
        for m in ("acc", "ece", "nll", "brier"):
            assert run.data.metrics[f"{name}_{m}"] == pytest.approx(want[m], rel=1e-4, abs=1e-5), (name, m)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return write_report(store["suite"], tmp_path_factory.mktemp("results"), uri=store["uri"])


def test_report_columns_fidelity_table_and_figure_hold_the_runs_numbers(store, report):
    table = pd.read_csv(report / "comparison.csv", keep_default_na=False, na_values=[""])
    kd = table[table.row == "kd"].iloc[0]
    logged = {m: [r.data.metrics[f"test_{m}"] for r in store["runs"] if _role(r) == ("student", "kd")]
              for m in MEASURES}
    for m, values in logged.items():
        assert kd[f"{m}_n"] == 2 and kd[f"{m}_status"] == "ok"
        assert kd[f"{m}_mean"] == pytest.approx(statistics.mean(values), abs=1e-6)
        assert kd[f"{m}_std"] == pytest.approx(statistics.stdev(values), abs=1e-6)
    alone = table[table.row == "baseline"].iloc[0]
    assert alone.agreement_status == "no teacher" and math.isnan(alone.agreement_mean) and alone.ece_n == 2
    teacher = table[table.row == "teacher"].iloc[0]
    assert teacher.kl_status == "no teacher" and teacher.brier_n == 1
    fidelity = (report / "fidelity.md").read_text()
    agreement = fidelity.split("**Top-1 agreement")[1].split("**KL")[0]
    assert f"| kd | {statistics.mean(logged['agreement']):.2f} ± " in agreement
    assert "| teacher |" not in agreement and "baseline" not in agreement  # nothing to agree with
    assert all((report / f"agreement_vs_gap.{ext}").stat().st_size > 0 for ext in ("png", "svg", "pdf"))
    assert "](agreement_vs_gap.png)" in (report / "report.md").read_text()


def _report_cli(store, out: Path, *flags: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setattr(sys, "argv", ["kdbench", "report", str(store["suite"]), "--out", str(out), *flags])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)


def test_report_logs_its_files_as_artifacts_of_the_parent_run(store, tmp_path, monkeypatch):
    client = store["client"]
    _report_cli(store, tmp_path / "quiet", "--no-mlflow-artifacts", monkeypatch=monkeypatch)
    assert client.list_artifacts(store["parent"], ARTIFACT_PATH) == []
    _report_cli(store, tmp_path / "out", monkeypatch=monkeypatch)
    folder = tmp_path / "out" / "measures"
    logged = {Path(a.path).name for a in client.list_artifacts(store["parent"], ARTIFACT_PATH)}
    assert logged == {p.name for p in folder.iterdir()}
    assert {"report.md", "comparison.csv", "fidelity.md", "accuracy_vs_gap.png", "agreement_vs_gap.svg"} <= logged
    back = Path(client.download_artifacts(store["parent"], ARTIFACT_PATH, str(tmp_path / "back")))
    for name in logged:
        assert (back / name).read_bytes() == (folder / name).read_bytes(), name


def test_a_report_whose_artifacts_cannot_be_written_says_so_and_keeps_its_files(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    client = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    experiment = client.create_experiment("elsewhere", artifact_location=str(tmp_path / "a_file" / "artifacts"))
    run = client.create_run(experiment).info.run_id
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.md").write_text("# a report\n")
    heard = []
    assert log_report(client, run, folder, 0, heard.append) == []
    assert len(heard) == 1 and "cannot be written" in heard[0] and (folder / "report.md").is_file()


def before_the_measures(store: Path, copy: Path) -> Path:
    """A copy of a store as kdbench wrote it before the fidelity measures: the same runs without those metrics."""
    shutil.copyfile(store, copy)
    logged = [f"{split}_{m}" for split in ("test", "val") for m in MEASURES]
    with sqlite3.connect(copy) as db:
        for table in ("metrics", "latest_metrics"):
            db.execute(f"delete from {table} where key in ({','.join('?' * len(logged))})", logged)
    return copy


def test_a_store_from_before_the_measures_keeps_its_numbers_and_says_why_the_rest_are_missing(tmp_path):
    committed = REPO / "results" / "quickstart" / "mlflow.db"
    if not committed.is_file():
        pytest.skip("results/quickstart/mlflow.db not present")
    old = before_the_measures(committed, tmp_path / "old.db")
    folder = write_report(REPO / "suites" / "quickstart.yaml", tmp_path / "report", uri=f"sqlite:///{old}")
    table = pd.read_csv(folder / "comparison.csv", keep_default_na=False, na_values=[""])
    runs = pd.read_csv(folder / "runs.csv", keep_default_na=False, na_values=[""])
    client = MlflowClient(f"sqlite:///{old}")
    losses = {r: client.get_run(r).data.metrics.get("test_loss") for r in runs.run_id}
    assert all(runs.test_nll[i] == pytest.approx(losses[r], abs=1e-6) for i, r in enumerate(runs.run_id)
               if runs.status[i] == "FINISHED")  # the NLL every run has always logged as its test loss
    kd = table[table.row == "kd"]
    assert (kd.agreement_status == "not logged").all() and (kd.ece_status == "not logged").all()
    assert (kd.nll_n == kd.n).all() and not (folder / "agreement_vs_gap.png").exists()
    assert "Top-1 agreement with the teacher (%)**: – (not logged" in (folder / "fidelity.md").read_text()
