"""The one training loop: teachers, assistants and students all train here.

The engine owns the optimiser, the learning-rate schedule, precision, evaluation and checkpoints;
the method owns only its loss (or its own step, for methods that train two models). Data stays on
the device; the only host syncs are at the end of an epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn

from kdbench import Interrupted, KdbenchError
from kdbench.data.batches import (DeviceData, Split, epoch_batches, epoch_views, eval_batches, eval_labels,
                                  make_generator, normalize)
from kdbench.method import Batch, Method, PassCounts, StepContext, TeacherRoute
from kdbench.seeding import stream_seed
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.train.measures import EvalTotals
from kdbench.train.parallel import mean_over_devices, sum_over_devices
from kdbench.train.stacked import StackedMethod
from kdbench.train.training import (COMPILED_PREFIX, EpochTotals, Training, make_optimizer,  # noqa: F401 (read here)
                                    plain_state_dict)
from kdbench.train.teacher_cache import TeacherCache, split_logits

EXPLODED = 1e4  # an epoch's mean training loss above this ends the job as diverged


class Diverged(KdbenchError):
    pass


CHANCE_MARGIN_PP = 2.0  # a final accuracy less than this (or 3 standard errors) above chance is a collapse


def collapse_reason(history: list[dict[str, float]], num_classes: int, test_size: int) -> str | None:
    """Why a finished run's number means nothing (it collapsed), or None.

    Collapsed: the last epoch's test accuracy lies within max(2 pp, 3 standard errors of a chance-level
    classifier on this test split) of chance (100 / classes %); or, over two or more epochs, no training
    loss term ever fell below its first epoch's mean. Per term, not the total: a warm-up (DKD) raises the
    total on a healthy run while its cross-entropy falls.
    """
    if not history or "test_acc" not in history[-1]:
        return None
    chance = 100.0 / num_classes
    p = 1.0 / num_classes
    margin = max(CHANCE_MARGIN_PP, 300.0 * math.sqrt(p * (1 - p) / max(test_size, 1)))
    acc = history[-1]["test_acc"]
    if acc < chance + margin:
        return f"collapsed: test accuracy {acc:.2f}% is within {margin:.1f} pp of chance ({chance:.2f}%)"
    terms = [k for k in history[0] if k.startswith("train_") and k != "train_loss"]
    later = {k: [h[k] for h in history[1:] if k in h] for k in terms}
    later = {k: v for k, v in later.items() if v}  # a stage's term that stops (FitNets' hint) says nothing here
    if later and all(not any(v < history[0][k] for v in values) for k, values in later.items()):
        return (f"collapsed: the training loss never fell below its first epoch's "
                f"({history[0].get('train_loss', math.nan):.4g} -> {history[-1].get('train_loss', math.nan):.4g})")
    return None


@dataclass(frozen=True)
class EngineOptions:
    device: torch.device
    bf16: bool  # bf16 autocast for forward passes (BatchNorm and losses stay float32)
    channels_last: bool
    # torch.compile the models' forward (and so their backward) for training steps. On CUDA with CUDA graphs
    # (mode "reduce-overhead"): a batch-64 CIFAR ResNet step is bound by kernel launches, not arithmetic.
    compile: bool = False

    @property
    def compile_mode(self) -> str:
        # reduce-overhead = inductor kernels replayed as CUDA graphs; CPU has no graphs, so plain inductor there.
        return "reduce-overhead" if self.device.type == "cuda" else "default"

    @classmethod
    def for_device(cls, name: str = "auto", compile: bool | None = None) -> "EngineOptions":
        """compile: None = on for CUDA, off on CPU (compiling costs about a minute per model on a small CPU)."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KdbenchError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
        gpu = device.type == "cuda"
        # channels_last on CPU too: oneDNN's convolutions are faster in it (kdbench bench, 2-core Xeon: about
        # 20% for resnet56 -> resnet20, 9% for resnet32x4 -> resnet8x4).
        return cls(device=device, bf16=gpu, channels_last=True, compile=gpu if compile is None else compile)

    def autocast(self):  # forward passes only: backward runs outside, in the types the forward chose
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


