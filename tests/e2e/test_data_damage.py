"""Training data damaged on disk, without a checksum file to catch it, is noticed end to end: its fingerprint (part
of every job's key) changes, so no model trained on other bytes is reused; once the data is repaired, the
teacher trained on the damaged data is not reused either. Damage that keeps a file's size and modification time
counts too (kdbench.data.load._stamp: small files are identified by their content)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.data.load import SMALL_FILE, _stamp


def rewrite_keeping_size_and_mtime(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place, then set the modification time back: what bit rot, or a tool that restores
    times, leaves behind."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def run_suite(monkeypatch, capsys, suite: Path, root: Path) -> str:
    """Run the suite; the key of its teacher job (from MLflow, in the parent run the command names)."""
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", str(suite), "--device", "cpu", "--data-root", str(root)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    parent = capsys.readouterr().err.split("parent run ")[-1].split()[0]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}' and tags.`kdbench.role` = 'teacher'")
    return runs[0].data.tags["kdbench.job"]


def stored(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "store").iterdir() if (p / "meta.json").is_file()}


def test_a_small_files_stamp_is_its_content_a_large_files_its_size_times_and_inode(tmp_path):
    small, large = tmp_path / "labels", tmp_path / "images"
    small.write_bytes(b"\x01" * 1000)
    large.write_bytes(b"\x01" * (SMALL_FILE + 1))
    before = _stamp(small, small.stat())
    os.utime(small, ns=(1, 1))
    assert _stamp(small, small.stat()) == before  # times alone say nothing about a small file
    rewrite_keeping_size_and_mtime(small, 10, b"\x02")
    assert _stamp(small, small.stat()) != before
    st = large.stat()
    assert _stamp(large, st) == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def test_mnist_without_a_checksum_file_damaged_then_repaired(monkeypatch, capsys, tmp_path, mnist_root):
    """MNIST with no MD5SUMS beside raw/: a label among the training images is changed in place (size and
    modification time kept), then changed back."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_root / "MNIST" / "raw").iterdir():
        if f.name == "train-labels-idx1-ubyte":
            shutil.copyfile(f, raw / f.name)  # the one damaged
        else:
            (raw / f.name).symlink_to(f)
    labels = raw / "train-labels-idx1-ubyte"
    suite = tmp_path / "mnist.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "damage", "data": {"dataset": "mnist", "train_size": 256, "test_size": 128},
        "teachers": ["mnist_mlp_100x2"], "students": ["mnist_mlp_30x2"], "methods": ["kd"], "seeds": [0],
        "train": {"epochs": 1, "batch_size": 64}}))
    clean = run_suite(monkeypatch, capsys, suite, tmp_path / "data")
    original = labels.read_bytes()[8 + 5:8 + 6]  # the 6th training image's label (after the 8-byte header)
    rewrite_keeping_size_and_mtime(labels, 8 + 5, bytes([(original[0] + 1) % 10]))
    damaged = run_suite(monkeypatch, capsys, suite, tmp_path / "data")
    assert damaged != clean and stored(tmp_path) == {clean, damaged}  # noticed: trained again, not reused
    rewrite_keeping_size_and_mtime(labels, 8 + 5, original)
    repaired = run_suite(monkeypatch, capsys, suite, tmp_path / "data")
    assert repaired == clean and stored(tmp_path) == {clean, damaged}  # the clean teacher, not the damaged one


def test_an_image_folder_damaged_then_repaired_keeping_size_and_mtime(monkeypatch, capsys, tmp_path):
    """An image folder has no checksum file at all. One training image is damaged before the first run; it is
    repaired in place with its size and modification time kept, so a cache keyed by those would still hand out
    the damaged pixels (decoded images are cached) and reuse the teacher trained on them."""
    from PIL import Image

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "data" / "shapes"
    for split, n in (("train", 24), ("test", 8)):
        for label, shade in (("dark", 40), ("light", 200)):
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (shade + i, shade, shade - i)).save(folder / split / label / f"{i}.bmp")
    image = folder / "train" / "dark" / "0.bmp"
    good = image.read_bytes()
    header = len(good) - 32 * 32 * 3  # BMP: a header, then raw pixels
    rewrite_keeping_size_and_mtime(image, header, bytes([255]) * (32 * 32 * 3))  # a white image labelled dark
    suite = tmp_path / "folder.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "folder", "data": {"dataset": "imagefolder", "path": "shapes", "num_classes": 2, "image_size": 32},
        "teachers": ["cifar_resnet14"], "students": ["cifar_resnet8"], "methods": ["kd"], "seeds": [0],
        "train": {"epochs": 1, "batch_size": 16}}))
    damaged = run_suite(monkeypatch, capsys, suite, tmp_path / "data")
    rewrite_keeping_size_and_mtime(image, header, good[header:])
    assert image.read_bytes() == good
    repaired = run_suite(monkeypatch, capsys, suite, tmp_path / "data")
    assert repaired != damaged and stored(tmp_path) == {damaged, repaired}
