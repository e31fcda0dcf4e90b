"""`kdbench bench`'s settings, defaults and result records, and the data every loop reads.
"""

from __future__ import annotations
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
import torch
from kdbench import KdbenchError
from kdbench.data.spec import DataSpec, dataset_info
from kdbench.data.batches import DeviceData, Split
from kdbench.data.load import load_data
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.zoo import known_models


DEFAULT_PAIRS = (("cifar_resnet56", "cifar_resnet20"), ("cifar_resnet32x4", "cifar_resnet8x4"))
DEFAULT_BATCH_SIZES = (64, 512)
LOOPS = ("classic", "kdbench", "ceiling")
PROTOCOL_EPOCHS = 240  # the CRD protocol
TRAIN_IMAGES = 50_000  # CIFAR-100's training split
CROP_PADDING = 4
CPU_IMAGES_PER_ROUND = 384  # the CPU default: a round of 6 steps at batch 64, 3 at 128 (2 cores: seconds each)
AUGMENT = AugmentConfig(crop_padding=CROP_PADDING, flip=True)
TRAIN = TrainConfig(epochs=1, schedule="constant")  # the protocol's SGD (lr 0.05, momentum 0.9, wd 5e-4)


@dataclass
class BenchSettings:
    device: str = "auto"
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    rounds: int | None = None  # default: 5 on GPU, 3 on CPU
    steps: int | None = None  # timed steps per loop and round; default: 100 on GPU, 384 images' worth on CPU
    workers: int | None = None  # classic DataLoader workers; default: min(8, cores), 8 is RepDistiller's
    loops: tuple[str, ...] = LOOPS
    dataset: str = "synthetic"
    data_root: Path | None = None
    cache_cell: bool = False
    cell_train_size: int | None = None  # default: 50,000 on GPU, 128 on CPU
    cell_epochs: int | None = None  # default: 2
    cell_batch_size: int = 64
    cell_methods: int = 5
    cell_seeds: int = 3
    compile: bool | None = None  # torch.compile the models (engine and ceiling); default: on for CUDA, off on CPU

    def steps_for(self, batch_size: int, gpu: bool) -> int:
        return self.steps or (100 if gpu else max(2, CPU_IMAGES_PER_ROUND // batch_size))

    def resolved(self, gpu: bool) -> "BenchSettings":
        return BenchSettings(**{**asdict(self),
                                "rounds": self.rounds or (5 if gpu else 3), "steps": self.steps,
                                "workers": self.workers if self.workers is not None else min(8, os.cpu_count() or 1),
                                "cell_train_size": self.cell_train_size or (TRAIN_IMAGES if gpu else 128),
                                "cell_epochs": self.cell_epochs or 2})


def check_settings(s: BenchSettings) -> None:
    """User errors as one line, before anything is built."""
    names = set(known_models())
    for teacher, student in s.pairs:
        for name in (teacher, student):
            if name not in names:
                raise KdbenchError(f"--pairs: unknown model '{name}' (pairs are teacher:student timm names)")
    if not s.batch_sizes or any(b < 1 for b in s.batch_sizes):
        raise KdbenchError(f"--batch-sizes: expected positive integers, got {list(s.batch_sizes)}")
    for name, value in (("rounds", s.rounds), ("steps", s.steps), ("cell-train-size", s.cell_train_size),
                        ("cell-epochs", s.cell_epochs)):
        if value is not None and value < 1:
            raise KdbenchError(f"--{name}: expected a positive integer, got {value}")
    if s.workers is not None and s.workers < 0:
        raise KdbenchError(f"--workers: expected 0 or more, got {s.workers}")
    unknown = [l for l in s.loops if l not in LOOPS]
    if unknown or not s.loops:
        raise KdbenchError(f"--loops: expected some of {', '.join(LOOPS)}, got {', '.join(s.loops) or 'none'}")
    if s.dataset not in ("synthetic", "cifar100"):
        raise KdbenchError(f"--dataset: expected synthetic or cifar100, got '{s.dataset}'")


# ---------------------------------------------------------------------------------------------------- data


def bench_data(dataset: str, data_root: Path | None, device: torch.device) -> tuple[DeviceData, torch.Tensor, torch.Tensor]:
    """The training split on the device for the engine, and the same images and labels on the host for classic.

    synthetic: 50,000 random uint8 images of 100 classes, normalised with CIFAR-100's statistics (speed does
    not depend on the pixels). The test split is one image: the loops are timed on training alone.
    """
    info = dataset_info(DataSpec("cifar100"))
    if dataset == "cifar100":
        real = load_data(DataSpec("cifar100"), data_root, "cpu")
        images, labels = real.train.images, real.train.labels
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (TRAIN_IMAGES, *info.input_shape), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, info.num_classes, (TRAIN_IMAGES,), generator=g)
    train = Split(images.to(device), labels.to(device))
    test = Split(train.images[:1], train.labels[:1])
    return DeviceData(info, train, test), images, labels


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class Row:
    teacher: str
    student: str
    batch_size: int
    loop: str
    rates: list[float]  # images/s per round
    flops_per_image: int
    peak: float
    steps: int  # timed steps per round

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def tflops(self) -> float:
        return self.median * self.flops_per_image / 1e12

    @property
    def of_peak(self) -> float:
        return self.median * self.flops_per_image / self.peak

    @property
    def projected_minutes(self) -> float:
        return PROTOCOL_EPOCHS * TRAIN_IMAGES / self.median / 60


@dataclass
class BenchResult:
    settings: dict
    device: str
    device_name: str
    torch_version: str
    torchvision_version: str
    date: str
    command: str
    load_before: tuple[float, float, float] | None
    load_after: tuple[float, float, float] | None = None
    peak: float = 0.0
    peak_how: str = ""
    rows: list[Row] = field(default_factory=list)
    cell: dict | None = None
    compile: list[dict] = field(default_factory=list)  # per model and batch size: torch.compile's cost

    def rows_of(self, teacher: str, student: str, batch_size: int) -> dict[str, Row]:
        return {r.loop: r for r in self.rows if (r.teacher, r.student, r.batch_size) == (teacher, student, batch_size)}

    def ratio(self, row: Row, other: str) -> float | None:
        """kdbench over `other`: the median of per-round ratios (rounds are interleaved, so paired)."""
        ref = self.rows_of(row.teacher, row.student, row.batch_size).get(other)
        if ref is None:
            return None
        return statistics.median(a / b for a, b in zip(row.rates, ref.rates))
