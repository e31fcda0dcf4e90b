"""Local worker processes, the default executor: a suite's independent jobs run side by side on this machine.

`--workers N` worker processes (forked warm: `worker_start`) each train one job at a time (default: the usable
cores over the torch threads per job, `--cpus-per-job`, on CPU; one on a GPU). A job is sent out as soon as its
teacher (or assistant) is done, so the dependency waves hold without waiting for a whole level; the longest
first. Every job sets torch to its key's runtime (`run_job`), so the numbers are bit for bit those of
`--workers 1`, which is the in-process executor itself: this process runs the jobs one after another.

The driver keeps the one jobs bar, with a bar per running job under it; the workers send it their lines and
epochs. Ctrl-C (which reaches every process of the terminal) and SIGTERM are the driver's to answer: the workers
ignore SIGINT, the driver stops sending jobs and asks the running ones to stop at their next step (checkpoint
saved, run KILLED), then exits 130, and the same command resumes them. A worker whose driver was killed outright
stops its job the same way and leaves. The pool outlives one run in this process (tuning's batches), so a worker
reads the suite's data once (`ProcessCache`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import Progress

from kdbench import Interrupted, KdbenchError
from kdbench.plan import Job, Plan
from kdbench.run.context import JobContext, Reporter
from kdbench.run.executors.base import Outcome, tasks_of
from kdbench.run.executors.inprocess import InProcessExecutor
from kdbench.run.executors.options import check_packing, usable_cores
from kdbench.run.job import HELD, JobResult, run_task
from kdbench.run.worker_start import worker_context
from kdbench.storage.claims import Claim

POLL_S = 0.2  # how often the driver looks at its workers, their messages and a stop request


def default_workers(device_type: str, threads: int) -> int:
    """One job per core's worth of threads on CPU; one worker on a GPU (its jobs would share the device)."""
    return 1 if device_type == "cuda" else max(1, usable_cores() // threads)


# ---------------------------------------------------------------------------------------------- in a worker

_worker: dict = {}  # this worker process's reporter, stop test and busy flag, set once by _start_worker


class QueueReporter(Reporter):
    """A worker's lines and epochs, sent to the driver, which shows them: one console, one set of bars. A
    SimpleQueue writes before `put` returns, so a job's last line reaches the driver before its result does."""

    def __init__(self, messages):
        super().__init__()
        self.messages, self.pid = messages, os.getpid()

    def _send(self, kind: str, value) -> None:
        self.messages.put((kind, self.pid, value))

    def print(self, message: str) -> None:
        self._send("print", message)

    def job_started(self, job: Job, epochs_done: int = 0) -> None:
        self._send("started", (job.title, max(job.train.epochs, 1), epochs_done))

    def epoch(self, epoch: int) -> None:
        self._send("epoch", epoch)

    def job_ended(self) -> None:
        self._send("ended", None)


def _start_worker(stop_jobs, messages, threads: int, environ: dict[str, str], driver_alive) -> None:
    os.environ.clear()  # the driver's now, as a spawned process would have it (the forkserver kept its own)
    os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the terminal's every process: the driver answers
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())  # as the driver's: stop at the next step
    torch.set_num_threads(threads)  # each job sets its runtime's own; this holds between jobs
    busy = threading.Event()
    _worker.update(reporter=QueueReporter(messages), busy=busy,
                   should_stop=lambda: stop_jobs.is_set() or terminated.is_set())
    threading.Thread(target=_watch_driver, args=(driver_alive, terminated, busy), daemon=True).start()


def _watch_driver(driver_alive, terminated: threading.Event, busy: threading.Event) -> None:
    """A driver killed outright cannot stop its workers: each sees it gone (its end of `driver_alive`, a pipe no
    one writes to, closes with it), stops its job at the next step (its checkpoint saved, its run KILLED, its
    claim freed) and leaves, instead of waiting forever for work. (Not the parent process: that is the forkserver,
    which outlives the driver while its workers live.)"""
    try:
        driver_alive.recv()
    except (EOFError, OSError):
        pass
    terminated.set()
    deadline = time.monotonic() + 60
    while busy.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(1)


