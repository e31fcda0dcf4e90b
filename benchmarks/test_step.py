"""One training step of every registered method, through engine.fit() (an epoch of one batch, so it includes
the epoch's one host sync and a one-image evaluation), plus kd reading shared teacher outputs (warm: no teacher forward)."""

import pytest
import torch

from conftest import synchronize
from kdbench.data.spec import DataSpec
from kdbench.data.load import load_data
from kdbench.train.engine import EngineOptions, Provided, fit
from kdbench.registry import get_method, methods
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.train.teacher_cache import TeacherCache
from kdbench.zoo import create_model

BATCH = 64
TEACHER, STUDENT = "cifar_resnet14", "cifar_resnet8"  # small, so a CPU round stays short


@pytest.fixture(scope="module")
def setup(device):
    opts = EngineOptions.for_device(str(device))
    data = load_data(DataSpec("synthetic", train_size=BATCH, test_size=1, num_classes=100), None, opts.device)
    torch.manual_seed(0)
    teacher = create_model(TEACHER, 100, 3).to(opts.device).eval().requires_grad_(False)
    if opts.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return opts, data, teacher


def step_runner(opts, data, teacher, name, cache=None):
    torch.manual_seed(0)
    student = create_model(STUDENT, 100, 3).to(opts.device)
    if opts.channels_last:
        student = student.to(memory_format=torch.channels_last)
    cls = get_method(name)
    method = cls({}, student, teacher if cls.needs_teacher else None, data.info.input_shape).to(opts.device)
    train = TrainConfig(epochs=1, batch_size=BATCH, schedule="constant")
    augment = AugmentConfig(crop_padding=4, flip=True)

    def step():  # seed 0 each time: the same batch and views, like a warm teacher cache sees
        fit(student, method, teacher if cls.needs_teacher else None, data, train, augment, 0, opts,
            provided=Provided(teacher_cache=cache))
        synchronize(opts.device)

    return step


@pytest.mark.parametrize("name", list(methods()))
def test_step(benchmark, setup, name):
    benchmark(step_runner(*setup, name))


def test_step_kd_shared_teacher_outputs(benchmark, setup):
    opts, data, teacher = setup
    cache = TeacherCache(teacher, data.train, data.info, 4, True, opts)
    run = step_runner(opts, data, teacher, "kd", cache)
    run()  # the same seed every step, so the same views: after this one, every step only gathers
    assert cache.size == BATCH
    benchmark(run)
