"""Streaming data (kdbench.data.stream) and each device's part of a batch (kdbench.data.shard).

Where both loaders apply (a folder of images already at image_size, exact crops, no evaluation resize, generators
on the CPU) the streamed batches are the device-resident ones, image for image; a device's parts of every batch
put back together are the whole batch; ImageNet's crops are drawn per (seed, epoch), so a resumed epoch reads the
same images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from kdbench.config.load import load_suite
from kdbench.config.schema import SuiteError
from kdbench.data.batches import epoch_batches, eval_batches, make_generator
from kdbench.data.load import load_data
from kdbench.data.shard import Shard, shard_data, shard_problem
from kdbench.data.sources import cached_fingerprint, data_fingerprint, load_splits
from kdbench.data.spec import DataError, DataSpec
from kdbench.data.stream import ATTEMPTS, CROP_RATIO, CROP_SCALE, load_stream, read_image, resized_crop_box

CLASSES = ("ant", "bee", "cat")


def image_tree(root: Path, sizes=((16, 16),), n_train=9, n_test=4, test_name="test", classes=CLASSES) -> Path:
    """train/<class>/*.png and test/ (or val/) of random images, of the given (width, height) sizes in turn."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), (test_name, n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i:02d}.png")
    return root


def spec(**kw) -> DataSpec:
    return DataSpec(**{"dataset": "imagefolder", "path": "tree", "num_classes": 3, "image_size": 16, **kw})


def gens(epoch: int):
    return make_generator("cpu", 100 + epoch), make_generator("cpu", 200 + epoch)


def same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_device_resident_ones(tmp_path, workers):
    image_tree(tmp_path / "tree")
    kw = {"train_size": 24, "val_size": 5}
    resident = load_data(spec(**kw), tmp_path, "cpu")
    streamed = load_stream(spec(loader="stream", **kw), tmp_path, "cpu", workers=workers)
    assert [len(s) for s in (streamed.train, streamed.val, streamed.test)] == [19, 5, 12]
    for epoch in range(2):  # the same permutation, crops and flips, image for image
        same_batches(epoch_batches(resident.train, 4, *gens(epoch), 2, True),
                     epoch_batches(streamed.train, 4, *gens(epoch), 2, True))
    # a resumed epoch: the batches before `start` are drawn, not read; the rest are those of the whole epoch
    whole = list(epoch_batches(streamed.train, 4, *gens(0), 2, True))
    same_batches(whole[3:], epoch_batches(streamed.train, 4, *gens(0), 2, True, start=3))
    same_batches(whole[3:], epoch_batches(resident.train, 4, *gens(0), 2, True, start=3))
    for mine, theirs in ((streamed.test, resident.test), (streamed.val, resident.val)):  # the same held-out images
        same_batches(eval_batches(theirs, 5), eval_batches(mine, 5))


def test_each_device_reads_its_part_of_every_batch(tmp_path):
    image_tree(tmp_path / "tree")
    resident = load_data(spec(), tmp_path, "cpu")
    streamed = load_stream(spec(loader="stream"), tmp_path, "cpu", workers=0)
    for data, parts in ((resident, [shard_data(resident, Shard(r, 3)) for r in range(3)]),
                        (streamed, [load_stream(spec(loader="stream"), tmp_path, "cpu", Shard(r, 3), workers=0)
                                    for r in range(3)])):
        whole = list(epoch_batches(data.train, 7, *gens(0), 1, True))  # 27 images: batches of 7, 7, 7, 6
        by_device = [list(epoch_batches(p.train, 7, *gens(0), 1, True)) for p in parts]
        assert [[len(x) for x, _ in b] for b in by_device] == [[3, 3, 3, 2], [2, 2, 2, 2], [2, 2, 2, 2]]
        for step, (images, labels) in enumerate(whole):
            assert torch.equal(images, torch.cat([b[step][0] for b in by_device]))
            assert torch.equal(labels, torch.cat([b[step][1] for b in by_device]))
        test = torch.cat([x for x, _ in eval_batches(data.test, 5)])
        parts_test = [list(eval_batches(p.test, 5)) for p in parts]  # batches of 5, 5, 2: the last has no third
        assert [len(b) for b in parts_test] == [3, 3, 2] and len(parts[2].test) == len(data.test) == 12
        assert torch.equal(test, torch.cat([x for step in range(3) for b in parts_test if step < len(b)
                                            for x in [b[step][0]]]))


def test_a_batch_that_cannot_be_shared_is_refused_in_one_line():
    assert Shard(1, 3).part(7) == slice(3, 5) and Shard(2, 3).part(2) == slice(2, 2)
    assert shard_problem(120, 8, 2) is None and shard_problem(121, 8, 2) is not None  # 121 = 15 x 8 + 1
    assert "does not split evenly over 4 devices" in shard_problem(128, 6, 4)
    assert "holds 3 of the 131 training images, fewer than the 4 devices" in shard_problem(131, 8, 4)
    with pytest.raises(ValueError):
        Shard(2, 2)


def test_random_resized_crops_are_drawn_per_seed_and_epoch(tmp_path):
    image_tree(tmp_path / "tree", sizes=((40, 24), (20, 50), (31, 31)), n_train=6, n_test=2)
    data = load_stream(spec(loader="stream", train_crop="random_resized", eval_resize=18), tmp_path, "cpu",
                       workers=0)
    first = list(epoch_batches(data.train, 5, *gens(0), 0, True))
    assert first[0][0].shape == (5, 3, 16, 16)
    same_batches(first, epoch_batches(data.train, 5, *gens(0), 0, True))  # the same draws: the same images
    same_batches(first[2:], epoch_batches(data.train, 5, *gens(0), 0, True, start=2))  # resumed in the epoch
    other = list(epoch_batches(data.train, 5, *gens(1), 0, True))
    assert not torch.equal(first[0][0], other[0][0])
    # the order and the flips are the resident path's draws (the crops have a stream of their own): the batch
    # without flips, flipped where the resident path's flip-only draw says, is the batch with them
    order, aug = gens(0)
    perm = torch.randperm(len(data.train), generator=order)
    flips = torch.randint(0, 2, (5,), generator=aug).bool()
    unflipped = next(epoch_batches(data.train, 5, *gens(0), 0, False))[0]
    assert torch.equal(first[0][1], data.train.labels[perm[:5]]) and flips.any() and not flips.all()
    assert torch.equal(first[0][0], torch.where(flips[:, None, None, None], unflipped.flip(-1), unflipped))


def test_the_resized_crop_box_is_torchvision_rule():
    g = torch.Generator().manual_seed(0)
    for width, height in ((40, 24), (20, 50), (500, 375), (7, 300)):
        area = width * height
        for _ in range(200):
            top, left, h, w = resized_crop_box(width, height, torch.rand((ATTEMPTS, 4), generator=g))
            assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
    # a first attempt that fits is taken: area fraction and aspect from the first two draws, position from the next
    draws = torch.zeros(ATTEMPTS, 4)
    draws[0] = torch.tensor([0.5, 0.5, 0.999, 0.0])
    target = 500 * 375 * (CROP_SCALE[0] + 0.5 * (CROP_SCALE[1] - CROP_SCALE[0]))
    aspect = math.exp((math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1])) / 2)
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    assert resized_crop_box(500, 375, draws) == (375 - h, 0, h, w)
    # nothing fits (the whole area at an aspect the image cannot hold): the centred box of the nearest aspect
    never = torch.zeros(ATTEMPTS, 4)
    never[:, 0] = 0.99
    never[:, 1] = 0.0  # aspect 3/4: wider than 7 x 300 allows at that area
    assert resized_crop_box(7, 300, never) == ((300 - round(7 / CROP_RATIO[0])) // 2, 0, round(7 / CROP_RATIO[0]), 7)


def test_evaluation_crop_is_torchvision_resize_then_centre_crop(tmp_path):
    image_tree(tmp_path / "tree", sizes=((40, 27),), n_train=1, n_test=1)
    path = next((tmp_path / "tree" / "test").rglob("*.png"))
    ours = read_image(str(path), 16, "eval", 20, None)
    with Image.open(path) as image:
        theirs = transforms.Compose([transforms.Resize(20), transforms.CenterCrop(16)])(image.convert("RGB"))
    assert np.array_equal(ours, np.asarray(theirs))


def test_imagenet_layout_default_folder_and_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    classes = [f"n{i:08d}" for i in range(1000)]
    image_tree(tmp_path / "imagenet", sizes=((6, 5),), n_train=1, n_test=1, test_name="val", classes=classes)
    imagenet = DataSpec("imagenet", loader="stream", image_size=4, train_crop="random_resized", eval_resize=4,
                        train_size=16)
    assert cached_fingerprint(imagenet, tmp_path) is None  # never listed: a dry run cannot know it
    data = load_splits(imagenet, tmp_path, "cpu")  # <root>/imagenet/{train,val}: ImageNet's layout
    assert (data.info.num_classes, len(data.train), len(data.test)) == (1000, 16, 1000)
    assert next(eval_batches(data.test, 8))[0].shape == (8, 3, 4, 4)
    assert cached_fingerprint(imagenet, tmp_path) == data.fingerprint == data_fingerprint(imagenet, tmp_path)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "imagenet" / "val" / classes[0] / "00.png")
    assert data_fingerprint(imagenet, tmp_path) != data.fingerprint  # a file changed: another fingerprint


def test_unreadable_images_are_one_line_errors(tmp_path):
    image_tree(tmp_path / "tree", sizes=((16, 16), (16, 15)), n_train=2, n_test=1)
    data = load_stream(spec(loader="stream"), tmp_path, "cpu", workers=1)
    with pytest.raises(DataError, match=r"\.png is 16x15, but the suite declares image_size: 16") as err:
        list(epoch_batches(data.train, 6, *gens(0), 0, False))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    (tmp_path / "tree" / "test" / "ant" / "00.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode .*00.png"):
        list(eval_batches(load_stream(spec(loader="stream"), tmp_path, "cpu", workers=0).test, 4))
    with pytest.raises(DataError, match="found 3 classes but the suite declares num_classes: 4"):
        load_stream(spec(loader="stream", num_classes=4), tmp_path, "cpu")
    with pytest.raises(DataError, match="no train/ and test/ \\(or val/\\) folders"):
        load_stream(spec(loader="stream", path="nowhere"), tmp_path, "cpu")


@pytest.mark.parametrize("data, field, message", [
    ({"dataset": "imagenet"}, "data", "imagenet: set loader: stream"),
    ({"dataset": "imagefolder", "path": "x", "num_classes": 3, "image_size": 8, "train_crop": "random_resized"},
     "data", "train_crop need loader: stream"),
    ({"dataset": "synthetic", "loader": "stream"}, "data", "synthetic fits on the device: leave loader out"),
    ({"dataset": "imagenet", "loader": "stream", "num_classes": 100}, "data", "imagenet has 1000 classes"),
])
def test_what_only_streaming_can_do_is_refused_elsewhere(write_suite, data, field, message):
    with pytest.raises(SuiteError) as err:
        load_suite(write_suite({"data": data}))
    assert f"field '{field}'" in str(err.value) and message in str(err.value)


def test_shared_teacher_outputs_need_resident_data(write_suite):
    path = write_suite({"data": {"dataset": "imagefolder", "path": "x", "num_classes": 3, "image_size": 8,
                                 "loader": "stream"}, "teacher_cache": True})
    with pytest.raises(SuiteError, match="field 'teacher_cache': expected false with data.loader stream"):
        load_suite(path)
