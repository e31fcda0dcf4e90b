"""A job's life runs the same in another process: plan, job and context are picklable, and a worker that gets
only them (as a SLURM job or a Ray task would) trains, tracks and stores exactly what the in-process run does."""

from __future__ import annotations

import io
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench.run.executors import Executor, get_executor
from kdbench.run.executors.base import dependency_levels
from kdbench.run.job import run_job
from kdbench.plan import make_plan
from kdbench.config.load import load_suite


class SpawnExecutor(Executor):
    """A backend in a dozen lines: each dependency level's jobs go to a fresh worker process."""

    def run_jobs(self, jobs, outcome):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            for level in dependency_levels(jobs):
                blocked = [self.blocked(job, outcome) for job in level]
                for result in pool.map(run_job, [self.plan] * len(level), level, [self.ctx] * len(level), blocked):
                    outcome.record(result)


def student_accuracies(parent: str) -> dict[str, float]:
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["kdbench.method"]: r.data.metrics["test_acc"] for r in runs
            if r.data.tags["kdbench.role"] == "student" and r.info.status == "FINISHED"}


def test_a_worker_process_given_plan_job_and_context_gives_the_in_process_numbers(write_suite):
    path = write_suite({"train": {"epochs": 1, "batch_size": 64}})
    plan = make_plan(load_suite(path), path)
    quiet = Console(file=io.StringIO())
    spawned = SpawnExecutor(plan, None, "cpu", console=quiet)
    remote = spawned.run()
    # One epoch of tiny data: a run at chance counts as collapsed (issue 9.4), still a finished job.
    assert not remote.failed and len(remote.finished) + len(remote.collapsed) == len(plan.jobs) == 3
    ctx = pickle.loads(pickle.dumps(spawned.ctx))  # what crosses to a worker: settings only, no live objects
    assert ctx.parent_run == remote.parent_run and ctx.local.data is None and ctx.local.tracker is None

    local = get_executor("inprocess")(plan, None, "cpu", console=quiet, fresh=True).run()  # teacher from the store
    assert local.parent_run != remote.parent_run and not local.failed
    remote_acc, local_acc = student_accuracies(remote.parent_run), student_accuracies(local.parent_run)
    assert set(remote_acc) == {"baseline", "kd"} and remote_acc == local_acc  # bit for bit on CPU


def test_a_worker_unpickling_the_same_context_keeps_what_it_built():
    """A Ray worker gets the context pickled once per task: the data, client and teacher cache it built for one
    job serve its next job of the same suite, and a context of another suite starts afresh."""
    from pathlib import Path

    from kdbench.run.context import JobContext

    ctx = JobContext(parent_run="p1", tracking_uri="sqlite:///x.db", store_root=Path("s"), data_root=None)
    first, second = pickle.loads(pickle.dumps(ctx)), pickle.loads(pickle.dumps(ctx))
    assert first.local is second.local and first.local is not ctx.local
    first.local.data = "built once"
    assert pickle.loads(pickle.dumps(ctx)).local.data == "built once"
    other = JobContext(parent_run="p2", tracking_uri="sqlite:///x.db", store_root=Path("s"), data_root=None)
    assert pickle.loads(pickle.dumps(other)).local.data is None
