"""Equal-budget tuning on validation: every method's `search_space` searched with the same number of trials
(Optuna, seeded, ask/tell), the chosen settings then run on the reporting seeds as ordinary jobs.

A trial is one ordinary student job per tuning seed, marked `trial` (its key differs from any reported
job's, and it sees data without a test split: nothing in a search can read it). Trials of every method run
together through the chosen executor, a batch at a time (ask a batch, run it, tell), under one MLflow tuning
parent in the experiment `<suite>.tune`. The Optuna studies live beside the MLflow store (`<suite>.optuna.db`);
a killed search finds its asked, untold trials there and runs them again (their jobs resume), so it ends with
the numbers of a search never stopped: each ask draws from a sampler seeded by the trial's number, and the
trials told are those of whole earlier batches, whatever happened in between.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import optuna
from filelock import FileLock

from kdbench import KdbenchError
from kdbench.config.schema import MethodEntry, SearchRange, Suite
from kdbench.config.tuning import search_space
from kdbench.data.load import data_fingerprint
from kdbench.storage.files import content_hash
from kdbench.plan import Job, Plan, in_waves, make_plan
from kdbench.registry import get_method
from kdbench.run.executors.base import Executor, Outcome
from kdbench.run.executors.options import usable_cores
from kdbench.storage.store import ModelStore
from kdbench.tracking import (SEARCH_SUFFIX, TUNED_LABEL, TUNED_SUFFIX, TUNING_TAG, RunEnd, RunStatus, SuiteTags,
                              Tracker, code_version, sqlite_path)

OBJECTIVE = "val_acc"  # last-epoch validation accuracy, the mean over the tuning seeds


@dataclass(frozen=True)
class Study:
    """One search: a method entry on the pair it is tuned on."""
    entry: MethodEntry
    pair: tuple[str, str]
    space: dict[str, SearchRange]

    @property
    def name(self) -> str:
        return f"{self.entry.label}|{self.pair[0]}->{self.pair[1]}"


@dataclass(frozen=True)
class Choice:
    """What a search chose: the best trial's setting (ties: the earlier trial) and every trial's numbers."""
    study: str
    params: dict[str, Any]  # the drawn parameters only (the entry's other params are kept)
    value: float  # its objective
    trial: int
    values: list[tuple[int, dict[str, Any], float | None]]  # every trial: number, drawn params, objective (None: failed)


def tuned_pairs(plan: Plan) -> list[tuple[str, str]]:
    """The pairs searched on: each pair, or the one `tune.pairs` names (its setting frozen for the rest)."""
    pairs = [(p.teacher.name, p.student.name) for p in plan.pairs]
    chosen = plan.suite.tune.pairs
    if chosen == "each":
        return pairs
    if tuple(chosen) not in pairs:
        raise KdbenchError(f"{plan.suite_path}: field 'tune.pairs': [{chosen[0]}, {chosen[1]}] is not a pair of "
                           f"this suite ({', '.join(f'[{t}, {s}]' for t, s in pairs)})")
    return [tuple(chosen)]


def studies(plan: Plan) -> list[Study]:
    """Every (method, tuned pair) search, in the suite's order."""
    return [Study(entry, pair, search_space(plan.suite, entry))
            for pair in tuned_pairs(plan) for entry in plan.suite.methods]


def storage_path(tracker_uri: str, store: ModelStore, suite: str) -> Path:
    """The Optuna studies beside the MLflow store (SQLite), else in the model store."""
    mlflow_db = sqlite_path(tracker_uri)
    folder = mlflow_db.parent if mlflow_db is not None else store.root
    return folder / f"{suite}.optuna.db"


def draw_seed(sampler_seed: int, study: str, number: int) -> int:
    """The sampler's seed for one ask: fixed by the study and the trial's number, so a resumed search draws
    exactly what an uninterrupted one does."""
    return int.from_bytes(hashlib.sha256(f"{sampler_seed}/{study}/{number}".encode()).digest()[:4], "big")


