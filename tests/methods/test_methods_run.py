"""Every method end to end through the executor (real models, real MLflow in SQLite, tiny synthetic data):
what each run records, RCO's anchors per stage, TAKD's assistant stored once and reused, ProKT's costs."""

import io
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench.run.executors.inprocess import InProcessExecutor as Executor
from kdbench.plan import make_plan
from kdbench.storage.store import ModelStore
from kdbench.config.load import load_suite

SUITE = {
    "name": "methods",
    "data": {"dataset": "synthetic", "train_size": 80, "val_size": 16, "test_size": 32, "num_classes": 4,
             "image_size": 16},  # 64 trained on, 16 held out for takd_auto's choice
    "augment": {"crop_padding": 2, "flip": True},
    "teachers": ["cifar_resnet20", "cifar_resnet14"],  # resnet14: a candidate assistant for "auto"
    "students": ["cifar_resnet8"],
    "pairs": [["cifar_resnet20", "cifar_resnet8"]],
    "methods": ["kd", "fitnets", "rco", {"takd": {"assistants": "cifar_resnet14"}},
                {"method": "takd", "label": "takd_auto"}, "prokt", "dkd", "dist", "eskd", "dgkd", "dfa"],
    "seeds": [0],
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.05, "schedule": "step", "milestones": [3]},
}


def run(path, **narrow):
    plan = make_plan(load_suite(path), Path(path), **narrow)
    executor = Executor(plan, None, "cpu", console=Console(file=io.StringIO()))
    outcome = executor.run()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("methods").experiment_id], max_results=1000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run}'")
    return executor, outcome, {r.info.run_name: r for r in runs}


def test_every_method_runs_records_its_procedure_and_cost_and_takd_reuses_its_assistant(write_suite):
    path = write_suite(SUITE)
    executor, outcome, runs = run(path)
    assert not outcome.failed, outcome.failed
    students = {r.data.tags["kdbench.method"]: r for r in runs.values() if r.data.tags["kdbench.role"] == "student"}
    assert sorted(students) == ["dfa", "dgkd", "dist", "dkd", "eskd", "fitnets", "kd", "prokt", "rco", "takd", "takd_auto"]
    for r in runs.values():  # cost accounting: every trained run
        assert r.info.status == "FINISHED"
        for metric in ("wall_time", "images_per_sec", "teacher_forward", "teacher_backward", "student_forward",
                       "student_backward"):
            assert metric in r.data.metrics, (r.info.run_name, metric)

    # RCO: stage i distilled from anchor i, the teacher's route checkpoints after epochs 1..4
    rco = students["rco"].data.params
    assert [rco[f"procedure.stage{i}.anchor_epoch"] for i in range(1, 5)] == ["1", "2", "3", "4"]
    assert students["rco"].data.metrics["teacher_backward"] == 0

    # ProKT: the teacher trains too; its accuracy is logged each epoch; costs per step 2 fwd + 1 bwd each
    prokt = students["prokt"]
    assert prokt.data.tags["kdbench.protocol"] == "protocol assumed" and prokt.data.params["teacher_init"] == "random"
    m = prokt.data.metrics
    assert (m["teacher_forward"], m["teacher_backward"], m["student_forward"], m["student_backward"]) == (16, 8, 16, 8)
    assert len(MlflowClient().get_metric_history(prokt.info.run_id, "teacher_test_acc")) == 4

    assert students["fitnets"].data.params["procedure.hint_layer"].startswith("layer2")

    # TAKD: one assistant trained (named and auto choose the same one), and the students are taught by it
    assistants = [r for r in runs.values() if r.data.tags["kdbench.role"] == "assistant"
                  and r.data.tags["kdbench.method_name"] == "takd"]
    assert len(assistants) == 1 and "kdbench.reused" not in assistants[0].data.tags
    assistant_key = assistants[0].data.tags["kdbench.job"]
    for label in ("takd", "takd_auto"):
        params = students[label].data.params
        assert params["assistant_job"] == assistant_key and params["assistant_models"] == "cifar_resnet14"
        assert students[label].data.tags["kdbench.teacher"] == "cifar_resnet20"
    store = ModelStore()
    # chosen by the reference runs' validation accuracy (the test split is only reported)
    choice = students["takd_auto"].data.params["assistant_choice"]
    reference = next(j for j in executor.plan.jobs if j.model == "cifar_resnet14" and j.role != "assistant")
    val_acc = store.meta(reference.key)["metrics"]["val_acc"]
    assert choice.startswith("auto: cifar_resnet14, validation accuracy closest to")
    assert choice.endswith(f"candidates: cifar_resnet14 {val_acc:.2f}"), choice
    job = executor.plan.job(students["takd"].data.tags["kdbench.job"])
    taught_by = executor.build_teacher(job).state_dict()
    assistant = store.load_final(assistant_key)
    assert all(torch.equal(taught_by[k].cpu(), v) for k, v in assistant.items())

    # ESKD: the teacher's route checkpoint nearest half its run (epoch 2 of 4), never retrained
    eskd = students["eskd"].data
    assert eskd.params["procedure.teacher_epoch"] == "2" and eskd.metrics["teacher_backward"] == 0
    # DGKD: the student guided by the teacher and the model between (resnet14), itself guided by the teacher
    dgkd = students["dgkd"].data
    assert dgkd.params["guide_models"] == "cifar_resnet20 > cifar_resnet14"
    assert dgkd.params["assistant_choice"] == "between: cifar_resnet14"
    dgkd_assistant, = [r for r in runs.values() if r.data.tags["kdbench.role"] == "assistant"
                       and r.data.tags["kdbench.method_name"] == "dgkd"]
    assert dgkd_assistant.data.params["guide_models"] == "cifar_resnet20"
    assert 0 < dgkd.metrics["teacher_forward"] < 2 * dgkd.metrics["student_forward"]  # guides dropped at random

    # DFA: the mix of resnet20's blocks searched in epoch 1 of 4 (3 student passes per step), then frozen
    dfa = students["dfa"].data
    assert dfa.params["procedure.search"] == "1 of 4 epochs; frozen after epoch 1"
    assert dfa.params["procedure.stage2"] == "student layer2 <- teacher layer2.0, layer2.1, layer2.2"
    assert (dfa.metrics["student_forward"], dfa.metrics["student_backward"]) == (2 * 3 + 3 * 2, 2 * 3 + 3 * 2)

    # A second cell with the same teacher and assistant (another seed, another suite run) reuses it
    _, outcome2, runs2 = run(path, methods=["takd"], seeds=[1])
    assert not outcome2.failed
    again = [r for r in runs2.values() if r.data.tags["kdbench.role"] == "assistant"]
    assert len(again) == 1 and again[0].data.tags["kdbench.reused"] == "true"
    assert "wall_time" not in again[0].data.metrics  # not trained again
    student2 = next(r for r in runs2.values() if r.data.tags["kdbench.role"] == "student")
    assert student2.data.params["assistant_job"] == assistant_key and student2.data.tags["kdbench.seed"] == "1"
