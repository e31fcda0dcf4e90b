"""One job on several devices: the processes of a data-parallel job, and how they share its work.

`kdbench run SUITE --devices N` starts the same command as N processes on this machine through torchrun
(`torchrun --nproc-per-node N -m kdbench.cli run SUITE` does the same); `--executor slurm --devices N` runs
each job as an N-task SLURM job (submitit). Every job of the suite then trains on all N devices, one after
another. The first process (rank 0) does all a job's bookkeeping as on one device: it claims the job, skips,
reuses or resumes it, logs to MLflow and writes checkpoints and the model store. When it trains a job it sends
the others the plan, the job and the checkpoint it resumes from; they build the same models (the teacher is
replicated on every device, for its forward passes), train alongside it on their part of every batch
(kdbench.train.parallel), and write nothing. When it is done with the suite it releases them.

A stop request on any device (Ctrl-C, which reaches the processes once through torchrun; SIGTERM; a lost claim)
stops all of them at the same step, the first one saving the checkpoint; the same command resumes the job, with
the numbers an uninterrupted run gives. Every CHECK_EVERY steps, and after the first, the devices compare their
weights and the method's state: a method that keeps state drawn from each device's own images (DFA's search
does) makes them differ, and the job stops with one line saying so, rather than report numbers no single
device would give.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NoReturn

import torch
from rich.console import Console

from kdbench import Interrupted, KdbenchError
from kdbench.data.shard import shard_problem
from kdbench.method import Method
from kdbench.plan import Job, Plan
from kdbench.registry import get_method
from kdbench.run.build import build_guides, build_model, build_teacher, teacher_route
from kdbench.run.context import JobContext, Local, Reporter, StopRequest
from kdbench.storage.files import load_checkpoint
from kdbench.tracking import TAG
from kdbench.train import parallel
from kdbench.train.engine import fit

CHECK_EVERY = 1000  # steps between two comparisons of the devices' weights (the first step is always compared)
LR_SCALING = "none: train.lr is the rate of the global batch train.batch_size, whatever the number of devices"


# ---------------------------------------------------------------------------------------------- processes

def launch(devices: int, argv: list[str]) -> NoReturn:
    """This command again, as `devices` processes on this machine under torchrun (this process becomes torchrun)."""
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={devices}", "-m", "kdbench.cli", *argv])


def join(device: str) -> str:
    """Join the job's process group as the launcher started this process; the device it trains on: the GPU of its
    local rank, or the CPU."""
    if device.startswith("cuda:"):
        raise KdbenchError(f"--device {device}: with several devices each process takes the GPU of its local "
                           f"rank; say --device cuda (or auto)")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "TORCHELASTIC_RUN_ID" in os.environ and os.getpgrp() != os.getpid():
        # Ctrl-C in a terminal reaches every process of its group, and torchrun forwards it once more: out of that
        # group, a process gets it once (from torchrun), which asks it to stop at the next step, not to abort.
        # (torchrun starts its workers in sessions of their own: then they are out of it already.)
        os.setpgrp()
    group = parallel.start("cuda" if cuda else "cpu")
    return f"cuda:{group.local_rank}" if cuda else "cpu"


def join_slurm_task(ctx: JobContext) -> bool:
    """A task of a multi-task SLURM job (submitit) joins its job's group; whether it is the one that leads."""
    from submitit.helpers import TorchDistributedEnvironment  # the optional SLURM backend's package

    # CUDA_VISIBLE_DEVICES stays SLURM's: the task's GPU is picked by its local rank among the job's GPUs
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    ctx.device = join(ctx.device)
    ctx.local.opts = None  # built again for this task's device
    ctx.compile = False
    return parallel.current().leads


def release() -> None:
    """The first process is done with the suite: the others leave `follow` (and the command)."""
    if parallel.current() is not None and parallel.current().leads:
        parallel.send(None)


