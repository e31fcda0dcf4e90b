"""One job's life, wherever it runs: claim, skip or block, resume, train, track in MLflow, save to the store.

`run_job(plan, job, ctx)` is all a worker needs. The driver creates the MLflow parent run and the store
before any worker starts and hands each worker the plan, the job and a `JobContext`: plain, picklable
settings (tracking URI, parent run, store and data roots, device). Whatever a process builds from them
(the data on its device, the MLflow client, the teacher-output cache) lives in `ctx.local`, made on first
use in that process and never pickled, so the same context travels to a SLURM job or a Ray task as is.

A lease per job (kdbench.claims, in the store) is the claim: a job held by another live worker is not run
but reported as HELD, and the caller tries it again later; a dead worker's claim expires. Finished jobs
are skipped, a diverged one is not retried, an unfinished one resumes from its last checkpoint in the same MLflow run.
"""

from __future__ import annotations
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
import torch
from kdbench import KdbenchError
from kdbench.run.build import build_guides, build_model, build_teacher, teacher_route
from kdbench.storage.claims import Claim
from kdbench.data.batches import DeviceData
from kdbench import Interrupted
from kdbench.train.engine import Diverged, Hooks, Provided, collapse_reason, fit
from kdbench.plan import STORED_ROLES, Job, Plan
from kdbench.method import Method
from kdbench.modifier import modify
from kdbench.registry import get_method, get_modifier
from kdbench.storage.files import CorruptFile, content_hash, load_checkpoint, save_checkpoint
from kdbench.storage.store import ModelStore
from kdbench.train.stacked import StackedMethod, StackedStudent
from kdbench.train.teacher_cache import TeacherCache
from kdbench.tracking import DIVERGED, JobTags, RunEnd, RunStatus, Tracker, flatten
from kdbench.run.context import JobContext, job_runtime
from kdbench.run.devices import lead
from kdbench.train import parallel


# JobResult.status
FINISHED = "finished"  # trained now, or taken from the store
SKIPPED = "skipped"  # finished by an earlier or concurrent run
FAILED = "failed"
HELD = "held"  # another process holds the job's claim: try again later
COLLAPSED = "collapsed"  # finished (now or before), but at chance or never learned: no number (see collapse_reason)


@dataclass
class JobResult:
    key: str
    status: str
    reason: str = ""  # why it failed or collapsed
    test_acc: float | None = None


def run_task(plan: Plan, jobs: list[Job], ctx: JobContext, blocked: list[str | None]) -> list[JobResult]:
    """What an executor sends to one worker (`kdbench.run.executors.base.tasks_of`): one job, or the seeds of one
    stack, which train as one model: the first trains them all, the others take its results (ctx.local)."""
    return [run_job(plan, job, ctx, why) for job, why in zip(jobs, blocked)]


def run_job(plan: Plan, job: Job, ctx: JobContext, blocked: str | None = None) -> JobResult:
    """Claim `job` and live its life; HELD if another process has it. `blocked`: why it cannot run (the driver
    knows: its teacher failed, its assistant could not be chosen); it is then recorded as failed."""
    if job.stack and not blocked:  # its cell's seeds train together, once (the others' results wait in ctx.local)
        return ctx.local.stacked.pop(job.key, None) or _run_stack(plan, job, ctx)
    claim = Claim(ctx.store.claim_path(job.key))
    if not claim.acquire():
        return JobResult(job.key, HELD)
    outer = ctx.local.should_stop or _never
    ctx.local.claim = claim
    ctx.local.should_stop = lambda: outer() or claim.lost  # taken over (we stalled past the lease): stop, unfinished
    try:
        with job_runtime(job.config["runtime"], ctx.opts.device):
            return _run_claimed(plan, job, ctx, blocked)
    except Interrupted:
        if claim.lost:
            ctx.reporter.print(f"[yellow]lost the claim[/] on {job.title} to another worker; leaving it to them")
            return JobResult(job.key, HELD)
        raise
    finally:
        ctx.local.should_stop = None if outer is _never else outer
        ctx.local.claim = None
        claim.release()