def make_sampler(suite: Suite, study: str, number: int) -> optuna.samplers.BaseSampler:
    tune = suite.tune
    seed = draw_seed(tune.sampler_seed, study, number)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Half the budget random, then TPE on what was told (Optuna's default of 10 would leave small budgets random)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, tune.trials // 2))


def own_setting(study: Study) -> dict[str, Any]:
    """The entry's own values of the searched parameters (the suite's, else the method's defaults): trial 0 of
    every search, so a tuned setting is never one the search found worse on validation than the default."""
    given = {**get_method(study.entry.method).defaults, **study.entry.params}
    return {name: given[name] for name in study.space if name in given}


def suggest(trial: optuna.Trial, space: dict[str, SearchRange]) -> dict[str, Any]:
    """The trial's draw from a search space, in the space's order (trial 0: the entry's own setting, which may lie
    outside the ranges: Optuna's warning about it is silenced)."""
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
        for name, r in space.items():
            out[name] = _suggest_one(trial, name, r)
    return out


def _suggest_one(trial: optuna.Trial, name: str, r: SearchRange) -> Any:
    if r.integer:
        return trial.suggest_int(name, round(r.low), round(r.high), log=r.log)
    return trial.suggest_float(name, r.low, r.high, log=r.log)


# ---------------------------------------------------------------------------------------------- trial jobs

def as_trial(job: Job) -> Job:
    """A student job as a tuning trial: validation only, so keyed apart from any job that reports test accuracy."""
    config = {**job.config, "trial": True}
    return replace(job, key=content_hash(config), config=config, trial=True)


def entry_plan(plan: Plan, pair: tuple[str, str], entries: list[MethodEntry], seeds: list[int],
               suffix: str) -> Plan:
    """The plan of some method entries on one pair and some seeds, keyed with the data plan's fingerprint."""
    suite = plan.suite.model_copy(update={"name": plan.suite.name + suffix, "methods": entries, "seeds": seeds,
                                          "pairs": [pair], "tune": None})
    options = {k: v for k, v in plan.options.items() if k not in ("methods", "seeds")}
    return make_plan(suite, plan.suite_path, **options)


def trial_jobs(plan: Plan, study: Study, params: dict[str, Any]) -> list[Job]:
    """A trial's jobs (its teacher's too): the entry at `params` on the study's pair, once per tuning seed."""
    entry = study.entry.model_copy(update={"params": {**study.entry.params, **params}})
    one = entry_plan(plan, study.pair, [entry], list(plan.suite.tune.seeds), SEARCH_SUFFIX)
    return [as_trial(j) if j.role == "student" else j for j in one.jobs]


def merged(plan: Plan, suite: Suite, parts: list[Plan] | list[list[Job]], cells=()) -> Plan:
    """One plan of several plans' (or job lists') jobs, each job once, in waves; keyed already by its data and
    runtime (an executor re-plans a plan from its suite when those differ, which would drop the merged jobs)."""
    jobs: dict[str, Job] = {}
    for part in parts:
        for job in (part.jobs if isinstance(part, Plan) else part):
            jobs.setdefault(job.key, job)
    pairs = [p for part in parts if isinstance(part, Plan) for p in part.pairs]
    return Plan(suite, plan.suite_path, plan.models, pairs, list(cells), in_waves(jobs.values()),
                plan.student_train, {k: plan.options.get(k) for k in ("data_fingerprint", "runtime")})


# ---------------------------------------------------------------------------------------------- the executors

class UnderParent:
    """Mixed into an executor: its jobs' runs go under a given parent run (the tuning parent), not a suite's."""
    given_parent = ""

    def parent_run(self, env: dict[str, str]) -> str:
        self.tracker.reopen(self.given_parent)
        return self.given_parent


def under_parent(backend: type[Executor], parent: str) -> type[Executor]:
    return type(f"Tuning{backend.__name__}", (UnderParent, backend), {"given_parent": parent})


@contextmanager
def kept_ray(backend: type[Executor], address: str | None):
    """Ray started once for the whole search (the executor leaves a Ray it did not start running)."""
    if backend.name != "ray":
        yield
        return
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, configure_logging=False,
                 **({} if address else {"num_cpus": usable_cores()}))  # as the executor would start it
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- the search

