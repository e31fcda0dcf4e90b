"""The plan: a validated suite expanded into pairs, cells (pair x method x seed) and the jobs they need.

Every job carries a content hash of everything that determines its numbers, so the model store can
reuse a trained teacher in another suite and can never reuse a stale one after a setting changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench import KdbenchError
from kdbench.data import dataset_info
from kdbench.registry import get_method
from kdbench.suite import AugmentConfig, MethodEntry, Suite, TrainConfig
from kdbench.zoo import ModelStats, known_models, model_stats

STORE_VERSION = 2  # bump when a change to the engine changes what a given config trains to
# 2: channels_last on CPU too (other convolution kernels, so other last bits)
TEACHER_METHOD = MethodEntry(method="baseline", label="baseline")


@dataclass(frozen=True)
class Pair:
    teacher: ModelStats
    student: ModelStats

    @property
    def gap(self) -> float:
        """The capacity gap: teacher parameters over student parameters."""
        return self.teacher.params / self.student.params

    @property
    def name(self) -> str:
        return f"{self.teacher.name}->{self.student.name}"


@dataclass(frozen=True)
class Job:
    key: str
    role: str  # "teacher" or "student"
    model: str
    seed: int
    method: MethodEntry
    train: TrainConfig
    augment: AugmentConfig
    config: dict[str, Any] = field(compare=False, repr=False)  # the hashed description, logged as params
    teacher: str | None = None  # key of the job whose trained model teaches this one
    teacher_model: str | None = None
    pair: str | None = None  # "teacher->student" for distilled students; None for teachers and the baseline
    source: str = "train"  # teachers: train, checkpoint or pretrained
    checkpoint: str | None = None
    route_every: int | None = None  # keep the model every N epochs along the way (teachers)

    @property
    def title(self) -> str:
        if self.role == "teacher":
            return f"teacher {self.model} seed {self.seed}"
        via = f" from {self.teacher_model}" if self.teacher_model else ""
        return f"{self.method.label} {self.model}{via} seed {self.seed}"


@dataclass(frozen=True)
class Cell:
    pair: Pair
    method: str  # the method entry's label
    seed: int
    job: str  # key of the student job that produces this cell's number


@dataclass
class Plan:
    suite: Suite
    suite_path: Path
    models: dict[str, ModelStats]
    pairs: list[Pair]
    cells: list[Cell]
    jobs: list[Job]  # in dependency order: every job comes after the job that teaches it

    def job(self, key: str) -> Job:
        return next(j for j in self.jobs if j.key == key)


def content_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_route_every(epochs: int) -> int:
    """The smallest divisor of `epochs` that keeps at most 24 route checkpoints (240 epochs: every 10)."""
    return next(d for d in range(1, epochs + 1) if epochs % d == 0 and epochs // d <= 24) if epochs else 1


def expand(patterns: list[str], names: list[str]) -> list[str]:
    out: list[str] = []
    for pattern in patterns:
        out += [n for n in sorted(fnmatch.filter(names, pattern)) if n not in out]
    return out


def make_plan(suite: Suite, suite_path: Path, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              epochs: int | None = None) -> Plan:
    """Expand a suite. `methods`, `seeds` and `epochs` narrow or shrink it (the CLI's options)."""
    if methods:
        unknown = set(methods) - {m.label for m in suite.methods}
        if unknown:
            raise KdbenchError(f"--methods: {', '.join(sorted(unknown))} not in {suite_path} "
                               f"(it has: {', '.join(m.label for m in suite.methods)})")
    entries = [m for m in suite.methods if not methods or m.label in methods]
    seeds = seeds if seeds is not None else list(suite.seeds)
    info = dataset_info(suite.data.spec())
    names = known_models()

    def stats(name: str) -> ModelStats:
        kwargs = tuple(sorted(suite.model_kwargs.get(name, {}).items()))
        return model_stats(name, info.num_classes, info.input_shape, kwargs)

    teachers, students = expand(suite.teachers, names), expand(suite.students, names)
    models = {n: stats(n) for n in teachers + students if n not in ()}
    if suite.pairs:
        pair_names = [tuple(p) for p in suite.pairs]
        models.update({n: stats(n) for p in pair_names for n in p if n not in models})
    elif suite.pair_rule == "teacher_larger":
        pair_names = [(t, s) for t in teachers for s in students if models[t].params > models[s].params]
    else:
        pair_names = [(t, s) for t in teachers for s in students if t != s]
    if not pair_names:
        raise KdbenchError(f"{suite_path}: no teacher-student pairs: rule '{suite.pair_rule}' keeps none of "
                           f"teachers {teachers} x students {students}")
    pairs = [Pair(models[t], models[s]) for t, s in pair_names]

    student_train = suite.train if epochs is None else suite.train.scaled_to(epochs)
    teacher_train = suite.teacher_train()
    if epochs is not None and teacher_train.epochs > 0:
        teacher_train = teacher_train.scaled_to(epochs)
    base = {"store_version": STORE_VERSION, "data": suite.data.model_dump(), "augment": suite.augment.model_dump()}
    teacher_augment = suite.teacher.augment or suite.augment

    jobs: dict[str, Job] = {}
    teacher_keys: dict[str, str] = {}
    for t in dict.fromkeys(t for t, _ in pair_names):
        train = teacher_train.for_model(t)
        kwargs = {**suite.model_kwargs.get(t, {}), **suite.teacher.model_kwargs.get(t, {})}
        config = {**base, "augment": teacher_augment.model_dump(), "model": t, "model_kwargs": kwargs, "seed": suite.teacher.seed,
                  "method": TEACHER_METHOD.method, "method_params": {}, "train": train.model_dump(),
                  "source": suite.teacher.source}
        checkpoint = None
        if suite.teacher.source == "checkpoint":
            checkpoint = str((suite_path.parent / suite.teacher.checkpoints[t]).resolve())
            if not Path(checkpoint).is_file():
                raise KdbenchError(f"{suite_path}: field 'teacher.checkpoints.{t}': no such file {checkpoint}")
            config["checkpoint_sha256"] = file_hash(Path(checkpoint))
        key = content_hash(config)
        teacher_keys[t] = key
        jobs[key] = Job(key, "teacher", t, suite.teacher.seed, TEACHER_METHOD, train, teacher_augment, config,
                        source=suite.teacher.source, checkpoint=checkpoint,
                        route_every=suite.teacher.route_every or default_route_every(train.epochs))

    cells: list[Cell] = []
    for pair, (t, s) in zip(pairs, pair_names):
        for entry in entries:
            method = get_method(entry.method)
            params = {**method.defaults, **entry.params}
            for seed in seeds:
                train = student_train.for_model(s)
                teacher_key = teacher_keys[t] if method.needs_teacher else None
                config = {**base, "model": s, "model_kwargs": suite.model_kwargs.get(s, {}), "seed": seed,
                          "method": entry.method, "method_params": params, "train": train.model_dump(),
                          "teacher": teacher_key}
                key = content_hash(config)
                if key not in jobs:
                    jobs[key] = Job(key, "student", s, seed, entry, train, suite.augment, config, teacher=teacher_key,
                                    teacher_model=t if teacher_key else None,
                                    pair=f"{t}->{s}" if teacher_key else None)
                cells.append(Cell(pair, entry.label, seed, key))
    ordered = [j for j in jobs.values() if j.role == "teacher"] + [j for j in jobs.values() if j.role != "teacher"]
    return Plan(suite, suite_path, models, pairs, cells, ordered)
