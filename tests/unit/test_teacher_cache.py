"""Shared teacher outputs: the cached logits are the numbers a fresh teacher forward gives, and a run with
the cache trains to exactly the same student as a run without it."""

import pytest
import torch

from kdbench.data.spec import DataSpec
from kdbench.data.batches import (Views, epoch_batches, epoch_views, make_generator, normalize, num_views, view_ids,
                                  views_from_ids)
from kdbench.data.load import load_data
from kdbench.train.engine import EngineOptions, Provided, fit
from kdbench.registry import get_method
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.train.teacher_cache import TeacherCache
from kdbench.zoo import create_model

CPU = EngineOptions.for_device("cpu")


def _setup(train_size=96):
    # 16x16 images keep the models cheap; the crop-and-flip is CIFAR's (padding 4, flip)
    data = load_data(DataSpec("synthetic", train_size=train_size, test_size=16, num_classes=5, image_size=16), None,
                     "cpu")
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", 5, 3).eval().requires_grad_(False)
    if CPU.channels_last:  # as the executor prepares a teacher
        teacher = teacher.to(memory_format=torch.channels_last)
    return data, teacher


def test_view_ids_cover_every_view_and_invert():
    for padding, flip in ((4, True), (2, False), (0, True)):
        n = num_views(padding, flip)
        span = torch.arange(2 * padding + 1)
        top, left, flips = torch.meshgrid(span, span, torch.tensor([0, 1] if flip else [0]), indexing="ij")
        views = Views(top.reshape(-1), left.reshape(-1), flips.reshape(-1).bool())
        ids = view_ids(views, len(views.top), padding, flip, torch.device("cpu"))
        assert sorted(ids.tolist()) == list(range(n))  # one id per distinct view
        back = views_from_ids(ids, padding, flip)
        assert all(torch.equal(a, b) for a, b in zip(back, views))
    assert num_views(4, True) == 162


def test_epoch_views_replays_epoch_batches():
    data, _ = _setup()
    with_views = list(epoch_batches(data.train, 40, make_generator("cpu", 1), make_generator("cpu", 2), 4, True,
                                    with_views=True))
    plain = list(epoch_batches(data.train, 40, make_generator("cpu", 1), make_generator("cpu", 2), 4, True))
    ahead = list(epoch_views(len(data.train), 40, make_generator("cpu", 1), make_generator("cpu", 2), 4, True))
    assert len(with_views) == len(plain) == len(ahead) == 3
    for (x, y, idx, views), (px, py), (aidx, aviews) in zip(with_views, plain, ahead):
        assert torch.equal(x, px) and torch.equal(y, py) and torch.equal(idx, aidx)
        assert all(torch.equal(a, b) for a, b in zip(views, aviews))
        assert torch.equal(y, data.train.labels[idx])


@pytest.mark.parametrize("padding,flip", [(4, True), (0, False)])  # CIFAR's views; no augmentation (MNIST's)
def test_cached_logits_equal_a_fresh_teacher_forward(padding, flip):
    data, teacher = _setup()
    cache = TeacherCache(teacher, data.train, data.info, padding, flip, CPU)
    batches = list(epoch_batches(data.train, 32, make_generator("cpu", 3), make_generator("cpu", 4), padding, flip,
                                 with_views=True))
    calls = cache.fill(((idx, views) for _, _, idx, views in batches), 32)
    assert calls == 3 and cache.size == cache.images_computed == 96
    for images, _, idx, views in batches:
        with torch.no_grad():
            fresh = teacher(normalize(images, data.info, channels_last=CPU.channels_last))
        assert torch.equal(cache.lookup(idx, views), fresh)  # bit for bit
    # a second epoch computes only the views it has not seen before
    again = list(epoch_views(len(data.train), 32, make_generator("cpu", 5), make_generator("cpu", 6), padding, flip))
    before = cache.size

    def pairs(drawn):
        return {(i, v) for idx, views in drawn
                for i, v in zip(idx.tolist(), view_ids(views, len(idx), padding, flip, idx.device).tolist())}

    cache.fill(again, 32)
    new = pairs(again) - pairs((idx, views) for _, _, idx, views in batches)
    assert cache.size - before == len(new) < 96
    assert cache.fill(again, 32) == 0  # nothing left to compute
    if not flip and not padding:
        assert cache.size == 96  # one view per image


def test_fit_with_shared_teacher_outputs_trains_the_same_student():
    data, teacher = _setup(train_size=64)
    train = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    augment = AugmentConfig(crop_padding=4, flip=True)
    kd = get_method("kd")
    runs = []
    cache = TeacherCache(teacher, data.train, data.info, 4, True, CPU)
    for use_cache in (False, True, True):  # the third run reads what the second one filled
        torch.manual_seed(1)
        student = create_model("cifar_resnet8", 5, 3)
        method = kd({}, student, teacher, data.info.input_shape)
        result = fit(student, method, teacher, data, train, augment, 7, CPU,
                     provided=Provided(teacher_cache=cache if use_cache else None))
        runs.append((result, cache.images_computed))
    (plain, _), (first, filled), (second, filled_after) = runs
    timing = ("epoch_time", "images_per_sec")
    numbers = [[{k: v for k, v in h.items() if k not in timing} for h in r.history] for r in (plain, first, second)]
    assert numbers[0] == numbers[1] == numbers[2]  # every loss and accuracy the same, bit for bit
    assert plain.passes.teacher_forward == first.passes.teacher_forward == 4  # 2 epochs x 2 batches (fills)
    assert second.passes.teacher_forward == 0 and filled_after == filled <= 128  # the second job reused them all
    baseline = get_method("baseline")({}, create_model("cifar_resnet8", 5, 3), None, data.info.input_shape)
    assert not baseline.teacher_logits_only and kd.teacher_logits_only


def test_suite_run_shares_teacher_outputs_across_methods(write_suite):
    from kdbench.run.executors.inprocess import InProcessExecutor as Executor
    from kdbench.plan import make_plan
    from kdbench.config.load import load_suite
    from kdbench.tracking import Tracker

    path = write_suite({"methods": ["kd", {"method": "kd", "label": "kd_T2", "params": {"T": 2.0}}, "baseline"],
                        "data": {"dataset": "synthetic", "train_size": 64, "test_size": 32, "num_classes": 4,
                                 "image_size": 16}, "train": {"epochs": 1, "batch_size": 32}, "teacher_cache": True})
    plan = make_plan(load_suite(path), path)
    tracker = Tracker()
    outcome = Executor(plan, None, "cpu", tracker=tracker).run()
    assert not outcome.failed
    runs = tracker.client.search_runs([tracker.client.get_experiment_by_name("tiny").experiment_id])
    forwards = {r.data.tags["kdbench.method"]: r.data.metrics.get("teacher_forward") for r in runs
                if r.data.tags.get("kdbench.role") == "student"}
    # the first logit method fills the cache (2 batches), the second, same seed, reads it: no teacher forward
    assert forwards == {"kd": 2.0, "kd_T2": 0.0, "baseline": 0.0}


def test_a_cache_for_other_views_is_refused():
    data, teacher = _setup(train_size=32)
    cache = TeacherCache(teacher, data.train, data.info, 4, True, CPU)
    student = create_model("cifar_resnet8", 5, 3)
    method = get_method("kd")({}, student, teacher, data.info.input_shape)
    with pytest.raises(ValueError, match="another training split or augmentation"):
        fit(student, method, teacher, data, TrainConfig(epochs=1), AugmentConfig(crop_padding=2, flip=True), 0, CPU,
            provided=Provided(teacher_cache=cache))
