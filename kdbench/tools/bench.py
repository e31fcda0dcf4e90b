"""`kdbench bench`: the engine's speed measured beside the field's classic training loop, in one process.

Three loops train the same teacher-student pair with vanilla KD, at the same batch size on the same
device, interleaved round by round (the order rotates each round), so a busy machine slows all three
alike and the ratios stay fair:

- classic: what RepDistiller, mdistiller and torchdistill do: a torchvision-style dataset that turns each
  uint8 image into a PIL image, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``; a ``DataLoader`` with workers (and pinned memory on a GPU); float32; the teacher under
  ``no_grad``; ``loss.item()`` every step.
- kdbench: ``engine.fit()`` with the registered ``kd`` method, as ``kdbench run`` calls it.
- ceiling: the same teacher and student steps on one batch already on the device, in the engine's
  precision and memory format: no data pipeline, no engine; what the models alone cost.

All three read CIFAR-100-shaped data: 50,000 uint8 32x32x3 images of 100 classes (random, or the real
CIFAR-100 with ``--dataset cifar100``). Model FLOPs count a forward as 2 x MACs and a backward as twice
a forward: per image, 2 x (3 x student MACs + teacher MACs).
"""

from __future__ import annotations

import copy
import csv
import datetime
import io
import json
import os
import platform
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdbench import KdbenchError
from kdbench.data.spec import DataSpec, DatasetInfo, dataset_info
from kdbench.data.batches import DeviceData, Split, normalize, num_views
from kdbench.data.load import load_data
from kdbench.train.engine import Compiled, EngineOptions, Provided, fit, make_optimizer
from kdbench.losses import cross_entropy, kd_loss
from kdbench.registry import get_method, methods
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.train.teacher_cache import TeacherCache
from kdbench.zoo import create_model, known_models, model_stats

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


