"""Seeds trained together (suite field stack_seeds): each seed's numbers equal its own job's within float32
round-off, each seed is its own MLflow run, a stop resumes to the same numbers, a diverged seed fails alone, and a
cell that cannot stack trains apart, said once."""

from __future__ import annotations

import io
import math

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench import Interrupted
from kdbench.config.load import load_suite
from kdbench.config.schema import AugmentConfig, SuiteError, TrainConfig
from kdbench.data.load import load_data
from kdbench.data.spec import DataSpec
from kdbench.plan import make_plan
from kdbench.registry import get_method
from kdbench.run.executors import get_executor
from kdbench.train.engine import EngineOptions, Hooks, fit
from kdbench.train.stacked import StackedMethod, StackedStudent
from kdbench.zoo import create_model

SEEDS = [0, 1, 2]
TRAIN = TrainConfig(epochs=3, batch_size=16, lr=0.05, schedule="step", milestones=[2])
AUG = AugmentConfig(crop_padding=1, flip=True)
ROUND_OFF = 1e-4  # float32: batched kernels sum in another order than one seed's


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec("synthetic", train_size=56, val_size=8, test_size=32, num_classes=4, image_size=28),
                     None, torch.device("cpu"))


def built(name: str, student: str, seed: int, data, params=None):
    """A seed's student, teacher and method, drawn as its own job draws them."""
    c = data.info.input_shape[0]
    torch.manual_seed(seed)
    model = create_model(student, 4, c)
    torch.manual_seed(100)
    teacher = create_model("mnist_mlp_100x2", 4, c)
    return model, teacher, get_method(name)(params or {}, model, teacher, data.info.input_shape)


def stacked_fit(name, student, data, resume=None, hooks=Hooks(), spoil=None):
    models, teachers, methods = zip(*(built(name, student, s, data) for s in SEEDS))
    if spoil is not None:  # a seed whose weights make its loss overflow at once
        with torch.no_grad():
            next(models[spoil].parameters()).fill_(1e30)
    return fit(StackedStudent(list(models)), StackedMethod(list(methods), SEEDS), teachers[0], data, TRAIN, AUG,
               SEEDS[0], EngineOptions.for_device("cpu"), eval_batch_size=16, hooks=hooks, resume=resume)


def largest_difference(a: list[dict], b: list[dict]) -> float:
    keys = [k for k in a[0] if k.startswith(("train_", "test_", "val_")) and not k.endswith("_acc")]
    return max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(a, b) for k in keys)


@pytest.mark.parametrize("name", ["baseline", "kd", "fitnets"])
@pytest.mark.parametrize("student", ["mnist_mlp_30x2", "mnist_convnet_4x1"])
def test_each_stacked_seed_equals_its_own_job_within_round_off(name, student, data):
    stacked = stacked_fit(name, student, data)
    assert [len(lane.history) for lane in stacked.lanes] == [TRAIN.epochs] * len(SEEDS)
    for seed, lane in zip(SEEDS, stacked.lanes):
        model, teacher, method = built(name, student, seed, data)
        alone = fit(model, method, teacher, data, TRAIN, AUG, seed, EngineOptions.for_device("cpu"),
                    eval_batch_size=16)
        assert largest_difference(lane.history, alone.history) < ROUND_OFF
        # an accuracy may move by one image at most, where a logit sat within round-off of another
        assert abs(lane.metrics["test_acc"] - alone.metrics["test_acc"]) <= 100 / 32 + 1e-9
        assert lane.passes.student_backward == alone.passes.student_backward
    other = [lane.history[-1]["train_loss"] for lane in stacked.lanes]
    assert len(set(other)) == len(SEEDS)  # the seeds differ: each drew its own initialisation and batches


