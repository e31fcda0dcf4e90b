"""The plan: a validated suite expanded into pairs, cells (pair x method x seed) and the jobs they need.

Every job carries a content hash of everything that determines its numbers, so the model store can
reuse a trained teacher in another suite and can never reuse a stale one after a setting changed.
"""

from __future__ import annotations
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from kdbench import KdbenchError
from kdbench.data.spec import DatasetInfo, dataset_info
from kdbench.method import AUTO, BETWEEN, Needs
from kdbench.registry import get_method, method_hash
from kdbench.storage.files import content_hash, sha256
from kdbench.config.checks import check_method_models
from kdbench.config.schema import AugmentConfig, MethodEntry, Suite, TrainConfig
from kdbench.zoo import (ModelStats, known_models, matching_models, meta_model, model_kwargs_problem, model_stats,
                         models_between)
from kdbench.data.sources import data_fingerprint
from kdbench.runtime import runtime_config
from kdbench.job_config import STORE_VERSION, base_config, combine_config, modify_config  # noqa: F401 (STORE_VERSION)
from kdbench.schedule import default_route_every, scale_epoch_params
from kdbench.stacking import entry_problem, model_problem


TEACHER_METHOD = MethodEntry(method="baseline", label="baseline")
# Roles whose trained models the store keeps and reuses. A "reference" is a model trained alone with the
# teachers' recipe so that its accuracy can choose an assistant (it is the same job as that model's teacher job).
STORED_ROLES = ("teacher", "reference", "assistant")
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
    trial: bool = False  # a tuning trial (kdbench.run.tune): evaluated on validation only, the test split never read
    stack: str = ""  # stack_seeds: the id its cell's seeds share when they train together as one model ("": alone)

    @property
    def pending(self) -> bool:
        """An assistant still to be chosen (at run time, once the models it is chosen by are trained)."""
        return self.assistants == (AUTO,)

    @property
    def first_wave(self) -> bool:
        """A teacher or reference run: trained before every other job, and whose validation accuracy chooses the
        "auto" assistants."""
        return WAVES[self.role] == 0

    def keeps_route(self, epoch: int) -> bool:
        """Whether the model after 1-based `epoch` is kept as a route checkpoint: every `route_every` epochs and
        after the last (teachers and references; other jobs keep none)."""
        return self.route_every is not None and (epoch % self.route_every == 0 or epoch == self.train.epochs)

    @property
    def route_epochs(self) -> list[int]:
        return [e for e in range(1, self.train.epochs + 1) if self.keeps_route(e)]

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
    unstacked: dict[str, str] = field(default_factory=dict)  # stack_seeds: "method on pair" -> why its seeds train apart
    _ids: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def job(self, key: str) -> Job:
        return next(j for j in self.jobs if j.key == key)

    @property
    def plan_hash(self) -> str:
        """Identifies 'the same suite run': running it again resumes the parent run with this hash."""
        return content_hash({"suite": self.suite.name, "jobs": [j.key for j in self.jobs],
                             "cells": [(c.pair.name, c.method, c.seed, c.job) for c in self.cells]})

    def stacked_with(self, job: Job) -> list[Job]:
        """The jobs that train together with `job` as one stacked model, `job` among them, in seed order."""
        return sorted((j for j in self.jobs if j.stack and j.stack == job.stack), key=lambda j: j.seed)

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

    def for_runtime(self, runtime: dict[str, Any]) -> "Plan":
        """This plan with the jobs keyed by `runtime` (runtime_config: the device kind and threads they will run
        with); what a report matches (data_free_hash) stays that of the default runtime."""
        if runtime == self.options.get("runtime"):
            return self
        plan = make_plan(self.suite, self.suite_path, **{**self.options, "runtime": runtime})
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
                                   job.method, config["method_params"], self.options.get("data_fingerprint"),
                                   self.options.get("runtime"))
            for a in chain:
                jobs.setdefault(a.key, a)
            choice = (f"auto: {chosen}, validation accuracy closest to {target:.2f}, the mean of teacher "
                      f"{job.teacher_model} and student {job.model}; candidates: "
                      + ", ".join(f"{n} {a:.2f}" for n, a in sorted(acc.items())))
            jobs[job.key] = replace(job, teacher=chain[-1].key, assistants=(chosen,), assistant_choice=choice)
        return replace(self, jobs=in_waves(jobs.values())), failed