class PilDataset(torch.utils.data.Dataset):
    """uint8 HWC images served as torchvision's CIFAR100 serves them: ``Image.fromarray``, then the transforms."""

    def __init__(self, images_hwc: np.ndarray, targets: list[int], transform: Callable):
        self.data, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def classic_transform(info: DatasetInfo, padding: int = CROP_PADDING):
    """The field's CIFAR training transform (RepDistiller's, mdistiller's), on PIL images."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(info.input_shape[1], padding=padding), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(info.mean, info.std)])


# ---------------------------------------------------------------------------------------------------- loops


def kd_step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            autocast: Callable, graphs: bool = False) -> torch.Tensor:
    """One vanilla-KD step with the kd method's default weights: teacher under no_grad, student, update."""
    p = get_method("kd").defaults
    if graphs:  # compiled with CUDA graphs: a new iteration, as the engine marks it
        torch.compiler.cudagraph_mark_step_begin()
    with autocast():
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = p["ce_weight"] * cross_entropy(s, y) + p["kd_weight"] * kd_loss(s, t, p["T"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


class ClassicLoop:
    def __init__(self, student, teacher, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                 batch_size: int, workers: int, device: torch.device):
        self.student, self.teacher, self.device, self.batch_size = student, teacher, device, batch_size
        dataset = PilDataset(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist(), classic_transform(info))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                                  pin_memory=device.type == "cuda", drop_last=True,
                                                  persistent_workers=workers > 0)
        # On a GPU, where data is the bottleneck, the batches the workers prepared while the other loops ran
        # are consumed untimed before each round. On CPU a batch's PIL work is ~2% of its step, so the lead-in
        # would cost more time than the bias it removes (at most 2 x workers batches, in classic's favour).
        self.lead_in = workers * 2 if device.type == "cuda" else 0  # 2: DataLoader's default prefetch_factor
        self.opt = make_optimizer(list(student.parameters()), TRAIN)
        self.batches = iter(self.loader)

    def run(self, steps: int) -> int:
        self.student.train()
        self.teacher.eval()
        for _ in range(steps):
            try:
                x, y = next(self.batches)
            except StopIteration:  # a new epoch, as the field's loops start one
                self.batches = iter(self.loader)
                x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = kd_step(self.student, self.teacher, self.opt, x, y, nullcontext)
            loss.item()  # the field logs the loss every step: a host sync
        return steps * self.batch_size


class EngineLoop:
    """engine.fit() with the kd method, on a window of the training split `steps` batches long."""

    lead_in = 0

    def __init__(self, student, teacher, data: DeviceData, batch_size: int, opts: EngineOptions):
        self.student, self.teacher, self.data, self.opts, self.batch_size = student, teacher, data, opts, batch_size
        self.method = get_method("kd")({}, student, teacher, data.info.input_shape).to(opts.device)
        self.calls = 0

    def run(self, steps: int) -> int:
        n_all = len(self.data.train)
        images = min(steps * self.batch_size, n_all)
        epochs = max(1, round(steps * self.batch_size / images))
        start = (self.calls * images) % (n_all - images + 1)  # a moving window: not the same images each round
        window = Split(self.data.train.images[start:start + images], self.data.train.labels[start:start + images])
        fit(self.student, self.method, self.teacher, DeviceData(self.data.info, window, self.data.test),
            TRAIN.model_copy(update={"epochs": epochs, "batch_size": self.batch_size}), AUGMENT, self.calls,
            self.opts)
        self.calls += 1
        return images * epochs


class CeilingLoop:
    """The models alone, compiled as the engine compiles them (so the engine is never measured against less)."""

    lead_in = 0

    def __init__(self, student, teacher, data: DeviceData, batch_size: int, opts: EngineOptions):
        self.student, self.opts, self.batch_size = student, opts, batch_size
        self.graphs = opts.compile and opts.device.type == "cuda"
        self.step_student = Compiled(student, opts) if opts.compile else student
        self.step_teacher = Compiled(teacher, opts) if opts.compile else teacher
        self.x = normalize(data.train.images[:batch_size], data.info, channels_last=opts.channels_last)
        self.y = data.train.labels[:batch_size]
        self.opt = make_optimizer(list(student.parameters()), TRAIN)

    def run(self, steps: int) -> int:
        self.student.train()
        for _ in range(steps):
            kd_step(self.step_student, self.step_teacher, self.opt, self.x, self.y, self.opts.autocast, self.graphs)
        return steps * self.batch_size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loops: dict[str, object], rounds: int, steps: int, device: torch.device,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, list[float]]:
    """Images per second of each loop in each round, after an untimed warm-up (workers, allocator, kernels)."""
    names = list(loops)
    for name in names:
        progress(f"warm-up: {name}")
        loops[name].run((min(steps, 10) if device.type == "cuda" else 1) + loops[name].lead_in)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: no loop always runs after the same one
        for name in order:
            progress(f"round {r + 1}/{rounds}: {name}")
            loop = loops[name]
            if loop.lead_in:
                loop.run(loop.lead_in)
            synchronize(device)  # only around timed regions
            start = time.perf_counter()
            images = loop.run(steps)
            synchronize(device)
            rates[name].append(images / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------------------------------------------------------- device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """The device's measured matrix peak (FLOP/s): a timed square GEMM, bf16 on GPU, float32 on CPU, best of 3."""
    gpu = device.type == "cuda"
    dtype, n, reps = (torch.bfloat16, 8192, 20) if gpu else (torch.float32, 1024, 8)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best, f"{str(dtype).removeprefix('torch.')} GEMM {n}x{n}"


def train_flops_per_image(teacher: str, student: str, info: DatasetInfo) -> int:
    s = model_stats(student, info.num_classes, info.input_shape).macs
    t = model_stats(teacher, info.num_classes, info.input_shape).macs
    return 2 * (3 * s + t)


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


def _load() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def run_bench(settings: BenchSettings, progress: Callable[[str], None] = lambda _: None) -> BenchResult:
    import torchvision

    check_settings(settings)
    opts = EngineOptions.for_device(settings.device, settings.compile)
    gpu = opts.device.type == "cuda"
    s = settings.resolved(gpu)
    result = BenchResult(settings=asdict(s), device=str(opts.device), device_name=device_name(opts.device),
                         torch_version=torch.__version__, torchvision_version=torchvision.__version__,
                         date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                         command=" ".join(["kdbench", *sys.argv[1:]]) if sys.argv[0].endswith(("kdbench", "cli.py"))
                         else " ".join(sys.argv), load_before=_load())
    result.settings["data_root"] = str(s.data_root) if s.data_root else None
    result.settings["compile_mode"] = opts.compile_mode if opts.compile else None
    progress("measuring the matrix peak")
    result.peak, result.peak_how = matmul_peak(opts.device)
    progress("building the data")
    data, host_images, host_labels = bench_data(s.dataset, s.data_root, opts.device)
    for teacher_name, student_name in s.pairs:
        flops = train_flops_per_image(teacher_name, student_name, data.info)
        for batch_size in s.batch_sizes:
            if opts.compile:
                progress(f"{teacher_name} -> {student_name}, batch {batch_size}: compiling")
                result.compile += compile_costs(teacher_name, student_name, batch_size, opts, data)
            loops = build_loops(teacher_name, student_name, batch_size, s, opts, data, host_images, host_labels)
            steps = s.steps_for(batch_size, gpu)
            rates = measure(loops, s.rounds, steps, opts.device,
                            lambda what: progress(f"{teacher_name} -> {student_name}, batch {batch_size}: {what}"))
            result.rows += [Row(teacher_name, student_name, batch_size, name, rates[name], flops, result.peak, steps)
                            for name in s.loops]
            del loops
    if s.cache_cell:
        result.cell = cache_cell(s, opts, data, progress)
    # The peak again at the end, the higher one kept: on a shared machine one measurement can land in a busy moment.
    result.peak = max(result.peak, matmul_peak(opts.device)[0])
    for row in result.rows:
        row.peak = result.peak
    result.load_after = _load()
    return result


def compile_costs(teacher_name: str, student_name: str, batch_size: int, opts: EngineOptions,
                  data: DeviceData) -> list[dict]:
    """What compiling costs per model: the first calls of the compiled model (tracing, inductor, recording the
    CUDA graphs) beyond the same number of steady calls. The teacher as the engine runs it (eval, no_grad), the
    student as it trains (forward and backward). The loops then reuse the compiled code (same shapes)."""
    info = data.info
    x = normalize(data.train.images[:batch_size], info, channels_last=opts.channels_last)
    y = data.train.labels[:batch_size]
    graphs = opts.device.type == "cuda"
    costs = []
    for name, role in ((teacher_name, "teacher"), (student_name, "student")):
        torch.manual_seed(0)
        model = create_model(name, info.num_classes, info.input_shape[0]).to(opts.device)
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train(role == "student").requires_grad_(role == "student")
        wrapped = Compiled(model, opts)

        def call():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with opts.autocast(), torch.set_grad_enabled(role == "student"):
                out = wrapped(x)
            if role == "student":
                cross_entropy(out.float(), y).backward()

        def timed(n: int) -> float:
            synchronize(opts.device)
            start = time.perf_counter()
            for _ in range(n):
                call()
            synchronize(opts.device)
            return time.perf_counter() - start

        calls = 3  # CUDA graph trees warm up once, then record: both inside the first three
        first = timed(calls)
        steady = timed(calls)
        costs.append({"model": name, "role": role, "batch_size": batch_size, "mode": opts.compile_mode,
                      "seconds": max(first - steady, 0.0), "first_calls_s": first, "steady_calls_s": steady})
        del wrapped, model
    return costs


def build_loops(teacher_name: str, student_name: str, batch_size: int, s: BenchSettings, opts: EngineOptions,
                data: DeviceData, host_images: torch.Tensor, host_labels: torch.Tensor) -> dict[str, object]:
    """The three loops, each with its own copy of the same freshly initialised teacher and student."""
    info = data.info
    torch.manual_seed(0)
    teacher = create_model(teacher_name, info.num_classes, info.input_shape[0]).eval().requires_grad_(False)
    student = create_model(student_name, info.num_classes, info.input_shape[0])

    def on_device(model: nn.Module, engine: bool) -> nn.Module:
        model = copy.deepcopy(model).to(opts.device)
        return model.to(memory_format=torch.channels_last) if engine and opts.channels_last else model

    loops: dict[str, object] = {}
    for name in s.loops:
        t, st = on_device(teacher, name != "classic"), on_device(student, name != "classic")
        if name == "classic":
            loops[name] = ClassicLoop(st, t, host_images, host_labels, info, batch_size, s.workers, opts.device)
        elif name == "kdbench":
            loops[name] = EngineLoop(st, t, data, batch_size, opts)
        else:
            loops[name] = CeilingLoop(st, t, data, batch_size, opts)
    return loops


# ---------------------------------------------------------------------------------------------------- cache cell


class TimedTeacherCache(TeacherCache):
    """A TeacherCache that also times its fills (synchronising around them, which the engine's never does)."""

    fill_seconds = 0.0

    def fill(self, drawn, batch_size):
        synchronize(self.slot.device)
        start = time.perf_counter()
        calls = super().fill(drawn, batch_size)
        synchronize(self.slot.device)
        self.fill_seconds += time.perf_counter() - start
        return calls


def logit_method_variants(count: int = 5) -> list[tuple[str, str, dict]]:
    """`count` methods that read only teacher logits: every registered one, then kd at other temperatures."""
    found = [(name, name, {}) for name, cls in methods().items() if cls.teacher_logits_only]
    extra = [(f"kd_T{t:g}", "kd", {"T": t}) for t in (2.0, 8.0, 1.0, 6.0, 3.0)]
    return (found + extra)[:count]


def cache_cell(s: BenchSettings, opts: EngineOptions, data: DeviceData, progress: Callable[[str], None]) -> dict:
    """One cell (the first pair, 5 logit methods x 3 seeds): each job trained without and then with shared teacher
    outputs, back to back, timed separately.

    Returns wall times, teacher forwards (images), whether every number matched, and a projection to the
    protocol's cell (240 epochs of 50,000 images) from the rates measured here.
    """
    teacher_name, student_name = s.pairs[0]
    info = data.info
    n = min(s.cell_train_size, len(data.train))
    cell_data = DeviceData(info, Split(data.train.images[:n], data.train.labels[:n]), data.test)
    train = TRAIN.model_copy(update={"epochs": s.cell_epochs, "batch_size": s.cell_batch_size})
    torch.manual_seed(0)
    teacher = create_model(teacher_name, info.num_classes, info.input_shape[0]).to(opts.device).eval()
    teacher.requires_grad_(False)
    if opts.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    variants = logit_method_variants(s.cell_methods)
    seeds = tuple(range(s.cell_seeds))
    cache = TimedTeacherCache(teacher, cell_data.train, info, AUGMENT.crop_padding, AUGMENT.flip, opts)
    runs = {use: {"wall_s": 0.0, "student_images": 0, "histories": []} for use in (False, True)}
    for label, method_name, params in variants:
        for seed in seeds:
            for use_cache in (False, True):  # each job twice, back to back: both see the same machine state
                progress(f"cache cell: {label} seed {seed}, {'with' if use_cache else 'without'} shared teacher outputs")
                torch.manual_seed(seed)
                student = create_model(student_name, info.num_classes, info.input_shape[0]).to(opts.device)
                if opts.channels_last:
                    student = student.to(memory_format=torch.channels_last)
                method = get_method(method_name)(params, student, teacher, info.input_shape).to(opts.device)
                synchronize(opts.device)
                start = time.perf_counter()
                result = fit(student, method, teacher, cell_data, train, AUGMENT, seed, opts,
                             provided=Provided(teacher_cache=cache if use_cache else None))
                synchronize(opts.device)
                run = runs[use_cache]
                run["wall_s"] += time.perf_counter() - start
                run["student_images"] += n * train.epochs
                run["histories"].append([{k: v for k, v in h.items() if k not in ("epoch_time", "images_per_sec")}
                                         for h in result.history])
    runs[False].update(teacher_images=runs[False]["student_images"], fill_s=0.0)
    runs[True].update(teacher_images=cache.images_computed, fill_s=cache.fill_seconds, cache_mb=cache.nbytes / 2**20)
    plain, shared = runs[False], runs[True]
    # Rates measured above: a full step (teacher + student), a step on shared outputs, a teacher fill.
    full_rate = plain["student_images"] / plain["wall_s"]
    shared_rate = shared["student_images"] / max(shared["wall_s"] - shared["fill_s"], 1e-9)
    fill_rate = shared["teacher_images"] / max(shared["fill_s"], 1e-9)
    views = num_views(AUGMENT.crop_padding, AUGMENT.flip)  # 162
    runs_in_cell = len(variants) * len(seeds)
    draws = len(seeds) * PROTOCOL_EPOCHS  # the methods of a cell share their seed's draws (paired by seed)
    distinct = views * (1 - (1 - 1 / views) ** draws)  # expected distinct views per image
    images_p = runs_in_cell * PROTOCOL_EPOCHS * TRAIN_IMAGES
    fills_p = distinct * TRAIN_IMAGES
    without_p = images_p / full_rate
    with_p = images_p / shared_rate + fills_p / fill_rate
    bytes_per_logit = 2 if opts.bf16 else 4
    return {
        "pair": f"{teacher_name} -> {student_name}", "methods": [v[0] for v in variants], "seeds": list(seeds),
        "train_size": n, "epochs": train.epochs, "batch_size": train.batch_size,
        "without_s": plain["wall_s"], "with_s": shared["wall_s"], "saving": 1 - shared["wall_s"] / plain["wall_s"],
        "teacher_images_without": plain["teacher_images"], "teacher_images_with": shared["teacher_images"],
        "fill_s": shared["fill_s"], "cache_mb": shared["cache_mb"],
        "identical": plain["histories"] == shared["histories"],
        "max_rel_diff": max_rel_diff(plain["histories"], shared["histories"]),
        "compiled": opts.compile,
        "rates": {"full_step": full_rate, "shared_step": shared_rate, "teacher_fill": fill_rate},
        "protocol": {"runs": runs_in_cell, "epochs": PROTOCOL_EPOCHS, "train_images": TRAIN_IMAGES,
                     "distinct_views_per_image": distinct, "without_h": without_p / 3600, "with_h": with_p / 3600,
                     "saving": 1 - with_p / without_p,
                     "cache_gb": fills_p * info.num_classes * bytes_per_logit / 1e9},
    }



def max_rel_diff(a: list, b: list) -> float:
    """The largest relative difference between the numbers of two lists of histories (same structure)."""
    worst = 0.0
    for ha, hb in zip(a, b):
        for ea, eb in zip(ha, hb):
            for k in ea:
                x, y = float(ea[k]), float(eb.get(k, float("nan")))
                worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12)) if x != y else worst
    return worst


