"""Tests for kdbench.data: device-resident splits, batch augmentation, and every loader's code path.

Real data (/work/shared/data, or $KDBENCH_DATA) is used when present and skipped otherwise; CIFAR and
image folders are tested on small data made here, through the same code paths.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from kdbench.data.spec import DataError, DataSpec, DatasetInfo, dataset_info
from kdbench.data.batches import Split, augment, crop_flip, epoch_batches, eval_batches, make_generator, normalize
from kdbench.data import load as kd_load
from kdbench.data.load import load_data, resolve_data_root

CPU = torch.device("cpu")


def _shared_data_root() -> Path | None:
    env = os.environ.get("KDBENCH_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    return root if root.is_dir() else None


def _mnist_root(name: str = "MNIST") -> Path:
    root = _shared_data_root()
    if root is None or not (root / name / "raw").is_dir():
        pytest.skip(f"no {name} under the shared data root (set KDBENCH_DATA)")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Never read or write the user's ~/.cache/kdbench.
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "kdcache"))


# ----------------------------------------------------------------------------------------------------
# crop_flip / augment


def _reference(images: torch.Tensor, top, left, flip, padding: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    out = []
    for img, t, l, f in zip(images, top.tolist(), left.tolist(), flip.tolist()):
        x = TF.pad(img, [padding] * 4, fill=0)
        x = TF.crop(x, t, l, h, w)
        if f:
            x = TF.horizontal_flip(x)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels,size,padding", [(3, 32, 4), (1, 28, 2)])
def test_crop_flip_matches_torchvision(dtype, channels, size, padding):
    g = torch.Generator().manual_seed(size + padding)
    n = 40
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    else:
        images = torch.randn(n, channels, size, size, generator=g)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    # make sure the extreme offsets and both flip states are exercised
    top[:4] = torch.tensor([0, 0, 2 * padding, 2 * padding])
    left[:4] = torch.tensor([0, 2 * padding, 0, 2 * padding])
    flip[:2] = torch.tensor([True, False])
    out = crop_flip(images, top, left, flip, padding)
    assert out.dtype == dtype and out.shape == images.shape and out.is_contiguous()
    torch.testing.assert_close(out, _reference(images, top, left, flip, padding), rtol=0, atol=0)


def test_crop_flip_center_no_flip_is_identity():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    four = torch.full((5,), 4)
    assert torch.equal(crop_flip(images, four, four, torch.zeros(5, dtype=torch.bool), 4), images)
    zero = torch.zeros(5, dtype=torch.long)
    assert torch.equal(crop_flip(images, zero, zero, torch.ones(5, dtype=torch.bool), 0), images.flip(-1))


def test_augment_reproducible_and_seed_dependent():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment(images, make_generator(CPU, 1), 4, True)
    b = augment(images, make_generator(CPU, 1), 4, True)
    c = augment(images, make_generator(CPU, 2), 4, True)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, images)
    # each output is some crop/flip of its input: replaying the documented draw order reproduces it
    g = make_generator(CPU, 1)
    top = torch.randint(0, 9, (64,), generator=g)
    left = torch.randint(0, 9, (64,), generator=g)
    flips = torch.randint(0, 2, (64,), generator=g).bool()
    assert torch.equal(a, crop_flip(images, top, left, flips, 4))
    assert set(top.tolist()) == set(range(9))  # offsets cover the whole [0, 2*padding] range


def test_augment_flip_only_and_noop():
    images = torch.randn(32, 1, 6, 6)
    assert augment(images, make_generator(CPU, 0), 0, False) is images
    out = augment(images, make_generator(CPU, 0), 0, True)
    assert out.dtype == images.dtype and out.shape == images.shape
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


# ----------------------------------------------------------------------------------------------------
# batching and normalisation


def _indexed_split(n: int) -> Split:
    # image i is filled with (i % 256) and labelled i, so batches can be traced back to indices
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return Split(images, torch.arange(n))


def test_epoch_batches_is_a_permutation():
    split = _indexed_split(103)
    batches = list(epoch_batches(split, 16, make_generator(CPU, 0), None, 0, False))
    assert [len(y) for _, y in batches] == [16] * 6 + [7]
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(103))
    assert order.tolist() != list(range(103))
    for x, y in batches:  # images travel with their labels
        assert torch.equal(x[:, 0, 0, 0], (y % 256).to(torch.uint8))
    same = torch.cat([y for _, y in epoch_batches(split, 16, make_generator(CPU, 0), None, 0, False)])
    other = torch.cat([y for _, y in epoch_batches(split, 16, make_generator(CPU, 1), None, 0, False)])
    assert torch.equal(order, same)
    assert not torch.equal(order, other)
    dropped = list(epoch_batches(split, 16, make_generator(CPU, 0), None, 0, False, drop_last=True))
    assert [len(y) for _, y in dropped] == [16] * 6


def test_epoch_batches_augments_with_aug_gen():
    split = Split(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    plain = list(epoch_batches(split, 20, make_generator(CPU, 3), None, 2, True))
    aug1 = list(epoch_batches(split, 20, make_generator(CPU, 3), make_generator(CPU, 9), 2, True))
    aug2 = list(epoch_batches(split, 20, make_generator(CPU, 3), make_generator(CPU, 9), 2, True))
    for (xp, yp), (xa, ya), (xb, yb) in zip(plain, aug1, aug2):
        assert torch.equal(yp, ya) and torch.equal(xa, xb)
        assert xa.dtype == torch.uint8 and xa.shape == xp.shape
    assert not all(torch.equal(p[0], a[0]) for p, a in zip(plain, aug1))


def test_eval_batches_in_order():
    split = _indexed_split(45)
    batches = list(eval_batches(split, 20))
    assert [len(y) for _, y in batches] == [20, 20, 5]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(45))
    assert torch.equal(torch.cat([x for x, _ in batches]), split.images)


def test_normalize():
    info = DatasetInfo("t", 10, (3, 2, 2), (0.1, 0.5, 0.9), (0.2, 0.25, 0.5))
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    expected = (x.double() / 255 - mean.double()) / std.double()
    out = normalize(x, info)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    half = normalize(x, info, dtype=torch.bfloat16, channels_last=True)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=2e-2)
    with pytest.raises(ValueError):
        normalize(x[:, :1], info)


def test_make_generator():
    a = torch.rand(5, generator=make_generator("cpu", 7))
    b = torch.rand(5, generator=make_generator(CPU, 7))
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_epoch_has_no_host_sync():
    dev = torch.device("cuda")
    d = load_data(DataSpec("synthetic", train_size=300), None, dev)
    assert d.train.images.device.type == "cuda" and d.train.labels.device.type == "cuda"
    order, aug = make_generator(dev, 0), make_generator(dev, 1)
    normalize(d.train.images[:1], d.info)  # build the cached constants outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seen = []
        for x, y in epoch_batches(d.train, 64, order, aug, 4, True):
            seen.append(y)
            normalize(x, d.info, dtype=torch.bfloat16, channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sorted(torch.cat(seen).cpu().tolist()) == sorted(d.train.labels.cpu().tolist())
    x = d.train.images[:16]
    top = torch.randint(0, 9, (16,), device=dev)
    left = torch.randint(0, 9, (16,), device=dev)
    flip = torch.rand(16, device=dev) < 0.5
    assert torch.equal(crop_flip(x, top, left, flip, 4).cpu(), crop_flip(x.cpu(), top.cpu(), left.cpu(), flip.cpu(), 4))


# ----------------------------------------------------------------------------------------------------
# static info and roots


def test_dataset_info_without_files():
    assert dataset_info(DataSpec("cifar100")) == DatasetInfo(
        "cifar100", 100, (3, 32, 32), (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    )
    c10 = dataset_info(DataSpec("cifar10", path="/nonexistent"))
    assert (c10.num_classes, c10.input_shape, c10.mean, c10.std) == (10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    m = dataset_info(DataSpec("mnist"))
    assert (m.num_classes, m.input_shape, m.mean, m.std) == (10, (1, 28, 28), (0.1307,), (0.3081,))
    f = dataset_info(DataSpec("fashion_mnist"))
    assert (f.num_classes, f.input_shape, f.mean, f.std) == (10, (1, 28, 28), (0.2860,), (0.3530,))
    s = dataset_info(DataSpec("synthetic"))
    assert (s.num_classes, s.input_shape, s.mean, s.std) == (10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    s2 = dataset_info(DataSpec("synthetic", num_classes=4, image_size=16))
    assert (s2.num_classes, s2.input_shape) == (4, (3, 16, 16))
    i = dataset_info(DataSpec("imagefolder", path="/nonexistent/x.zip", num_classes=200, image_size=64))
    assert (i.num_classes, i.input_shape, len(i.mean), len(i.std)) == (200, (3, 64, 64), 3, 3)
    with pytest.raises(DataError, match="num_classes"):
        dataset_info(DataSpec("imagefolder", path="x", image_size=64))
    with pytest.raises(DataError, match="image_size"):
        dataset_info(DataSpec("imagefolder", path="x", num_classes=3))
    with pytest.raises(DataError, match="100 classes"):
        dataset_info(DataSpec("cifar100", num_classes=10))
    with pytest.raises(DataError, match="unknown dataset"):
        DataSpec("places365")
    with pytest.raises(DataError, match="imagenet: set loader: stream"):  # 150 GB of JPEGs: never device-resident
        DataSpec("imagenet")


def test_resolve_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "cli")) == tmp_path / "cli"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("KDBENCH_DATA")
    assert resolve_data_root(None) is None


@pytest.mark.parametrize("name", ["cifar100", "cifar10", "mnist", "fashion_mnist"])
def test_real_dataset_without_root(name):
    with pytest.raises(DataError) as e:
        load_data(DataSpec(name), None, CPU)
    msg = str(e.value)
    assert "--data-root" in msg and "KDBENCH_DATA" in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic():
    d = load_data(DataSpec("synthetic"), None, CPU)
    assert d.info.num_classes == 10
    assert d.train.images.shape == (512, 3, 32, 32) and d.test.images.shape == (256, 3, 32, 32)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert d.train.images.is_contiguous() and len(d.train) == 512
    assert set(d.train.labels.tolist()) == set(range(10))
    again = load_data(DataSpec("synthetic"), None, CPU)
    assert torch.equal(d.train.images, again.train.images) and torch.equal(d.test.labels, again.test.labels)

    small = load_data(DataSpec("synthetic", train_size=40, test_size=30, num_classes=3, image_size=12), None, CPU)
    assert small.train.images.shape == (40, 3, 12, 12) and small.test.images.shape == (30, 3, 12, 12)
    assert int(small.train.labels.max()) == 2

    # learnable: a nearest-class-mean classifier fit on train is near perfect on test
    x = normalize(d.train.images, d.info).flatten(1)
    xt = normalize(d.test.images, d.info).flatten(1)
    means = torch.stack([x[d.train.labels == k].mean(0) for k in range(10)])
    acc = (torch.cdist(xt, means).argmin(1) == d.test.labels).float().mean().item()
    assert acc > 0.9


# ----------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST from the shared data root


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_real(name, folder):
    root = _mnist_root(folder)
    d = load_data(DataSpec(name, train_size=1000, test_size=300), root, CPU)
    assert d.train.images.shape == (1000, 1, 28, 28) and d.test.images.shape == (300, 1, 28, 28)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert 0 <= int(d.train.labels.min()) and int(d.train.labels.max()) <= 9
    assert len(set(d.train.labels.tolist())) == 10
    assert d.train.images.is_contiguous() and d.train.images.float().mean() > 10


def _copy_mnist(tmp_path: Path) -> Path:
    src = _mnist_root("MNIST") / "MNIST"
    root = tmp_path / "root"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for f in src.rglob("*"):
        if f.is_file():  # copyfile: the copies are writable even though the originals are read-only
            shutil.copyfile(f, root / "MNIST" / f.relative_to(src))
    return root


@pytest.mark.parametrize("victim,how", [("train-labels-idx1-ubyte", "alter"), ("t10k-images-idx3-ubyte", "truncate")])
def test_mnist_corruption_detected(tmp_path, victim, how):
    root = _copy_mnist(tmp_path)
    if not (root / "MNIST" / "MD5SUMS").is_file():
        pytest.skip("the shared MNIST copy has no MD5SUMS")
    path = root / "MNIST" / "raw" / victim
    if how == "alter":
        with open(path, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([(b[0] + 1) % 256]))
    else:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 784)
    with pytest.raises(DataError, match=victim) as e:
        load_data(DataSpec("mnist", train_size=10, test_size=10), root, CPU)
    assert "corrupted" in str(e.value)


def test_mnist_without_md5sums_truncated_file_is_data_error(tmp_path):
    root = _copy_mnist(tmp_path)
    (root / "MNIST" / "MD5SUMS").unlink(missing_ok=True)
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    with open(path, "r+b") as f:
        f.truncate(6)  # header cut: torchvision's parser fails
    with pytest.raises(DataError, match="MNIST"):
        load_data(DataSpec("mnist"), root, CPU)


def test_mnist_missing(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataSpec("mnist"), tmp_path, CPU)
    assert str(tmp_path / "MNIST" / "raw") in str(e.value) and "KDBENCH_DATA" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# CIFAR on tiny self-made data, through torchvision's real classes and integrity check


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_tiny_cifar(root: Path, name: str, monkeypatch, n_train: int = 7, n_test: int = 5):
    """Write a tiny dataset in torchvision's pickle layout and point the class's md5 entries at it."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR100 if name == "cifar100" else tvd.CIFAR10
    n_cls = 100 if name == "cifar100" else 10
    label_key = "fine_labels" if name == "cifar100" else "labels"
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_files = ["train"] if name == "cifar100" else [f"data_batch_{i}" for i in range(1, 6)]
    expected = {}
    train_list = []
    chunks = []
    for fname in train_files:
        x = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
        y = rng.integers(0, n_cls, n_train).tolist()
        entry = {"data": x, label_key: y, "batch_label": fname, "filenames": [f"{i}.png" for i in range(n_train)]}
        if name == "cifar100":
            entry["coarse_labels"] = [v // 5 for v in y]
        (folder / fname).write_bytes(pickle.dumps(entry))
        train_list.append([fname, _md5(folder / fname)])
        chunks.append((x, y))
    expected["train"] = (np.concatenate([c[0] for c in chunks]).reshape(-1, 3, 32, 32), sum((c[1] for c in chunks), []))
    x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    y = rng.integers(0, n_cls, n_test).tolist()
    test_name = "test" if name == "cifar100" else "test_batch"
    entry = {"data": x, label_key: y, "batch_label": "test", "filenames": [f"{i}.png" for i in range(n_test)]}
    (folder / test_name).write_bytes(pickle.dumps(entry))
    expected["test"] = (x.reshape(-1, 3, 32, 32), y)
    meta_name = cls.meta["filename"]
    meta_key = cls.meta["key"]
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(n_cls)]}))
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", [[test_name, _md5(folder / test_name)]])
    monkeypatch.setattr(cls, "meta", {"filename": meta_name, "key": meta_key, "md5": _md5(folder / meta_name)})
    return folder, expected


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_cifar_tiny(tmp_path, monkeypatch, name):
    folder, expected = _write_tiny_cifar(tmp_path, name, monkeypatch)
    d = load_data(DataSpec(name), tmp_path, CPU)
    for split, s in (("train", d.train), ("test", d.test)):
        assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
        assert torch.equal(s.images, torch.from_numpy(expected[split][0]))
        assert s.labels.dtype == torch.int64 and s.labels.tolist() == expected[split][1]
    cut = load_data(DataSpec(name, train_size=3, test_size=2), tmp_path, CPU)
    assert torch.equal(cut.train.images, d.train.images[:3]) and torch.equal(cut.test.labels, d.test.labels[:2])
    with pytest.raises(DataError, match="only"):
        load_data(DataSpec(name, train_size=10_000), tmp_path, CPU)