@dataclass
class Search:
    """A suite's search: its plan (data fingerprinted), the executor to run batches with, MLflow and the store."""
    plan: Plan
    backend: type[Executor]
    make_executor: Callable[[type[Executor], Plan], Executor]  # (class, plan) -> an executor ready to run
    tracker: Tracker
    store: ModelStore

    @property
    def storage(self) -> str:
        path = storage_path(self.tracker.uri, self.store, self.plan.suite.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def parent(self) -> str:
        """The tuning parent run of this suite's search (data-fingerprinted plan hash), created once."""
        plan, name = self.plan, self.plan.suite.name + SEARCH_SUFFIX
        key = content_hash({"tune": plan.suite.tune.model_dump(mode="json"), "plan": plan.plan_hash})
        with FileLock(str(self.store.lock_path(f"tune-{key}"))):
            found = self.tracker.find_suite_run(name, key)
            if found is not None:
                return found.info.run_id
            tags = SuiteTags(name, str(plan.suite_path), key, key, code_version())
            run = self.tracker.start_suite(tags, {})
            self.tracker.set_tags(run, {TUNING_TAG: "search"})
            return run

    def load(self, study: Study, number: int = 0) -> optuna.Study:
        sampler = make_sampler(self.plan.suite, study.name, number)
        return optuna.create_study(study_name=study.name, storage=self.storage, sampler=sampler,
                                   direction="maximize", load_if_exists=True)

    def next_batch(self, study: Study) -> list[tuple[int, dict[str, Any]]]:
        """The trials of the study's current batch, asked now if not asked before (those a killed search asked
        come first, as they were); empty once the budget is told."""
        tune = self.plan.suite.tune
        trials = self.load(study).get_trials(deepcopy=False)
        told = sum(t.state.is_finished() for t in trials)
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        asked = [t for t in trials if t.state != optuna.trial.TrialState.WAITING]  # WAITING: enqueued, not asked
        size = min(tune.batch, tune.trials - told)
        batch = [(t.number, t.params) for t in running]
        while len(batch) < size:
            number = len(asked) + len(batch) - len(running)
            optuna_study = self.load(study, number)
            if number == 0 and study.space and len(asked) == len(trials):
                optuna_study.enqueue_trial(own_setting(study))
            trial = optuna_study.ask()
            batch.append((trial.number, suggest(trial, study.space)))
        return batch

    def run(self) -> dict[str, Choice]:
        """Search every study to its budget; the choice of each."""
        parent = self.parent()
        self.run_teachers(parent)
        all_studies = studies(self.plan)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        while True:
            batches = {s.name: (s, self.next_batch(s)) for s in all_studies}
            if not any(b for _, b in batches.values()):
                return {s.name: choice(self.load(s), s) for s in all_studies}
            self.run_batch(parent, [(s, n, p) for s, b in batches.values() for n, p in b])

    def run_teachers(self, parent: str) -> None:
        """The teachers (and reference runs) first, as the ordinary jobs they are: they are evaluated on the test
        split to be reported, so that happens before the search, in which nothing reads it."""
        first = [j for j in self.plan.jobs if j.first_wave]
        suite = self.plan.suite.model_copy(update={"name": self.plan.suite.name + SEARCH_SUFFIX})
        outcome = self.make_executor(under_parent(self.backend, parent), merged(self.plan, suite, [first])).run()
        if outcome.failed:
            key, why = next(iter(outcome.failed.items()))
            raise KdbenchError(f"tuning {self.plan.suite.name}: teacher job {key} failed ({why}); nothing to tune")

    def run_batch(self, parent: str, trials: list[tuple[Study, int, dict[str, Any]]]) -> None:
        """Run the trials' jobs together on the executor, then tell each study its trials' objectives."""
        jobs = {(s.name, n): trial_jobs(self.plan, s, p) for s, n, p in trials}
        suite = self.plan.suite.model_copy(update={"name": self.plan.suite.name + SEARCH_SUFFIX})
        batch_plan = merged(self.plan, suite, list(jobs.values()))
        self.make_executor(under_parent(self.backend, parent), batch_plan).run()
        for study, number, _ in trials:
            value = self.objective(parent, [j for j in jobs[(study.name, number)] if j.trial])
            state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
            self.load(study).tell(number, value, state=state)

    def objective(self, parent: str, jobs: list[Job]) -> float | None:
        """The mean last-epoch validation accuracy of a trial's jobs; None when one diverged (a failed trial)."""
        values = []
        for job in jobs:
            run = self.tracker.job_run(parent, job.key)
            ended = RunEnd.of(run) if run is not None else None
            if ended is not None and ended.diverged:
                return None
            if ended is None or ended.status != RunStatus.FINISHED or OBJECTIVE not in run.data.metrics:
                why = ended.why if ended is not None else "it never ran"
                raise KdbenchError(f"tuning trial {job.title} did not finish ({why}); run `kdbench tune` again")
            values.append(run.data.metrics[OBJECTIVE])
        return sum(values) / len(values)


def choice(study: optuna.Study, spec: Study) -> Choice:
    """The best told trial (ties: the earlier one); every trial's numbers for the report's sensitivity."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise KdbenchError(f"tuning {spec.name}: every trial failed (diverged); no setting to choose")
    best = max(done, key=lambda t: (t.value, -t.number))
    values = [(t.number, dict(t.params), t.value if t.state == optuna.trial.TrialState.COMPLETE else None)
              for t in trials]
    return Choice(spec.name, dict(best.params), best.value, best.number, values)


def data_plan(plan: Plan, data_root: Path | None) -> Plan:
    """The plan with its data's fingerprint in every key, as an executor would make it (trial plans keep it)."""
    return plan.for_data(data_fingerprint(plan.suite.data.spec(), data_root))


# ---------------------------------------------------------------------------------------------- the tuned run

def methods_of(plan: Plan) -> list[MethodEntry]:
    """The suite's method entries the plan covers (all, or those `--methods` named)."""
    named = plan.options.get("methods")
    return [m for m in plan.suite.methods if not named or m.label in named]


def tuned_entry(entry: MethodEntry, chosen: Choice) -> MethodEntry:
    return entry.model_copy(update={"label": entry.label + TUNED_LABEL, "params": {**entry.params, **chosen.params}})


def tuned_plan(plan: Plan, choices: dict[str, Choice]) -> Plan:
    """Every method at its default and at its tuned setting on every pair and reporting seed: ordinary jobs,
    keyed by their parameters (a setting chosen on one pair is frozen for the others under `tune.pairs`)."""
    frozen = plan.suite.tune.pairs
    seeds = plan.options.get("seeds") or list(plan.suite.seeds)
    parts = []
    for p in plan.pairs:
        pair = (p.teacher.name, p.student.name)
        source = pair if frozen == "each" else tuple(frozen)
        tuned = [tuned_entry(e, choices[Study(e, source, {}).name]) for e in methods_of(plan)]
        parts.append(entry_plan(plan, pair, methods_of(plan) + tuned, seeds, TUNED_SUFFIX))
    suite = parts[0].suite.model_copy(update={"pairs": [list(pr) for pr in (plan.suite.pairs or [])] or None})
    return merged(plan, suite, parts, [c for part in parts for c in part.cells])


def tune_suite(plan: Plan, backend: type[Executor], make_executor: Callable[[type[Executor], Plan], Executor],
               tracker: Tracker, store: ModelStore, data_root: Path | None,
               ray_address: str | None = None) -> tuple[dict[str, Choice], Outcome]:
    """The search to its budget, then the tuned settings (and the defaults) on every reporting seed."""
    # Keyed by the runtime the executors run with before any trial plan is made from it.
    plan = data_plan(plan, data_root).for_runtime(make_executor(backend, plan).runtime)
    search = Search(plan, backend, make_executor, tracker, store)
    with kept_ray(backend, ray_address):
        choices = search.run()
        outcome = make_executor(backend, tuned_plan(plan, choices)).run()
    return choices, outcome