def _ready() -> None:
    """Nothing: sent once to each worker so that it starts (imports: seconds) before there is a job for it."""


def _worker_task(plan: Plan, jobs: list[Job], ctx: JobContext, blocked: list[str | None]) -> list[JobResult]:
    """One task (a job, or the seeds of one stack) in this worker, with its progress lines and stop flag."""
    ctx.local.reporter, ctx.local.should_stop = _worker["reporter"], _worker["should_stop"]
    _worker["busy"].set()
    try:  # torch threads and settings: each job's runtime, set by run_job
        return run_task(plan, jobs, ctx, blocked)
    finally:
        _worker["busy"].clear()


# ---------------------------------------------------------------------------------------------- in the driver

class WorkerPool:
    """Worker processes (forked from a server that imported their code and never ran torch: nothing of the
    driver's torch state; `worker_start`), the flag that asks their jobs to stop, and the queue of their messages.
    Kept for the next run in this process with the same size and threads."""

    kept: WorkerPool | None = None

    def __init__(self, size: int, threads: int):
        context = worker_context()
        self.size, self.threads = size, threads
        self.stop_jobs, self.messages = context.Event(), context.SimpleQueue()
        driver_alive, self.alive = context.Pipe(duplex=False)  # this process holds the writing end until it ends
        self.started = False
        # Processes start as jobs are sent (up to `size`), so a run of one job starts one.
        self.executor = ProcessPoolExecutor(size, mp_context=context, initializer=_start_worker,
                                            initargs=(self.stop_jobs, self.messages, threads, dict(os.environ),
                                                      driver_alive))

    @classmethod
    def get(cls, size: int, threads: int) -> WorkerPool:
        if cls.kept is None or (cls.kept.size, cls.kept.threads) != (size, threads):
            cls.discard()
            cls.kept = cls(size, threads)
        return cls.kept

    def start(self) -> None:
        if not self.started:
            self.started = True
            for _ in range(self.size):  # each finds no idle worker yet, so each starts one
                self.executor.submit(_ready)

    @classmethod
    def discard(cls) -> None:
        """After a stop or an error: a worker may have been told to stop for good (SIGTERM) or be gone."""
        if cls.kept is not None:
            cls.kept.executor.shutdown(wait=False, cancel_futures=True)
            cls.kept = None


class WorkerBars:
    """A bar per worker for the job it runs, fed by the workers' messages; their lines printed above the bars."""

    def __init__(self, progress: Progress, console: Console):
        self.progress, self.console, self.bars = progress, console, {}

    def relay(self, messages) -> None:
        while not messages.empty():
            kind, pid, value = messages.get()
            if kind == "print":
                self.console.print(value)
                continue
            if pid not in self.bars:
                self.bars[pid] = self.progress.add_task("", total=1, visible=False)
            bar = self.bars[pid]
            if kind == "started":
                title, epochs, done = value
                self.progress.update(bar, description=f"  {title}", total=epochs, completed=done, visible=True)
            elif kind == "epoch":
                self.progress.update(bar, completed=value)
            else:
                self.progress.update(bar, visible=False)