def test_cifar100_empty_root(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataSpec("cifar100"), tmp_path, CPU)
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg and "KDBENCH_DATA" in msg and "download: true" in msg
    assert "\n" not in msg


def test_cifar100_corrupted(tmp_path, monkeypatch):
    folder, _ = _write_tiny_cifar(tmp_path, "cifar100", monkeypatch)
    raw = bytearray((folder / "train").read_bytes())
    raw[200] ^= 0xFF
    (folder / "train").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupted") as e:
        load_data(DataSpec("cifar100"), tmp_path, CPU)
    assert "train" in str(e.value) and str(folder) in str(e.value)


# ----------------------------------------------------------------------------------------------------
# image folders (and zips of them)


def _write_tree(root: Path, classes=("cat", "dog"), n_train=5, n_test=3, size=8, fmt="png", test_classes=None) -> dict:
    """Write train/<class>/*.{png,jpg} and test/...; return {split: {image bytes: class index}}."""
    from PIL import Image

    rng = np.random.default_rng(1)
    made: dict = {}
    for split, n, cls_names in (("train", n_train, classes), ("test", n_test, test_classes or classes)):
        made[split] = {}
        for ci, c in enumerate(cls_names):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                if fmt == "png":
                    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                else:  # flat colours survive JPEG almost exactly
                    arr = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
                Image.fromarray(arr).save(root / split / c / f"{i:03d}.{fmt}")
                made[split][arr.transpose(2, 0, 1).tobytes()] = ci
    return made