@contextmanager
def leading():
    """Around the first process's work on a suite: the others are released when it ends, unless it ends by a stop
    request, which stopped them too (in the middle of a job: there is no one left to release)."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        parallel.stop()
        raise
    except BaseException:
        release()
        parallel.stop()
        raise
    release()
    parallel.stop()  # leaving the group before exit: a process that exits inside it is aborted by its threads


def follow_suite(store_root: Path, data_root: Path | None, device: str, download: bool, console: Console) -> None:
    """`kdbench run` in a process other than the first: train what the first sends until it is done. Ctrl-C and
    SIGTERM ask for a stop at the next step, which every device then agrees on."""
    stop = StopRequest(console)
    ctx = JobContext(parent_run="", tracking_uri="", store_root=store_root, data_root=data_root, device=device,
                     compile=False, download=download, local=Local(reporter=Reporter(console), should_stop=stop))
    with stop.installed():
        follow(ctx)


# ---------------------------------------------------------------------------------------------- one job

class StepWatch:
    """The stop predicate the engine asks at every step, on several devices: every device gets the same answer
    (true once any device asks to stop); after the first step and every CHECK_EVERY steps, the devices' weights and
    method state are compared first."""

    def __init__(self, local: Callable[[], bool], trained: dict[str, torch.nn.Module], method: Method):
        self.ask = parallel.agreed(local)
        self.trained, self.method, self.steps = trained, method, 0

    def __call__(self) -> bool:
        self.steps += 1
        if self.steps == 1 or self.steps % CHECK_EVERY == 0:
            differ = parallel.states_differ(self.trained)
            if differ:
                raise KdbenchError(
                    f"{self.method.name}: after {self.steps} step(s) the devices' copies of {', '.join(differ[:3])}"
                    f"{' ...' if len(differ) > 3 else ''} differ: the method keeps state drawn from each device's "
                    f"own images, so it cannot train on several devices; run it on one")
        return self.ask()


def prepare(model: torch.nn.Module, teacher: torch.nn.Module | None, method: Method,
            local_stop: Callable[[], bool]) -> StepWatch:
    """The job's models made data-parallel, on every device alike: BatchNorm over the whole batch, the first
    device's weights everywhere, gradients averaged after every backward. Returns the engine's stop predicate."""
    trained = {"student": model, "method": method}
    if method.trains_teacher and teacher is not None:  # ProKT: the teacher learns too, on every device
        trained["teacher"] = teacher
    for module in trained.values():
        parallel.synchronise_batchnorm(module)
    parallel.broadcast_weights(list(trained.values()))
    parallel.average_gradients([p for module in trained.values() for p in module.parameters()])
    return StepWatch(local_stop, trained, method)


def layout_tags(job: Job, world: int) -> dict[str, str]:
    """How the job's batch is laid out over the devices, logged with its run (a frequent source of numbers that
    cannot be reproduced is a global batch or learning rate that silently changes with the number of GPUs)."""
    return {f"{TAG}devices": str(world), f"{TAG}global_batch": str(job.train.batch_size),
            f"{TAG}per_device_batch": str(job.train.batch_size // world), f"{TAG}lr_scaling": LR_SCALING,
            f"{TAG}batchnorm": "statistics over the whole batch (every device's part)"}


def lead(plan: Plan, job: Job, ctx: JobContext, run_id: str, resume_from: Path | None, model: torch.nn.Module,
         teacher: torch.nn.Module | None, method: Method, local_stop: Callable[[], bool]) -> Callable[[], bool]:
    """The first process is about to train `job` (kdbench.run.job): the others are told to train it alongside,
    from the same checkpoint; returns the stop predicate its engine asks."""
    group = parallel.current()
    problem = shard_problem(len(ctx.data(plan).train), job.train.batch_size, group.world)
    if problem:
        raise KdbenchError(f"{plan.suite_path}: {job.title}: {problem}")
    parallel.send((plan, job, str(resume_from) if resume_from is not None else None))
    watch = prepare(model, teacher, method, local_stop)
    ctx.tracker.set_tags(run_id, layout_tags(job, group.world))
    return watch


def follow(ctx: JobContext) -> None:
    """The other processes: train each job the first one sends, until it releases them; then leave the group."""
    try:
        while True:
            message = parallel.receive()
            if message is None:
                return
            plan, job, resume_from = message
            try:
                train_alongside(plan, job, ctx, Path(resume_from) if resume_from else None)
            except KdbenchError:  # a diverged or failed job: the first process met the same, and records it
                continue
    finally:
        parallel.stop()


def train_alongside(plan: Plan, job: Job, ctx: JobContext, resume_from: Path | None) -> None:
    """What kdbench.run.job trains on the first device, built and trained here in the same order, writing nothing."""
    data, opts, store = ctx.data(plan), ctx.opts, ctx.store
    model = build_model(job, data, opts)
    teacher = build_teacher(plan, job, data, store, opts)
    method_cls = get_method(job.method.method)
    method = method_cls(job.config["method_params"], model, teacher, data.info.input_shape).to(opts.device)
    needs = method_cls.needs(method.params)
    resume = load_checkpoint(resume_from) if resume_from is not None else None
    watch = prepare(model, teacher, method, ctx.local.should_stop or (lambda: False))
    fit(model, method, teacher, data, job.train, job.augment, job.seed, opts,
        eval_batch_size=plan.suite.eval_batch_size,
        route=teacher_route(plan, job, store) if needs.route and job.teacher else None,
        guides=build_guides(plan, job, teacher, data, store, opts) if needs.dense and teacher is not None else None,
        resume=resume, should_stop=watch, combine=job.method.combine)
