"""Run by tests/e2e/test_devices.py as one process, or as one of a gloo group's: train method variants with kdbench's
engine on the CPU, in float32 and float64, and save what each ends with (rank 0 only).

    python gloo_worker.py OUT WORLD RANK PORT

WORLD 1 trains alone, as kdbench does on one device; WORLD > 1 joins a gloo group on 127.0.0.1:PORT and trains on
this process's part of every batch (kdbench.run.devices.prepare, as `kdbench run --devices` does). Float64 shows
that the two ways compute the same numbers (only the order of additions differs); float32 what that leaves.
"""

from __future__ import annotations

import os
import sys

import torch

from kdbench import KdbenchError
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.data.sources import load_splits
from kdbench.data.spec import DataSpec
from kdbench.method import TeacherRoute
from kdbench.registry import get_method
from kdbench.run.devices import prepare
from kdbench.train import engine, parallel, teacher_cache
from kdbench.zoo import create_model

SPEC = DataSpec("synthetic", train_size=40, val_size=8, test_size=16, num_classes=4, image_size=8)
TRAIN = TrainConfig(epochs=3, batch_size=8, lr=0.05, schedule="step", milestones=[2])  # 4 steps an epoch
AUG = AugmentConfig(crop_padding=1, flip=True)
ROUTE = [1, 2, 3]
# name: (method, params, combine); the ones that train the teacher, switch stages or hold state among them
VARIANTS = {"baseline": ("baseline", {}, "sum"), "kd": ("kd", {}, "sum"), "kd+pcgrad": ("kd", {}, "pcgrad"),
            "prokt": ("prokt", {}, "sum"),
            "fitnets_two_stage": ("fitnets", {"two_stage": True, "ce_weight": 0.1, "kd_weight": 0.9,
                                              "hint_fraction": 1 / 3}, "sum"),
            "rco": ("rco", {"anchors": 3}, "sum"), "dfa": ("dfa", {"search_fraction": 0.34}, "sum")}


def model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 4, 3)


def train(variant: str, data, dtype: torch.dtype, opts: engine.EngineOptions) -> dict:
    name, params, combine = VARIANTS[variant]
    cls = get_method(name)
    params = {**cls.defaults, **params}
    needs = cls.needs(params)
    states = {e: model("cifar_resnet14", 100 + e).state_dict() for e in ROUTE}
    teacher = None
    if needs.teacher == "random":
        teacher = model("cifar_resnet14", 7)
    elif needs.teacher != "none":
        teacher = model("cifar_resnet14", 0)
        teacher.load_state_dict(states[ROUTE[-1]])
    student = model("cifar_resnet8", 1)
    method = cls(params, student, teacher, (3, 8, 8))  # built in float32 (methods probe shapes so), then cast
    for module in (student, teacher, method):
        if module is not None:
            module.to(dtype)
    stop = (lambda: False)
    if parallel.current() is not None:
        stop = prepare(student, teacher, method, stop)
    route = TeacherRoute(ROUTE, lambda e: states[e]) if needs.route else None
    try:
        result = engine.fit(student, method, teacher, data, TRAIN, AUG, 0, opts, hooks=engine.Hooks(should_stop=stop),
                            provided=engine.Provided(route=route, combine=combine))
    except KdbenchError as exc:
        return {"error": str(exc)}
    out = {"student": student.state_dict(), "history": result.history}
    if method.trains_teacher:
        out["teacher"] = teacher.state_dict()
    return out


def main(out: str, world: int, rank: int, port: int) -> None:
    shard = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        shard = parallel.start("cpu").shard
    data = load_splits(SPEC, None, "cpu", shard)
    opts = engine.EngineOptions(torch.device("cpu"), bf16=False, channels_last=False)
    results = {("float32", v): train(v, data, torch.float32, opts) for v in VARIANTS}
    # float64 throughout: the engine (and its teacher outputs) normalise uint8 batches to float32 otherwise
    normalize = engine.normalize
    for module in (engine, teacher_cache):
        module.normalize = lambda images, info, dtype=None, channels_last=False: normalize(images, info, torch.float64,
                                                                                           channels_last)
    results.update({("float64", v): train(v, data, torch.float64, opts) for v in VARIANTS})
    if rank == 0:
        torch.save(results, out)
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
