"""`kdbench bench --cache-cell`: a cell of logit methods x seeds with and without shared teacher outputs.
"""

from __future__ import annotations
import time
from typing import Callable
import torch
from kdbench.data.batches import DeviceData, Split, num_views
from kdbench.train.engine import EngineOptions, Provided, fit
from kdbench.registry import get_method, methods
from kdbench.train.teacher_cache import TeacherCache
from kdbench.zoo import create_model
from kdbench.tools.bench_loops import synchronize
from kdbench.tools.bench_setup import AUGMENT, BenchSettings, PROTOCOL_EPOCHS, TRAIN, TRAIN_IMAGES


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