# ---------------------------------------------------------------------------------------------------- output


def short(model: str) -> str:
    return model.removeprefix("cifar_")


def _fmt_rate(r: Row) -> tuple[str, str]:
    return f"{r.median:,.0f}", f"{min(r.rates):,.0f}-{max(r.rates):,.0f}"


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _minutes(m: float) -> str:
    return f"{m:,.1f} min" if m < 120 else f"{m / 60:,.1f} h"


COLUMNS = ("pair", "batch", "loop", "img/s", "min-max", "TFLOP/s", "of peak", "240 epochs", "kdbench/classic",
           "kdbench/ceiling")


def table_rows(result: BenchResult) -> list[list[str]]:
    out = []
    for r in result.rows:
        median, spread = _fmt_rate(r)
        ours = r.loop == "kdbench"
        out.append([f"{short(r.teacher)} -> {short(r.student)}", str(r.batch_size), r.loop, median, spread, f"{r.tflops:.3f}",
                    f"{100 * r.of_peak:.1f}%", _minutes(r.projected_minutes),
                    _fmt_ratio(result.ratio(r, "classic")) if ours else "",
                    _fmt_ratio(result.ratio(r, "ceiling")) if ours else ""])
    return out


def header_lines(result: BenchResult) -> list[str]:
    s = result.settings
    steps = s["steps"] or f"{CPU_IMAGES_PER_ROUND} images' worth of"
    lines = [f"device: {result.device} ({result.device_name})",
             f"torch {result.torch_version}, torchvision {result.torchvision_version}; {result.date}",
             f"command: {result.command}",
             f"data: {s['dataset']} (50,000 CIFAR-100-shaped uint8 images, 100 classes); {s['rounds']} rounds x "
             f"{steps} timed steps per loop, interleaved; classic DataLoader workers: {s['workers']}",
             f"matrix peak: {result.peak / 1e12:.3f} TFLOP/s ({result.peak_how}, measured; the higher of two "
             f"measurements, before and after the loops)"]
    lines.append(f"torch.compile: {s.get('compile_mode') or 'off'}")
    if result.load_before is not None:
        lines.append(f"load average (1, 5, 15 min) before: {result.load_before}, after: {result.load_after} "
                     f"on {os.cpu_count()} cores")
    return lines


