"""The plan: a validated suite expanded into pairs, cells (pair x method x seed) and the jobs they need.

Every job carries a content hash of everything that determines its numbers, so the model store can
reuse a trained teacher in another suite and can never reuse a stale one after a setting changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from kdbench import KdbenchError
from kdbench.data.spec import dataset_info
from kdbench.method import AUTO, BETWEEN
from kdbench.registry import get_method, method_hash
from kdbench.storage.files import sha256
from kdbench.config.schema import AugmentConfig, MethodEntry, Suite, TrainConfig
from kdbench.zoo import ModelStats, known_models, meta_model, model_kwargs_problem, model_stats
from kdbench.data.sources import data_fingerprint

STORE_VERSION = 2  # bump when a change to the engine changes what a given config trains to
# 2: channels_last on CPU too (other convolution kernels, so other last bits)
TEACHER_METHOD = MethodEntry(method="baseline", label="baseline")
# Roles whose trained models the store keeps and reuses. A "reference" is a model trained alone with the
# teachers' recipe so that its accuracy can choose an assistant (it is the same job as that model's teacher job).
STORED_ROLES = ("teacher", "reference", "assistant")
# The data fields of the streaming loader, at the values that leave a job as it was before they existed.
STREAM_DEFAULTS = {"loader": "device", "train_crop": "exact", "eval_resize": None}
WAVES = {"teacher": 0, "reference": 0, "assistant": 1, "student": 2}  # jobs run wave by wave


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
    role: str  # "teacher", "reference", "assistant" or "student"
    model: str
    seed: int
    method: MethodEntry
    train: TrainConfig
    augment: AugmentConfig
    config: dict[str, Any] = field(compare=False, repr=False)  # the hashed description, logged as params
    teacher: str | None = None  # key of the job whose trained model teaches this one
    teacher_model: str | None = None  # the pair's teacher (an assistant's: the model it learns from)
    pair: str | None = None  # "teacher->student" for distilled students; None for teachers and the baseline
    source: str = "train"  # teachers: train, checkpoint or pretrained
    checkpoint: str | None = None
    route_every: int | None = None  # keep the model every N epochs along the way (teachers)
    teacher_init: str = "trained"  # Needs.teacher: "trained", "random" (built fresh) or "checkpoint" (a route epoch)
    teacher_epoch: int = 0  # "checkpoint": the route epoch, 0 = the final teacher
    assistants: tuple[str, ...] = ()  # models between the pair's teacher and this one; ("auto",) until chosen
    assistant_choice: str = ""  # how an "auto" assistant was chosen (filled in at run time)

    @property
    def pending(self) -> bool:
        """An assistant still to be chosen (at run time, once the models it is chosen by are trained)."""
        return self.assistants == (AUTO,)

    @property
    def title(self) -> str:
        if self.role in ("teacher", "reference"):
            return f"{self.role} {self.model} seed {self.seed}"
        if self.role == "assistant":
            return f"assistant {self.model} from {self.teacher_model} ({self.method.label}) seed {self.seed}"
        via = f" from {self.teacher_model}" if self.teacher_model else ""
        via += f" via {' > '.join(self.assistants)}" if self.assistants else ""
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
    student_train: TrainConfig | None = None  # the students' schedule (after --epochs): assistants train with it
    options: dict[str, Any] = field(default_factory=dict)  # make_plan's keyword arguments, to plan again
    suite_hash: str = ""  # the plan hash before the data's fingerprint was known (what a report matches)
    _ids: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def job(self, key: str) -> Job:
        return next(j for j in self.jobs if j.key == key)

    @property
    def plan_hash(self) -> str:
        """Identifies 'the same suite run': running it again resumes the parent run with this hash."""
        return content_hash({"suite": self.suite.name, "jobs": [j.key for j in self.jobs],
                             "cells": [(c.pair.name, c.method, c.seed, c.job) for c in self.cells]})

    def identities(self) -> dict[str, str]:
        """Job key -> the job's identity: its content hash with every method_hash left out (its own and those
        of the jobs it depends on). Two runs with one identity and different keys differ only in method code."""
        if self._ids is None:
            ids: dict[str, str] = {}
            for job in self.jobs:  # dependency order: a job's teacher and references come first
                ids[job.key] = content_hash(_without_method_code(job.config, ids))
            self._ids = ids
        return self._ids

    def method_changed(self, previous: dict[str, set[str]]) -> list[Job]:
        """The jobs that train again because their method's code (or a method behind their teacher) changed:
        `previous` (identity -> keys of its finished runs) has their identity under other keys only."""
        ids = self.identities()
        return [j for j in self.jobs if previous.get(ids[j.key]) and j.key not in previous[ids[j.key]]]

    @property
    def data_free_hash(self) -> str:
        """The plan's identity from the suite alone (no data read): what `kdbench report` compares runs with."""
        return self.suite_hash or self.plan_hash

    def for_data(self, fingerprint: str | None) -> "Plan":
        """This plan with the fingerprint of the data read from disk in every job's key (teachers are never
        reused across versions of a dataset's files); unchanged for generated data."""
        if fingerprint is None or fingerprint == self.options.get("data_fingerprint"):
            return self
        plan = make_plan(self.suite, self.suite_path, **{**self.options, "data_fingerprint": fingerprint})
        return replace(plan, suite_hash=self.data_free_hash)

    def for_data_root(self, root: Path | None) -> "Plan":
        """for_data with the fingerprint of the dataset under `root` (cached, or computed by reading it)."""

        return self.for_data(data_fingerprint(self.suite.data.spec(), root))

    def root_teacher(self, job: Job) -> Job | None:
        """The pair's teacher job behind `job` (through any assistants); None without a stored teacher."""
        current = self.job(job.teacher) if job.teacher else None
        while current is not None and current.role == "assistant":
            current = self.job(current.teacher)
        return current

    def guide_keys(self, job: Job) -> list[str]:
        """The jobs of every model above `job` in its chain: the pair's teacher first, `job`'s own teacher last."""
        keys: list[str] = []
        current = self.job(job.teacher) if job.teacher else None
        while current is not None:
            keys.insert(0, current.key)
            current = self.job(current.teacher) if current.role == "assistant" else None
        return keys

    def resolve_assistants(self, accuracy: Callable[[str], float | None]) -> tuple["Plan", dict[str, str]]:
        """Choose every "auto" assistant, now that `accuracy(job key)` knows the trained models' validation accuracy
        (never the test accuracy: the test split is only reported).

        The rule (Mirzadeh et al.): the candidate whose accuracy is closest to the mean of the teacher's and
        the student's, all trained alone with the teachers' recipe. Returns the plan with the assistant jobs
        added and the students pointed at them, and the reasons for students that could not be resolved.
        """
        jobs = {j.key: j for j in self.jobs}
        failed: dict[str, str] = {}
        for job in [j for j in self.jobs if j.pending]:
            config = job.config
            refs = {**config["assistant_candidates"], "teacher": job.teacher, "student": config["student_reference"]}
            acc = {name: accuracy(key) for name, key in refs.items()}
            missing = [name for name, a in acc.items() if a is None]
            if missing:
                failed[job.key] = f"assistant not chosen: the reference run of {missing[0]} did not finish " \
                                  f"(or has no validation accuracy)"
                continue
            target = (acc.pop("teacher") + acc.pop("student")) / 2
            chosen = min(acc, key=lambda name: (abs(acc[name] - target), name))
            chain = assistant_jobs(self.suite, self.student_train, job.teacher, job.teacher_model, (chosen,),
                                   job.method, config["method_params"], self.options.get("data_fingerprint"))
            for a in chain:
                jobs.setdefault(a.key, a)
            choice = (f"auto: {chosen}, validation accuracy closest to {target:.2f}, the mean of teacher "
                      f"{job.teacher_model} and student {job.model}; candidates: "
                      + ", ".join(f"{n} {a:.2f}" for n, a in sorted(acc.items())))
            jobs[job.key] = replace(job, teacher=chain[-1].key, assistants=(chosen,), assistant_choice=choice)
        return replace(self, jobs=in_waves(jobs.values())), failed


