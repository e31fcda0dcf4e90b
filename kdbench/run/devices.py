"""One job on several devices: the processes of a data-parallel job, and how they share its work.

`kdbench run SUITE --devices N` starts the same command as N processes on this machine through torchrun
(`torchrun --nproc-per-node N -m kdbench.cli run SUITE` does the same); `--executor slurm --devices N` runs
each job as an N-task SLURM job (submitit). Every job of the suite then trains on all N devices, one after
another. The first process (rank 0) does all a job's bookkeeping as on one device: it claims the job, skips,
reuses or resumes it, logs to MLflow and writes checkpoints and the model store (`lead`, from kdbench.run.job).
When it trains a job it sends the others the plan, the job and the checkpoint it resumes from; they build the same
models (the teacher is replicated on every device, for its forward passes), train alongside it on their part of
every batch (kdbench.train.parallel), and write nothing (kdbench.run.follow). When it is done with the suite it
releases them.

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

from kdbench import Interrupted, KdbenchError
from kdbench.data.shard import shard_problem
from kdbench.method import Method
from kdbench.plan import Job, Plan
from kdbench.run.context import JobContext
from kdbench.tracking import LayoutTags
from kdbench.train import parallel

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


def devices_for_run(plan: Plan, executor: str, devices: int | None, compile: bool | None,
                    teacher_cache: bool) -> int:
    """How many devices each job trains on (--devices, or the processes torchrun started), refused in one line
    where it cannot be: Ray, a batch that does not split, stacked seeds, torch.compile, shared teacher outputs."""
    launched = parallel.launched_world()
    if devices is not None and devices < 1:
        raise KdbenchError(f"--devices: expected a positive number of devices, got {devices}")
    if launched > 1 and devices is not None and devices != launched:
        raise KdbenchError(f"--devices {devices}: torchrun started {launched} processes; give the same number")
    world = devices or launched
    if plan.suite.data.loader == "stream" and teacher_cache:
        raise KdbenchError("--teacher-cache: the shared teacher outputs need data held on the device; "
                           f"{plan.suite_path} streams it (data.loader: stream)")
    if world == 1:
        return world
    if executor == "ray" or (executor == "slurm" and launched > 1):
        raise KdbenchError(f"--devices {world}: one job on several devices runs in-process (torchrun) or with "
                           f"--executor slurm (started by kdbench, not by torchrun), not with --executor {executor}")
    stacked = next((job for job in plan.jobs if job.stack), None)
    if stacked is not None:  # the stacked path trains in the first process alone, which holds only its part
        raise KdbenchError(f"{plan.suite_path}: field 'stack_seeds': not with several devices yet ({stacked.title} "
                           f"trains with its cell's other seeds as one stacked model); set it false, or use one device")
    if compile:
        raise KdbenchError("--compile: not with several devices yet (BatchNorm over the whole batch and the "
                           "gradient averaging run eagerly); leave it out")
    for job in plan.jobs:
        if job.train.batch_size % world:
            raise KdbenchError(f"{plan.suite_path}: field 'train.batch_size': {job.title} has batch_size "
                               f"{job.train.batch_size}, which does not split over {world} devices (it is the "
                               f"global batch: choose a multiple of {world})")
    return world


def layout_line(plan: Plan, world: int) -> str:
    """What a dry run says of the batches' layout over `world` devices."""
    sizes = sorted({j.train.batch_size for j in plan.jobs})
    return (f"each job on {world} devices: " + "; ".join(f"global batch {b}, {b // world} per device" for b in sizes)
            + "; learning rates as the suite gives them (not scaled: they are the global batch's)")


def start_processes(suite: Path, world: int, device: str) -> str:
    """`kdbench run --devices N` in-process: this command again as N processes under torchrun (this process becomes
    torchrun: no return), unless torchrun started this one; then it joins their group. The device it trains on."""
    if parallel.launched_world() > 1:
        return join(device)
    argv = sys.argv[1:]
    if "run" not in argv or str(suite) not in argv:
        raise KdbenchError("--devices: start `kdbench run` from a shell (or start it under torchrun yourself)")
    launch(world, argv)  # only from a command line that names the suite


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


def layout_tags(job: Job, world: int) -> LayoutTags:
    return LayoutTags(world, job.train.batch_size, job.train.batch_size // world, LR_SCALING,
                      "statistics over the whole batch (every device's part)")


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
    ctx.tracker.set_tags(run_id, layout_tags(job, group.world).to_tags())
    return watch
