"""Divergence, corruption and two processes on one suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.plan import make_plan
from kdbench.storage.store import ModelStore
from kdbench.config.load import load_suite


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def children(suite_name="tiny"):
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(suite_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("kdbench.role") != "suite"], \
        [r for r in runs if r.data.tags.get("kdbench.role") == "suite"]


SMALL = {"data": {"dataset": "synthetic", "train_size": 64, "test_size": 32, "num_classes": 4, "image_size": 32},
         "train": {"epochs": 1, "batch_size": 32}}


def test_divergence_fails_the_job_records_why_and_the_suite_goes_on(write_suite, monkeypatch, capsys):
    path = write_suite({**SMALL, "train": {"epochs": 1, "batch_size": 32, "lr_by_model": {"cifar_resnet8": 1e12}}})
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")
    assert code == 1, err
    runs, parents = children()
    by_method = {(r.data.tags["kdbench.role"], r.data.tags["kdbench.method"]): r for r in runs}
    assert by_method[("teacher", "baseline")].info.status == "FINISHED"  # the other jobs went on
    for key in (("student", "baseline"), ("student", "kd")):
        run = by_method[key]
        assert run.info.status == "FAILED"
        assert run.data.tags["kdbench.failure"].startswith("diverged: training loss")
    assert parents[0].info.status == "FAILED"
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")  # a diverged job is not retried
    assert code == 1 and "diverged" not in err
    assert len(children()[0]) == 3


def test_corrupted_teacher_is_never_used_but_retrained(write_suite, monkeypatch, capsys):
    path = write_suite(SMALL)
    assert run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")[0] == 0
    store = ModelStore()
    (key,) = [p.name for p in store.root.iterdir() if (p / "meta.json").is_file()]
    model = store.folder(key) / "model.pt"
    model.write_bytes(model.read_bytes()[:-100])  # truncated
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu", "--fresh")
    assert code == 0, err
    assert "corrupted" in err and "retraining it" in err and "model.pt" in err
    assert list((store.root / "corrupt").iterdir()) and store.has(key)
    store.verify(key)  # the retrained teacher is sound


def test_corrupted_checkpoint_is_reported_and_the_job_restarts(write_suite, monkeypatch, capsys, tmp_path):
    path = write_suite(SMALL)
    plan = make_plan(load_suite(path), path)
    student = next(j for j in plan.jobs if j.method.label == "kd")
    checkpoint = ModelStore().checkpoint_path(student.key)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"0" * 64 + b"\nnot a checkpoint")
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")
    assert code == 0, err
    assert f"{checkpoint}: checkpoint is truncated or altered" in " ".join(err.split())
    assert all(r.info.status == "FINISHED" for r in children()[0])
    assert not checkpoint.exists()


def test_two_processes_on_one_suite_train_each_job_once(write_suite, tmp_path):
    path = write_suite({**SMALL, "seeds": [0, 1]})
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(path), "--device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outputs]
    trained = [line for _, err in outputs for line in err.splitlines() if line.startswith("done ")]
    runs, parents = children()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    jobs = [r.data.tags["kdbench.job"] for r in runs]
    assert len(jobs) == len(set(jobs)) == 5  # teacher, 2 baseline, 2 kd: one run each
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(trained) == 5  # no job trained twice
