"""The one table of dataset facts: names, classes, input shapes, split sizes, mean and std.

Static knowledge: planning (`kdbench pairs`, dry runs) and the models' normalisation need no
data on disk.
"""

from __future__ import annotations
from dataclasses import dataclass
from kdbench import KdbenchError


class DataError(KdbenchError):
    """A dataset could not be found, read or verified.

    The message is always one line (whitespace, newlines included, is collapsed) and says what was
    looked for where, and how to provide it.
    """

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------------------------------
# Static knowledge

# Bounds on what a suite may ask for (the suite schema refuses more): a split of up to ten million images
# (ImageNet-21k's size), classes up to 100,000, square images up to 4096 pixels a side. Generated data is
# made in memory: at most 4 GiB of it (a million CIFAR-sized images).
MAX_IMAGES = 10_000_000
MAX_CLASSES = 100_000
MAX_IMAGE_SIDE = 4096
MAX_SYNTHETIC_BYTES = 4 << 30


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DataSpec:
    """What a suite asks for; built by the suite loader from YAML."""

    dataset: str  # cifar100 | cifar10 | mnist | fashion_mnist | imagefolder | imagenet | synthetic
    path: str | None = None  # imagefolder: folder (relative: under the data root) or a .zip of it; imagenet: folder
    train_size: int | None = None  # use only the first N training images (None = all); validation comes out of them
    test_size: int | None = None  # likewise for the test split
    num_classes: int | None = None  # imagefolder/synthetic: declared, so planning works without data
    image_size: int | None = None  # imagefolder/synthetic: declared side length
    download: bool = False  # cifar*/mnist*: let torchvision download when missing
    # Images held out of the training images for choices (TAKD's auto assistant, RCO's greedy anchors): drawn by
    # a seeded stream fixed per dataset, so every job of a suite holds out the same ones; 0 = no validation split.
    val_size: int = 0
    # Where batches come from (kdbench.data.stream): "device", the whole split held on the training device, or
    # "stream", images decoded from disk every epoch by loader processes (folders too large for the device).
    loader: str = "device"
    train_crop: str = "exact"  # stream: "exact" (images already image_size) or "random_resized" (ImageNet's)
    eval_resize: int | None = None  # stream: shorter side resized to this, then centre-cropped (None: exact size)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise DataError(
                f"unknown dataset {self.dataset!r}; expected one of: {', '.join(DATASETS)}"
            )
        for field in ("train_size", "test_size", "num_classes", "image_size"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(f"{self.dataset}: {field} must be a positive integer, got {value!r}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise DataError(f"{self.dataset}: val_size must be a non-negative integer, got {self.val_size!r}")
        if self.dataset == "synthetic":
            _check_synthetic_size(self)
        _check_stream_fields(self)
        pool = training_pool(self)
        if pool is not None and self.val_size >= pool:
            raise DataError(f"{self.dataset}: val_size {self.val_size} leaves no training images: it must be smaller "
                            f"than the {pool} training images{' (train_size)' if self.train_size else ''}")


LOADERS = ("device", "stream")
TRAIN_CROPS = ("exact", "random_resized")
# The streaming fields at the values that leave a job as it was before they existed: left out of its key there.
STREAM_DEFAULTS = {"loader": "device", "train_crop": "exact", "eval_resize": None}


def keyed_data_fields(data: dict) -> dict:
    """A suite's data section as a job's key holds it: the streaming loader's fields only where they are set, so
    every device-resident dataset keeps the keys it had."""
    return {k: v for k, v in data.items() if k not in STREAM_DEFAULTS or v != STREAM_DEFAULTS[k]}


def _check_stream_fields(spec: "DataSpec") -> None:
    """What only the streaming loader can do is asked of it; ImageNet (150 GB of JPEGs of every size) streams."""
    if spec.loader not in LOADERS:
        raise DataError(f"{spec.dataset}: loader must be one of {', '.join(LOADERS)}, got {spec.loader!r}")
    if spec.train_crop not in TRAIN_CROPS:
        raise DataError(f"{spec.dataset}: train_crop must be one of {', '.join(TRAIN_CROPS)}, got {spec.train_crop!r}")
    if spec.eval_resize is not None and (isinstance(spec.eval_resize, bool) or not isinstance(spec.eval_resize, int)
                                         or spec.eval_resize < 1):
        raise DataError(f"{spec.dataset}: eval_resize must be a positive integer, got {spec.eval_resize!r}")
    if spec.loader == "device":
        if spec.dataset == "imagenet":
            raise DataError("imagenet: set loader: stream (its images do not fit on a device and come in every size)")
        asked = [f for f, on in (("train_crop", spec.train_crop != "exact"), ("eval_resize", spec.eval_resize))
                 if on]
        if asked:
            raise DataError(f"{spec.dataset}: {' and '.join(asked)} need loader: stream (the device-resident "
                            f"splits hold images already at image_size)")
    elif spec.dataset not in ("imagefolder", "imagenet"):
        raise DataError(f"{spec.dataset}: loader: stream reads image folders (imagefolder, imagenet); "
                        f"{spec.dataset} fits on the device: leave loader out")


# The fixed datasets: classes, input shape (C, H, W), per-channel mean and std of the training split (what
# training normalises with: data/batches.normalize; the models' timm metadata reads them from here too), and
# the published train and test split sizes (train_size/test_size above them are refused at validation).
# CIFAR-100's mean/std are those of the CRD protocol (Tian et al., "Contrastive Representation Distillation"),
# which most KD papers reuse.
_FIXED: dict[str, tuple[DatasetInfo, int, int]] = {
    "cifar100": (DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
                 50000, 10000),
    "cifar10": (DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                50000, 10000),
    "mnist": (DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,)), 60000, 10000),
    "fashion_mnist": (DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,)), 60000, 10000),
}
# An image folder's statistics are unknown without reading it; natural images are close to ImageNet's.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# ImageNet (ILSVRC-2012): 1000 classes, its published train and validation sizes (the validation set is the test
# split every paper reports); the crop side may be chosen (224, the standard, unless image_size says).
IMAGENET_CLASSES = 1000
IMAGENET_IMAGE_SIZE = 224
IMAGENET_SPLITS = (1281167, 50000)