def _ended(ctx: JobContext, job: Job) -> tuple[JobResult | None, str | None]:
    """(its result, None) for a job whose run has finished or diverged; else (None, its run to go on in or None)."""
    existing = ctx.tracker.job_run(ctx.parent_run, job.key)
    ended = RunEnd.of(existing) if existing is not None else None
    if ended is not None and ended.status == RunStatus.FINISHED:
        return (JobResult(job.key, COLLAPSED, ended.collapsed) if ended.collapsed
                else JobResult(job.key, SKIPPED)), None
    if ended is not None and ended.diverged:  # deterministic: never retried
        return JobResult(job.key, FAILED, ended.failure), None
    return None, existing.info.run_id if existing is not None else None


def _run_claimed(plan: Plan, job: Job, ctx: JobContext, blocked: str | None) -> JobResult:
    tracker, store, say = ctx.tracker, ctx.store, ctx.reporter.print
    parent = ctx.parent_run
    done, run_id = _ended(ctx, job)
    if done is not None:
        return done
    if blocked:
        run_id = run_id or tracker.start_job(parent, job.title, job_tags(plan, job), job_params(plan, job, ctx))
        tracker.end(run_id, RunStatus.FAILED, blocked)
        return JobResult(job.key, FAILED, blocked)
    if job.role in STORED_ROLES and store.has(job.key) and _usable(job, ctx):
        return _log_stored(plan, job, ctx, run_id)
    if run_id is not None:
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_job(parent, job.title, job_tags(plan, job), job_params(plan, job, ctx))
    ctx.reporter.job_started(job)
    start = time.perf_counter()
    try:
        run_id, result = _train(plan, job, ctx, run_id)
    except Diverged as exc:
        why = f"{DIVERGED}{exc}"
        tracker.end(run_id, RunStatus.FAILED, why)
        store.drop_checkpoint(job.key)
        say(f"[red]diverged[/] {job.title}: {exc}")
        return JobResult(job.key, FAILED, why)
    except (Interrupted, KeyboardInterrupt):
        if ctx.local.claim is None or not ctx.local.claim.lost:  # a lost claim's run is its new owner's now
            tracker.end(run_id, RunStatus.KILLED, "interrupted: run the same command again to resume")
        raise
    except KdbenchError as exc:
        tracker.end(run_id, RunStatus.FAILED, str(exc))
        say(f"[red]failed[/] {job.title}: {exc}")
        return JobResult(job.key, FAILED, str(exc))
    except Exception as exc:  # a bug: record it with its traceback, go on with the other jobs
        tracker.end(run_id, RunStatus.FAILED, traceback.format_exc())
        say(f"[red]failed[/] {job.title}:\n{traceback.format_exc()}")
        return JobResult(job.key, FAILED, f"{type(exc).__name__}: {exc}")
    finally:
        ctx.reporter.job_ended()
    wall = time.perf_counter() - start
    final = {"wall_time": wall, **{k: float(v) for k, v in asdict(result.passes).items()}}
    tracker.log_metrics(run_id, final, step=job.train.epochs)
    status, why = _finish(plan, job, ctx, run_id, result.history)
    store.drop_checkpoint(job.key)
    shown = "val" if job.trial else "test"  # a tuning trial never evaluates on the test split
    say(f"done {job.title}: {shown} acc {result.metrics[f'{shown}_acc']:.2f}% ({wall:.1f} s)")
    return JobResult(job.key, status, why, test_acc=result.metrics.get("test_acc"))


def _finish(plan: Plan, job: Job, ctx: JobContext, run_id: str, history: list[dict[str, float]]) -> tuple[str, str]:
    """End a trained (or stored) job's run FINISHED; one that collapsed is tagged so, with why: (status, reason)."""
    data = job_data(plan, job, ctx)
    why = collapse_reason(history, data.info.num_classes, len(data.test)) if data.test is not None else None
    if why:
        ctx.tracker.collapsed(run_id, why)
        ctx.reporter.print(f"[yellow]collapsed[/] {job.title}: {why}")
    ctx.tracker.end(run_id, RunStatus.FINISHED)
    return (COLLAPSED, why) if why else (FINISHED, "")


# ---------------------------------------------------------------------------------------------- tracking

