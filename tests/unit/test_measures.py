"""The five measures beyond accuracy (ECE, NLL, Brier against the labels; agreement and KL against the teacher),
each checked against a float64 computation written here, batch by batch sums included, and through fit: a student's
last-epoch numbers are those of its final weights against the teacher it was given."""

import pytest
import torch

from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.data.load import load_data
from kdbench.data.spec import DataSpec
from kdbench.registry import get_method
from kdbench.train.engine import EngineOptions, Provided, evaluate, fit
from kdbench.train.measures import EvalTotals
from kdbench.train.teacher_cache import TeacherCache
from kdbench.zoo import create_model

from conftest import float64_measures

CPU = EngineOptions.for_device("cpu")


def test_each_measure_matches_its_float64_definition_over_batches():
    g = torch.Generator().manual_seed(0)
    n, classes = 300, 7
    logits = torch.randn(n, classes, generator=g) * 3
    teacher = logits + torch.randn(n, classes, generator=g) * 2  # agrees often, not always
    labels = torch.randint(0, classes, (n,), generator=g)
    totals = EvalTotals(torch.device("cpu"), with_teacher=True)
    for start in range(0, n, 64):  # the engine's sums, batch by batch
        totals.add(logits[start:start + 64], labels[start:start + 64], teacher[start:start + 64])
    got, want = totals.results(n), float64_measures(logits, labels, teacher)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert got["loss"] == got["nll"]  # the loss every run has always logged is the NLL
    assert 0 < got["agreement"] < 100 and got["kl"] > 0 and 0 < got["ece"] < 100


def test_measures_at_their_limits():
    labels = torch.tensor([0, 1, 2, 3])
    sure = torch.eye(4)[labels] * 40  # right and certain: no error, no miscalibration, no distance to itself
    totals = EvalTotals(torch.device("cpu"), with_teacher=True)
    totals.add(sure, labels, sure)
    got = totals.results(4)
    assert got["ece"] == pytest.approx(0, abs=1e-9) and got["brier"] == pytest.approx(0, abs=1e-9)
    assert got["agreement"] == 100 and got["kl"] == pytest.approx(0, abs=1e-9)
    wrong = torch.eye(4)[labels.roll(1)] * 40  # wrong and certain: ECE 100 %, Brier 2
    totals = EvalTotals(torch.device("cpu"), with_teacher=True)
    totals.add(wrong, labels, sure)
    got = totals.results(4)
    assert got["ece"] == pytest.approx(100) and got["brier"] == pytest.approx(2) and got["agreement"] == 0
    assert "agreement" not in EvalTotals(torch.device("cpu"), with_teacher=False).results(1)


def _models(data):
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet14", 4, 3).to(memory_format=torch.channels_last).eval()
    torch.manual_seed(1)
    return teacher, create_model("cifar_resnet8", 4, 3).to(memory_format=torch.channels_last)


def _logits(model, split, data):
    from kdbench.data.batches import normalize

    with torch.no_grad():
        return model.eval()(normalize(split.images, data.info, channels_last=True)).float()


def test_fit_logs_every_measure_of_the_final_student_against_its_teacher():
    data = load_data(DataSpec("synthetic", train_size=96, val_size=32, test_size=40, num_classes=4, image_size=16),
                     None, "cpu")
    teacher, student = _models(data)
    method = get_method("kd")({}, student, teacher, data.info.input_shape)
    cache = TeacherCache(teacher, data.train, data.info, 4, True, CPU)
    result = fit(student, method, teacher, data, TrainConfig(epochs=2, batch_size=32, lr=0.05),
                 AugmentConfig(crop_padding=4, flip=True), 0, CPU, eval_batch_size=16,
                 provided=Provided(teacher_cache=cache))
    for split, name in ((data.test, "test"), (data.val, "val")):
        want = float64_measures(_logits(student, split, data), split.labels, _logits(teacher, split, data))
        for measure, value in want.items():
            assert result.metrics[f"{name}_{measure}"] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, measure)
        assert f"{name}_agreement" in result.history[0]  # every epoch, not only the last
    assert len(cache._eval) == 2  # the teacher's test and validation outputs, kept for the next job


def test_a_run_without_teacher_has_no_agreement_and_the_same_accuracy_as_before():
    data = load_data(DataSpec("synthetic", train_size=32, test_size=24, num_classes=4, image_size=16), None, "cpu")
    _, student = _models(data)
    numbers = evaluate(student, data.test, data, CPU, 10)
    logits = _logits(student, data.test, data)
    assert numbers["acc"] == (logits.argmax(1) == data.test.labels).sum().item() / 24 * 100
    assert set(numbers) == {"acc", "loss", "ece", "nll", "brier"}