def _without_method_code(value: Any, ids: dict[str, str]) -> Any:
    """`value` with method_hash entries dropped and other jobs' keys replaced by their identities."""
    if isinstance(value, dict):
        return {k: _without_method_code(v, ids) for k, v in value.items() if k != "method_hash"}
    if isinstance(value, (list, tuple)):
        return [_without_method_code(v, ids) for v in value]
    return ids.get(value, value) if isinstance(value, str) else value


def in_waves(jobs) -> list[Job]:
    """Teachers, then assistants, then students; creation order within a wave (a chain's assistants in order)."""
    return sorted(jobs, key=lambda j: WAVES[j.role])


def assistant_jobs(suite: Suite, student_train: TrainConfig, teacher_key: str, teacher_model: str,
                   chain: tuple[str, ...], entry: MethodEntry, params: dict[str, Any],
                   data_fingerprint: str | None = None, runtime: dict[str, Any] | None = None) -> list[Job]:
    """One job per assistant of `chain`, each distilled from the one before (the first from the teacher).

    An assistant is keyed by what determines it (its model, its teacher's key, the loss params, the
    schedule, the teachers' seed), so every cell with the same teacher and assistant shares it.
    """
    loss_params = {k: v for k, v in params.items() if k not in CHAIN_PARAMS}
    jobs, prev_key, prev_model = [], teacher_key, teacher_model
    for name in chain:
        train = student_train.for_model(name)
        config = {**base_config(suite, data_fingerprint, runtime), "role": "assistant", "model": name,
                  "model_kwargs": suite.model_kwargs.get(name, {}), "seed": suite.teacher.seed,
                  "method": entry.method, "method_hash": method_hash(entry.method), "method_params": loss_params,
                  "train": train.model_dump(),
                  "teacher": prev_key, **combine_config(entry),
                  **modify_config(entry, suite.train.epochs, student_train.epochs)}
        job = Job(content_hash(config), "assistant", name, suite.teacher.seed, entry, train, suite.augment, config,
                  teacher=prev_key, teacher_model=prev_model, pair=f"{prev_model}->{name}")
        jobs.append(job)
        prev_key, prev_model = job.key, name
    return jobs


CHAIN_PARAMS = ("assistants", "max_assistants")  # choose the chain (its keys say which): not an assistant's loss


def make_plan(suite: Suite, suite_path: Path, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              epochs: int | None = None, data_fingerprint: str | None = None,
              runtime: dict[str, Any] | None = None) -> Plan:
    """Expand a suite. `methods`, `seeds` and `epochs` narrow or shrink it (the CLI's options); `data_fingerprint`
    (known once the data is read: Plan.for_data) and `runtime` (the device kind and threads the jobs run with:
    Plan.for_runtime; default one CPU thread) enter every job's key."""
    runtime = runtime or runtime_config()
    options = {"methods": methods, "seeds": seeds, "epochs": epochs, "data_fingerprint": data_fingerprint,
               "runtime": runtime}
    entries = chosen_methods(suite, suite_path, methods)
    seeds = seeds if seeds is not None else list(suite.seeds)
    planner = _Planner.start(suite, suite_path, epochs, data_fingerprint, runtime)
    pair_names = planner.pair_names()
    pairs = [Pair(planner.models[t], planner.models[s]) for t, s in pair_names]
    for t in dict.fromkeys(t for t, _ in pair_names):
        planner.check_kwargs(t, planner.teacher_kwargs(t), "teacher.model_kwargs")
        planner.stored_job(t)
    check_method_models(suite_path, suite, entries, pair_names, planner.info)  # after the kwargs: they build them
    cells: list[Cell] = []
    for pair, (t, s) in zip(pairs, pair_names):
        for entry in entries:
            distillation = planner.distillation(entry, t, s)
            planner.stack(distillation, seeds)
            cells += [Cell(pair, entry.label, seed, planner.student_job(distillation, seed)) for seed in seeds]
    return Plan(suite, suite_path, planner.models, pairs, cells, in_waves(planner.jobs.values()),
                planner.student_train, options, unstacked=planner.unstacked)


