"""What a worker process keeps between jobs (its data, MLflow client, store, teacher-output
cache), how it reports progress, and how Ctrl-C and SIGTERM ask the running job to stop.

A `JobContext` is plain, picklable settings; whatever a process builds from them lives in
`ctx.local` (a `ProcessCache`), made on first use in that process and never pickled.
"""

from __future__ import annotations
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
import torch
from rich.console import Console
from kdbench import KdbenchError, Stopped
from kdbench.storage.claims import Claim
from kdbench.data.batches import DeviceData
from kdbench.data.sources import load_splits
from kdbench.train import parallel
from kdbench.train.engine import EngineOptions
from kdbench.plan import Job, Plan
from kdbench.storage.store import ModelStore
from kdbench.train.teacher_cache import TeacherCache
from kdbench.tracking import Tracker


class Reporter:
    """What a worker tells its user: log lines, and the epochs of the running job (a progress bar in-process)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True, soft_wrap=True)

    def print(self, message: str) -> None:
        self.console.print(message)

    def job_started(self, job: Job, epochs_done: int = 0) -> None:
        pass

    def epoch(self, epoch: int) -> None:
        pass

    def job_ended(self) -> None:
        pass


class StopRequest:
    """Ctrl-C or SIGTERM asks the current job to stop at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self, console: Console):
        self.requested = False
        self.console = console

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise Stopped
        self.requested = True
        self.console.print(f"[yellow]{signal.Signals(signum).name}: stopping after the current step "
                           "(run the same command again to resume)[/]")

    @contextmanager
    def installed(self):
        try:
            old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no handlers, nothing to restore
            yield
            return
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


@contextmanager
def job_runtime(runtime: dict[str, Any], device: torch.device):
    """torch set to a job's runtime (plan.runtime_config, part of its key) while it runs, then put back: the one
    place every executor's jobs get their threads and deterministic settings, so a key means one set of numbers."""
    if runtime["device"] != device.type:  # the plan was keyed for another device than this worker's
        raise KdbenchError(f"job keyed for {runtime['device']} runs on {device.type}: plan with Plan.for_runtime")
    cudnn, fill = torch.backends.cudnn, torch.utils.deterministic
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), fill.fill_uninitialized_memory,
              torch.get_float32_matmul_precision(), cudnn.deterministic, cudnn.benchmark)
    if "threads" in runtime:
        torch.set_num_threads(runtime["threads"])
    # CPU: raises on the few ops without a deterministic kernel instead of giving other numbers; free otherwise
    # (torch.empty is not NaN-filled: that would cost a pass over every new tensor).
    torch.use_deterministic_algorithms(runtime.get("deterministic_algorithms", False))
    fill.fill_uninitialized_memory = False
    torch.set_float32_matmul_precision(runtime["matmul_precision"])
    cudnn.deterministic = runtime.get("cudnn_deterministic", False)
    cudnn.benchmark = runtime.get("cudnn_benchmark", False)
    try:
        yield
    finally:
        threads, deterministic, fill.fill_uninitialized_memory, precision, cudnn.deterministic, cudnn.benchmark = before
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision(precision)


@dataclass
class ProcessCache:
    """What one process builds from a JobContext; set fields to share objects the caller already has."""

    opts: EngineOptions | None = None
    data: DeviceData | None = None
    tracker: Tracker | None = None
    store: ModelStore | None = None
    reporter: Reporter | None = None
    should_stop: Callable[[], bool] | None = None  # asked at every step: stop now, resumably
    teacher_cache: tuple[str, TeacherCache] | None = None  # one at a time: jobs come grouped by pair
    claim: Claim | None = None  # the running job's claim
    # Stacked seeds trained with another member's call: their results, handed out when their own call comes.
    stacked: dict[str, Any] = field(default_factory=dict)


_LAST_CACHE: tuple[str, ProcessCache] | None = None  # what unpickled contexts share in this process: one suite


@dataclass
class JobContext:
    """Everything a worker needs besides the plan and the job; picklable (`local` stays behind)."""

    parent_run: str
    tracking_uri: str
    store_root: Path
    data_root: Path | None
    device: str = "auto"
    compile: bool | None = None  # torch.compile the models (None: on for CUDA, off on CPU)
    env: dict[str, str] = field(default_factory=dict)  # code version and environment, logged as params
    download: bool = False
    teacher_cache: bool = False  # share teacher outputs among logit-only methods
    local: ProcessCache = field(default_factory=ProcessCache, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A Ray worker unpickles the context once per task: it keeps the ProcessCache of the suite it last ran, so
        # its data, MLflow client and teacher-output cache are built once per worker, not once per job.
        global _LAST_CACHE
        key = repr(sorted(state.items()))
        if _LAST_CACHE is None or _LAST_CACHE[0] != key:
            _LAST_CACHE = (key, ProcessCache())
        self.__dict__.update(state, local=_LAST_CACHE[1])


    @property
    def opts(self) -> EngineOptions:
        if self.local.opts is None:
            self.local.opts = EngineOptions.for_device(self.device, self.compile)
        return self.local.opts

    @property
    def tracker(self) -> Tracker:
        if self.local.tracker is None:
            self.local.tracker = Tracker(self.tracking_uri)
        return self.local.tracker

    @property
    def store(self) -> ModelStore:
        if self.local.store is None:
            self.local.store = ModelStore(self.store_root)
        return self.local.store

    @property
    def reporter(self) -> Reporter:
        if self.local.reporter is None:
            self.local.reporter = Reporter()
        return self.local.reporter

    def data(self, plan: Plan) -> DeviceData:
        if self.local.data is None:
            spec = plan.suite.data.spec()
            group = parallel.current()  # one job on several devices: this one's part of every batch
            self.local.data = load_splits(replace(spec, download=spec.download or self.download), self.data_root,
                                          self.opts.device, group.shard if group is not None else None)
        return self.local.data
