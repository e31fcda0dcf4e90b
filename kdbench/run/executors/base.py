"""The driver every executor shares: the suite's MLflow parent run, the dependency waves, the outcome.

A backend subclasses `Executor` and implements one method, `run_jobs(jobs, outcome)`: run these jobs as
`tasks_of(jobs)` (one job each, or the seeds of one stack together), each task through
`kdbench.run.job.run_task(self.plan, task, self.ctx, [self.blocked(job, outcome) for job in task])`, and
`outcome.record(result)` each result (in this process `run_job` per job does the same: a stack's other
results wait in `ctx.local`). Jobs come in dependency order: a job's teacher (or assistant) is
earlier in the same list or already done; `dependency_levels(jobs)` splits a list into levels whose
jobs can run at the same time. `self.ctx` is picklable: send it with the plan and the task to a worker.
"""

from __future__ import annotations

import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from rich.console import Console

from kdbench.run.build import build_teacher
from kdbench import Interrupted
from kdbench.train.engine import EngineOptions
from kdbench.run.executors.options import ExecutorOptions
from kdbench.run.job import COLLAPSED, FAILED, FINISHED, HELD, SKIPPED, JobResult, stored_accuracy
from kdbench.run.context import JobContext, ProcessCache, Reporter
from kdbench.plan import STORED_ROLES, Job, Plan
from kdbench.runtime import runtime_config
from kdbench.storage.store import ModelStore
from kdbench.tracking import (TEACHER_FAILED, RunStatus, SuiteTags, Tracker, absolute_uri, code_version, environment,
                              flatten)


@dataclass
class Outcome:
    parent_run: str
    finished: list[str] = field(default_factory=list)  # job keys
    failed: dict[str, str] = field(default_factory=dict)  # job key -> reason
    collapsed: dict[str, str] = field(default_factory=dict)  # finished, but at chance or never learned: no number
    skipped: int = 0  # jobs already finished by an earlier or concurrent run
    nothing_to_do: bool = False  # every job had finished before: no job ran and the parent run was left as it was

    def record(self, result: JobResult) -> None:
        if result.status in (FINISHED, SKIPPED):
            self.finished.append(result.key)
            self.skipped += result.status == SKIPPED
        elif result.status == FAILED:
            self.failed[result.key] = result.reason
        elif result.status == COLLAPSED:
            self.collapsed[result.key] = result.reason
        elif result.status != HELD:
            raise ValueError(f"unknown job status {result.status!r}")