def _check_tree(d, made):
    for split, s in (("train", d.train), ("test", d.test)):
        got = {img.numpy().tobytes(): int(lbl) for img, lbl in zip(s.images, s.labels)}
        assert got == made[split]


def test_imagefolder_png_and_cache(tmp_path, monkeypatch):
    made = _write_tree(tmp_path / "tiny")
    spec = DataSpec("imagefolder", path="tiny", num_classes=2, image_size=8)
    d = load_data(spec, tmp_path, CPU)  # relative path: under the data root
    assert d.train.images.shape == (10, 3, 8, 8) and d.test.images.shape == (6, 3, 8, 8)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    _check_tree(d, made)
    # first N holds both classes (splits are stored in a fixed shuffled order, not class by class)
    assert set(load_data(DataSpec("imagefolder", path="tiny", num_classes=2, image_size=8, train_size=4), tmp_path, CPU).train.labels.tolist()) == {0, 1}

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(kd_load, "_decode_image_tree", boom)
    again = load_data(spec, tmp_path, CPU)
    assert torch.equal(again.train.images, d.train.images) and torch.equal(again.test.labels, d.test.labels)
    # a changed file list invalidates the cache
    shutil.copyfile(tmp_path / "tiny/train/cat/000.png", tmp_path / "tiny/train/cat/999.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(spec, tmp_path, CPU)


@pytest.mark.parametrize("top_folder", [False, True])
def test_imagefolder_zip(tmp_path, monkeypatch, top_folder):
    made = _write_tree(tmp_path / "tree" / "inner", fmt="jpg")
    src = tmp_path / "tree" / "inner"
    zpath = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(src.rglob("*")):
            arc = f.relative_to(src.parent if top_folder else src)
            zf.write(f, str(arc))
    spec = DataSpec("imagefolder", path=str(zpath), num_classes=2, image_size=8)
    d = load_data(spec, None, CPU)
    assert d.train.images.shape == (10, 3, 8, 8) and d.test.images.shape == (6, 3, 8, 8)
    # JPEG: compare to the flat colours with a small tolerance
    for split, s in (("train", d.train), ("test", d.test)):
        expected = {k: v for k, v in made[split].items()}
        ref = torch.stack([torch.frombuffer(bytearray(k), dtype=torch.uint8).view(3, 8, 8) for k in expected]).int()
        ref_labels = torch.tensor(list(expected.values()))
        for img, lbl in zip(s.images.int(), s.labels):
            diff = (ref - img).abs().amax(dim=(1, 2, 3))
            j = int(diff.argmin())
            assert int(diff[j]) <= 3 and int(ref_labels[j]) == int(lbl)
    unzipped = list((tmp_path / "kdcache" / "unzipped").iterdir())
    assert len(unzipped) == 1

    monkeypatch.setattr(kd_load, "_decode_image_tree", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    monkeypatch.setattr(kd_load, "_unzip_once", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unzipped again")))
    again = load_data(spec, None, CPU)
    assert torch.equal(again.train.images, d.train.images) and torch.equal(again.train.labels, d.train.labels)


def test_imagefolder_errors(tmp_path):
    _write_tree(tmp_path / "mismatch", test_classes=("cat", "cow"))
    with pytest.raises(DataError, match="classes differ"):
        load_data(DataSpec("imagefolder", path="mismatch", num_classes=2, image_size=8), tmp_path, CPU)
    _write_tree(tmp_path / "ok")
    with pytest.raises(DataError, match="num_classes: 3"):
        load_data(DataSpec("imagefolder", path="ok", num_classes=3, image_size=8), tmp_path, CPU)
    with pytest.raises(DataError, match="image_size: 16"):
        load_data(DataSpec("imagefolder", path="ok", num_classes=2, image_size=16), tmp_path, CPU)
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataSpec("imagefolder", path="nope", num_classes=2, image_size=8), tmp_path, CPU)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="train/ and test/"):
        load_data(DataSpec("imagefolder", path="flat", num_classes=2, image_size=8), tmp_path, CPU)
