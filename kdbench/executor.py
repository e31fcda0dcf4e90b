"""The in-process executor: runs a plan's jobs in dependency order, one after another.

It wires the pieces together and nothing else: data from kdbench.data, models from the zoo, the
method from the registry, training from the engine, results to MLflow (tracking) and the model
store. It knows no loss and no optimiser.

Running the same plan again continues its parent run: finished jobs are skipped, unfinished ones
resume from their last checkpoint in the same MLflow run. A file lock per job lets several
processes work on one suite without training a job twice.
"""

from __future__ import annotations

import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdbench import KdbenchError
from kdbench.data import DeviceData, load_data
from kdbench.engine import Diverged, EngineOptions, Interrupted, fit
from kdbench.method import TeacherRoute
from kdbench.plan import STORED_ROLES, Job, Plan
from kdbench.registry import get_method
from kdbench.seeding import stream_seed
from kdbench.store import CorruptFile, ModelStore, load_checkpoint, save_checkpoint
from kdbench.teacher_cache import TeacherCache
from kdbench.tracking import TAG, Tracker, code_version, environment, flatten
from kdbench.zoo import create_model

DIVERGED = "diverged: "  # prefix of the failure reason of a diverged job: deterministic, so never retried


@dataclass
class Outcome:
    parent_run: str
    finished: list[str] = field(default_factory=list)  # job keys
    failed: dict[str, str] = field(default_factory=dict)  # job key -> reason
    skipped: int = 0  # jobs already finished by an earlier or concurrent run


def build_model(job: Job, data: DeviceData, opts: EngineOptions) -> torch.nn.Module:
    torch.manual_seed(stream_seed(job.seed, "init"))  # the initialisation stream of this job's seed
    kwargs = dict(job.config["model_kwargs"])
    if job.source == "pretrained":
        kwargs["pretrained"] = True
    model = create_model(job.model, data.info.num_classes, data.info.input_shape[0], **kwargs)
    if job.source == "checkpoint":
        model.load_state_dict(torch.load(job.checkpoint, map_location="cpu", weights_only=True))
    return to_device(model, opts)


def to_device(model: torch.nn.Module, opts: EngineOptions) -> torch.nn.Module:
    model = model.to(opts.device)
    return model.to(memory_format=torch.channels_last) if opts.channels_last else model


def job_tags(plan: Plan, job: Job) -> dict[str, str]:
    method = get_method(job.method.method)
    tags = {f"{TAG}suite": plan.suite.name, f"{TAG}role": job.role, f"{TAG}student": job.model,
            f"{TAG}teacher": job.teacher_model or "", f"{TAG}method": job.method.label,
            f"{TAG}method_name": job.method.method, f"{TAG}seed": str(job.seed), f"{TAG}job": job.key,
            f"{TAG}pair": job.pair or ""}
    if job.role in ("teacher", "reference"):
        tags[f"{TAG}teacher"] = job.model
        tags[f"{TAG}student"] = ""
    if job.assistants:
        tags[f"{TAG}assistant"] = " > ".join(job.assistants)
    if method.protocol_note:
        tags[f"{TAG}protocol"] = method.protocol_note
    return tags


