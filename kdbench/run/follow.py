"""One job on several devices, in the processes other than the first (kdbench.run.devices): each trains the jobs the
first process sends, alongside it, on its part of every batch, and writes nothing (no MLflow run, checkpoint or
stored model: kdbench.run.job does all that in the first process)."""

from __future__ import annotations

from pathlib import Path

from kdbench import KdbenchError
from kdbench.plan import Job, Plan
from kdbench.run.context import JobContext, ProcessCache, Reporter, StopRequest, job_runtime
from kdbench.run.devices import prepare
from kdbench.run.job import job_models, job_provided
from kdbench.storage.files import load_checkpoint
from kdbench.train import parallel
from kdbench.train.engine import Hooks, fit


def _never() -> bool:
    return False


def follow(ctx: JobContext) -> None:
    """One job on several devices, in the processes other than the first (kdbench.run.devices): train each job the
    first sends, alongside it, until it releases them; then leave the group."""
    try:
        while True:
            message = parallel.receive()
            if message is None:
                return
            plan, job, resume_from = message
            try:
                _train_alongside(plan, job, ctx, Path(resume_from) if resume_from else None)
            except KdbenchError:  # a diverged or failed job: the first process met the same, and records it
                continue
    finally:
        parallel.stop()


def follow_suite(store_root: Path, data_root: Path | None, device: str, download: bool, console) -> None:
    """`kdbench run` in a process other than the first of a torchrun launch: train what the first sends until it is
    done, writing nothing. Ctrl-C and SIGTERM ask for a stop at the next step, which every device then agrees on."""
    stop = StopRequest(console)
    ctx = JobContext(parent_run="", tracking_uri="", store_root=store_root, data_root=data_root, device=device,
                     compile=False, download=download, local=ProcessCache(reporter=Reporter(console), should_stop=stop))
    with stop.installed():
        follow(ctx)


def _train_alongside(plan: Plan, job: Job, ctx: JobContext, resume_from: Path | None) -> None:
    """What _train trains in the first process, built in the same order and trained with it; nothing written."""
    with job_runtime(job.config["runtime"], ctx.opts.device):
        data, model, teacher, method = job_models(plan, job, ctx)
        resume = load_checkpoint(resume_from) if resume_from is not None else None
        provided = job_provided(plan, job, ctx, teacher, method)
        should_stop = prepare(model, teacher, method, ctx.local.should_stop or _never)
        fit(model, method, teacher, data, job.train, job.augment, job.seed, ctx.opts,
            eval_batch_size=plan.suite.eval_batch_size, hooks=Hooks(should_stop=should_stop), provided=provided,
            resume=resume)