def job_tags(plan: Plan, job: Job, reused: bool = False) -> JobTags:
    """What the job's run is tagged with; `reused`: a stored model, reported without training it again."""
    alone = job.role in ("teacher", "reference")  # its model is the teacher of others: tagged as the teacher
    return JobTags(suite=plan.suite.name, role=job.role, student="" if alone else job.model,
                   teacher=job.model if alone else job.teacher_model or "", method=job.method.label,
                   method_name=job.method.method, seed=job.seed, job=job.key, pair=job.pair or "",
                   identity=plan.identities()[job.key], assistant=" > ".join(job.assistants),
                   protocol=get_method(job.method.method).protocol_note or "", reused=reused, trial=job.trial)


def stored_accuracy(store: ModelStore, key: str, metric: str = "test_acc") -> float | None:
    """A stored model's last-epoch `metric`: test_acc to report it, val_acc to choose by it (None: absent)."""
    return store.meta(key)["metrics"].get(metric) if store.has(key) else None


def job_params(plan: Plan, job: Job, ctx: JobContext) -> dict[str, str]:
    store = ctx.store
    params = flatten("", {k: v for k, v in job.config.items() if k != "method_params"}, {})
    params.update({f"method.{k}": str(v) for k, v in job.config.get("method_params", {}).items()})
    params.update({"role": job.role, "method_label": job.method.label, "config_hash": job.key,
                   "combine": job.method.combine, **ctx.env})
    if job.teacher_model:
        params["teacher_model"] = job.teacher_model
    root = plan.root_teacher(job)
    if root is not None and store.has(root.key):
        params["teacher_test_acc"] = f"{stored_accuracy(store, root.key):.4f}"
    if job.teacher_init in ("random", "checkpoint"):
        params["teacher_init"] = job.teacher_init
    if job.assistants and not job.pending:
        params["assistant_models"] = " > ".join(job.assistants)
        params["assistant_job"] = job.teacher
        if store.has(job.teacher):
            params["assistant_test_acc"] = f"{stored_accuracy(store, job.teacher):.4f}"
    if job.assistant_choice:
        params["assistant_choice"] = job.assistant_choice
    method = get_method(job.method.method)
    if job.teacher and method.needs({**method.defaults, **job.config.get("method_params", {})}).dense:
        params["guide_models"] = " > ".join(plan.job(k).model for k in plan.guide_keys(job))
    return params


def _log_history(tracker: Tracker, run_id: str, history: list[dict[str, float]], metric: str = "test_acc") -> None:
    """Log the epochs this run does not have yet: after a resume, each epoch is logged exactly once."""
    done = tracker.last_step(run_id, metric)
    for epoch, metrics in enumerate(history, start=1):
        if epoch > done:
            tracker.log_metrics(run_id, metrics, step=epoch)


def _log_stored(plan: Plan, job: Job, ctx: JobContext, run_id: str | None) -> JobResult:
    """A teacher from the store still gets its child run, so every suite run reports its teachers."""
    meta = ctx.store.meta(job.key)
    if run_id is None:
        run_id = ctx.tracker.start_job(ctx.parent_run, job.title, job_tags(plan, job, reused=True),
                                       job_params(plan, job, ctx))
    _log_history(ctx.tracker, run_id, meta["history"])
    status, why = _finish(plan, job, ctx, run_id, meta["history"])
    ctx.reporter.print(f"[dim]reused[/] {job.title}: test acc {meta['metrics']['test_acc']:.2f}%")
    return JobResult(job.key, status, why, test_acc=meta["metrics"]["test_acc"])


# ---------------------------------------------------------------------------------------------- the store

def _usable(job: Job, ctx: JobContext) -> bool:
    """A stored teacher whose files fail their hash check is moved aside and trained again, never used."""
    try:
        ctx.store.verify(job.key)
        return True
    except CorruptFile as exc:
        where = ctx.store.quarantine(job.key)
        ctx.reporter.print(f"[red]corrupted[/] {exc}; moved to {where}, retraining it")
        return False