def content_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_method_code(value: Any, ids: dict[str, str]) -> Any:
    """`value` with method_hash entries dropped and other jobs' keys replaced by their identities."""
    if isinstance(value, dict):
        return {k: _without_method_code(v, ids) for k, v in value.items() if k != "method_hash"}
    if isinstance(value, (list, tuple)):
        return [_without_method_code(v, ids) for v in value]
    return ids.get(value, value) if isinstance(value, str) else value


def scale_epochs(value: int, old: int, new: int) -> int:
    """An epoch count on a schedule of `old` epochs, moved to one of `new` (as milestones are): at least 1 if it was."""
    scaled = round(value * new / old) if old else value
    return max(1, scaled) if value >= 1 else scaled


def scale_epoch_params(method, params: dict[str, Any], old: int, new: int, teacher_old: int, teacher_new: int,
                       route: list[int]) -> dict[str, Any]:
    """A method's epoch-counted params for a schedule shrunk by --epochs from `old` to `new` epochs (its
    `epoch_params`) and a teachers' run shrunk from `teacher_old` to `teacher_new` (its `teacher_epoch_params`:
    moved to the nearest of the teacher's `route` epochs, ties to the earlier; 0, the final teacher, stays)."""
    out = dict(params)
    for name in method.epoch_params:
        if isinstance(out.get(name), (int, float)) and not isinstance(out[name], bool):
            out[name] = type(out[name])(scale_epochs(out[name], old, new))
    for name in method.teacher_epoch_params:
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and route:
            scaled = scale_epochs(value, teacher_old, teacher_new)
            out[name] = min(route, key=lambda e: (abs(e - scaled), e))
    return out


