"""The in-process executor (`--workers 1` of the default, local one): this process runs the jobs one after another,
with a progress bar.

The smallest backend, and the one to copy: `run_jobs` calls `run_job` for each job. A job another kdbench
process holds (HELD) is put off and tried again once that process lets it go, so several processes can work
on one suite without training a job twice.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbench.storage.claims import Claim
from kdbench import Interrupted
from kdbench.run.executors.base import Executor, Outcome
from kdbench.run.job import HELD, run_job
from kdbench.run.context import Reporter, StopRequest
from kdbench.plan import Job


class InProcessExecutor(Executor):
    name = "inprocess"

    @contextmanager
    def session(self, outcome: Outcome):
        self.stop = StopRequest(self.console)
        with self.stop.installed(), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                             TimeElapsedColumn(), console=self.console) as progress:
            self.progress = progress
            self.jobs_bar = progress.add_task("jobs", total=len(self.plan.jobs))
            self.ctx.local.reporter = ProgressReporter(progress, self.console)
            self.ctx.local.should_stop = self.stop
            yield

    def run_jobs(self, jobs: list[Job], outcome: Outcome) -> None:
        self.progress.update(self.jobs_bar, total=len(self.plan.jobs))  # assistants resolved: the count may change
        while jobs:
            jobs = self.run_pending(jobs, outcome)

    def run_pending(self, pending: list[Job], outcome: Outcome) -> list[Job]:
        """Run every job this process can claim; return those another process holds (after waiting for one)."""
        deferred: list[Job] = []
        for job in pending:
            if self.stop():
                raise Interrupted("stopped between jobs")
            if job.teacher and any(d.key == job.teacher for d in deferred):
                deferred.append(job)  # its teacher is being trained by another process
                continue
            result = run_job(self.plan, job, self.ctx, self.blocked(job, outcome))
            if result.status == HELD:
                deferred.append(job)
                continue
            outcome.record(result)
            self.progress.advance(self.jobs_bar)
        if deferred:
            self.console.print(f"waiting for another kdbench process to finish {deferred[0].title}")
            claim = Claim(self.store.claim_path(deferred[0].key))
            while not claim.stale(claim.holder()):  # in short waits: a stop request ends the wait at once
                if self.stop():
                    raise Interrupted(f"stopped while waiting for another process to finish {deferred[0].title}")
                time.sleep(0.5)
        return deferred


class ProgressReporter(Reporter):
    """The running job's epochs as a second bar under the jobs bar."""

    def __init__(self, progress: Progress, console):
        super().__init__(console)
        self.progress = progress
        self.bar = progress.add_task("", total=1, visible=False)

    def job_started(self, job: Job, epochs_done: int = 0) -> None:
        self.progress.update(self.bar, description=f"  {job.title}", total=max(job.train.epochs, 1),
                             completed=epochs_done, visible=True)

    def epoch(self, epoch: int) -> None:
        self.progress.update(self.bar, completed=epoch)

    def job_ended(self) -> None:
        self.progress.update(self.bar, visible=False)
