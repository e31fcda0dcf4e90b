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
import datetime
import os
import sys
import time
from dataclasses import asdict
from typing import Callable
import torch
from torch import nn
from kdbench.data.batches import DeviceData, normalize
from kdbench.train.engine import Compiled, EngineOptions
from kdbench.losses import cross_entropy
from kdbench.zoo import create_model
from kdbench.tools.bench_cell import cache_cell
from kdbench.tools.bench_loops import (CeilingLoop, ClassicLoop, EngineLoop, device_name, matmul_peak, measure,
                                       synchronize, train_flops_per_image)
from kdbench.tools.bench_setup import BenchResult, BenchSettings, Row, bench_data, check_settings


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
                # set_to_none, as every training step does: a .grad kept from the last call would be a CUDA-graph
                # output that this call's replay overwrites before the backward adds to it (found on an H200)
                model.zero_grad(set_to_none=True)
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
