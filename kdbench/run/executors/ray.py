"""Ray: each task (a job, or the seeds of one stack) is a Ray task; fractional resources pack several small jobs
on one device.

`--executor ray` starts a local Ray (this machine's CPUs and GPUs) unless `--ray-address` names an existing
cluster ("auto" on a cluster node, or "ray://head:10001"). Each task asks for `--cpus-per-job` CPUs (default 1;
torch gets that many threads, as in every executor: part of the jobs' keys) and `--gpus-per-job` GPUs (0.25: four
jobs share a GPU; default 0 on a CPU-only run, 1 otherwise). Every worker must see the store, the data and the
MLflow tracking URI at the same paths.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from kdbench import KdbenchError
from kdbench.storage.claims import Claim
from kdbench import Interrupted
from kdbench.run.executors.base import Executor, Outcome, dependency_levels, tasks_of
from kdbench.run.executors.options import check_packing, usable_cores
from kdbench.run.job import HELD, JobResult, run_task
from kdbench.run.context import JobContext, StopRequest
from kdbench.plan import Job, Plan


def _ray_task(plan: Plan, jobs: list[Job], ctx: JobContext, blocked: list[str | None]) -> list[JobResult]:
    return run_task(plan, jobs, ctx, blocked)  # torch threads: each job's runtime (the task's CPUs), set by run_job


AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # a logger filter sees only its own records


def _no_default_auth_notice(record: logging.LogRecord) -> bool:
    """Ray's notice that a local Ray uses token authentication, its default: a line in every log, nothing to do."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opts = self.options
        self.cpus = opts.cpus_per_job if opts.cpus_per_job is not None else 1.0
        if opts.address is None:  # a local Ray (started with this machine's usable cores) packs cores / cpus jobs
            check_packing(max(1, int(usable_cores() // self.cpus)), opts.threads,
                          f"--executor ray --cpus-per-job {self.cpus:g} (a local Ray)")

    @contextmanager
    def session(self, outcome: Outcome):
        try:
            import ray
        except ImportError:
            raise KdbenchError("--executor ray: the ray package is not installed (pip install 'kdbench[cluster]')") \
                from None
        self.ray = ray
        self.stop = StopRequest(self.console)
        opts = self.options
        on_gpu = self.ctx.opts.device.type == "cuda"
        self.gpus = opts.gpus_per_job if opts.gpus_per_job is not None else (1.0 if on_gpu else 0.0)
        started = not ray.is_initialized()
        if started:
            # A local Ray's workers inherit this process's environment (PYTHONPATH, KDBENCH_*), and Ray sets their
            # OMP_NUM_THREADS to the task's CPUs. No dashboard: nothing needs it, and it slows a loaded machine.
            if not self.console.is_terminal:  # a log file or a pipe: worker lines without colour codes
                os.environ.setdefault("RAY_COLOR_PREFIX", "0")
            logging.getLogger(AUTH_LOGGER).addFilter(_no_default_auth_notice)
            for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s start-up wait: try again
                try:
                    ray.init(address=opts.address, include_dashboard=False, configure_logging=False,
                             **({} if opts.address else {"num_cpus": usable_cores()}))
                    break
                except Exception as exc:
                    ray.shutdown()
                    if attempt == 2 or opts.address or "timed out during startup" not in str(exc):
                        raise
                    self.console.print(f"[yellow]ray:[/] {str(exc).splitlines()[0]}; starting it again")
            where = opts.address or "a local Ray"
            self.console.print(f"ray: running jobs on {where} ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
                               f"{ray.cluster_resources().get('GPU', 0):g} GPUs), {self.cpus:g} CPU and "
                               f"{self.gpus:g} GPU per job")
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def run_jobs(self, jobs: list[Job], outcome: Outcome) -> None:
        ray = self.ray
        remote = ray.remote(_ray_task).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)
        plan_ref, ctx_ref = ray.put(self.plan), ray.put(self.ctx)  # once per wave, not once per job
        for level in dependency_levels(jobs):
            while level:
                running = {remote.remote(plan_ref, task, ctx_ref, [self.blocked(job, outcome) for job in task]): task
                           for task in tasks_of(level)}
                held = self.collect(running, outcome)
                if held:
                    self.console.print(f"waiting for another kdbench process to finish {held[0].title}")
                    Claim(self.store.claim_path(held[0].key)).wait_free()
                level = held

    def collect(self, running: dict, outcome: Outcome) -> list[Job]:
        """Record each job's result as it arrives; on Ctrl-C or SIGTERM cancel the rest (their runs end KILLED
        and resume on the next run). Returns the jobs another kdbench process holds."""
        ray, held = self.ray, []
        with self.stop.installed():
            try:
                while running:
                    done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                    if self.stop():
                        raise Interrupted("stopped: the running jobs were cancelled")
                    for ref in done:
                        for job, result in zip(running.pop(ref), ray.get(ref)):
                            if result.status == HELD:  # another kdbench process trains it: wait, then look again
                                held.append(job)
                            else:  # the worker's own line ("done ...", "failed ...") says how it ended
                                outcome.record(result)
            except (Interrupted, KeyboardInterrupt):
                for ref in running:
                    ray.cancel(ref)  # a KeyboardInterrupt in the task: its run is marked KILLED, its claim freed
                ray.wait(list(running), num_returns=len(running), timeout=30)
                raise
        return held
