"""The seed methods of issue 12 end to end, one epoch each, through the executor (real models, real MLflow in
SQLite, tiny synthetic data): what each run records, the attention weights and PCGrad's statistics."""

import io
import math
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench.run.executors.inprocess import InProcessExecutor as Executor
from kdbench.plan import make_plan
from kdbench.config.load import load_suite

SUITE = {
    "name": "seed_methods",
    "data": {"dataset": "synthetic", "train_size": 64, "test_size": 32, "num_classes": 4, "image_size": 16},
    "augment": {"crop_padding": 2, "flip": True},
    "teachers": ["cifar_resnet14"],
    "students": ["cifar_resnet8"],
    "methods": ["layer_attention", "tang_smooth", "tang_confidence", "tang_topk", "wsl",
                {"method": "fitnets", "combine": "pcgrad"}],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "schedule": "constant"},
}


def test_every_seed_method_runs_one_epoch_and_records_what_it_chose(write_suite):
    path = write_suite(SUITE)
    outcome = Executor(make_plan(load_suite(path), Path(path)), None, "cpu", console=Console(file=io.StringIO())).run()
    assert not outcome.failed, outcome.failed
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("seed_methods").experiment_id], max_results=100,
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run}'")
    students = {r.data.tags["kdbench.method"]: r for r in runs if r.data.tags["kdbench.role"] == "student"}
    assert sorted(students) == ["fitnets+pcgrad", "layer_attention", "tang_confidence", "tang_smooth", "tang_topk",
                                "wsl"]
    for label, r in students.items():
        assert r.info.status == "FINISHED" and math.isfinite(r.data.metrics["test_acc"])
        assert r.data.params["combine"] == ("pcgrad" if label == "fitnets+pcgrad" else "sum")
        assert r.data.metrics["student_backward"] == (4 if label == "fitnets+pcgrad" else 2)  # a backward per term
    assert students["tang_topk"].data.tags["kdbench.protocol"] == "protocol assumed"
    assert students["tang_topk"].data.params["method.k"] == "3"

    attention = students["layer_attention"]
    assert attention.data.params["procedure.attend.layer1"] == "layer1, layer2, layer3"
    weights = {k: v for k, v in attention.data.metrics.items() if k.startswith("attn/")}
    assert len(weights) == 6
    for s_layer in ("layer1", "layer2", "layer3"):
        assert math.isclose(sum(v for k, v in weights.items() if k.startswith(f"attn/{s_layer}/")), 1.0, rel_tol=1e-6)

    pcgrad = students["fitnets+pcgrad"].data.metrics
    assert 0 <= pcgrad["pcgrad_conflict"] <= 1 and "pcgrad_cosine.ce.hint" in pcgrad
