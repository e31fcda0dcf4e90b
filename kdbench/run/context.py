"""What a worker process keeps between jobs (its data, MLflow client, store, teacher-output
cache), how it reports progress, and how Ctrl-C and SIGTERM ask the running job to stop.

A `JobContext` is plain, picklable settings; whatever a process builds from them lives in
`ctx.local`, made on first use in that process and never pickled.
"""

from __future__ import annotations
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from rich.console import Console
from kdbench import Stopped
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


@dataclass
class Local:
    """What one process builds from a JobContext; set fields to share objects the caller already has."""

    opts: EngineOptions | None = None
    data: DeviceData | None = None
    tracker: Tracker | None = None
    store: ModelStore | None = None
    reporter: Reporter | None = None
    should_stop: Callable[[], bool] | None = None  # asked at every step: stop now, resumably
    teacher_cache: tuple[str, TeacherCache] | None = None  # one at a time: jobs come grouped by pair
    claim: Claim | None = None  # the running job's claim


_LAST_LOCAL: tuple[str, Local] | None = None  # this process's unpickled contexts' Local, one suite at a time


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
    local: Local = field(default_factory=Local, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A Ray worker unpickles the context once per task: it keeps the Local of the suite it last ran, so
        # its data, MLflow client and teacher-output cache are built once per worker, not once per job.
        global _LAST_LOCAL
        key = repr(sorted(state.items()))
        if _LAST_LOCAL is None or _LAST_LOCAL[0] != key:
            _LAST_LOCAL = (key, Local())
        self.__dict__.update(state, local=_LAST_LOCAL[1])


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
