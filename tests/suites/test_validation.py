"""The validation split: held out of the training images, the same for every job, the only split choices use."""

from pathlib import Path

import pytest
import torch

from kdbench import KdbenchError
from kdbench.data.spec import DataError, DataSpec
from kdbench.data.load import load_data
from kdbench.data.batches import normalize
from kdbench.train.engine import EngineOptions, fit
from kdbench.method import Method
from kdbench.plan import make_plan
from kdbench.config.schema import AugmentConfig, SuiteError, TrainConfig
from kdbench.config.load import load_suite
from kdbench.zoo import create_model

CPU = torch.device("cpu")


def test_validation_is_held_out_of_the_training_images_by_a_fixed_draw():
    whole = load_data(DataSpec("synthetic", train_size=100, test_size=8), None, CPU)
    data = load_data(DataSpec("synthetic", train_size=100, val_size=30, test_size=8), None, CPU)
    assert len(data.train) == 70 and len(data.val) == 30 and whole.val is None  # train_size counts both
    assert torch.equal(data.test.images, whole.test.images)
    # disjoint, and together exactly the training images (each image identified by its bytes)
    rows = lambda split: {bytes(x.numpy()) for x in split.images}  # noqa: E731
    assert not rows(data.train) & rows(data.val) and rows(data.train) | rows(data.val) == rows(whole.train)
    # drawn, not the first or last 30; training keeps the original order
    assert not torch.equal(data.val.images, whole.train.images[:30])
    assert not torch.equal(data.val.images, whole.train.images[70:])
    kept = [i for i in range(100) if bytes(whole.train.images[i].numpy()) in rows(data.train)]
    assert torch.equal(data.train.images, whole.train.images[kept])
    # the same for every job: it depends on the dataset spec only (no cell seed enters the draw)
    again = load_data(DataSpec("synthetic", train_size=100, val_size=30, test_size=8), None, CPU)
    assert torch.equal(again.val.images, data.val.images) and torch.equal(again.train.labels, data.train.labels)


def test_validation_must_leave_training_images():
    with pytest.raises(DataError, match="val_size 40 leaves no training images"):
        DataSpec("synthetic", train_size=40, val_size=40)
    with pytest.raises(DataError, match="val_size 60000 leaves no training images"):
        DataSpec("mnist", val_size=60000)
    with pytest.raises(DataError, match="non-negative"):
        DataSpec("synthetic", val_size=-1)


class Probing(Method):
    """Records what the engine's probe hands a method that chooses during training."""
    name = "probing"
    needs_teacher = False

    def start_epoch(self, epoch, epochs, ctx):
        self.probed = ctx.probe(5)

    def losses(self, batch, student, teacher):
        return {"ce": torch.nn.functional.cross_entropy(student.logits, batch.labels)}


def test_engine_logs_validation_every_epoch_and_probes_only_validation_images():
    data = load_data(DataSpec("synthetic", train_size=48, val_size=16, test_size=16, num_classes=4, image_size=8),
                     None, CPU)
    torch.manual_seed(0)
    student = create_model("cifar_resnet8", 4, 3)
    method = Probing({}, student, None, (3, 8, 8))
    opts = EngineOptions.for_device("cpu")
    result = fit(student, method, None, data, TrainConfig(epochs=2, batch_size=16), AugmentConfig(), 0, opts)
    assert all({"val_acc", "val_loss", "test_acc", "test_loss"} <= set(h) for h in result.history)
    images, labels = method.probed
    assert torch.equal(images, normalize(data.val.images[:5], data.info, channels_last=opts.channels_last))
    assert torch.equal(labels, data.val.labels[:5])
    no_val = load_data(DataSpec("synthetic", train_size=48, test_size=16, num_classes=4, image_size=8), None, CPU)
    with pytest.raises(KdbenchError, match="validation split: set data.val_size"):
        fit(student, Probing({}, student, None, (3, 8, 8)), None, no_val, TrainConfig(epochs=1, batch_size=16),
            AugmentConfig(), 0, opts)
    assert "val_acc" not in fit(student, Probing({}, student, None, (3, 8, 8)), None, no_val, TrainConfig(epochs=0),
                                AugmentConfig(), 0, opts).metrics


@pytest.mark.parametrize("method, choice", [({"takd": {}}, "takd assistants 'auto'"),
                                            ({"rco": {"choice": "greedy"}}, "rco choice 'greedy'")])
def test_a_choice_without_a_validation_split_is_refused_with_how_to_add_one(write_suite, method, choice):
    path = write_suite({"methods": ["baseline", "kd", method]})
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value) == (f"{path}: field 'methods.2': {choice} chooses on a validation split: "
                               f"set data.val_size (e.g. 25)")  # a tenth of TINY's 256 training images
    data = {"dataset": "synthetic", "train_size": 256, "val_size": 32, "test_size": 128, "num_classes": 4,
            "image_size": 32}
    load_suite(write_suite({"methods": ["baseline", method], "data": data}))  # with one, it loads
    load_suite(write_suite({"methods": ["baseline", {"rco": {}}, {"takd": {"assistants": "cifar_resnet8"}}]}))


def test_val_size_changes_every_job_key_and_0_keeps_the_keys_of_suites_without_it(write_suite):
    def keys(path):
        return {(j.role, j.model, j.method.label): j.key for j in make_plan(load_suite(path), Path(path)).jobs}

    data = {"dataset": "synthetic", "train_size": 256, "test_size": 128, "num_classes": 4, "image_size": 32}
    plain, zero, held = (keys(write_suite({"data": d}, name=f"{i}.yaml"))
                         for i, d in enumerate([data, {**data, "val_size": 0}, {**data, "val_size": 32}]))
    assert plain == zero  # no validation split: the same training set, the same stored teachers
    assert plain.keys() == held.keys() and not set(plain.values()) & set(held.values())