def chosen_methods(suite: Suite, suite_path: Path, labels: list[str] | None) -> list[MethodEntry]:
    """The suite's method entries, narrowed to `labels` (--methods) when given."""
    if labels:
        unknown = set(labels) - {m.label for m in suite.methods}
        if unknown:
            raise KdbenchError(f"--methods: {', '.join(sorted(unknown))} not in {suite_path} "
                               f"(it has: {', '.join(m.label for m in suite.methods)})")
    return [m for m in suite.methods if not labels or m.label in labels]


@dataclass
class Distillation:
    """How one method entry distils one pair: what the student jobs of every seed share."""
    entry: MethodEntry
    params: dict[str, Any]  # the method's params, defaults filled in (epoch params scaled by --epochs)
    needs: Needs  # what the method needs with these params
    teacher: str  # the pair's teacher model
    student: str
    teacher_key: str | None  # the job whose trained model teaches the student: the last assistant's, or the teacher's
    assistants: tuple[str, ...]
    choice: str  # how the assistants were chosen, for the record
    extra: dict[str, Any]  # what else determines the students' numbers, from the method's needs


@dataclass
class _Planner:
    """What make_plan builds up while it expands a suite: the models, the jobs by key (in creation order, which
    orders the plan), the job that trains each teacher, the model kwargs already checked."""
    suite: Suite
    suite_path: Path
    info: DatasetInfo
    student_train: TrainConfig
    teacher_train: TrainConfig
    base: dict[str, Any]
    data_fingerprint: str | None
    epochs: int | None  # --epochs, or None
    runtime: dict[str, Any]  # runtime_config: the torch configuration the jobs run under, in every key
    models: dict[str, ModelStats] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    teacher_keys: dict[str, str] = field(default_factory=dict)
    checked: set[tuple[str, str]] = field(default_factory=set)
    unstacked: dict[str, str] = field(default_factory=dict)  # see Plan.unstacked

    @classmethod
    def start(cls, suite: Suite, suite_path: Path, epochs: int | None, data_fingerprint: str | None,
              runtime: dict[str, Any]) -> "_Planner":
        student_train = suite.train if epochs is None else suite.train.scaled_to(epochs)
        teacher_train = suite.teacher_train()
        if epochs is not None and teacher_train.epochs > 0:
            teacher_train = teacher_train.scaled_to(epochs)
        return cls(suite, suite_path, dataset_info(suite.data.spec()), student_train, teacher_train,
                   base_config(suite, data_fingerprint, runtime), data_fingerprint, epochs, runtime)

    def check_kwargs(self, name: str, kwargs: dict[str, Any], field: str) -> None:
        """Model kwargs are checked against the model's constructor here, before anything is written."""
        if (name, field) not in self.checked:
            problem = model_kwargs_problem(name, self.info.num_classes, self.info.input_shape, kwargs)
            if problem:
                raise KdbenchError(f"{self.suite_path}: field '{field}.{name}': {problem}")
            self.checked.add((name, field))

    def stats(self, name: str) -> ModelStats:
        kwargs = self.suite.model_kwargs.get(name, {})
        self.check_kwargs(name, kwargs, "model_kwargs")
        return model_stats(name, self.info.num_classes, self.info.input_shape, tuple(sorted(kwargs.items())))

    def teacher_kwargs(self, name: str) -> dict[str, Any]:
        return {**self.suite.model_kwargs.get(name, {}), **self.suite.teacher.model_kwargs.get(name, {})}

    def pair_names(self) -> list[tuple[str, str]]:
        """The (teacher, student) pairs: the suite's explicit `pairs`, else its rule over teachers x students.
        Fills in `models` (the suite's teachers, students and paired models)."""
        suite, names = self.suite, known_models()
        teachers, students = matching_models(suite.teachers, names), matching_models(suite.students, names)
        self.models.update({n: self.stats(n) for n in teachers + students})
        if suite.pairs:
            pair_names = [tuple(p) for p in suite.pairs]
            self.models.update({n: self.stats(n) for p in pair_names for n in p if n not in self.models})
        elif suite.pair_rule == "teacher_larger":
            pair_names = [(t, s) for t in teachers for s in students if self.models[t].params > self.models[s].params]
        else:
            pair_names = [(t, s) for t in teachers for s in students if t != s]
        if not pair_names:
            raise KdbenchError(f"{self.suite_path}: no teacher-student pairs: rule '{suite.pair_rule}' keeps none of "
                               f"teachers {teachers} x students {students}")
        return pair_names

    def stored_job(self, t: str, role: str = "teacher") -> str:
        """The job that trains `t` with the teachers' recipe (a teacher, or a reference for choosing assistants)."""
        if t in self.teacher_keys:
            return self.teacher_keys[t]
        suite, train = self.suite, self.teacher_train.for_model(t)
        augment = suite.teacher.augment or suite.augment
        config = {**self.base, "augment": augment.model_dump(), "model": t, "model_kwargs": self.teacher_kwargs(t),
                  "seed": suite.teacher.seed, "method": TEACHER_METHOD.method,
                  "method_hash": method_hash(TEACHER_METHOD.method), "method_params": {}, "train": train.model_dump(),
                  "source": suite.teacher.source}
        # Everything the store keeps for it is part of the key: the route checkpoints too (RCO distils from them).
        config["route_every"] = suite.teacher.route_every or default_route_every(train.epochs)
        checkpoint = None
        if suite.teacher.source == "checkpoint":
            checkpoint = str((self.suite_path.parent / suite.teacher.checkpoints[t]).resolve())
            if not Path(checkpoint).is_file():
                raise KdbenchError(f"{self.suite_path}: field 'teacher.checkpoints.{t}': no such file {checkpoint}")
            config["checkpoint_sha256"] = sha256(Path(checkpoint))
        key = content_hash(config)
        self.teacher_keys[t] = key
        self.jobs[key] = Job(key, role, t, suite.teacher.seed, TEACHER_METHOD, train, augment, config,
                             source=suite.teacher.source, checkpoint=checkpoint, route_every=config["route_every"])
        return key

    def method_params(self, method, entry: MethodEntry, t: str) -> dict[str, Any]:
        """The entry's params with the method's defaults, epoch-counted ones moved to the --epochs schedule."""
        params = {**method.defaults, **entry.params}
        if self.epochs is None:
            return params
        teacher = self.jobs[self.teacher_keys[t]]
        return scale_epoch_params(method, params, self.suite.train.epochs, self.student_train.epochs,
                                  self.suite.teacher_train().epochs, teacher.train.epochs, teacher.route_epochs)

    def distillation(self, entry: MethodEntry, t: str, s: str) -> Distillation:
        """What the method needs for the pair t -> s: its teacher, assistants (their jobs created), extra keys."""
        method = get_method(entry.method)
        params = self.method_params(method, entry, t)
        needs = method.needs(params)
        teacher_key = self.teacher_keys[t] if needs.teacher in ("trained", "checkpoint") else None
        d = Distillation(entry, params, needs, t, s, teacher_key, needs.assistants, "", {})
        if needs.teacher == "random":  # no stored teacher: the architecture and its kwargs determine it
            d.extra.update(teacher_model=t, teacher_model_kwargs=self.teacher_kwargs(t))
        if d.assistants == (BETWEEN,):
            d.assistants = models_between(self.models, t, s, needs.max_assistants)
            d.choice = (f"between: {', '.join(d.assistants)}" if d.assistants
                          else "between: no suite model between teacher and student")
        if d.assistants == (AUTO,):
            self.auto_assistants(d)
        elif d.assistants:
            self.assistant_chain(d)
        return d

    def stack(self, d: Distillation, seeds: list[int]) -> None:
        """stack_seeds: the seeds of `d` train as one model, their list in every one's key; or why they cannot."""
        if not self.suite.stack_seeds or len(seeds) < 2:
            return
        student = meta_model(d.student, self.info.num_classes, self.info.input_shape[0],
                             self.suite.model_kwargs.get(d.student, {}))
        why = entry_problem(get_method(d.entry.method), d.params, d.needs, d.entry) or model_problem(student)
        if why:
            self.unstacked[f"{d.entry.label} on {d.teacher}->{d.student}"] = why
        else:
            d.extra["stack_seeds"] = sorted(seeds)

    def auto_assistants(self, d: Distillation) -> None:
        """An assistant chosen at run time: the reference jobs it is chosen by (none between: no assistant)."""
        t, s = d.teacher, d.student
        candidates = [m for m in self.models if self.models[s].params < self.models[m].params < self.models[t].params]
        if self.suite.teacher.source != "train":
            raise KdbenchError(f"{self.suite_path}: method '{d.entry.label}': assistants 'auto' compares models "
                               f"trained by the suite (teacher.source: train); name the assistant instead")
        if candidates:
            d.extra["assistant_candidates"] = {m: self.stored_job(m, "reference") for m in candidates}
            d.extra["student_reference"] = self.stored_job(s, "reference")
        else:  # nothing between teacher and student in size: no assistant, recorded as such
            d.assistants = ()
            d.choice = "auto: no suite model between teacher and student"
        d.extra["assistants"] = AUTO

    def assistant_chain(self, d: Distillation) -> None:
        """Named assistants: they must shrink from teacher to student; their jobs teach the student."""
        t, s = d.teacher, d.student
        between = [(self.models[a] if a in self.models else self.stats(a)).params for a in d.assistants]
        sizes = [self.models[t].params, *between, self.models[s].params]
        if any(a <= b for a, b in zip(sizes, sizes[1:])):
            raise KdbenchError(f"{self.suite_path}: method '{d.entry.label}': assistants {list(d.assistants)} "
                               f"must shrink from teacher {t} to student {s} in size; use 'auto' or list `pairs`")
        chain = assistant_jobs(self.suite, self.student_train, d.teacher_key, t, d.assistants, d.entry,
                               d.params, self.data_fingerprint, self.runtime)
        for a in chain:
            self.jobs.setdefault(a.key, a)
        d.teacher_key = chain[-1].key

    def student_job(self, d: Distillation, seed: int) -> str:
        """The key of the student job of `d` for `seed`, the job created unless another cell has it."""
        s, entry, train = d.student, d.entry, self.student_train.for_model(d.student)
        config = {**self.base, "model": s, "model_kwargs": self.suite.model_kwargs.get(s, {}), "seed": seed,
                  "method": entry.method, "method_hash": method_hash(entry.method), "method_params": d.params,
                  "train": train.model_dump(), "teacher": d.teacher_key, **d.extra, **combine_config(entry),
                  **modify_config(entry, self.suite.train.epochs, self.student_train.epochs)}
        key = content_hash(config)
        if key not in self.jobs:
            stack = content_hash({**config, "seed": None}) if "stack_seeds" in config else ""
            has_teacher = d.needs.teacher != "none"
            self.jobs[key] = Job(key, "student", s, seed, entry, train, self.suite.augment, config,
                                 teacher=d.teacher_key, teacher_model=d.teacher if has_teacher else None,
                                 pair=f"{d.teacher}->{s}" if has_teacher else None, teacher_init=d.needs.teacher,
                                 teacher_epoch=d.needs.teacher_epoch, assistants=d.assistants,
                                 assistant_choice=d.choice, stack=stack)
        return key