def compile_lines(result: BenchResult) -> list[str]:
    return [f"compile {short(c['model'])} ({c['role']}, batch {c['batch_size']}, {c['mode']}): {c['seconds']:.1f} s "
            f"(first {c['first_calls_s']:.1f} s, steady {c['steady_calls_s']:.2f} s for the same calls)"
            for c in result.compile]


def cell_lines(cell: dict) -> list[str]:
    p = cell["protocol"]
    return [
        f"cell: {cell['pair']}, methods {', '.join(cell['methods'])} x seeds {cell['seeds']}; {cell['train_size']} "
        f"images x {cell['epochs']} epochs, batch {cell['batch_size']}",
        f"without shared teacher outputs: {cell['without_s']:.1f} s, {cell['teacher_images_without']:,} teacher "
        f"forwards (images)",
        f"with shared teacher outputs:    {cell['with_s']:.1f} s, {cell['teacher_images_with']:,} teacher forwards "
        f"({cell['fill_s']:.1f} s of fills; cache {cell['cache_mb']:.1f} MiB); saving {100 * cell['saving']:.1f}%",
        f"every loss and accuracy identical with and without: {'yes' if cell['identical'] else 'NO'}"
        + ("" if cell["identical"] else f" (largest relative difference {cell.get('max_rel_diff', float('nan')):.2g}"
           + ("; expected with torch.compile: shared outputs come from the eager teacher, the steps from the "
              "compiled one" if cell.get("compiled") else "") + ")"),
        f"projected to the protocol's cell ({p['runs']} runs x {p['epochs']} epochs x {p['train_images']:,} images; "
        f"{p['distinct_views_per_image']:.1f} distinct views per image): {p['without_h']:.1f} h without, "
        f"{p['with_h']:.1f} h with (saving {100 * p['saving']:.0f}%); cache {p['cache_gb']:.2f} GB",
    ]


