"""Streaming data: image folders of any size (ImageNet), decoded and augmented off the training step.

For data that does not fit on the training device (`data.loader: stream`). Each epoch's draws are made in the
training process, from the generators the engine seeds by (seed, epoch), exactly as the device-resident path
makes them (kdbench.data.batches.epoch_views): the permutation, then per batch the crop offsets and flips.
Loader processes (torch DataLoader workers, `KDBENCH_DATA_WORKERS`) only carry them out: they open the images
(PIL, through torchvision's functional transforms, the decoder and resampling of torchvision's and timm's
ImageNet recipes, so numbers stay comparable with the papers'), crop, resize and flip, and hand back uint8
batches, which the engine normalises on the device as for resident data. Which worker decodes a batch never
changes it, and a resumed epoch draws the same images without decoding the batches it had done.

Training crops (`data.train_crop`): "exact" (images already image_size, as resident data) or "random_resized",
ImageNet's RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3, bilinear), its 10 attempts drawn per image from a
generator of the epoch's augmentation seed. Evaluation: the shorter side resized to `data.eval_resize`, then
the centre image_size square (ImageNet: 256, 224), or the images as they are (None).

The streamed splits hold the same images in the same order as the device-resident loader makes of the same
folder (ImageFolder's listing in a fixed shuffled order, the same train_size/test_size cut and validation
images): where both apply (images already image_size, exact crops and no eval resize, generators on the CPU)
they yield the same batches. On a GPU the device-resident path draws from CUDA generators, this one from the
CPU generators seeded alike: each is fixed per (seed, epoch), but they are not each other's draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kdbench.data.batches import Views, apply_views, epoch_views
from kdbench.data.load import cache_dir, user_path, carve_validation
from kdbench.data.shard import Shard, slice_views
from kdbench.data.spec import DataError, DataSpec, DatasetInfo, dataset_info
from kdbench.seeding import stream_seed
from kdbench.storage.files import atomic_write

ATTEMPTS = 10  # RandomResizedCrop's tries at a box that fits before it falls back to the centre
CROP_SCALE = (0.08, 1.0)  # of the image's area
CROP_RATIO = (3 / 4, 4 / 3)  # width / height
IMAGENET_FOLDER = "imagenet"  # dataset imagenet: the folder under the data root unless `path` says otherwise


# ----------------------------------------------------------------------------------------------------
# Crops and decoding (run in the loader processes)


def resized_crop_box(width: int, height: int, draws: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of RandomResizedCrop's box in a `width` x `height` image, from `draws`:
    (ATTEMPTS, 4) uniforms in [0, 1), per attempt the area fraction, the log aspect, the top and the left.

    torchvision's algorithm (RandomResizedCrop.get_params) with its random numbers given: the first attempt
    whose box fits is taken; with none, the largest centred box of an aspect within CROP_RATIO."""
    area = width * height
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for u_area, u_ratio, u_top, u_left in draws.tolist():
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u_area)
        aspect = math.exp(lo + (hi - lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def read_image(path: str, size: int, crop: str, eval_resize: int | None, draws: torch.Tensor | None) -> np.ndarray:
    """One image as a (size, size, 3) uint8 array: decoded as RGB, then cropped for training ("exact": as it is;
    "random_resized": the box `draws` give, resized to size) or for evaluation (`crop` "eval")."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as exc:
        raise DataError(f"cannot decode {path} ({exc})") from exc
    bilinear = InterpolationMode.BILINEAR
    if crop == "random_resized":
        top, left, h, w = resized_crop_box(image.width, image.height, draws)
        image = F.resized_crop(image, top, left, h, w, [size, size], bilinear, antialias=True)
    elif crop == "eval" and eval_resize is not None:
        image = F.center_crop(F.resize(image, [eval_resize], bilinear, antialias=True), [size, size])
    if image.size != (size, size):
        raise DataError(f"{path} is {image.width}x{image.height}, but the suite declares image_size: {size} "
                        f"(set data.train_crop: random_resized and data.eval_resize for images of other sizes)")
    return np.asarray(image)


@dataclass(frozen=True)
class Request:
    """One batch (or one device's part of it) for a loader process: which images, and the draws that augment them."""

    positions: torch.Tensor  # indices into the split, long
    crop: str  # "exact", "random_resized" or "eval"
    crop_draws: torch.Tensor | None = None  # (n, ATTEMPTS, 4) uniforms, for random_resized
    views: Views | None = None  # crop-with-padding and flip, as the engine drew them
    padding: int = 0


class Reader(torch.utils.data.Dataset):
    """Turns a Request into (uint8 images (n, 3, size, size), labels, positions, views); a failure comes back as
    its one-line message, raised by the training process (an exception would come back with a traceback)."""

    def __init__(self, files: list[str], labels: torch.Tensor, size: int, eval_resize: int | None):
        self.files, self.labels, self.size, self.eval_resize = files, labels, size, eval_resize

    def __getitem__(self, request: Request):
        try:
            pixels = np.empty((len(request.positions), self.size, self.size, 3), dtype=np.uint8)
            for i, position in enumerate(request.positions.tolist()):
                draws = request.crop_draws[i] if request.crop_draws is not None else None
                pixels[i] = read_image(self.files[position], self.size, request.crop, self.eval_resize, draws)
        except DataError as exc:
            return str(exc)
        images = apply_views(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), request.views,
                             request.padding)
        return images, self.labels[request.positions], request.positions, request.views


# ----------------------------------------------------------------------------------------------------
# Streamed splits


def default_workers() -> int:
    """Loader processes per training process: `KDBENCH_DATA_WORKERS`, else the cores this process may use (a SLURM
    task's own; the machine's shared by torchrun's processes), one kept for training, at most 8."""
    if os.environ.get("KDBENCH_DATA_WORKERS"):
        try:
            return max(0, int(os.environ["KDBENCH_DATA_WORKERS"]))
        except ValueError:
            raise DataError(f"KDBENCH_DATA_WORKERS: expected a number of processes, got "
                            f"{os.environ['KDBENCH_DATA_WORKERS']!r}") from None
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():  # a SLURM task: these cores are its own
        per_process = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:  # torchrun's processes share the machine's cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


def host_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator that draws what `generator` would from its seed: `generator` itself when on the CPU."""
    if generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


class StreamSplit:
    """A split read from disk batch by batch: its files, labels and how its images are cropped."""

    def __init__(self, files: list[str], labels: torch.Tensor, info: DatasetInfo, crop: str,
                 eval_resize: int | None, device: torch.device, workers: int, shard: Shard | None = None):
        self.files, self.labels, self.info = files, labels, info
        self.crop = crop  # "exact", "random_resized" (a training split), or "eval"
        self.device, self.workers, self.shard = torch.device(device), workers, shard
        self.reader = Reader(files, labels, info.input_shape[1], eval_resize)

    def __len__(self) -> int:
        return len(self.files)

    def _part(self, n: int) -> slice:
        return self.shard.part(n) if self.shard is not None else slice(0, n)

    def requests(self, batch_size: int, order_gen: torch.Generator, aug_gen: torch.Generator | None,
                 padding: int, flip: bool, drop_last: bool, start: int) -> Iterator[Request]:
        """The epoch's batches as the engine draws them, each cut to this device's part; those before `start`
        are drawn and dropped. Runs in the training process, as the loader asks for the next batch."""
        order_gen = host_generator(order_gen)
        aug_gen = host_generator(aug_gen) if aug_gen is not None else None
        crop_gen = None
        if self.crop == "random_resized":  # its own stream: the flips stay those the resident path draws
            seed = (aug_gen or order_gen).initial_seed()
            crop_gen = torch.Generator().manual_seed(stream_seed(seed, "resized_crop"))
        for step, (idx, views) in enumerate(epoch_views(len(self), batch_size, order_gen, aug_gen, padding, flip,
                                                        drop_last)):
            draws = torch.rand((len(idx), ATTEMPTS, 4), generator=crop_gen) if crop_gen is not None else None
            if step < start:
                continue
            part = self._part(len(idx))
            yield Request(idx[part], self.crop, draws[part] if draws is not None else None,
                          slice_views(views, part), padding)

    def epoch_batches(self, batch_size: int, order_gen: torch.Generator, aug_gen: torch.Generator | None,
                      padding: int, flip: bool, drop_last: bool = False, with_views: bool = False,
                      start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """One training epoch, as kdbench.data.batches.epoch_batches gives it (this device's part of each batch)."""
        for images, labels, positions, views in self.load(
                self.requests(batch_size, order_gen, aug_gen, padding, flip, drop_last, start)):
            yield (images, labels, positions, views) if with_views else (images, labels)

    def eval_requests(self, batch_size: int) -> Iterator[Request]:
        """The split in order, in batches; this device's part of each (a device with nothing in one skips it)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for first in range(0, len(self), batch_size):
            part = self._part(min(batch_size, len(self) - first))
            if part.start < part.stop:
                yield Request(torch.arange(first + part.start, first + part.stop), "eval")

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, cropped for evaluation (this device's part of each batch)."""
        for images, labels, _, _ in self.load(self.eval_requests(batch_size)):
            yield images, labels

    def eval_labels(self, batch_size: int) -> torch.Tensor:
        """The labels eval_batches gives, without reading an image."""
        return torch.cat([self.labels[r.positions] for r in self.eval_requests(batch_size)]).to(self.device)

    def load(self, requests: Iterator[Request]) -> Iterator[tuple]:
        """The requests carried out by the loader processes, in order, moved to the training device."""
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            self.reader, batch_size=None, sampler=_Requests(requests), num_workers=self.workers,
            pin_memory=cuda, prefetch_factor=4 if self.workers else None)
        for out in loader:
            if isinstance(out, str):
                raise DataError(out)
            images, labels, positions, views = out
            yield (images.to(self.device, non_blocking=cuda), labels.to(self.device, non_blocking=cuda),
                   positions.to(self.device), views)


class _Requests(torch.utils.data.Sampler):
    """An epoch's requests as a DataLoader sampler: drawn in the training process, one batch at a time."""

    def __init__(self, requests: Iterator[Request]):
        self.requests = requests

    def __iter__(self):
        return iter(self.requests)


@dataclass
class StreamData:
    """As kdbench.data.batches.DeviceData, with splits read from disk."""

    info: DatasetInfo
    train: StreamSplit
    test: StreamSplit
    fingerprint: str | None = None  # of the folders' listing: every file's name and size
    val: StreamSplit | None = None


# ----------------------------------------------------------------------------------------------------
# The folders


def _folders(spec: DataSpec, root: Path | None) -> tuple[Path, Path, Path]:
    """(the dataset folder, its training folder, its test folder): train/ and test/, or ImageNet's train/ and val/."""
    path = user_path(spec.path or (IMAGENET_FOLDER if spec.dataset == "imagenet" else ""), root)
    test = next((path / name for name in ("test", "val") if (path / name).is_dir()), None)
    if not (path / "train").is_dir() or test is None:
        raise DataError(f"{spec.dataset}: {path} has no train/ and test/ (or val/) folders (expected "
                        f"train/<class>/<image> and val/<class>/<image>)")
    return path, path / "train", test


def _listing(folder: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, files, labels) as torchvision's ImageFolder lists them: classes sorted, files sorted by path."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{folder}: {exc}") from exc
    return classes, [path for path, _ in samples], [label for _, label in samples]


def _fingerprint(folder: Path, splits: list[tuple[list[str], list[str]]]) -> str:
    """The sha256 of every file's path (relative to `folder`) and size, with the class names; hashing the images
    themselves (ImageNet: 150 GB) would cost minutes at every start, in every process."""
    digest = hashlib.sha256()
    for classes, files in splits:
        listing = [(os.path.relpath(p, folder), os.stat(p).st_size) for p in files]
        digest.update(json.dumps({"classes": classes, "files": listing}).encode())
    return digest.hexdigest()[:16]


def _fingerprint_note(spec: DataSpec, folder: Path) -> Path:
    key = hashlib.sha1(json.dumps([str(folder.resolve()), spec.dataset]).encode(), usedforsecurity=False)
    return cache_dir() / "fingerprints" / f"stream-{spec.dataset}-{key.hexdigest()[:16]}.txt"


def cached_stream_fingerprint(spec: DataSpec, root: Path | None) -> str | None:
    """The fingerprint the last load of this folder found (for dry runs: listing ImageNet takes a while); None."""
    try:
        return _fingerprint_note(spec, _folders(spec, root)[0]).read_text().strip() or None
    except (DataError, OSError):
        return None


def _split(files: list[str], labels: torch.Tensor, order: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    return [files[i] for i in order.tolist()], labels[order]


def load_stream(spec: DataSpec, root: Path | None, device: torch.device | str, shard: Shard | None = None,
                workers: int | None = None) -> StreamData:
    """The splits of an image folder (or ImageNet) as streamed splits: listed, put in the device-resident loader's
    fixed order, cut to train_size/test_size, the validation images held out as it holds them out."""
    info = dataset_info(spec)
    folder, train_dir, test_dir = _folders(spec, root)
    (classes, train_files, train_labels), (test_classes, test_files, test_labels) = map(_listing, (train_dir, test_dir))
    if classes != test_classes:
        a, b = set(classes), set(test_classes)
        raise DataError(f"{spec.dataset} {folder}: train and test classes differ (only in train: {sorted(a - b) or '-'}; "
                        f"only in test: {sorted(b - a) or '-'})")
    if len(classes) != info.num_classes:
        raise DataError(f"{spec.dataset} {folder}: found {len(classes)} classes but the suite declares num_classes: "
                        f"{info.num_classes}")
    fingerprint = _fingerprint(folder, [(classes, train_files), (test_classes, test_files)])
    try:
        atomic_write(_fingerprint_note(spec, folder), fingerprint.encode())
    except OSError:
        pass  # an unwritable cache only costs dry runs their keys
    splits = {}
    for i, (name, files, labels, size) in enumerate((("train", train_files, train_labels, spec.train_size),
                                                     ("test", test_files, test_labels, spec.test_size))):
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(i))  # as the resident loader
        if size is not None and size > len(files):
            raise DataError(f"{spec.dataset} {name}: asked for the first {size} images but the split has only "
                            f"{len(files)}")
        splits[name] = _split(files, torch.as_tensor(labels, dtype=torch.int64), order[:size])
    workers = default_workers() if workers is None else workers

    def make(files: list[str], labels: torch.Tensor, crop: str, part: Shard | None) -> StreamSplit:
        return StreamSplit(files, labels, info, crop, spec.eval_resize, device, workers, part)

    val = None
    train_files, train_labels = splits["train"]
    if spec.val_size:  # the same images as the resident loader holds out: carved by position
        (kept, train_labels), (held, val_labels) = carve_validation(torch.arange(len(train_files)), train_labels, spec)
        val = make([train_files[i] for i in held.tolist()], val_labels, "eval", None)
        train_files = [train_files[i] for i in kept.tolist()]
    return StreamData(info, make(train_files, train_labels, spec.train_crop, shard),
                      make(*splits["test"], "eval", shard), fingerprint, val)
