"""SLURM through submitit: one job array per dependency level, each array task one kdbench task (a job, or the
seeds of one stack).

Options (command line or the executor config file): partition, GPUs, CPUs and memory per job, time limit, and
the log folder (default `<store>/slurm-logs/<suite>`; each task writes `<SLURM job id>_..._log.out/.err`
there, and the driver prints the folder and the array ids). The driver stays in the foreground and polls.

A stopped job resumes from its last checkpoint, with the same final numbers:
- time limit or preemption: SLURM sends SIGUSR2 ahead of time; submitit saves the task (`checkpoint`) and requeues
  it; the requeued task takes over its own claim (same SLURM job) and resumes from the job's last checkpoint;
- `scancel`, a node lost: SIGTERM asks the job to checkpoint at the next step and stop; the driver sees a task
  that ended unfinished (or vanished from the queue) and submits it again (up to `max_retries` times).
Job states come from `squeue` and submitit's result files, so no SLURM accounting (sacct) is needed.
"""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from kdbench import KdbenchError
from kdbench.storage.claims import Claim
from kdbench import Interrupted
from kdbench.run.executors.base import Executor, Outcome, dependency_levels, tasks_of
from kdbench.run.follow import follow
from kdbench.run.job import FAILED, HELD, JobResult, run_task
from kdbench.run.context import JobContext, Reporter, StopRequest
from kdbench.run.devices import join_slurm_task, leading
from kdbench.plan import Job, Plan

try:
    from submitit.helpers import Checkpointable
except ImportError:  # the executor says so when chosen; the module still imports
    Checkpointable = object

STOPPED = "stopped by SLURM (cancelled or preempted): submitted again, it resumes from its checkpoint"


class SlurmTask(Checkpointable):
    """One array task. Checkpointable: on SIGUSR2 (time limit, preemption) submitit requeues this same call, which
    resumes from the job's checkpoint in the store."""

    def __call__(self, plan: Plan, jobs: list[Job], ctx: JobContext, blocked: list[str | None],
                 devices: int = 1) -> list[JobResult] | None:
        stop = StopRequest(Reporter().console)  # scancel's SIGTERM: checkpoint at the next step, then stop
        ctx.local.should_stop = stop
        with stop.installed():
            # one job on several devices: every task trains it, the first one (whose result the driver reads) leads
            if devices > 1 and not join_slurm_task(ctx):
                try:
                    follow(ctx)
                except Interrupted:
                    pass
                return None
            try:
                with leading():
                    return run_task(plan, jobs, ctx, blocked)
            except Interrupted:
                return [JobResult(job.key, HELD, STOPPED) for job in jobs]


def _queued(job_id: str) -> bool:
    """Whether SLURM still has this job (pending, running, requeued), by squeue: no accounting database needed."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


class SlurmExecutor(Executor):
    name = "slurm"

    @contextmanager
    def session(self, outcome: Outcome):
        try:
            import submitit
        except ImportError:
            raise KdbenchError("--executor slurm: the submitit package is not installed "
                               "(pip install 'kdbench[cluster]')") from None
        try:
            subprocess.run(["sinfo", "-h"], capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            raise KdbenchError("--executor slurm: SLURM does not answer here (sinfo failed); run kdbench on a "
                               "machine that can submit jobs") from None
        opts = self.options
        logs = Path(opts.logs).expanduser() if opts.logs else self.ctx.store_root / "slurm-logs" / self.plan.suite.name
        self.logs = logs.resolve()
        executor = submitit.AutoExecutor(folder=self.logs, cluster="slurm")
        params = {"name": f"kdbench-{self.plan.suite.name}", "timeout_min": opts.time_min or 24 * 60,
                  "cpus_per_task": opts.threads}  # torch gets as many threads: run_job sets the job's runtime
        if opts.partition:
            params["slurm_partition"] = opts.partition
        on_gpu = self.ctx.opts.device.type == "cuda"
        gpus = int(opts.gpus_per_job) if opts.gpus_per_job is not None else int(on_gpu)
        self.devices = int(opts.devices_per_job or 1)
        if self.devices > 1:  # one task per device, on one node; a GPU each
            params.update(nodes=1, tasks_per_node=self.devices)
            gpus = self.devices if on_gpu else 0
        if gpus:
            params["gpus_per_node"] = gpus
        if opts.mem_gb:
            params["mem_gb"] = opts.mem_gb
        executor.update_parameters(**params)
        self.executor = executor
        self.console.print(f"slurm: job logs in {self.logs}/ (<SLURM job id>_..._log.out and .err, "
                           "one pair per job)")
        yield

    def run_jobs(self, jobs: list[Job], outcome: Outcome) -> None:
        for level in dependency_levels(jobs):
            tries = {job.key: 0 for job in level}
            while level:
                groups = tasks_of(level)
                n = len(groups)
                tasks = self.executor.map_array(SlurmTask(), [self.plan] * n, groups, [self.ctx] * n,
                                                [[self.blocked(job, outcome) for job in g] for g in groups],
                                                [self.devices] * n)
                ids = sorted({t.job_id.split("_")[0] for t in tasks})
                self.console.print(f"slurm: submitted {len(level)} job(s) as array {', '.join(ids)}"
                                   + (f" ({n} tasks: a stack's seeds are one)" if n < len(level) else "") + ": "
                                   + ", ".join(j.title for j in level))
                again = []
                for group, results in zip(groups, self.wait(tasks, groups)):
                    again += [job for job, result in zip(group, results or [None] * len(group))
                              if self.submit_again(job, result, tries, outcome)]
                level = again

    def submit_again(self, job: Job, result: JobResult | None, tries: dict[str, int], outcome: Outcome) -> bool:
        """Record how `job` ended; True when it goes out again (held by another process, stopped, or lost)."""
        if result is not None and result.status != HELD:
            if result.status == FAILED:
                self.console.print(f"[red]slurm:[/] {job.title} failed: {result.reason[-1000:]}")
            outcome.record(result)
            return False
        if result is not None and not result.reason:  # another kdbench process trains it
            Claim(self.store.claim_path(job.key)).wait_free()
            return True
        tries[job.key] += 1
        why = result.reason if result is not None else "ended without a result (cancelled, node lost)"
        if tries[job.key] > self.options.max_retries:
            outcome.record(JobResult(job.key, FAILED, f"slurm: {why}; gave up after "
                                     f"{self.options.max_retries} resubmissions"))
            return False
        self.console.print(f"[yellow]slurm:[/] {job.title} {why}; resubmitting it")
        return True

    def wait(self, tasks, groups: list[list[Job]]) -> list[list[JobResult] | None]:
        """Each task's results, None for a task that left the queue without them; polls squeue and the result files."""
        results: dict[int, list[JobResult] | None] = {}
        gone: dict[int, int] = {}
        while len(results) < len(tasks):
            time.sleep(self.options.poll_s)
            for i, task in enumerate(tasks):
                if i in results:
                    continue
                if task.paths.result_pickle.exists():
                    status, value = _result_file(task)
                    results[i] = value if status == "success" else [JobResult(
                        job.key, FAILED, f"raised in SLURM job {task.job_id} (log {task.paths.stderr}): "
                                         f"{str(value)[-500:]}") for job in groups[i]]
                elif not _queued(task.job_id):
                    gone[i] = gone.get(i, 0) + 1
                    if gone[i] >= 3:  # not a race with the result file being written: gone for three polls
                        results[i] = None
                else:
                    gone.pop(i, None)
        return [results[i] for i in range(len(tasks))]


def _result_file(task):
    from submitit.core import utils

    return utils.pickle_load(task.paths.result_pickle)