def test_a_stopped_stack_resumes_to_the_uninterrupted_numbers(data):
    reference = stacked_fit("kd", "mnist_convnet_4x1", data)
    saved, calls = {}, [0]

    def stop():
        calls[0] += 1
        return calls[0] == 5  # epoch 2, its second step (4 steps an epoch, asked after each step and epoch)

    with pytest.raises(Interrupted):
        stacked_fit("kd", "mnist_convnet_4x1", data, hooks=Hooks(checkpoint=lambda s: saved.update(state=s),
                                                                  should_stop=stop))
    assert (saved["state"]["epoch"], saved["state"]["batch"]) == (1, 1)
    resumed = stacked_fit("kd", "mnist_convnet_4x1", data, resume=saved["state"])
    for a, b in zip(resumed.lanes, reference.lanes):
        drop = ("epoch_time", "images_per_sec")
        assert [{k: v for k, v in h.items() if k not in drop} for h in a.history] == \
               [{k: v for k, v in h.items() if k not in drop} for h in b.history]


def test_a_diverged_seed_fails_alone_and_the_others_train_on(data):
    reference = stacked_fit("baseline", "mnist_mlp_30x2", data)
    spoilt = stacked_fit("baseline", "mnist_mlp_30x2", data, spoil=1)
    assert "training loss" in spoilt.lanes[1].diverged and spoilt.lanes[1].history == []
    for i in (0, 2):
        assert not spoilt.lanes[i].diverged
        assert largest_difference(spoilt.lanes[i].history, reference.lanes[i].history) < ROUND_OFF


# ------------------------------------------------------------------------------------------ whole suites

SUITE = {"name": "tiny", "data": {"dataset": "synthetic", "train_size": 96, "test_size": 32, "num_classes": 4,
                                  "image_size": 28},
         "teachers": ["mnist_mlp_100x2"], "students": ["mnist_mlp_30x2"], "methods": ["baseline", "kd", "dkd"],
         "seeds": SEEDS, "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}


def child_runs(parent: str) -> dict[tuple[str, int], tuple[str, float, float, str]]:
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {(r.data.tags["kdbench.method"], int(r.data.tags["kdbench.seed"])):
            (r.info.status, r.data.metrics["test_acc"], r.data.metrics["train_loss"], r.data.tags["kdbench.job"])
            for r in runs if r.data.tags["kdbench.role"] == "student"}


def test_a_stacked_suite_logs_each_seed_as_its_own_run_with_its_own_numbers(tmp_path):
    apart_path, together_path = tmp_path / "apart.yaml", tmp_path / "together.yaml"
    apart_path.write_text(yaml.safe_dump(SUITE))
    together_path.write_text(yaml.safe_dump({**SUITE, "stack_seeds": True}))
    out = io.StringIO()
    apart = get_executor("inprocess")(make_plan(load_suite(apart_path), apart_path), None, "cpu",
                                      console=Console(file=io.StringIO())).run()
    plan = make_plan(load_suite(together_path), together_path)
    together = get_executor("inprocess")(plan, None, "cpu", console=Console(file=out, width=300)).run()
    assert not apart.failed and not together.failed
    a, t = child_runs(apart.parent_run), child_runs(together.parent_run)
    assert set(a) == set(t) == {(m, s) for m in ("baseline", "kd", "dkd") for s in SEEDS}
    for cell, (status, acc, loss, key) in t.items():
        assert status == "FINISHED"
        stacked = cell[0] != "dkd"  # dkd has a warm-up of its own: its seeds train apart
        assert (key != a[cell][3]) == stacked  # a stacked seed has its own key; a lone one keeps its key
        assert math.isclose(loss, a[cell][2], rel_tol=ROUND_OFF) and abs(acc - a[cell][1]) <= 100 / 32 + 1e-9
    text = out.getvalue()
    assert text.count("train their seeds as separate jobs") == 1 and "dkd on mnist_mlp_100x2->mnist_mlp_30x2" in text
    assert {j.stack for j in plan.jobs if j.method.label == "kd"} != {""}


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_stack_seeds_value_is_one_line_naming_the_field(tmp_path, value):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "stack_seeds": value}))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message and "stack_seeds" in message and str(path) in message
