"""The three loops `kdbench bench` times side by side (classic, kdbench, ceiling), and how they are timed.
"""

from __future__ import annotations
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable
import numpy as np
import torch
from torch import nn
from kdbench.data.spec import DatasetInfo
from kdbench.data.batches import DeviceData, Split, normalize
from kdbench.train.engine import Compiled, EngineOptions, fit, make_optimizer
from kdbench.losses import cross_entropy, kd_loss
from kdbench.registry import get_method
from kdbench.zoo import model_stats
from kdbench.tools.bench_setup import AUGMENT, CROP_PADDING, TRAIN


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
