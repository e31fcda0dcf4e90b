"""Pilot of the CIFAR-10 capacity-gap study: seconds per epoch of each job kind, on ONE thread, before choosing its
training subset and epochs (suites/study_cifar10.yaml). Writes results/study_cifar10/pilot/pilot.{csv,md,png,svg}.

Each job kind is timed through kdbench's own engine (`fit`, one epoch, CRD's crop-and-flip, batch 64) on the real
images: a model trained alone (a teacher, or the student alone), the cifar_resnet8 student distilled by KD (the
teacher's forward in every step, as without shared outputs) and by FitNets (the teacher's features in every step).
Training is timed per image (`images_per_sec`), evaluation per test image (the epoch's time less its training),
so an epoch at any subset is train_images / rate + (test + validation images) x evaluation cost.

    OMP_NUM_THREADS=1 KDBENCH_DATA=../shared/data python scripts/pilot_cifar10.py [--train 1024] [--test 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.data.load import load_data, resolve_data_root
from kdbench.data.spec import DataSpec
from kdbench.registry import get_method
from kdbench.report.figures import save_figure
from kdbench.report.format import markdown_table, write_csv, write_text
from kdbench.train.engine import Diverged, EngineOptions, fit
from kdbench.zoo import create_model, model_stats

STUDENT = "cifar_resnet8"
TEACHERS = ["cifar_resnet14", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110"]
OUT = Path("results/study_cifar10/pilot")


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(memory_format=torch.channels_last)


def time_job(kind: str, model_name: str, teacher_name: str | None, data, opts, repeats: int) -> dict:
    """The best of `repeats` one-epoch fits (the machine is shared: the best is the least disturbed)."""
    best = None
    for _ in range(repeats):
        torch.manual_seed(0)
        student = channels_last(create_model(model_name, 10, 3))
        teacher = channels_last(create_model(teacher_name, 10, 3)).eval() if teacher_name else None
        # FitNets' hint weight hardly matters to its cost; a small one keeps an untrained deep teacher's features
        # from exploding the loss in this one epoch (with 100 or 1 the loss passes 1e4 and the job stops as diverged).
        method = get_method(kind)({} if kind != "fitnets" else {"hint_weight": 1e-4}, student, teacher, (3, 32, 32))
        start = time.perf_counter()
        result = fit(student, method, teacher, data, TrainConfig(epochs=1, batch_size=64, lr=0.05),
                     AugmentConfig(crop_padding=4, flip=True), 0, opts, eval_batch_size=500)
        wall = time.perf_counter() - start
        m = result.metrics
        train_s = len(data.train) / m["images_per_sec"]
        record = {"job": kind, "model": model_name, "teacher": teacher_name or "", "train_images": len(data.train),
                  "test_images": len(data.test), "train_ms_per_image": 1000 * train_s / len(data.train),
                  "eval_ms_per_image": 1000 * (m["epoch_time"] - train_s) / len(data.test), "wall_s": wall}
        if best is None or record["train_ms_per_image"] < best["train_ms_per_image"]:
            best = record
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    opts = EngineOptions.for_device("cpu")
    spec = DataSpec("imagefolder", path="cifar10-jpeg.zip", num_classes=10, image_size=32, train_size=args.train,
                    test_size=args.test)
    start = time.perf_counter()
    data = load_data(spec, resolve_data_root(None), "cpu")
    print(f"data: {len(data.train)} train, {len(data.test)} test images in {time.perf_counter() - start:.0f} s",
          flush=True)
    jobs = [("baseline", m, None) for m in [STUDENT, *TEACHERS]]
    jobs += [("kd", STUDENT, t) for t in TEACHERS] + [("fitnets", STUDENT, t) for t in TEACHERS]
    import pandas as pd

    OUT.mkdir(parents=True, exist_ok=True)
    # Resumable: a job already timed (a row of pilot.csv) is kept, so an interrupted pilot goes on where it stopped.
    frame = pd.read_csv(OUT / "pilot.csv", keep_default_na=False) if (OUT / "pilot.csv").is_file() else None
    for kind, model, teacher in jobs:
        if frame is not None and ((frame.job == kind) & (frame.model == model) & (frame.teacher == (teacher or ""))).any():
            continue
        try:
            record = time_job(kind, model, teacher, data, opts, args.repeats)
        except Diverged as exc:  # FitNets under an untrained resnet110: its features explode even at weight 1e-4
            print(f"{kind} {model} {teacher}: not timed ({exc})", flush=True)
            continue
        record["params"] = model_stats(model, 10, (3, 32, 32), ()).params
        print(record, flush=True)
        frame = pd.concat([frame, pd.DataFrame([record])], ignore_index=True) if frame is not None \
            else pd.DataFrame([record])
        write_csv(frame, OUT / "pilot.csv")
    rows = [[r.job, r.model, r.teacher or "–", f"{r.train_ms_per_image:.2f}", f"{r.eval_ms_per_image:.2f}"]
            for r in frame.itertuples()]
    write_text(OUT / "pilot.md", markdown_table(["job", "model", "teacher", "train ms/image", "eval ms/image"], rows,
                                                "lllrr") +
               f"\nOne thread ({os.environ.get('OMP_NUM_THREADS', '?')} OMP), batch 64, crop-and-flip, best of "
               f"{args.repeats} one-epoch fits on {args.train} training and {args.test} test images of CIFAR-10 "
               f"(JPEG), on a 2-core machine shared with other work.\n")
    save_figure(figure(frame), OUT / "pilot")


def plan_cost(frame, train: int, held: int, epochs: int, teacher_epochs: int, teachers: list[str], logit_methods: int,
              seeds: int) -> dict[str, float]:
    """Core-seconds of a study from the pilot's rates: teachers; the student alone; the logit methods (their teacher
    outputs computed once per pair and seed by the shared cache, at the teacher's forward cost per image); FitNets
    (a teacher forward every step). `held`: test + validation images evaluated every epoch."""
    rate = {(r.job, r.model, r.teacher): (r.train_ms_per_image, r.eval_ms_per_image) for r in frame.itertuples()}
    alone = rate[("baseline", STUDENT, "")]
    epoch = lambda train_ms, eval_ms, n: n * (train * train_ms + held * eval_ms) / 1000  # noqa: E731
    return {"teachers": sum(epoch(*rate[("baseline", t, "")], teacher_epochs) for t in teachers),
            "student alone": seeds * epoch(*alone, epochs),
            "logit methods": seeds * len(teachers) * logit_methods * epoch(*alone, epochs),
            "their teacher outputs": seeds * sum(epochs * train * rate[("baseline", t, "")][1] / 1000 for t in teachers),
            "fitnets": seeds * sum(epoch(rate[("fitnets", STUDENT, t)][0], alone[1], epochs) for t in teachers)}


def figure(frame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    for kind, marker in (("baseline", "o"), ("kd", "s"), ("fitnets", "^")):
        mine = frame[frame.job == kind]
        if kind == "baseline":
            x, label = mine.params, "a model trained alone (x: its parameters)"
        else:
            x = [frame[(frame.job == "baseline") & (frame.model == t)].params.iloc[0] for t in mine.teacher]
            label = f"{kind}: cifar_resnet8 student (x: its teacher's parameters)"
        ax.plot(x, mine.train_ms_per_image, marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("training, ms per image (one thread)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle("CIFAR-10 pilot: training cost per image on one CPU thread")
    return fig


if __name__ == "__main__":
    main()