class Compiled:
    """A model as methods see it when the engine compiles: calling it runs the compiled forward; every other
    attribute (forward_intermediates, load_state_dict, train/eval, submodules) is the plain model's, so
    state_dict keys stay unprefixed and feature paths run eagerly. The engine keeps the plain model for
    evaluation and checkpoints."""

    def __init__(self, model: nn.Module, opts: EngineOptions):
        self.eager_module = model
        # Models of one family share one forward, and each architecture, batch shape and mode is another entry
        # of its compile cache: a suite has more than dynamo's default 8, past which it silently runs eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # dynamic=False: one graph per batch shape (the full batch, an epoch's last one), each replayable as a CUDA graph
        self._call = torch.compile(model, mode=opts.compile_mode, dynamic=False)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "eager_module":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.eager_module, name)


def for_steps(model: nn.Module | None, opts: EngineOptions) -> nn.Module | None:
    """The model as training steps call it: compiled when the engine compiles (evaluation runs the plain one)."""
    return Compiled(model, opts) if opts.compile and model is not None else model


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, data: DeviceData, opts: EngineOptions, batch_size: int,
             teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy and loss (the NLL), ECE and Brier score on `split`; agreement and KL against the teacher's logits
    on the same images when given (kdbench.train.measures). Summed on the device, one host sync at the end."""
    was_training = model.training
    model.eval()
    totals = EvalTotals(opts.device, with_teacher=teacher_logits is not None)
    start = 0
    for images, labels in eval_batches(split, batch_size):
        images = normalize(images, data.info, channels_last=opts.channels_last)
        with torch.autocast(opts.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            logits = model(images).float()
        end = start + labels.shape[0]
        totals.add(logits, labels, None if teacher_logits is None else teacher_logits[start:end])
        start = end
    sum_over_devices(split, *totals.sums())  # one job on several devices: each device read its part of the split
    model.train(was_training)
    return totals.results(len(split))


@dataclass
class FitResult:
    metrics: dict[str, float]  # the last epoch's metrics: the headline numbers
    history: list[dict[str, float]] = field(default_factory=list)
    passes: PassCounts = field(default_factory=PassCounts)
    diverged: str = ""  # a stacked seed that diverged: why (a lone job raises Diverged instead)
    lanes: list["FitResult"] = field(default_factory=list)  # stacked seeds: each seed's result, in seed order


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Hooks:
    """How fit's caller follows a run and stops it. Epochs here are 1-based: the number of epochs done."""

    on_epoch: Callable[[int, dict[str, float]], None] | None = None  # after an epoch (and its checkpoint)
    keep_route: Callable[[int], bool] | None = None  # the epochs whose student goes to on_route (a teacher's route)
    on_route: Callable[[int, dict[str, torch.Tensor]], None] | None = None
    checkpoint: Callable[[dict[str, Any]], None] | None = None  # the training state (Training.state_dict)
    should_stop: Callable[[], bool] = _never  # asked after every step and epoch: stop resumably (Interrupted)
    # Stacked seeds, after an epoch (and its checkpoint): each seed's metrics, None for a seed that has diverged.
    on_lanes: Callable[[int, list[dict[str, float] | None]], None] | None = None


@dataclass(frozen=True)
class Provided:
    """What a job brings besides models and data: what its method's needs ask for, shared teacher outputs,
    and how the student's loss terms make its update."""

    route: TeacherRoute | None = None  # the teacher's route checkpoints, for a method with `Needs.route`
    guides: list[nn.Module] = field(default_factory=list)  # `Needs.dense` (DGKD): frozen models, lent as ctx.guides
    # Outputs of this teacher on data.train with this augmentation, used in place of its forward when the method
    # reads only the teacher's logits (the same numbers, computed once for all the jobs that share them).
    teacher_cache: TeacherCache | None = None
    combine: str = "sum"  # "sum", or "pcgrad" (kdbench.train.combine)