def default_route_every(epochs: int) -> int:
    """The smallest divisor of `epochs` that keeps at most 24 route checkpoints (240 epochs: every 10)."""
    return next(d for d in range(1, epochs + 1) if epochs % d == 0 and epochs // d <= 24) if epochs else 1


def in_waves(jobs) -> list[Job]:
    """Teachers, then assistants, then students; creation order within a wave (a chain's assistants in order)."""
    return sorted(jobs, key=lambda j: WAVES[j.role])


def base_config(suite: Suite, data_fingerprint: str | None = None) -> dict[str, Any]:
    data = suite.data.model_dump()
    if not data["val_size"]:  # no validation split trains on what suites before val_size trained on: same keys
        del data["val_size"]
    for field, default in STREAM_DEFAULTS.items():  # likewise: device-resident data keeps the keys it had
        if data[field] == default:
            del data[field]
    config = {"store_version": STORE_VERSION, "data": data, "augment": suite.augment.model_dump()}
    if data_fingerprint is not None:  # data read from disk: its content, not only its name (see data.py)
        config["data_fingerprint"] = data_fingerprint
    return config


def assistant_jobs(suite: Suite, student_train: TrainConfig, teacher_key: str, teacher_model: str,
                   chain: tuple[str, ...], entry: MethodEntry, params: dict[str, Any],
                   data_fingerprint: str | None = None) -> list[Job]:
    """One job per assistant of `chain`, each distilled from the one before (the first from the teacher).

    An assistant is keyed by what determines it (its model, its teacher's key, the loss params, the
    schedule, the teachers' seed), so every cell with the same teacher and assistant shares it.
    """
    loss_params = {k: v for k, v in params.items() if k not in CHAIN_PARAMS}
    jobs, prev_key, prev_model = [], teacher_key, teacher_model
    for name in chain:
        train = student_train.for_model(name)
        config = {**base_config(suite, data_fingerprint), "role": "assistant", "model": name,
                  "model_kwargs": suite.model_kwargs.get(name, {}), "seed": suite.teacher.seed,
                  "method": entry.method, "method_hash": method_hash(entry.method), "method_params": loss_params,
                  "train": train.model_dump(),
                  "teacher": prev_key, **combine_config(entry)}
        job = Job(content_hash(config), "assistant", name, suite.teacher.seed, entry, train, suite.augment, config,
                  teacher=prev_key, teacher_model=prev_model, pair=f"{prev_model}->{name}")
        jobs.append(job)
        prev_key, prev_model = job.key, name
    return jobs


def combine_config(entry: MethodEntry) -> dict[str, str]:
    """How the entry combines its loss terms, for a job's hash: absent when summed, so existing keys stay valid."""
    return {"combine": entry.combine} if entry.combine != "sum" else {}


CHAIN_PARAMS = ("assistants", "max_assistants")  # choose the chain (its keys say which): not an assistant's loss


def models_between(models: dict[str, ModelStats], teacher: str, student: str, limit: int) -> tuple[str, ...]:
    """The suite's models strictly between teacher and student in parameters, largest first (`Needs.assistants`
    ("between",)); with more than `limit` (> 0), `limit` of them spread evenly over that order."""
    low, high = models[student].params, models[teacher].params
    found = sorted((m for m in models if low < models[m].params < high), key=lambda m: (-models[m].params, m))
    if limit and len(found) > limit:
        n = len(found)
        found = [found[round((i + 1) * (n + 1) / (limit + 1)) - 1] for i in range(limit)]
    return tuple(found)


def expand(patterns: list[str], names: list[str]) -> list[str]:
    out: list[str] = []
    for pattern in patterns:
        out += [n for n in sorted(fnmatch.filter(names, pattern)) if n not in out]
    return out


def check_methods(suite: Suite, suite_path: Path, entries: list[MethodEntry], pair_names: list[tuple[str, str]],
                  info) -> None:
    """Each method's `check_models` for every pair, on models built on the meta device (no data, no memory):
    what a method can only check against the models (a FitNets hint_layer out of range) is refused now,
    not after the teacher has trained."""
    for entry in entries:
        method = get_method(entry.method)
        params = {**method.defaults, **entry.params}
        uses_teacher = method.needs(params).teacher != "none"
        for t, s in pair_names:
            student = meta_model(s, info.num_classes, info.input_shape[0], suite.model_kwargs.get(s, {}))
            teacher = meta_model(t, info.num_classes, info.input_shape[0],
                                 {**suite.model_kwargs.get(t, {}), **suite.teacher.model_kwargs.get(t, {})})
            problem = method.check_models(params, student, teacher if uses_teacher else None)
            if problem:
                raise KdbenchError(f"{suite_path}: field 'methods.{suite.methods.index(entry)}': method "
                                   f"'{entry.label}' for the pair {t} -> {s}: {problem}")


def make_plan(suite: Suite, suite_path: Path, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              epochs: int | None = None, data_fingerprint: str | None = None) -> Plan:
    """Expand a suite. `methods`, `seeds` and `epochs` narrow or shrink it (the CLI's options); `data_fingerprint`
    (known once the data is read: Plan.for_data) enters every job's key."""
    options = {"methods": methods, "seeds": seeds, "epochs": epochs, "data_fingerprint": data_fingerprint}
    if methods:
        unknown = set(methods) - {m.label for m in suite.methods}
        if unknown:
            raise KdbenchError(f"--methods: {', '.join(sorted(unknown))} not in {suite_path} "
                               f"(it has: {', '.join(m.label for m in suite.methods)})")
    entries = [m for m in suite.methods if not methods or m.label in methods]
    seeds = seeds if seeds is not None else list(suite.seeds)
    info = dataset_info(suite.data.spec())
    names = known_models()

    checked: set[str] = set()

    def check_kwargs(name: str, kwargs: dict[str, Any], field: str) -> None:
        """Model kwargs are checked against the model's constructor here, before anything is written."""
        if (name, field) not in checked:
            problem = model_kwargs_problem(name, info.num_classes, info.input_shape, kwargs)
            if problem:
                raise KdbenchError(f"{suite_path}: field '{field}.{name}': {problem}")
            checked.add((name, field))

    def stats(name: str) -> ModelStats:
        check_kwargs(name, suite.model_kwargs.get(name, {}), "model_kwargs")
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
    base = base_config(suite, data_fingerprint)
    teacher_augment = suite.teacher.augment or suite.augment

    jobs: dict[str, Job] = {}
    teacher_keys: dict[str, str] = {}

    def stored_job(t: str, role: str = "teacher") -> str:
        """The job that trains `t` with the teachers' recipe (a teacher, or a reference for choosing assistants)."""
        if t in teacher_keys:
            return teacher_keys[t]
        train = teacher_train.for_model(t)
        kwargs = {**suite.model_kwargs.get(t, {}), **suite.teacher.model_kwargs.get(t, {})}
        config = {**base, "augment": teacher_augment.model_dump(), "model": t, "model_kwargs": kwargs, "seed": suite.teacher.seed,
                  "method": TEACHER_METHOD.method, "method_hash": method_hash(TEACHER_METHOD.method),
                  "method_params": {}, "train": train.model_dump(), "source": suite.teacher.source}
        # Everything the store keeps for it is part of the key: the route checkpoints too (RCO distils from them).
        route_every = suite.teacher.route_every or default_route_every(train.epochs)
        config["route_every"] = route_every
        checkpoint = None
        if suite.teacher.source == "checkpoint":
            checkpoint = str((suite_path.parent / suite.teacher.checkpoints[t]).resolve())
            if not Path(checkpoint).is_file():
                raise KdbenchError(f"{suite_path}: field 'teacher.checkpoints.{t}': no such file {checkpoint}")
            config["checkpoint_sha256"] = sha256(Path(checkpoint))
        key = content_hash(config)
        teacher_keys[t] = key
        jobs[key] = Job(key, role, t, suite.teacher.seed, TEACHER_METHOD, train, teacher_augment, config,
                        source=suite.teacher.source, checkpoint=checkpoint,
                        route_every=route_every)
        return key

    def teacher_route(epochs: int) -> list[int]:
        """The epochs at which a teacher trained for `epochs` keeps route checkpoints (the executor's rule)."""
        every = suite.teacher.route_every or default_route_every(epochs)
        return [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]

    for t in dict.fromkeys(t for t, _ in pair_names):
        check_kwargs(t, {**suite.model_kwargs.get(t, {}), **suite.teacher.model_kwargs.get(t, {})},
                     "teacher.model_kwargs")
        stored_job(t)
    check_methods(suite, suite_path, entries, pair_names, info)  # after model kwargs: they build the models

    def model_stats_of(name: str) -> int:
        return (models[name] if name in models else stats(name)).params

    cells: list[Cell] = []
    for pair, (t, s) in zip(pairs, pair_names):
        for entry in entries:
            method = get_method(entry.method)
            params = {**method.defaults, **entry.params}
            if epochs is not None:
                params = scale_epoch_params(method, params, suite.train.epochs, student_train.epochs,
                                            suite.teacher_train().epochs, teacher_train.for_model(t).epochs,
                                            teacher_route(teacher_train.for_model(t).epochs))
            needs = method.needs(params)
            extra: dict[str, Any] = {}  # what else determines this job's numbers, from the method's needs
            chain: list[Job] = []
            assistants = needs.assistants
            choice = ""
            if assistants == (BETWEEN,):
                assistants = models_between(models, t, s, needs.max_assistants)
                choice = (f"between: {', '.join(assistants)}" if assistants
                          else "between: no suite model between teacher and student")
            teacher_key = teacher_keys[t] if needs.teacher in ("trained", "checkpoint") else None
            if needs.teacher == "random":  # no stored teacher: the architecture and its kwargs determine it
                extra["teacher_model"] = t
                extra["teacher_model_kwargs"] = {**suite.model_kwargs.get(t, {}), **suite.teacher.model_kwargs.get(t, {})}
            if assistants == (AUTO,):
                candidates = [m for m in models if models[s].params < models[m].params < models[t].params]
                if suite.teacher.source != "train":
                    raise KdbenchError(f"{suite_path}: method '{entry.label}': assistants 'auto' compares models "
                                       f"trained by the suite (teacher.source: train); name the assistant instead")
                if candidates:
                    extra["assistant_candidates"] = {m: stored_job(m, "reference") for m in candidates}
                    extra["student_reference"] = stored_job(s, "reference")
                else:  # nothing between teacher and student in size: no assistant, recorded as such
                    assistants = ()
                extra["assistants"] = AUTO
            elif assistants:
                sizes = [models[t].params] + [model_stats_of(a) for a in assistants] + [models[s].params]
                if any(a <= b for a, b in zip(sizes, sizes[1:])):
                    raise KdbenchError(f"{suite_path}: method '{entry.label}': assistants {list(assistants)} must shrink "
                                       f"from teacher {t} to student {s} in size; use 'auto' or list `pairs`")
                chain = assistant_jobs(suite, student_train, teacher_key, t, assistants, entry, params, data_fingerprint)
                for a in chain:
                    jobs.setdefault(a.key, a)
            for seed in seeds:
                train = student_train.for_model(s)
                config = {**base, "model": s, "model_kwargs": suite.model_kwargs.get(s, {}), "seed": seed,
                          "method": entry.method, "method_hash": method_hash(entry.method),
                          "method_params": params, "train": train.model_dump(),
                          "teacher": chain[-1].key if chain else teacher_key, **extra, **combine_config(entry)}
                key = content_hash(config)
                if key not in jobs:
                    has_teacher = needs.teacher != "none"
                    jobs[key] = Job(key, "student", s, seed, entry, train, suite.augment, config,
                                    teacher=config["teacher"], teacher_model=t if has_teacher else None,
                                    pair=f"{t}->{s}" if has_teacher else None, teacher_init=needs.teacher,
                                    teacher_epoch=needs.teacher_epoch, assistants=assistants,
                                    assistant_choice=choice or ("auto: no suite model between teacher and student"
                                                                if extra.get("assistants") == AUTO and not assistants else ""))
                cells.append(Cell(pair, entry.label, seed, key))
    return Plan(suite, suite_path, models, pairs, cells, in_waves(jobs.values()), student_train, options)