class LocalExecutor(InProcessExecutor):
    name = "local"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        threads = self.options.threads
        self.size = self.options.workers or default_workers(self.opts.device.type, threads)
        if self.size < 1:
            raise KdbenchError(f"--workers: expected a positive integer, got {self.options.workers}")
        check_packing(self.size, threads, f"--workers {self.size} with --cpus-per-job {threads}")
        self.pool: WorkerPool | None = None

    @property
    def waits_for_teachers(self) -> bool:
        return self.size > 1  # send_ready holds a job until its teacher is done; one worker is the in-process loop

    def run(self) -> Outcome:
        if self.size > 1:  # the workers start while this process reads the data and opens the parent run
            WorkerPool.get(self.size, self.options.threads).start()
        return super().run()

    @contextmanager
    def session(self, outcome: Outcome):
        with super().session(outcome):
            if self.size == 1:  # the in-process executor, as it is
                yield
                return
            self.pool = WorkerPool.get(self.size, self.options.threads)
            self.pool.stop_jobs.clear()
            self.bars = WorkerBars(self.progress, self.console)
            try:
                yield
            except BaseException:
                WorkerPool.discard()
                raise

    def run_jobs(self, jobs: list[Job], outcome: Outcome) -> None:
        if self.pool is None:
            return super().run_jobs(jobs, outcome)
        self.progress.update(self.jobs_bar, total=len(self.plan.jobs))  # assistants resolved: the count may change
        running: dict[Future, list[Job]] = {}
        try:
            self.run_parallel(list(jobs), running, outcome)
        except BaseException as exc:  # a stop request, a job's bug, a lost worker: the running jobs stop first
            self.pool.stop_jobs.set()
            self.wind_down(running, outcome)
            if isinstance(exc, BrokenProcessPool):
                raise KdbenchError("a worker process died (killed, or out of memory?); run the same command again "
                                   "to resume its job") from None
            raise

    def run_parallel(self, waiting: list[Job], running: dict[Future, list[Job]], outcome: Outcome) -> None:
        """Send each job out once its teacher is done and a worker is free; record the results as they come."""
        held: dict[str, Job] = {}  # jobs another kdbench process holds, tried again once it lets them go
        chosen = not any(j.pending for j in waiting)
        while waiting or running or held:
            if self.stop():
                raise Interrupted("stopped: the running jobs were asked to stop at their next step")
            if not chosen and not any(j.first_wave
                                      for j in [*waiting, *held.values(), *(j for js in running.values() for j in js)]):
                # The first wave's validation accuracies exist: the "auto" students join, their assistants first
                # (a chain to train before its students: started ahead of the jobs already waiting)
                waiting, chosen = self.choose_assistants() + [j for j in waiting if not j.pending], True
                self.progress.update(self.jobs_bar, total=len(self.plan.jobs))
            waiting = self.send_ready(waiting, running, held, outcome, chosen)
            if not running:
                time.sleep(POLL_S)  # only held jobs left: their claims are looked at again
                continue
            done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
            self.bars.relay(self.pool.messages)
            for future in done:  # a worker's exception is raised by result()
                for job, result in zip(running.pop(future), future.result()):
                    if result.status == HELD:
                        self.console.print(f"waiting for another kdbench process to finish {job.title}")
                        held[job.key] = job
                    else:  # the worker's own line ("done ...", "failed ...") says how it ended
                        outcome.record(result)
                        self.progress.advance(self.jobs_bar)

    def send_ready(self, waiting: list[Job], running: dict[Future, list[Job]], held: dict[str, Job],
                   outcome: Outcome, chosen: bool = True) -> list[Job]:
        """Send out the jobs whose teacher is done (an "auto" student's once its assistant is `chosen`), while a
        worker is free, highest `priority` first; return the rest. The seeds of one stack go to one worker
        together: they train as one model there."""
        for key in list(held):
            claim = Claim(self.store.claim_path(key))
            if claim.stale(claim.holder()):  # the other process finished it (skipped here) or died (resumed here)
                waiting.insert(0, held.pop(key))
        unfinished = {j.key for j in waiting} | {j.key for js in running.values() for j in js} | set(held)
        later = []
        for task in sorted(tasks_of(waiting), key=self.priority, reverse=True):
            if len(running) < self.size and task[0].teacher not in unfinished and (chosen or not task[0].pending):
                future = self.pool.executor.submit(_worker_task, self.plan, task, self.ctx,
                                                   [self.blocked(j, outcome) for j in task])
                running[future] = task
            else:
                later += task
        return later

    def wind_down(self, running: dict[Future, list[Job]], outcome: Outcome) -> None:
        """Wait for the running jobs to stop at their next step (runs KILLED, checkpoints saved), recording those
        that finished meanwhile; a second Ctrl-C ends the wait at once."""
        while running:
            done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
            self.bars.relay(self.pool.messages)
            for future in done:
                running.pop(future)
                for result in future.result() if future.exception() is None else []:
                    if result.status != HELD:
                        outcome.record(result)
                        self.progress.advance(self.jobs_bar)