class StopRequest:
    """Ctrl-C or SIGTERM asks the current job to stop at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self, console: Console):
        self.requested = False
        self.console = console

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
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


class Executor:
    def __init__(self, plan: Plan, data_root: Path | None, device: str = "auto", tracker: Tracker | None = None,
                 store: ModelStore | None = None, console: Console | None = None, fresh: bool = False,
                 download: bool = False, teacher_cache: bool = False):
        self.plan = plan
        self.use_teacher_cache = teacher_cache or plan.suite.teacher_cache
        self.teacher_cache: tuple[str, TeacherCache] | None = None  # one at a time: jobs come grouped by pair
        self.data_root = data_root
        self.opts = EngineOptions.for_device(device)
        self.console = console or Console(stderr=True)
        self.store = store or ModelStore()
        self.tracker = tracker
        self.fresh = fresh
        self.download = download
        self.stop = StopRequest(self.console)
        self.data: DeviceData | None = None
        self.unresolved: dict[str, str] = {}  # student job key -> why its "auto" assistant could not be chosen

    # ------------------------------------------------------------------------------------------ the suite

    def run(self) -> Outcome:
        plan = self.plan
        # Data first: a missing dataset stops the suite before anything is written to MLflow.
        spec = plan.suite.data.spec()
        self.data = load_data(replace(spec, download=spec.download or self.download), self.data_root,
                              self.opts.device)
        self.tracker = self.tracker or Tracker()
        self.env = {**code_version(), **environment(str(self.opts.device))}
        parent = self.parent_run()
        outcome = Outcome(parent)
        with self.stop.installed(), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                             TimeElapsedColumn(), console=self.console) as progress:
            self.progress = progress
            jobs_bar = progress.add_task("jobs", total=len(plan.jobs))
            self.epoch_bar = progress.add_task("", total=1, visible=False)
            advance = lambda: progress.advance(jobs_bar)  # noqa: E731
            try:
                first_wave = [j for j in plan.jobs if j.role in ("teacher", "reference")]
                self.run_all(first_wave, outcome, advance)
                if any(j.pending for j in self.plan.jobs):
                    # The accuracies that choose "auto" assistants exist now that the first wave is done.
                    self.plan, self.unresolved = self.plan.resolve_assistants(
                        lambda key: self.stored_accuracy(key, "val_acc"))  # chosen on validation, never on test
                    progress.update(jobs_bar, total=len(self.plan.jobs))
                self.run_all([j for j in self.plan.jobs if j not in first_wave], outcome, advance)
            except (Interrupted, KeyboardInterrupt):
                self.tracker.end(parent, "KILLED")
                raise
        self.tracker.end(parent, "FAILED" if outcome.failed else "FINISHED")
        return outcome

    def parent_run(self) -> str:
        """Continue this plan's parent run if one exists (resume), else create it; one process at a time."""
        plan = self.plan
        with FileLock(str(self.store.lock_path(f"suite-{plan.plan_hash}"))):
            found = None if self.fresh else self.tracker.find_suite_run(plan.suite.name, plan.plan_hash)
            if found is not None:
                if found.info.status != "RUNNING":
                    self.tracker.reopen(found.info.run_id)
                self.console.print(f"continuing run {found.info.run_id} of {plan.suite.name} "
                                   f"(finished jobs are skipped; use --fresh to start over)")
                return found.info.run_id
            tags = {f"{TAG}{k}": v for k, v in self.env.items()}
            tags[f"{TAG}plan"] = plan.plan_hash
            return self.tracker.start_suite(plan.suite.name, str(plan.suite_path), tags,
                                            flatten("", plan.suite.model_dump(mode="json"), {}))

    def run_all(self, jobs: list[Job], outcome: Outcome, advance) -> None:
        while jobs:
            jobs = self.run_pending(jobs, outcome, advance)

    def stored_accuracy(self, key: str, metric: str = "test_acc") -> float | None:
        """A stored model's last-epoch `metric`: test_acc to report it, val_acc to choose by it (None: absent)."""
        return self.store.meta(key)["metrics"].get(metric) if self.store.has(key) else None

    def run_pending(self, pending: list[Job], outcome: Outcome, advance) -> list[Job]:
        """Run every job this process can claim; return those another process holds (after waiting for one)."""
        deferred: list[Job] = []
        for job in pending:
            if self.stop():
                raise Interrupted("stopped between jobs")
            if job.teacher and any(d.key == job.teacher for d in deferred):
                deferred.append(job)  # its teacher is being trained by another process
                continue
            lock = FileLock(str(self.store.lock_path(job.key)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                deferred.append(job)
                continue
            try:
                self.run_job(job, outcome)
            finally:
                lock.release()
            advance()
        if deferred:
            self.console.print(f"waiting for another kdbench process to finish {deferred[0].title}")
            with FileLock(str(self.store.lock_path(deferred[0].key))):
                pass
        return deferred

    # ------------------------------------------------------------------------------------------ one job

    def run_job(self, job: Job, outcome: Outcome) -> None:
        parent = outcome.parent_run
        existing = self.tracker.job_run(parent, job.key)
        if existing is not None and existing.info.status == "FINISHED":
            outcome.finished.append(job.key)
            outcome.skipped += 1
            return
        reason = existing.data.tags.get(f"{TAG}failure", "") if existing is not None else ""
        if existing is not None and existing.info.status == "FAILED" and reason.startswith(DIVERGED):
            outcome.failed[job.key] = reason
            return
        run_id = existing.info.run_id if existing is not None else None
        blocked = None
        if job.pending:
            blocked = self.unresolved.get(job.key, "assistant not chosen")
        elif job.teacher and job.teacher in outcome.failed:
            blocked = f"its teacher failed: {outcome.failed[job.teacher]}"
        if blocked:
            run_id = run_id or self.tracker.start_job(parent, job.title, job_tags(self.plan, job), self.job_params(job))
            outcome.failed[job.key] = blocked
            self.tracker.end(run_id, "FAILED", blocked)
            return
        if job.role in STORED_ROLES and self.store.has(job.key) and self.usable(job):
            self.log_stored(job, parent, run_id)
            outcome.finished.append(job.key)
            return
        if run_id is not None:
            self.tracker.reopen(run_id)
        else:
            run_id = self.tracker.start_job(parent, job.title, job_tags(self.plan, job), self.job_params(job))
        self.progress.update(self.epoch_bar, description=f"  {job.title}", total=max(job.train.epochs, 1),
                             completed=0, visible=True)
        start = time.perf_counter()
        try:
            run_id, result = self.train(job, run_id)
        except Diverged as exc:
            outcome.failed[job.key] = f"{DIVERGED}{exc}"
            self.tracker.end(run_id, "FAILED", outcome.failed[job.key])
            self.store.checkpoint_path(job.key).unlink(missing_ok=True)
            self.console.print(f"[red]diverged[/] {job.title}: {exc}")
            return
        except (Interrupted, KeyboardInterrupt):
            self.tracker.end(run_id, "KILLED", "interrupted: run the same command again to resume")
            raise
        except KdbenchError as exc:
            outcome.failed[job.key] = str(exc)
            self.tracker.end(run_id, "FAILED", str(exc))
            self.console.print(f"[red]failed[/] {job.title}: {exc}")
            return
        except Exception as exc:  # a bug: record it with its traceback, go on with the other jobs
            outcome.failed[job.key] = f"{type(exc).__name__}: {exc}"
            self.tracker.end(run_id, "FAILED", traceback.format_exc())
            self.console.print(f"[red]failed[/] {job.title}:\n{traceback.format_exc()}")
            return
        finally:
            self.progress.update(self.epoch_bar, visible=False)
        wall = time.perf_counter() - start
        final = {"wall_time": wall, **{k: float(v) for k, v in asdict(result.passes).items()}}
        self.tracker.log_metrics(run_id, final, step=job.train.epochs)
        self.tracker.end(run_id, "FINISHED")
        self.store.checkpoint_path(job.key).unlink(missing_ok=True)
        outcome.finished.append(job.key)
        self.console.print(f"done {job.title}: test acc {result.metrics['test_acc']:.2f}% ({wall:.1f} s)")

    def usable(self, job: Job) -> bool:
        """A stored teacher whose files fail their hash check is moved aside and trained again, never used."""
        try:
            self.store.verify(job.key)
            return True
        except CorruptFile as exc:
            where = self.store.quarantine(job.key)
            self.console.print(f"[red]corrupted[/] {exc}; moved to {where}, retraining it")
            return False

    def job_params(self, job: Job) -> dict[str, str]:
        params = flatten("", {k: v for k, v in job.config.items() if k != "method_params"}, {})
        params.update({f"method.{k}": str(v) for k, v in job.config.get("method_params", {}).items()})
        params.update({"role": job.role, "method_label": job.method.label, "config_hash": job.key, **self.env})
        if job.teacher_model:
            params["teacher_model"] = job.teacher_model
        root = self.plan.root_teacher(job)
        if root is not None and self.store.has(root.key):
            params["teacher_test_acc"] = f"{self.stored_accuracy(root.key):.4f}"
        if job.teacher_init in ("random", "checkpoint"):
            params["teacher_init"] = job.teacher_init
        if job.assistants and not job.pending:
            params["assistant_models"] = " > ".join(job.assistants)
            params["assistant_job"] = job.teacher
            if self.store.has(job.teacher):
                params["assistant_test_acc"] = f"{self.stored_accuracy(job.teacher):.4f}"
        if job.assistant_choice:
            params["assistant_choice"] = job.assistant_choice
        method = get_method(job.method.method)
        if job.teacher and method.needs({**method.defaults, **job.config.get("method_params", {})}).dense:
            params["guide_models"] = " > ".join(self.plan.job(k).model for k in self.plan.guide_keys(job))
        return params

    def log_history(self, run_id: str, history: list[dict[str, float]]) -> None:
        """Log the epochs this run does not have yet: after a resume, each epoch is logged exactly once."""
        done = self.tracker.last_step(run_id)
        for epoch, metrics in enumerate(history, start=1):
            if epoch > done:
                self.tracker.log_metrics(run_id, metrics, step=epoch)

    def log_stored(self, job: Job, parent: str, run_id: str | None) -> None:
        """A teacher from the store still gets its child run, so every suite run reports its teachers."""
        meta = self.store.meta(job.key)
        if run_id is None:
            run_id = self.tracker.start_job(parent, job.title, {**job_tags(self.plan, job), f"{TAG}reused": "true"},
                                            self.job_params(job))
        self.log_history(run_id, meta["history"])
        self.tracker.end(run_id, "FINISHED")
        self.console.print(f"[dim]reused[/] {job.title}: test acc {meta['metrics']['test_acc']:.2f}%")

    def build_teacher(self, job: Job) -> torch.nn.Module | None:
        """The model that teaches `job`, as the method's needs say: stored (final or a route epoch) or fresh."""
        data = self.data
        if job.teacher_init == "random":  # trained here, with the student (ProKT): its own init stream
            torch.manual_seed(stream_seed(job.seed, "teacher_init"))
            teacher = create_model(job.teacher_model, data.info.num_classes, data.info.input_shape[0],
                                   **job.config["teacher_model_kwargs"])
        elif job.teacher:
            teacher_job = self.plan.job(job.teacher)
            teacher = create_model(teacher_job.model, data.info.num_classes, data.info.input_shape[0],
                                   **teacher_job.config["model_kwargs"])
            if job.teacher_init == "checkpoint" and job.teacher_epoch:
                route = self.store.route(job.teacher)
                if job.teacher_epoch not in route:
                    raise KdbenchError(f"teacher_epoch {job.teacher_epoch}: the stored teacher {teacher_job.model} "
                                       f"has route checkpoints at epochs {sorted(route)}")
                teacher.load_state_dict(self.store.load_route(job.teacher, job.teacher_epoch))
            else:
                teacher.load_state_dict(self.store.load_final(job.teacher))
        else:
            return None
        return to_device(teacher, self.opts)

    def build_guides(self, job: Job, teacher: torch.nn.Module) -> list[torch.nn.Module]:
        """`Needs.dense`: the stored models above `job` in its chain (teacher first), then `teacher`, its own."""
        guides = []
        for key in self.plan.guide_keys(job)[:-1]:
            above = self.plan.job(key)
            model = create_model(above.model, self.data.info.num_classes, self.data.info.input_shape[0],
                                 **above.config["model_kwargs"])
            model.load_state_dict(self.store.load_final(key))
            guides.append(to_device(model, self.opts))
        return guides + [teacher]

    def teacher_route(self, job: Job) -> TeacherRoute:
        key = self.plan.root_teacher(job).key
        return TeacherRoute(sorted(self.store.route(key)), lambda epoch: self.store.load_route(key, epoch))

    def train(self, job: Job, run_id: str):
        data = self.data
        model = build_model(job, data, self.opts)
        teacher = self.build_teacher(job)
        method_cls = get_method(job.method.method)
        method = method_cls(job.config["method_params"], model, teacher, data.info.input_shape).to(self.opts.device)
        needs = method_cls.needs(method.params)

        checkpoint_path = self.store.checkpoint_path(job.key)
        resume, route = self.resume_state(job, checkpoint_path)
        if resume is None and self.tracker.last_step(run_id) > 0:
            # Epochs were logged but no usable checkpoint is left: start over in a new run, keep the old one failed.
            parent = self.tracker.client.get_run(run_id).data.tags["mlflow.parentRunId"]
            self.tracker.end(run_id, "FAILED", "no usable checkpoint to resume from; restarted in a new run")
            run_id = self.tracker.start_job(parent, job.title, job_tags(self.plan, job), self.job_params(job))
        if resume is not None:
            self.log_history(run_id, resume["history"])
            self.progress.update(self.epoch_bar, completed=len(resume["history"]))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            self.progress.update(self.epoch_bar, completed=epoch)

        def on_route(epoch: int, state: dict[str, torch.Tensor]) -> None:
            route[epoch] = self.store.save_route(job.key, epoch, state)

        def checkpoint(state: dict) -> None:
            save_checkpoint({**state, "route": route}, checkpoint_path)

        keep_route = None
        if job.role in ("teacher", "reference"):
            keep_route = lambda e: e % job.route_every == 0 or e == job.train.epochs  # noqa: E731
        cache = None
        if teacher is not None and self.use_teacher_cache and method_cls.teacher_logits_only:
            cache = self.shared_teacher_outputs(job, teacher)
        result = fit(model, method, teacher, data, job.train, job.augment, job.seed, self.opts,
                     eval_batch_size=self.plan.suite.eval_batch_size, on_epoch=on_epoch, keep_route=keep_route,
                     on_route=on_route, route=self.teacher_route(job) if needs.route and job.teacher else None,
                     teacher_cache=cache,
                     guides=self.build_guides(job, teacher) if needs.dense and teacher is not None else None,
                     checkpoint=checkpoint, resume=resume, should_stop=self.stop)
        if method.record:  # procedure details the method chose while training (RCO's anchors, FitNets' layers)
            self.tracker.log_params(run_id, {f"procedure.{k}": v for k, v in method.record.items()})
        if job.role in STORED_ROLES:
            self.store.save_final(job.key, model.state_dict(), {"config": job.config, "metrics": result.metrics,
                                                                "history": result.history}, route)
        return run_id, result

    def resume_state(self, job: Job, path: Path):
        """The job's last checkpoint, if there is a sound one; a corrupted one is reported and discarded."""
        if not path.is_file():
            return None, {}
        try:
            state = load_checkpoint(path)
        except CorruptFile as exc:
            self.console.print(f"[red]corrupted[/] {exc}; restarting {job.title} from scratch")
            path.unlink()
            return None, {}
        if "method_extra" not in state:  # written before methods' own state was saved: resuming could be wrong
            self.console.print(f"{path}: checkpoint of an older kdbench lacks the method's state; restarting "
                               f"{job.title} from scratch")
            path.unlink()
            return None, {}
        self.console.print(f"resuming {job.title} from epoch {state['epoch'] + 1}, step {state['batch']}")
        return state, dict(state["route"])

    def shared_teacher_outputs(self, job: Job, teacher: torch.nn.Module) -> TeacherCache:
        """The teacher-output cache for this job's teacher, data and augmentation (kept while jobs share it)."""
        key = f"{job.teacher}/{job.config['data']}/{job.augment.model_dump()}"
        if self.teacher_cache is None or self.teacher_cache[0] != key:
            self.teacher_cache = None  # free the previous teacher's outputs first
            cache = TeacherCache(teacher, self.data.train, self.data.info, job.augment.crop_padding, job.augment.flip,
                                 self.opts)
            self.teacher_cache = (key, cache)
        return self.teacher_cache[1]