def dependency_levels(jobs: list[Job]) -> list[list[Job]]:
    """`jobs` in levels: each job after the level of its teacher when that is in `jobs` (TAKD's assistant chains)."""
    level: dict[str, int] = {}
    for job in jobs:  # in dependency order, so a teacher's level is known before its students'
        level[job.key] = level[job.teacher] + 1 if job.teacher in level else 0
    out: list[list[Job]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for job in jobs:
        out[level[job.key]].append(job)
    return out


def tasks_of(jobs: list[Job]) -> list[list[Job]]:
    """`jobs` as what one worker runs at a time: one job each, except the seeds of one stack (stack_seeds), which
    are one task (they train as one model in one process); in plan order."""
    tasks: dict[str, list[Job]] = {}
    for job in jobs:
        tasks.setdefault(job.stack or job.key, []).append(job)
    return list(tasks.values())


class Executor:
    """Runs a plan's jobs in dependency waves: teachers and reference runs, then (with the accuracies that choose
    "auto" assistants known) assistants and students. Subclasses say where a job runs: `run_jobs`."""

    name = "base"
    # True where run_jobs holds each job until its teacher is done and the students of "auto" assistants until
    # `choose_assistants` (once no teacher or reference run is left): the whole plan then goes out in one call,
    # and students start while the slowest teacher still trains.
    waits_for_teachers = False

    def __init__(self, plan: Plan, data_root: Path | None, device: str = "auto", tracker: Tracker | None = None,
                 store: ModelStore | None = None, console: Console | None = None, fresh: bool = False,
                 download: bool = False, teacher_cache: bool = False, compile: bool | None = None,
                 options: ExecutorOptions | None = None):
        self.plan = plan
        self.data_root = data_root
        self.device = device
        self.compile = compile  # None: the device's default (on for CUDA)
        self.opts = EngineOptions.for_device(device, compile)  # a bad --device stops here, before anything else
        self.console = console or Console(stderr=True)
        self.store = store or ModelStore()
        self.tracker = tracker
        self.fresh = fresh
        self.download = download
        self.teacher_cache = teacher_cache or plan.suite.teacher_cache
        self.unresolved: dict[str, str] = {}  # student job key -> why its "auto" assistant could not be chosen
        self.done_before: dict[str, str] | None = None  # a finished parent run's jobs, when none is left to run
        self.ctx: JobContext | None = None
        self.options = options or ExecutorOptions()

    @property
    def runtime(self) -> dict:
        """The torch configuration every job runs under (and is keyed by): this device kind, the options' threads."""
        return runtime_config(self.opts.device.type, self.options.threads)

    def run_jobs(self, jobs: list[Job], outcome: Outcome) -> None:
        raise NotImplementedError

    def run(self) -> Outcome:
        plan = self.plan
        # Absolute paths: a worker may start in another folder (a Ray worker) or on another machine (SLURM).
        ctx = JobContext(parent_run="", tracking_uri="", store_root=self.store.root.resolve(),
                         data_root=self.data_root.resolve() if self.data_root else None,
                         device=self.device, compile=self.compile, download=self.download,
                         teacher_cache=self.teacher_cache,
                         local=ProcessCache(opts=self.opts, store=self.store, reporter=Reporter(self.console)))
        # A missing dataset stops the suite before anything is written to MLflow; teachers are keyed by the data
        # they learn from (its fingerprint, known once it is read).
        self.plan = plan = plan.for_data(ctx.data(plan).fingerprint).for_runtime(self.runtime)
        self.tracker = self.tracker or Tracker()
        ctx.local.tracker, ctx.tracking_uri = self.tracker, absolute_uri(self.tracker.uri)
        ctx.env = {**code_version(), **environment(str(ctx.opts.device)),
                   "compile": ctx.opts.compile_mode if ctx.opts.compile else "off"}
        changed = [j for j in plan.method_changed(self.tracker.finished_identities(plan.suite.name))
                   if not (j.role in STORED_ROLES and self.store.has(j.key))]
        if changed:  # the job keys cover the method's code: these would have been reused before the edit
            methods = ", ".join(dict.fromkeys(j.method.method for j in changed))
            self.console.print(f"{len(changed)} jobs retrain because their method's code changed since this "
                               f"suite last ran them ({methods})")
        if plan.unstacked:  # once per suite run, not per job
            self.console.print(f"stack_seeds: {len(plan.unstacked)} cells train their seeds as separate jobs: "
                               + "; ".join(f"{cell} ({why})" for cell, why in plan.unstacked.items()))
        ctx.parent_run = self.parent_run(ctx.env)  # before any worker starts: workers only add child runs
        self.ctx = ctx
        outcome = Outcome(ctx.parent_run)
        if self.done_before is not None:
            outcome.finished = [k for k, why in self.done_before.items() if not why]
            outcome.collapsed = {k: why for k, why in self.done_before.items() if why}
            outcome.skipped, outcome.nothing_to_do = len(outcome.finished), True
            return outcome
        # The parent run is shared by every process working on this plan: the last one to leave ends it.
        with self.store.workers(ctx.parent_run, f"suite-{plan.plan_hash}") as self.workers:
            try:
                with self.session(outcome):
                    self.run_waves(outcome)
            except (Interrupted, KeyboardInterrupt):
                raise
            except BaseException:  # a bug outside any job: the parent must not stay RUNNING
                if self.workers.leave():
                    self.tracker.end(outcome.parent_run, RunStatus.FAILED, traceback.format_exc())
                raise
            if self.workers.leave():
                self.tracker.end(outcome.parent_run, RunStatus.FAILED if outcome.failed else RunStatus.FINISHED)
        return outcome

    def session(self, outcome: Outcome):
        """A backend's set-up around the waves (start a cluster, show progress); nothing by default."""
        return nullcontext()

    def run_waves(self, outcome: Outcome) -> None:
        plan = self.plan
        try:
            if self.waits_for_teachers:  # it holds each job until its teacher is done, "auto" students until chosen
                return self.run_jobs(list(plan.jobs), outcome)
            first_wave = sorted((j for j in plan.jobs if j.first_wave), key=lambda j: self.priority([j]), reverse=True)
            self.run_jobs(first_wave, outcome)
            if any(j.pending for j in self.plan.jobs):
                self.choose_assistants()
            self.run_jobs([j for j in self.plan.jobs if j.key not in {f.key for f in first_wave}], outcome)
        except (Interrupted, KeyboardInterrupt):
            if self.workers.leave():  # never while another process still works on the shared parent
                self.tracker.end(outcome.parent_run, RunStatus.KILLED)
            raise

    def priority(self, task: list[Job]) -> tuple[bool, int]:
        """Which task (a job, or a stack's seeds) to start first, highest first; only the order, no number depends
        on it. The first wave first: the "auto" assistants are chosen once it is done. Then the longest: the
        slowest teacher starts at once, and short jobs fill the end instead of a long one running alone. Length: one
        forward's MACs of the model trained (three with its backward) and of the model that teaches it, times
        epochs; an assistant outside the suite's models counts as nothing."""
        def macs(name: str | None) -> int:
            return self.plan.models[name].macs if name in self.plan.models else 0

        def work(job: Job) -> int:
            teacher = job.assistants[-1] if job.assistants and not job.pending else job.teacher_model
            return (3 * macs(job.model) + macs(teacher)) * job.train.epochs
        return task[0].first_wave, sum(map(work, task))

    def choose_assistants(self) -> list[Job]:
        """Choose the "auto" assistants, now that the first wave's validation accuracies exist (never the test
        split's); returns the jobs that replace the pending ones: the assistants to train, then their students
        (a student whose assistant could not be chosen stays pending: `blocked` says why)."""
        pending, before = {j.key for j in self.plan.jobs if j.pending}, {j.key for j in self.plan.jobs}
        self.plan, self.unresolved = self.plan.resolve_assistants(
            lambda key: stored_accuracy(self.store, key, "val_acc"))
        return [j for j in self.plan.jobs if j.key in pending or j.key not in before]

    def blocked(self, job: Job, outcome: Outcome) -> str | None:
        """Why `job` cannot run now, given what failed so far; None when it can."""
        if job.pending:
            return self.unresolved.get(job.key, "assistant not chosen")
        if job.teacher and job.teacher in outcome.failed:
            return f"{TEACHER_FAILED}{outcome.failed[job.teacher]}"
        return None

    def parent_run(self, env: dict[str, str]) -> str:
        """Continue this plan's parent run if one exists (resume), else create it; one process at a time."""
        plan = self.plan
        with FileLock(str(self.store.lock_path(f"suite-{plan.plan_hash}"))):
            found = None if self.fresh else self.tracker.find_suite_run(plan.suite.name, plan.plan_hash)
            if found is not None and found.info.status == RunStatus.FINISHED:
                done = self.tracker.finished_jobs(found.info.run_id)
                if all(job.key in done for job in plan.jobs):  # nothing to run: the parent keeps its duration
                    self.done_before = done
                    return found.info.run_id
            if found is not None:
                if found.info.status != RunStatus.RUNNING:
                    self.tracker.reopen(found.info.run_id)
                self.console.print(f"continuing run {found.info.run_id} of {plan.suite.name} "
                                   f"(finished jobs are skipped; use --fresh to start over)")
                return found.info.run_id
            tags = SuiteTags(plan.suite.name, str(plan.suite_path), plan.plan_hash, plan.data_free_hash, env)
            return self.tracker.start_suite(tags, flatten("", plan.suite.model_dump(mode="json"), {}))

    def build_teacher(self, job: Job):
        """The model that teaches `job` (as a worker builds it), for inspection after a run."""
        return build_teacher(self.plan, job, self.ctx.data(self.plan), self.store, self.opts)
