"""A tiny suite end to end through the CLI: real timm models, real data pipeline, real MLflow (SQLite)."""

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from kdbench.storage.store import ModelStore


def kdbench(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "kdbench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    return proc


def runs_of(suite_name):
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(suite_name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_suite_runs_end_to_end_and_reproduces_bit_for_bit(write_suite):
    path = write_suite()
    first = kdbench("run", str(path), "--device", "cpu")
    assert first.returncode == 0, first.stderr
    client, runs = runs_of("tiny")
    parents = [r for r in runs if r.data.tags.get("kdbench.role") == "suite"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    roles = sorted((r.data.tags["kdbench.role"], r.data.tags["kdbench.method"]) for r in children)
    assert roles == [("student", "baseline"), ("student", "kd"), ("teacher", "baseline")]
    for run in children:
        assert run.info.status == "FINISHED"
        tags, params = run.data.tags, run.data.params
        for tag in ("suite", "teacher", "method", "seed", "role"):
            assert f"kdbench.{tag}" in tags
        assert params["seed"] == "0" and params["config_hash"] == tags["kdbench.job"]
        for key in ("kdbench_version", "torch_version", "timm_version", "cuda_version", "device"):
            assert key in params, key  # provenance: code, library versions and device of every run
        assert params["train.lr"] == "0.05" and params["augment.crop_padding"] == "4"
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert [m.step for m in history] == [1, 2]  # one value per epoch, none per step
    kd = next(r for r in children if r.data.tags["kdbench.method"] == "kd")
    assert kd.data.params["method.T"] == "4.0" and kd.data.params["method.kd_weight"] == "0.9"
    assert kd.data.tags["kdbench.teacher"] == "cifar_resnet14" and kd.data.tags["kdbench.student"] == "cifar_resnet8"
    assert kd.data.metrics["teacher_forward"] == kd.data.metrics["student_backward"] > 0

    teacher = next(r for r in children if r.data.tags["kdbench.role"] == "teacher")
    store = ModelStore()
    key = teacher.data.tags["kdbench.job"]
    assert store.has(key) and sorted(store.route(key)) == [1, 2]  # route checkpoints kept for RCO

    again = kdbench("run", str(path), "--device", "cpu")  # the same plan again: every job is already finished
    assert again.returncode == 0, again.stderr
    # Tiny data, 2 epochs: some runs sit at chance and are counted as collapsed (issue 9.4), none trains again.
    assert "nothing to do: 3 jobs already finished" in again.stderr, again.stderr
    assert "continuing run" not in again.stderr and "done " not in again.stderr, again.stderr
    kept = client.get_run(parents[0].info.run_id).info  # the finished parent run is left as it was
    assert (kept.status, kept.end_time) == ("FINISHED", parents[0].info.end_time)

    second = kdbench("run", str(path), "--device", "cpu", "--fresh")
    assert second.returncode == 0, second.stderr
    assert "reused" in second.stderr  # the teacher is not trained again
    _, runs = runs_of("tiny")
    parent2 = next(r for r in runs if r.data.tags.get("kdbench.role") == "suite"
                   and r.info.run_id != parents[0].info.run_id)
    kd2 = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent2.info.run_id
               and r.data.tags["kdbench.method"] == "kd")
    for metric in ("test_acc", "test_loss", "train_loss"):
        a = [m.value for m in client.get_metric_history(kd.info.run_id, metric)]
        b = [m.value for m in client.get_metric_history(kd2.info.run_id, metric)]
        assert a == b, metric  # same seed, same numbers, bit for bit on CPU


def test_missing_dataset_is_one_line_and_writes_nothing(write_suite, tmp_path):
    path = write_suite({"data": {"dataset": "cifar100"}})
    proc = kdbench("run", str(path), "--data-root", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and "KDBENCH_DATA" in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