def _resume_state(job: Job, path: Path, ctx: JobContext):
    """The job's last checkpoint, if there is a sound one; a corrupted one is reported and discarded."""
    if not path.is_file():
        return None, {}
    try:
        state = load_checkpoint(path)
    except CorruptFile as exc:
        ctx.reporter.print(f"[red]corrupted[/] {exc}; restarting {job.title} from scratch")
        path.unlink()
        return None, {}
    if "method_extra" not in state:  # written before methods' own state was saved: resuming could be wrong
        ctx.reporter.print(f"{path}: checkpoint of an older kdbench lacks the method's state; restarting "
                           f"{job.title} from scratch")
        path.unlink()
        return None, {}
    ctx.reporter.print(f"resuming {job.title} from epoch {state['epoch'] + 1}, step {state['batch']}")
    return state, dict(state["route"])


# ---------------------------------------------------------------------------------------------- training

def job_data(plan: Plan, job: Job, ctx: JobContext) -> DeviceData:
    """The data a job sees: a tuning trial's has no test split, so nothing it does can read it."""
    data = ctx.data(plan)
    return replace(data, test=None) if job.trial else data


def logged_metric(job: Job) -> str:
    """A metric every trained epoch logs: how far a run got (a trial has no test accuracy)."""
    return "val_acc" if job.trial else "test_acc"


def _never() -> bool:
    return False


def job_models(plan: Plan, job: Job, ctx: JobContext):
    """(data, student, teacher, method) as the job trains them; in this order, so every process draws alike."""
    data, opts, store = job_data(plan, job, ctx), ctx.opts, ctx.store
    model = build_model(job, data, opts)
    teacher = build_teacher(plan, job, data, store, opts)
    method_cls = get_method(job.method.method)
    method = method_cls(job.config["method_params"], model, teacher, data.info.input_shape).to(opts.device)
    if "modify" in job.config:  # a modifier of the method's logit losses (kdbench.modifier), with its own params
        spec = job.config["modify"]
        method = modify(method, get_modifier(spec["name"])(spec["params"]).to(opts.device))
    return data, model, teacher, method


def _train(plan: Plan, job: Job, ctx: JobContext, run_id: str):
    opts, store, tracker = ctx.opts, ctx.store, ctx.tracker
    data, model, teacher, method = job_models(plan, job, ctx)

    checkpoint_path = store.checkpoint_path(job.key)
    resume, route = _resume_state(job, checkpoint_path, ctx)
    if resume is None and tracker.last_step(run_id, logged_metric(job)) > 0:
        # Epochs were logged but no usable checkpoint is left: start over in a new run, keep the old one failed.
        tracker.end(run_id, RunStatus.FAILED, "no usable checkpoint to resume from; restarted in a new run")
        run_id = tracker.start_job(ctx.parent_run, job.title, job_tags(plan, job), job_params(plan, job, ctx))
    if resume is not None:
        _log_history(tracker, run_id, resume["history"], logged_metric(job))
        ctx.reporter.epoch(len(resume["history"]))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        ctx.reporter.epoch(epoch)

    def on_route(epoch: int, state: dict[str, torch.Tensor]) -> None:
        route[epoch] = store.save_route(job.key, epoch, state)

    def checkpoint(state: dict) -> None:
        save_checkpoint({**state, "route": route}, checkpoint_path)

    hooks = Hooks(on_epoch=on_epoch, keep_route=job.keeps_route, on_route=on_route, checkpoint=checkpoint,
                  should_stop=ctx.local.should_stop or _never)
    provided = job_provided(plan, job, ctx, teacher, method)
    if parallel.current() is not None:  # one job on several devices: the other processes train it with this one
        hooks = replace(hooks, should_stop=lead(plan, job, ctx, run_id, checkpoint_path if resume is not None
                                                else None, model, teacher, method, hooks.should_stop))
    result = fit(model, method, teacher, data, job.train, job.augment, job.seed, opts,
                 eval_batch_size=plan.suite.eval_batch_size, hooks=hooks, provided=provided, resume=resume)
    if method.record:  # procedure details the method chose while training (RCO's anchors, FitNets' layers)
        tracker.log_params(run_id, {f"procedure.{k}": v for k, v in method.record.items()})
    if job.role in STORED_ROLES:
        store.save_final(job.key, model.state_dict(), {"config": job.config, "metrics": result.metrics,
                                                       "history": result.history}, route)
    return run_id, result