def print_result(result: BenchResult, console) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal:  # a log or a pipe: room for every column rather than rich's default 80
        console = Console(file=console.file, width=max(console.width, 140))

    for line in header_lines(result):
        console.print(line, highlight=False, markup=False)
    table = Table(box=box.SIMPLE_HEAD)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("pair", "loop") else "right", no_wrap=col == "pair")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    for line in compile_lines(result):
        console.print(line, highlight=False, markup=False)
    if result.cell:
        for line in cell_lines(result.cell):
            console.print(line, highlight=False, markup=False)


def markdown(result: BenchResult) -> str:
    lines = [f"# kdbench bench: {result.device_name}", ""] + [f"- {l}" for l in header_lines(result)] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c in ("pair", "loop") else "---:" for c in COLUMNS) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", "Models are kdbench's `cifar_*` timm models (prefix left out above). "
              "img/s: training images per second (median over rounds; min-max across rounds). TFLOP/s and "
              "'of peak': model FLOPs (2 x (3 x student MACs + teacher MACs) per image) at the median rate, over "
              "the measured matrix peak. '240 epochs': 240 x 50,000 images at the median rate (training only; "
              "evaluation adds a student forward of 10,000 images per epoch). Ratios: median of per-round ratios "
              "(the loops are interleaved, so each round's three numbers share the machine's state)."]
    if result.compile:
        lines += ["", "## Compile cost per model", "", "The first 3 calls of the compiled model (tracing, inductor, "
                  "recording CUDA graphs) beyond 3 steady calls; the teacher under no_grad, the student forward "
                  "and backward.", ""] + [f"- {l}" for l in compile_lines(result)]
    if result.cell:
        lines += ["", "## Shared teacher outputs", ""] + [f"- {l}" for l in cell_lines(result.cell)]
    return "\n".join(lines) + "\n"