def probe_validation(data: DeviceData, opts: EngineOptions, method_name: str,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ctx.probe`: choices are made on held-out images, never on what the student trains on nor on the test split."""
    if data.val is None:
        raise KdbenchError(f"{method_name}: this method chooses on a validation split: set data.val_size")
    images, labels = next(eval_batches(data.val, n))
    return normalize(images, data.info, channels_last=opts.channels_last), labels


def evaluate_splits(model: nn.Module, data: DeviceData, opts: EngineOptions, batch_size: int,
                    references: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Test numbers (reported only), and validation's where there is a split (what choices use); measured against
    the teacher's logits on a split where `references` has them (teacher_references)."""
    out = {}
    for name, split in (("test", data.test), ("val", data.val)):
        if split is not None:
            result = evaluate(model, split, data, opts, batch_size, (references or {}).get(name))
            out.update({f"{name}_{k}": v for k, v in result.items()})
    return out


def teacher_references(teacher: nn.Module | None, data: DeviceData, opts: EngineOptions, batch_size: int,
                       cache: TeacherCache | None) -> dict[str, torch.Tensor]:
    """The teacher's logits on the test and validation splits, which the student's agreement and KL are measured
    against: kept in the shared teacher outputs where the job has them, else computed here."""
    if teacher is None:
        return {}
    return {name: cache.eval_outputs(split, batch_size) if cache is not None
            else split_logits(teacher, split, data.info, opts, batch_size)
            for name, split in (("test", data.test), ("val", data.val)) if split is not None}


def evaluation(student: nn.Module, teacher: nn.Module | None, method: Method, data: DeviceData, opts: EngineOptions,
               batch_size: int, references: dict[str, torch.Tensor]) -> dict[str, float]:
    """An epoch's evaluation of the student: against the teacher it was given (its logits computed once, before
    any training), or, for a method that trains its teacher, against that teacher as it is now."""
    if not method.trains_teacher:
        return evaluate_splits(student, data, opts, batch_size, references)
    references = teacher_references(teacher, data, opts, batch_size, None)
    if data.test is None:  # a tuning trial (kdbench.run.tune): no test split, nothing measured on it
        return evaluate_splits(student, data, opts, batch_size, references)
    correct = (references["test"].argmax(1) == eval_labels(data.test, batch_size)).sum()
    sum_over_devices(data.test, correct)
    return {**evaluate_splits(student, data, opts, batch_size, references),
            "teacher_test_acc": correct.item() / len(data.test) * 100}


def usable_teacher_cache(provided: Provided, teacher: nn.Module | None, method: Method, data: DeviceData,
                         augment: AugmentConfig) -> TeacherCache | None:
    """The shared teacher outputs, where they may replace the teacher's forward: only a fixed teacher's outputs
    can be shared, not one that trains (ProKT) or changes by stage (RCO)."""
    cache = provided.teacher_cache
    if cache is None or teacher is None or not method.teacher_logits_only or method.trains_teacher \
            or provided.route is not None:
        return None
    if not cache.serves(data.train, augment.crop_padding, augment.flip):
        raise ValueError("teacher_cache was built for another training split or augmentation")
    return cache


def epoch_generators(seed: int, epoch: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """An epoch's order and augmentation draws, seeded by (seed, epoch): the same in a resumed run."""
    return (make_generator(device, stream_seed(seed, "order", epoch)),
            make_generator(device, stream_seed(seed, "aug", epoch)))


def training_loss(totals: EpochTotals, epoch: int, lane: int | None = None) -> dict[str, float]:
    """The epoch's mean loss terms and their sum (of stacked seed `lane`); Diverged when the sum is not finite or
    exploded."""
    terms = totals.means(lane)
    total = sum(terms.values())
    if not math.isfinite(total):
        raise Diverged(f"training loss became {total} in epoch {epoch + 1}")
    if total > EXPLODED:
        raise Diverged(f"training loss exploded to {total:.3g} in epoch {epoch + 1}")
    return {"train_loss": total, **terms}


def epoch_steps(data: DeviceData, train: TrainConfig, augment: AugmentConfig, seeds: list[int], epoch: int,
                opts: EngineOptions, cache: TeacherCache | None, skip: int,
                stacked: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """An epoch's steps from `skip` on: (step, normalised images, labels, shared teacher logits or None). Each seed
    draws its own order and views from its generators; stacked seeds' batches come stacked, (seeds, B, ...)."""
    # a resumed epoch replays its draws up to the step where it stopped: the batches before are drawn, not read
    streams = [epoch_batches(data.train, train.batch_size, *epoch_generators(seed, epoch, opts.device),
                             augment.crop_padding, augment.flip, with_views=cache is not None, start=skip)
               for seed in seeds]
    for step, drawn in enumerate(zip(*streams), start=skip):
        images = [normalize(images, data.info, channels_last=opts.channels_last) for images, *_ in drawn]
        labels = [labels for _, labels, *_ in drawn]
        logits = [cache.lookup(*views) for _, _, *views in drawn] if cache is not None else None
        if not stacked:
            yield step, images[0], labels[0], logits[0] if logits else None
        else:
            yield step, torch.stack(images), torch.stack(labels), torch.stack(logits) if logits else None


def stacked_evaluation(training: Training, totals: EpochTotals, epoch: int, teacher: nn.Module | None,
                       data: DeviceData, opts: EngineOptions, batch_size: int,
                       references: dict[str, torch.Tensor]) -> list[dict[str, float] | None]:
    """Each stacked seed's epoch numbers (its losses, its own student evaluated), None for one that has diverged:
    a diverged seed is its own job's failure, and the others go on."""
    stacked, out = training.method, []
    for lane, student in enumerate(training.models["student"].unstack()):
        if not training.diverged[lane]:
            try:
                losses = training_loss(totals, epoch, lane)
            except Diverged as exc:
                training.diverged[lane] = str(exc)
        if training.diverged[lane]:
            out.append(None)
            continue
        out.append({**losses, **evaluation(student, teacher, stacked, data, opts, batch_size, references),
                    **stacked.lanes[lane].epoch_metrics()})
    return out


def epoch_end(training: Training, totals: EpochTotals, epoch: int, teacher: nn.Module | None, data: DeviceData,
              opts: EngineOptions, batch_size: int, references: dict[str, torch.Tensor],
              start: float) -> list[dict[str, float] | None]:
    """The epoch's metrics, one dict per seed (one for a lone job), added to the history of each seed."""
    train_time = time.perf_counter() - start
    if isinstance(training.method, StackedMethod):
        lanes = stacked_evaluation(training, totals, epoch, teacher, data, opts, batch_size, references)
    else:
        lanes = [{**training_loss(totals, epoch),
                  **evaluation(training.models["student"], teacher, training.method, data, opts, batch_size,
                               references)}]
    timing = {"lr": training.lr, "epoch_time": time.perf_counter() - start,
              "images_per_sec": totals.images / train_time}
    for lane, metrics in enumerate(lanes):
        if metrics is not None:
            metrics.update(timing)
            if not isinstance(training.method, StackedMethod):
                metrics.update(training.method.epoch_metrics())  # a method's own per-epoch numbers (attention...)
            metrics.update(training.epoch_metrics())
            training.histories[lane].append(metrics)
    return lanes


def lane_results(training: Training) -> list[FitResult]:
    """Each stacked seed's result: its last epoch's metrics, its history, the shared pass counts, why it diverged."""
    return [FitResult(h[-1] if h else {}, h, training.passes, why) for h, why in zip(training.histories,
                                                                                    training.diverged)]


def fit(student: nn.Module, method: Method, teacher: nn.Module | None, data: DeviceData, train: TrainConfig,
        augment: AugmentConfig, seed: int, opts: EngineOptions, *, eval_batch_size: int = 1000,
        hooks: Hooks = Hooks(), provided: Provided = Provided(), resume: dict[str, Any] | None = None) -> FitResult:
    """Train `student` for `train.epochs` with `method`, evaluating on the test split (and the validation split,
    when `data.val` exists) after each epoch. Only validation numbers may choose anything (`StepContext.probe`).

    hooks.checkpoint(state) is called after every epoch, and when hooks.should_stop() turns true between two
    steps (then Interrupted is raised); fit(..., resume=state) goes on from there with the numbers of a run never
    stopped: an epoch's draws come from generators seeded by (seed, epoch), and a resumed epoch replays them up
    to its step. `method.resumed(ctx)` restores what the method holds outside its state.

    Stacked seeds (kdbench.train.stacked): `student` a StackedStudent and `method` a StackedMethod; each seed draws
    from its own generators, hooks.on_lanes gets each seed's metrics, and the result's `lanes` each seed's result.
    """
    for frozen in [*([teacher] if teacher is not None and not method.trains_teacher else []), *provided.guides]:
        frozen.eval().requires_grad_(False)  # a fixed teacher, guides: running statistics, no dropout, no gradient
    stacked = isinstance(method, StackedMethod)
    seeds = method.seeds if stacked else [seed]
    training = Training(student, teacher, method, train, seed, provided.combine, opts.device, len(seeds))
    cache = usable_teacher_cache(provided, teacher, method, data, augment)
    # The teacher as given, before a method loads another of its checkpoints into it or a resume restores one.
    references = {} if method.trains_teacher else teacher_references(teacher, data, opts, eval_batch_size, cache)
    graphs = opts.compile and opts.device.type == "cuda"
    first_epoch, skip_batches = (resume["epoch"], resume["batch"]) if resume is not None else (0, 0)
    # ctx.update knows the step it serves (PCGrad draws by it): bound here to the first step to run, then to each.
    ctx = StepContext(student=for_steps(student, opts), teacher=for_steps(teacher, opts),
                      update=partial(training.update, first_epoch, skip_batches), passes=training.passes,
                      autocast=opts.autocast, probe=partial(probe_validation, data, opts, method.name), seed=seed,
                      route=provided.route, guides=list(provided.guides))
    if train.epochs == 0:  # a model used as loaded (checkpoint, pretrained): evaluate only
        metrics = evaluate_splits(student, data, opts, eval_batch_size, references)
        return FitResult(metrics, [metrics], training.passes)
    if resume is not None:
        training.load_state_dict(resume)
        method.resumed(ctx)  # what the method holds outside its state (RCO: the anchor in the teacher)
    metrics = training.history[-1] if training.history else {}

    for epoch in range(first_epoch, train.epochs):
        start = time.perf_counter()
        # An epoch resumed in its middle has started already: its state and its totals so far are restored.
        totals = EpochTotals.restored(resume, opts.device) if skip_batches else EpochTotals()
        if not skip_batches:
            method.start_epoch(epoch, train.epochs, ctx)
        training.start_epoch(epoch)
        if cache is not None:  # the epoch's draws replayed ahead: fill the views never computed, then only gathers
            for lane_seed in seeds:
                training.passes.teacher_forward += cache.fill(
                    epoch_views(len(data.train), train.batch_size, *epoch_generators(lane_seed, epoch, opts.device),
                                augment.crop_padding, augment.flip), train.batch_size)
        for step, images, labels, logits in epoch_steps(data, train, augment, seeds, epoch, opts, cache, skip_batches,
                                                         stacked):
            if graphs:  # a new iteration: CUDA-graph outputs of the last step may be overwritten from here on
                torch.compiler.cudagraph_mark_step_begin()
            ctx.update = partial(training.update, epoch, step)
            terms = method.step(Batch(images, labels, epoch, train.epochs, logits, step=step), ctx)
            totals.add(mean_over_devices(data.train, terms), labels.shape[-1])  # several devices: the whole batch's
            if hooks.should_stop():
                if hooks.checkpoint is not None:
                    hooks.checkpoint(training.state_dict(epoch, step + 1, totals))
                raise Interrupted(f"stopped in epoch {epoch + 1} after step {step + 1}")
        skip_batches = 0
        lanes = epoch_end(training, totals, epoch, teacher, data, opts, eval_batch_size, references, start)
        metrics = lanes[0] or {}
        if hooks.keep_route is not None and hooks.on_route is not None and hooks.keep_route(epoch + 1):
            hooks.on_route(epoch + 1, {k: v.detach().clone() for k, v in student.state_dict().items()})
        # Checkpoint before logging: a crash in between re-logs this epoch from the checkpoint's history, once.
        if hooks.checkpoint is not None:
            hooks.checkpoint(training.state_dict(epoch + 1, 0, EpochTotals()))
        if hooks.on_epoch is not None and not stacked:
            hooks.on_epoch(epoch + 1, metrics)
        if hooks.on_lanes is not None and stacked:
            hooks.on_lanes(epoch + 1, lanes)
        if hooks.should_stop() and epoch + 1 < train.epochs:
            raise Interrupted(f"stopped after epoch {epoch + 1}")
    return FitResult(metrics, training.history, training.passes, lanes=lane_results(training) if stacked else [])
