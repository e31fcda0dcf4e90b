"""The in-process executor: runs a plan's jobs in dependency order, one after another.

It wires the pieces together and nothing else: data from kdbench.data, models from the zoo, the
method from the registry, training from the engine, results to MLflow (tracking) and the model
store. It knows no loss and no optimiser.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbench import KdbenchError
from kdbench.data import DeviceData, load_data
from kdbench.engine import Diverged, EngineOptions, fit
from kdbench.plan import Job, Plan
from kdbench.registry import get_method
from kdbench.seeding import stream_seed
from kdbench.store import ModelStore
from kdbench.teacher_cache import TeacherCache
from kdbench.tracking import TAG, Tracker, code_version, environment, flatten
from kdbench.zoo import create_model


@dataclass
class Outcome:
    parent_run: str
    finished: list[str] = field(default_factory=list)  # job keys
    failed: dict[str, str] = field(default_factory=dict)  # job key -> reason


def build_model(job: Job, data: DeviceData, opts: EngineOptions) -> torch.nn.Module:
    torch.manual_seed(stream_seed(job.seed, "init"))  # the initialisation stream of this job's seed
    kwargs = dict(job.config["model_kwargs"])
    if job.source == "pretrained":
        kwargs["pretrained"] = True
    model = create_model(job.model, data.info.num_classes, data.info.input_shape[0], **kwargs)
    if job.source == "checkpoint":
        model.load_state_dict(torch.load(job.checkpoint, map_location="cpu", weights_only=True))
    model = model.to(opts.device)
    return model.to(memory_format=torch.channels_last) if opts.channels_last else model


def job_tags(plan: Plan, job: Job) -> dict[str, str]:
    method = get_method(job.method.method)
    tags = {f"{TAG}suite": plan.suite.name, f"{TAG}role": job.role, f"{TAG}student": job.model,
            f"{TAG}teacher": job.teacher_model or "", f"{TAG}method": job.method.label,
            f"{TAG}method_name": job.method.method, f"{TAG}seed": str(job.seed), f"{TAG}job": job.key,
            f"{TAG}pair": job.pair or ""}
    if job.role == "teacher":
        tags[f"{TAG}teacher"] = job.model
        tags[f"{TAG}student"] = ""
    if method.protocol_note:
        tags[f"{TAG}protocol"] = method.protocol_note
    return tags


class Executor:
    def __init__(self, plan: Plan, data_root: Path | None, device: str = "auto", tracker: Tracker | None = None,
                 store: ModelStore | None = None, console: Console | None = None, teacher_cache: bool = False):
        self.plan = plan
        self.use_teacher_cache = teacher_cache or plan.suite.teacher_cache
        self.teacher_cache: tuple[str, TeacherCache] | None = None  # one at a time: jobs come grouped by pair
        self.data_root = data_root
        self.opts = EngineOptions.for_device(device)
        self.console = console or Console(stderr=True)
        self.store = store or ModelStore()
        self.tracker = tracker
        self.data: DeviceData | None = None

    def run(self) -> Outcome:
        plan = self.plan
        # Data first: a missing dataset stops the suite before anything is written to MLflow.
        self.data = load_data(plan.suite.data.spec(), self.data_root, self.opts.device)
        self.tracker = self.tracker or Tracker()
        env = {**code_version(), **environment(str(self.opts.device))}
        parent = self.tracker.start_suite(plan.suite.name, str(plan.suite_path), {f"{TAG}{k}": v for k, v in env.items()},
                                          flatten("", plan.suite.model_dump(mode="json"), {}))
        outcome = Outcome(parent)
        self.env = env
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            jobs_bar = progress.add_task("jobs", total=len(plan.jobs))
            epoch_bar = progress.add_task("", total=1, visible=False)
            try:
                for job in plan.jobs:
                    self.run_job(job, parent, outcome, progress, epoch_bar)
                    progress.advance(jobs_bar)
            except BaseException:
                self.tracker.end(parent, "KILLED")
                raise
        self.tracker.end(parent, "FAILED" if outcome.failed else "FINISHED")
        return outcome

    def run_job(self, job: Job, parent: str, outcome: Outcome, progress: Progress, epoch_bar) -> None:
        if job.teacher and job.teacher in outcome.failed:
            outcome.failed[job.key] = f"its teacher failed: {outcome.failed[job.teacher]}"
            run_id = self.tracker.start_job(parent, job.title, job_tags(self.plan, job), self.job_params(job))
            self.tracker.end(run_id, "FAILED", outcome.failed[job.key])
            return
        if job.role == "teacher" and self.store.has(job.key):
            self.log_reused(job, parent)
            outcome.finished.append(job.key)
            self.console.print(f"[dim]reused[/] {job.title}: test acc {self.store.meta(job.key)['metrics']['test_acc']:.2f}%")
            return
        run_id = self.tracker.start_job(parent, job.title, job_tags(self.plan, job), self.job_params(job))
        progress.update(epoch_bar, description=f"  {job.title}", total=max(job.train.epochs, 1), completed=0,
                        visible=True)
        start = time.perf_counter()
        try:
            result = self.train(job, run_id, progress, epoch_bar)
        except Diverged as exc:
            outcome.failed[job.key] = f"diverged: {exc}"
            self.tracker.end(run_id, "FAILED", outcome.failed[job.key])
            self.console.print(f"[red]diverged[/] {job.title}: {exc}")
            return
        except KeyboardInterrupt:
            self.tracker.end(run_id, "KILLED", "interrupted")
            raise
        except KdbenchError as exc:
            outcome.failed[job.key] = str(exc)
            self.tracker.end(run_id, "FAILED", str(exc))
            self.console.print(f"[red]failed[/] {job.title}: {exc}")
            return
        except Exception as exc:  # a bug: record it, keep its traceback, go on with the other jobs
            outcome.failed[job.key] = f"{type(exc).__name__}: {exc}"
            self.tracker.end(run_id, "FAILED", traceback.format_exc())
            self.console.print(f"[red]failed[/] {job.title}:\n{traceback.format_exc()}")
            return
        wall = time.perf_counter() - start
        final = {"wall_time": wall, **{k: float(v) for k, v in asdict(result.passes).items()}}
        self.tracker.log_metrics(run_id, final, step=job.train.epochs)
        self.tracker.end(run_id, "FINISHED")
        outcome.finished.append(job.key)
        progress.update(epoch_bar, visible=False)
        self.console.print(f"done {job.title}: test acc {result.metrics['test_acc']:.2f}% ({wall:.1f} s)")

    def job_params(self, job: Job) -> dict[str, str]:
        params = flatten("", {k: v for k, v in job.config.items() if k != "method_params"}, {})
        params.update({f"method.{k}": str(v) for k, v in job.config.get("method_params", {}).items()})
        params.update({"role": job.role, "method_label": job.method.label, "job_key": job.key, **self.env})
        if job.teacher:
            params["teacher_model"] = job.teacher_model
            params["teacher_test_acc"] = f"{self.store.meta(job.teacher)['metrics']['test_acc']:.4f}"
        return params

    def log_reused(self, job: Job, parent: str) -> None:
        """A teacher from the store still gets its child run, so every suite run reports its teachers."""
        meta = self.store.meta(job.key)
        run_id = self.tracker.start_job(parent, job.title, {**job_tags(self.plan, job), f"{TAG}reused": "true"},
                                        self.job_params(job))
        for epoch, metrics in enumerate(meta["history"], start=1):
            self.tracker.log_metrics(run_id, metrics, step=epoch)
        self.tracker.end(run_id, "FINISHED")

    def train(self, job: Job, run_id: str, progress: Progress, epoch_bar):
        data = self.data
        model = build_model(job, data, self.opts)
        teacher = None
        if job.teacher:
            teacher_job = self.plan.job(job.teacher)
            teacher = create_model(teacher_job.model, data.info.num_classes, data.info.input_shape[0],
                                   **teacher_job.config["model_kwargs"])
            teacher.load_state_dict(self.store.load_final(job.teacher))
            teacher = teacher.to(self.opts.device)
            if self.opts.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)
        method_cls = get_method(job.method.method)
        method = method_cls(job.config["method_params"], model, teacher, data.info.input_shape).to(self.opts.device)
        route: dict[int, tuple[str, str]] = {}

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            progress.update(epoch_bar, completed=epoch)

        def on_route(epoch: int, state: dict[str, torch.Tensor]) -> None:
            route[epoch] = self.store.save_route(job.key, epoch, state)

        keep_route = None
        if job.role == "teacher":
            keep_route = lambda e: e % job.route_every == 0 or e == job.train.epochs  # noqa: E731
        cache = None
        if teacher is not None and self.use_teacher_cache and method_cls.teacher_logits_only:
            cache = self.shared_teacher_outputs(job, teacher)
        result = fit(model, method, teacher, data, job.train, job.augment, job.seed, self.opts,
                     eval_batch_size=self.plan.suite.eval_batch_size, on_epoch=on_epoch, keep_route=keep_route,
                     on_route=on_route, teacher_cache=cache)
        if job.role == "teacher":
            self.store.save_final(job.key, model.state_dict(), {"config": job.config, "metrics": result.metrics,
                                                                "history": result.history}, route)
        return result

    def shared_teacher_outputs(self, job: Job, teacher: torch.nn.Module) -> TeacherCache:
        """The teacher-output cache for this job's teacher, data and augmentation (kept while jobs share it)."""
        key = f"{job.teacher}/{job.config['data']}/{job.augment.model_dump()}"
        if self.teacher_cache is None or self.teacher_cache[0] != key:
            self.teacher_cache = None  # free the previous teacher's outputs first
            cache = TeacherCache(teacher, self.data.train, self.data.info, job.augment.crop_padding, job.augment.flip,
                                 self.opts)
            self.teacher_cache = (key, cache)
        return self.teacher_cache[1]
