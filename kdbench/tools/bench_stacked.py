"""Stacked seeds against separate jobs, side by side in one process (issue 22): the same students of S seeds
trained by `fit` one seed at a time and all together (kdbench.train.stacked), rounds alternating which goes first,
on one CPU thread as a job runs. Reports each way's time, the speed-up and the largest difference of any seed's
per-epoch numbers (losses relative to max(1, |value|); accuracies in images).

    python -m kdbench.tools.bench_stacked --data ../shared/data --out results/perf/stacked_seeds.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.data.load import load_data
from kdbench.data.spec import DataSpec
from kdbench.registry import get_method
from kdbench.runtime import runtime_config
from kdbench.run.build import to_device
from kdbench.run.context import job_runtime
from kdbench.seeding import stream_seed
from kdbench.train.engine import EngineOptions, fit
from kdbench.train.stacked import StackedMethod, StackedStudent
from kdbench.zoo import create_model

AUGMENT = AugmentConfig()  # the MNIST studies' (none)


def _students(name: str, seeds: list[int], data, opts):
    """Each seed's student and method (baseline: the student alone), built from its init stream as a job builds it."""
    built = []
    for seed in seeds:
        torch.manual_seed(stream_seed(seed, "init"))
        model = to_device(create_model(name, data.info.num_classes, data.info.input_shape[0]), opts)
        built.append((model, get_method("baseline")({}, model, None, data.info.input_shape)))
    return built


def separate(name: str, seeds: list[int], data, train: TrainConfig, opts) -> list[list[dict]]:
    return [fit(model, method, None, data, train, AUGMENT, seed, opts).history
            for seed, (model, method) in zip(seeds, _students(name, seeds, data, opts))]


def stacked(name: str, seeds: list[int], data, train: TrainConfig, opts) -> list[list[dict]]:
    models, methods = zip(*_students(name, seeds, data, opts))
    result = fit(StackedStudent(list(models)), StackedMethod(list(methods), seeds), None, data, train, AUGMENT,
                 seeds[0], opts)
    return [lane.history for lane in result.lanes]


def differences(a: list[list[dict]], b: list[list[dict]], test_size: int) -> tuple[float, float]:
    """(largest relative loss difference, largest test-accuracy difference in images) over seeds and epochs."""
    loss, images = 0.0, 0.0
    for x, y in ((x, y) for ha, hb in zip(a, b) for x, y in zip(ha, hb)):
        loss = max([loss] + [abs(x[k] - y[k]) / max(1.0, abs(y[k])) for k in x
                             if k.startswith(("train_", "test_loss", "val_loss"))])
        images = max(images, abs(x["test_acc"] - y["test_acc"]) * test_size / 100)
    return loss, images


def measure(name: str, epochs: int, seeds: list[int], data, rounds: int) -> dict:
    train = TrainConfig(epochs=epochs, batch_size=256, lr=0.05, weight_decay=1e-4, schedule="cosine")
    opts = EngineOptions.for_device("cpu")
    times: dict[str, list[float]] = {"separate": [], "stacked": []}
    out = {}
    for r in range(rounds):
        for way in (("separate", "stacked") if r % 2 == 0 else ("stacked", "separate")):
            start = time.perf_counter()
            out[way] = (separate if way == "separate" else stacked)(name, seeds, data, train, opts)
            times[way].append(time.perf_counter() - start)
    loss, images = differences(out["stacked"], out["separate"], len(data.test))
    params = sum(p.numel() for p in create_model(name, data.info.num_classes, data.info.input_shape[0]).parameters())
    return {"student": name, "params": params, "epochs": epochs, "separate": min(times["separate"]),
            "stacked": min(times["stacked"]), "loss_diff": loss, "acc_images": images}


def markdown(rows: list[dict], seeds: list[int], load: tuple, after: tuple, rounds: int) -> str:
    lines = [f"# Stacked seeds against separate jobs ({len(seeds)} seeds, CPU, one thread)", "",
             f"`python -m kdbench.tools.bench_stacked`, {datetime.date.today()}, {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}; load average before {load}, after {after}; "
             f"MNIST (55,000 trained on, 5,000 validation, 10,000 test), batch 256, baseline (CE), best of "
             f"{rounds} rounds alternating which way goes first.", "",
             "| student | parameters | epochs | separate jobs (s) | stacked (s) | speed-up | largest loss difference "
             "| largest test-accuracy difference |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['student']} | {r['params']:,} | {r['epochs']} | {r['separate']:.1f} | {r['stacked']:.1f} | "
              f"{r['separate'] / r['stacked']:.2f}x | {r['loss_diff']:.1e} | {r['acc_images']:.0f} images |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding MNIST/raw")
    parser.add_argument("--students", default="mnist_mlp_30x2:5,mnist_convnet_4x1:1", help="name:epochs,...")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data = load_data(DataSpec("mnist", val_size=5000), args.data, torch.device("cpu"))
    seeds, load = list(range(args.seeds)), os.getloadavg()
    with job_runtime(runtime_config("cpu"), torch.device("cpu")):
        rows = [measure(n, int(e), seeds, data, args.rounds) for n, e in (s.split(":") for s in args.students.split(","))]
    text = markdown(rows, seeds, tuple(round(x, 2) for x in load), tuple(round(x, 2) for x in os.getloadavg()),
                    args.rounds)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