_SYNTHETIC_DEFAULTS = {"num_classes": 10, "image_size": 32, "train_size": 512, "test_size": 256}
_SYNTHETIC_SEED = 20240611  # fixed: the synthetic dataset is the same everywhere

DATASETS = (*_FIXED, "imagefolder", "imagenet", "synthetic")
VAL_SEED = 0  # the cell seed of the validation stream: the held-out images depend only on the dataset


def _check_synthetic_size(spec: DataSpec) -> None:
    side = spec.image_size or _SYNTHETIC_DEFAULTS["image_size"]
    images = (spec.train_size or _SYNTHETIC_DEFAULTS["train_size"]) + (spec.test_size or _SYNTHETIC_DEFAULTS["test_size"])
    size = images * 3 * side * side
    if size > MAX_SYNTHETIC_BYTES:
        raise DataError(f"synthetic: {images} images of 3x{side}x{side} would take {size / (1 << 30):.1f} GiB of memory; "
                        f"at most {MAX_SYNTHETIC_BYTES >> 30} GiB of data is generated (lower train_size, test_size or "
                        f"image_size)")


def fixed_info(name: str) -> DatasetInfo:
    """Classes, input shape, mean and std of a fixed dataset (cifar100, cifar10, mnist, fashion_mnist)."""
    return _FIXED[name][0]


def split_sizes(name: str) -> tuple[int, int] | None:
    """The published (train, test) split sizes of a fixed dataset or ImageNet; None for generated data and image
    folders."""
    if name == "imagenet":
        return IMAGENET_SPLITS
    return _FIXED[name][1:] if name in _FIXED else None


def training_pool(spec: DataSpec) -> int | None:
    """How many training images the spec uses, validation included (train_size, else the split's size; None: an
    image folder's, unknown until read)."""
    if spec.train_size:
        return spec.train_size
    if spec.dataset == "synthetic":
        return _SYNTHETIC_DEFAULTS["train_size"]
    sizes = split_sizes(spec.dataset)
    return sizes[0] if sizes else None


def dataset_info(spec: DataSpec) -> DatasetInfo:
    """Classes, input shape and normalisation of ``spec``'s dataset. Never touches files."""
    name = spec.dataset
    if name in _FIXED:
        info = fixed_info(name)
        # A declaration that contradicts the real dataset is a suite error, not something to ignore.
        if spec.num_classes is not None and spec.num_classes != info.num_classes:
            raise DataError(f"{name} has {info.num_classes} classes, but the suite declares num_classes: {spec.num_classes}")
        if spec.image_size is not None and spec.image_size != info.input_shape[1]:
            raise DataError(f"{name} images are {info.input_shape[1]}x{info.input_shape[2]}, but the suite declares image_size: {spec.image_size}")
        return info
    if name == "synthetic":
        n_cls = spec.num_classes or _SYNTHETIC_DEFAULTS["num_classes"]
        size = spec.image_size or _SYNTHETIC_DEFAULTS["image_size"]
        if n_cls < 2:
            raise DataError(f"synthetic: num_classes must be at least 2, got {n_cls}")
        return DatasetInfo("synthetic", n_cls, (3, size, size), (0.5,) * 3, (0.25,) * 3)
    if name == "imagenet":
        if spec.num_classes is not None and spec.num_classes != IMAGENET_CLASSES:
            raise DataError(f"imagenet has {IMAGENET_CLASSES} classes, but the suite declares num_classes: "
                            f"{spec.num_classes} (a subset of ImageNet is an imagefolder)")
        size = spec.image_size or IMAGENET_IMAGE_SIZE
        return DatasetInfo("imagenet", IMAGENET_CLASSES, (3, size, size), _IMAGENET_MEAN, _IMAGENET_STD)
    if name == "imagefolder":
        missing = [f for f in ("num_classes", "image_size") if getattr(spec, f) is None]
        if missing:
            raise DataError(
                f"imagefolder dataset {spec.path!r}: declare {' and '.join(missing)} in the suite's data section "
                "(needed to build models without reading the images)"
            )
        assert spec.num_classes is not None and spec.image_size is not None
        return DatasetInfo("imagefolder", spec.num_classes, (3, spec.image_size, spec.image_size), _IMAGENET_MEAN, _IMAGENET_STD)
    raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