def job_provided(plan: Plan, job: Job, ctx: JobContext, teacher: torch.nn.Module | None, method: Method) -> Provided:
    """What the job's method needs besides its models (a route, guides), shared teacher outputs, the update rule."""
    data, store, needs = job_data(plan, job, ctx), ctx.store, method.needs(method.params)
    cache = None
    # (not on several devices: each holds only its part of the training batches)
    if teacher is not None and (ctx.teacher_cache or plan.suite.teacher_cache) and method.teacher_logits_only \
            and parallel.current() is None:
        cache = _shared_teacher_outputs(job, teacher, data, ctx)
    return Provided(route=teacher_route(plan, job, store) if needs.route and job.teacher else None,
                    guides=build_guides(plan, job, teacher, data, store, ctx.opts)
                    if needs.dense and teacher is not None else [],
                    teacher_cache=cache, combine=job.method.combine)


def _shared_teacher_outputs(job: Job, teacher: torch.nn.Module, data: DeviceData, ctx: JobContext) -> TeacherCache:
    """The teacher-output cache for this job's teacher, data and augmentation (kept while jobs share it)."""
    key = f"{job.teacher}/{job.config['data']}/{job.augment.model_dump()}"
    held = ctx.local.teacher_cache
    if held is None or held[0] != key:
        ctx.local.teacher_cache = None  # free the previous teacher's outputs first
        cache = TeacherCache(teacher, data.train, data.info, job.augment.crop_padding, job.augment.flip, ctx.opts)
        ctx.local.teacher_cache = (key, cache)
    return ctx.local.teacher_cache[1]


# ---------------------------------------------------------------------------------------------- stacked seeds

def _run_stack(plan: Plan, job: Job, ctx: JobContext) -> JobResult:
    """Claim every job stacked with `job` and train those not done yet together; HELD if another process has one."""
    members = plan.stacked_with(job)
    claims: list[Claim] = []
    for member in members:
        claims.append(Claim(ctx.store.claim_path(member.key)))
        if not claims[-1].acquire():
            for claim in claims[:-1]:
                claim.release()
            return JobResult(job.key, HELD)
    outer = ctx.local.should_stop or _never
    ctx.local.should_stop = lambda: outer() or any(c.lost for c in claims)  # taken over: stop, unfinished
    try:
        with job_runtime(job.config["runtime"], ctx.opts.device):
            results = _run_stack_claimed(plan, members, ctx)
    except Interrupted:
        if any(c.lost for c in claims):
            ctx.reporter.print(f"[yellow]lost the claim[/] on {job.title} to another worker; leaving it to them")
            return JobResult(job.key, HELD)
        raise
    finally:
        ctx.local.should_stop = None if outer is _never else outer
        for claim in claims:
            claim.release()
    ctx.local.stacked.update({k: r for k, r in results.items() if k != job.key})
    return results[job.key]


def _run_stack_claimed(plan: Plan, members: list[Job], ctx: JobContext) -> dict[str, JobResult]:
    tracker, say = ctx.tracker, ctx.reporter.print
    results, runs = {}, {}
    for member in members:
        done, run_id = _ended(ctx, member)
        if done is not None:
            results[member.key] = done
        else:
            runs[member.key] = run_id
    lanes = [m for m in members if m.key in runs]
    if not lanes:
        return results
    for m in lanes:
        if runs[m.key] is not None:
            tracker.reopen(runs[m.key])
        else:
            runs[m.key] = tracker.start_job(ctx.parent_run, m.title, job_tags(plan, m), job_params(plan, m, ctx))
    ctx.reporter.job_started(lanes[0])
    start = time.perf_counter()
    try:
        fitted = _train_stack(plan, lanes, ctx, runs)
    except (Interrupted, KeyboardInterrupt):
        for run_id in runs.values():
            tracker.end(run_id, RunStatus.KILLED, "interrupted: run the same command again to resume")
        raise
    except Exception as exc:  # a bug, or a KdbenchError: every seed of the stack failed with it
        why = str(exc) if isinstance(exc, KdbenchError) else traceback.format_exc()
        say(f"[red]failed[/] {len(lanes)} stacked seeds of {lanes[0].title}: {why}")
        for m in lanes:
            tracker.end(runs[m.key], RunStatus.FAILED, why)
            results[m.key] = JobResult(m.key, FAILED, why if isinstance(exc, KdbenchError) else
                                       f"{type(exc).__name__}: {exc}")
        return results
    finally:
        ctx.reporter.job_ended()
    wall = (time.perf_counter() - start) / len(lanes)  # each seed's share of the stack's time
    for m, result in zip(lanes, fitted.lanes):
        results[m.key] = _end_lane(plan, m, ctx, runs[m.key], result, wall)
    ctx.store.drop_checkpoint(_stack_key(lanes))
    return results