def to_json(result: BenchResult) -> dict:
    out = asdict(result)
    out["rows"] = [{**asdict(r), "median": r.median, "tflops": r.tflops, "of_peak": r.of_peak,
                    "projected_240_epochs_min": r.projected_minutes,
                    "kdbench_over_classic": result.ratio(r, "classic") if r.loop == "kdbench" else None,
                    "kdbench_over_ceiling": result.ratio(r, "ceiling") if r.loop == "kdbench" else None}
                   for r in result.rows]
    return out


def slug(result: BenchResult) -> str:
    if result.device.startswith("cuda"):
        name = result.device_name
    else:
        name = "cpu " + result.device_name.split(",")[0]
    name = re.sub(r"\((r|tm)\)|\bcpu\b(?=.*\bcpu\b)|@.*", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_result(result: BenchResult, folder: Path) -> list[Path]:
    """<folder>/<device>.md, .csv and .json (a later run on the same device replaces them)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / slug(result)
    data = to_json(result)
    buf = io.StringIO()
    fields = ["teacher", "student", "batch_size", "loop", "median", "rates", "tflops", "of_peak",
              "projected_240_epochs_min", "kdbench_over_classic", "kdbench_over_ceiling"]
    writer = csv.DictWriter(buf, fieldnames=["device", "device_name", "torch_version", "date"] + fields)
    writer.writeheader()
    for row in data["rows"]:
        writer.writerow({"device": result.device, "device_name": result.device_name,
                         "torch_version": result.torch_version, "date": result.date,
                         **{k: (" ".join(f"{x:.1f}" for x in row[k]) if k == "rates" else row[k]) for k in fields}})
    paths = [base.with_suffix(".md"), base.with_suffix(".csv"), base.with_suffix(".json")]
    paths[0].write_text(markdown(result))
    paths[1].write_text(buf.getvalue())
    paths[2].write_text(json.dumps(data, indent=1, default=str) + "\n")
    return paths