def _end_lane(plan: Plan, job: Job, ctx: JobContext, run_id: str, result, wall: float) -> JobResult:
    """One stacked seed's run ended as a lone job's would: diverged (failed), collapsed or finished."""
    if result.diverged:
        why = f"{DIVERGED}{result.diverged}"
        ctx.tracker.end(run_id, RunStatus.FAILED, why)
        ctx.reporter.print(f"[red]diverged[/] {job.title}: {result.diverged}")
        return JobResult(job.key, FAILED, why)
    final = {"wall_time": wall, **{k: float(v) for k, v in asdict(result.passes).items()}}
    ctx.tracker.log_metrics(run_id, final, step=job.train.epochs)
    status, why = _finish(plan, job, ctx, run_id, result.history)
    ctx.reporter.print(f"done {job.title} (stacked): test acc {result.metrics['test_acc']:.2f}% ({wall:.1f} s)")
    return JobResult(job.key, status, why, test_acc=result.metrics.get("test_acc"))


def _stack_key(lanes: list[Job]) -> str:
    """Where the stack's checkpoint lives: the same seeds still to train find it again."""
    return content_hash(sorted(m.key for m in lanes))


def _train_stack(plan: Plan, lanes: list[Job], ctx: JobContext, runs: dict[str, str]):
    """Build each seed's student, teacher and method as its own job would (the same draws), stack and train them."""
    data, opts, store, tracker = job_data(plan, lanes[0], ctx), ctx.opts, ctx.store, ctx.tracker
    students, methods, teachers = [], [], []
    for m in lanes:
        students.append(build_model(m, data, opts))
        teachers.append(build_teacher(plan, m, data, store, opts))
        methods.append(get_method(m.method.method)(m.config["method_params"], students[-1], teachers[-1],
                                                   data.info.input_shape).to(opts.device))
    path = store.checkpoint_path(_stack_key(lanes))
    resume, _ = _resume_state(lanes[0], path, ctx)
    for i, m in enumerate(lanes):
        if resume is None and tracker.last_step(runs[m.key], logged_metric(m)) > 0:  # as a lone job: a new run
            tracker.end(runs[m.key], RunStatus.FAILED, "no usable checkpoint to resume from; restarted in a new run")
            runs[m.key] = tracker.start_job(ctx.parent_run, m.title, job_tags(plan, m), job_params(plan, m, ctx))
        if resume is not None:
            _log_history(tracker, runs[m.key], resume["histories"][i], logged_metric(m))

    def on_lanes(epoch: int, metrics: list[dict[str, float] | None]) -> None:
        for m, lane in zip(lanes, metrics):
            if lane is not None:
                tracker.log_metrics(runs[m.key], lane, step=epoch)
        ctx.reporter.epoch(epoch)

    hooks = Hooks(on_lanes=on_lanes, checkpoint=lambda state: save_checkpoint({**state, "route": {}}, path),
                  should_stop=ctx.local.should_stop or _never)
    method = StackedMethod(methods, [m.seed for m in lanes])
    result = fit(StackedStudent(students), method, teachers[0], data, lanes[0].train, lanes[0].augment,
                 lanes[0].seed, opts, eval_batch_size=plan.suite.eval_batch_size, hooks=hooks,
                 provided=job_provided(plan, lanes[0], ctx, teachers[0], methods[0]), resume=resume)
    for m, lane in zip(lanes, methods):
        if lane.record:
            tracker.log_params(runs[m.key], {f"procedure.{k}": v for k, v in lane.record.items()})
    return result
