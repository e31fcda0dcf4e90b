"""The one training loop: teachers, assistants and students all train here.

The engine owns the optimiser, the learning-rate schedule, precision, evaluation and checkpoints;
the method owns only its loss (or its own step, for methods that train two models). Data stays on
the device; the only host syncs are at the end of an epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from kdbench import Interrupted, KdbenchError
from kdbench.train.combine import PCGrad
from kdbench.data.batches import DeviceData, Split, epoch_batches, epoch_views, eval_batches, make_generator, normalize
from kdbench.method import Batch, Method, PassCounts, StepContext, TeacherRoute
from kdbench.seeding import stream_seed
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.train.teacher_cache import TeacherCache
from kdbench.train.parallel import mean_over_devices, sum_over_devices

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


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before every state_dict key


def plain_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A state_dict saved from a torch.compile'd module, with the wrapper's key prefix removed (others unchanged)."""
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}


def lr_factor(train: TrainConfig, epoch: int) -> float:
    """Multiplier of the base rate during 0-based `epoch` (the step schedule multiplies after each milestone)."""
    if epoch < train.warmup_epochs:
        return (epoch + 1) / train.warmup_epochs
    if train.schedule == "step":
        return train.gamma ** sum(epoch >= m for m in train.milestones)
    if train.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / train.epochs))
    return 1.0


def make_optimizer(params: list[nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov,
                               weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, data: DeviceData, opts: EngineOptions, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=opts.device)
    loss = torch.zeros((), dtype=torch.float64, device=opts.device)
    for images, labels in eval_batches(split, batch_size):
        x = normalize(images, data.info, channels_last=opts.channels_last)
        with torch.autocast(opts.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            logits = model(x).float()
        correct += (logits.argmax(1) == labels).sum()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
    correct, loss = sum_over_devices(split, correct, loss)  # one job on several devices: each read its part
    model.train(was_training)
    n = len(split)
    return {"acc": correct.item() / n * 100, "loss": loss.item() / n}


@dataclass
class FitResult:
    metrics: dict[str, float]  # the last epoch's metrics: the headline numbers
    history: list[dict[str, float]] = field(default_factory=list)
    passes: PassCounts = field(default_factory=PassCounts)


def fit(student: nn.Module, method: Method, teacher: nn.Module | None, data: DeviceData, train: TrainConfig,
        augment: AugmentConfig, seed: int, opts: EngineOptions, *, eval_batch_size: int = 1000,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        keep_route: Callable[[int], bool] | None = None,
        on_route: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
        route: TeacherRoute | None = None,
        teacher_cache: TeacherCache | None = None,
        guides: list[nn.Module] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        resume: dict[str, Any] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        combine: str = "sum") -> FitResult:
    """Train `student` for `train.epochs` with `method`, evaluating on the test split (and the validation split,
    when `data.val` exists) after each epoch. Only validation numbers may choose anything (`StepContext.probe`).

    on_epoch(epoch, metrics) gets 1-based epochs; on_route(epoch, state_dict) is called where keep_route(epoch).
    route: the teacher's route checkpoints, for a method that declared `needs_route`.
    guides: frozen models a method with `Needs.dense` learns from besides the teacher (DGKD), lent as ctx.guides.
    teacher_cache: shared teacher outputs of this teacher on data.train with this augmentation, used in place
    of the teacher forward when the method reads only the teacher's logits (the same numbers, computed once).
    checkpoint(state) is called at the end of every epoch and when should_stop() turns true between two steps
    (then Interrupted is raised); fit(..., resume=state) continues from such a state with the same numbers an
    uninterrupted run gives: each epoch's order and augmentation come from generators seeded by (seed, epoch),
    and a resumed epoch replays its draws up to the step where it stopped. The method's state_dict and its
    `extra_state()` are part of the state, and `method.resumed(ctx)` restores what it holds outside it.
    combine: how the student's named loss terms make its update: "sum", or "pcgrad" (kdbench.combine).
    """
    models = {"student": student}
    trainable = {"student": list(student.parameters()) + list(method.parameters())}
    if teacher is not None:
        models["teacher"] = teacher
        if method.trains_teacher:
            trainable["teacher"] = list(teacher.parameters())
        else:
            teacher.eval().requires_grad_(False)  # frozen: running statistics, no dropout, no gradient
    for guide in guides or ():
        guide.eval().requires_grad_(False)  # frozen like a teacher
    optimizers = {k: make_optimizer(p, train) for k, p in trainable.items()}
    passes = PassCounts()
    combiner = PCGrad(seed) if combine == "pcgrad" else None

    def update(which: str, loss: torch.Tensor | dict[str, torch.Tensor], clip_grad_norm: float | None = None) -> None:
        opt = optimizers[which]
        opt.zero_grad(set_to_none=True)
        backwards = 1
        if combiner is not None and which == "student" and isinstance(loss, dict):
            # `epoch` and `batch` are the training loop's, read at call time: the projection order of a step
            # is drawn from (seed, epoch, step), so a resumed run draws the same orders.
            backwards = combiner.backward(loss, trainable[which], epoch, batch)
        else:
            (sum(loss.values()) if isinstance(loss, dict) else loss).backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(trainable[which], clip_grad_norm)
        opt.step()
        setattr(passes, f"{which}_backward", getattr(passes, f"{which}_backward") + backwards)
        model = models[which]
        if getattr(model, "max_norm", None):  # Hinton 2012's max-norm constraint, where the model asks for it
            model.apply_max_norm_(model.max_norm)

    def probe(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Choices are made on held-out images: never on what the student trains on, never on the test split.
        if data.val is None:
            raise KdbenchError(f"{method.name}: this method chooses on a validation split: set data.val_size")
        images, labels = next(eval_batches(data.val, n))
        return normalize(images, data.info, channels_last=opts.channels_last), labels

    # Only a fixed teacher's outputs can be shared: not one that trains (ProKT) or changes by stage (RCO).
    cached = teacher_cache is not None and teacher is not None and method.teacher_logits_only \
        and not method.trains_teacher and route is None
    if cached and not teacher_cache.serves(data.train, augment.crop_padding, augment.flip):
        raise ValueError("teacher_cache was built for another training split or augmentation")
    step_student, step_teacher = student, teacher
    if opts.compile:
        step_student = Compiled(student, opts)
        step_teacher = Compiled(teacher, opts) if teacher is not None else None
    graphs = opts.compile and opts.device.type == "cuda"
    ctx = StepContext(student=step_student, teacher=step_teacher, update=update, passes=passes,
                      autocast=opts.autocast, route=route, probe=probe, seed=seed,
                      guides=list(guides or ()))
    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}

    def evaluated() -> dict[str, float]:
        """Test accuracy and loss (reported only), and validation's where there is a split (what choices use)."""
        out = {}
        for name, split in (("test", data.test), ("val", data.val)):
            if split is not None:
                result = evaluate(student, split, data, opts, eval_batch_size)
                out.update({f"{name}_acc": result["acc"], f"{name}_loss": result["loss"]})
        return out

    if train.epochs == 0:  # a model used as loaded (checkpoint, pretrained): evaluate only
        metrics = evaluated()
        return FitResult(metrics, [metrics], passes)

    def state(epoch: int, batch: int, totals: dict[str, torch.Tensor], steps: int, images_seen: int) -> dict:
        return {"epoch": epoch, "batch": batch, "steps": steps, "images_seen": images_seen,
                "totals": {k: v.detach().clone() for k, v in totals.items()},
                "models": {k: m.state_dict() for k, m in models.items() if k in trainable},
                "method": method.state_dict(), "method_extra": method.extra_state(),
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "history": list(history), "passes": asdict(passes), "cpu_rng": torch.get_rng_state(),
                "combine": combiner.state_dict() if combiner is not None else None,
                "cuda_rng": torch.cuda.get_rng_state_all() if opts.device.type == "cuda" else None}

    first_epoch, skip_batches, resumed_totals = 0, 0, None
    if resume is not None:
        for k, sd in resume["models"].items():
            models[k].load_state_dict(plain_state_dict(sd))
        method.load_state_dict(resume["method"])
        method.load_extra_state(resume["method_extra"])
        for k, sd in resume["optimizers"].items():
            optimizers[k].load_state_dict(sd)
        history[:] = resume["history"]
        metrics = history[-1] if history else {}
        passes.__dict__.update(resume["passes"])
        if combiner is not None and resume.get("combine"):
            combiner.load_state_dict(resume["combine"])
        torch.set_rng_state(resume["cpu_rng"])
        if resume["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        first_epoch, skip_batches = resume["epoch"], resume["batch"]
        resumed_totals = (resume["totals"], resume["steps"], resume["images_seen"]) if skip_batches else None
        method.resumed(ctx)  # what the method holds outside its state (RCO: the anchor in the teacher)

    for epoch in range(first_epoch, train.epochs):
        start = time.perf_counter()
        if not skip_batches:  # an epoch resumed in its middle has started already: its state is restored
            method.start_epoch(epoch, train.epochs, ctx)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = train.lr * lr_factor(train, epoch)
        student.train()
        method.train()
        if method.trains_teacher:
            teacher.train()

        def generators():
            return (make_generator(opts.device, stream_seed(seed, "order", epoch)),
                    make_generator(opts.device, stream_seed(seed, "aug", epoch)))

        if cached:  # the epoch's draws replayed ahead: fill the views never computed, then only gathers
            passes.teacher_forward += teacher_cache.fill(
                epoch_views(len(data.train), train.batch_size, *generators(), augment.crop_padding, augment.flip),
                train.batch_size)
        totals: dict[str, torch.Tensor] = {}
        steps = images_seen = 0
        if resumed_totals is not None:
            totals, steps, images_seen = {k: v.to(opts.device) for k, v in resumed_totals[0].items()}, *resumed_totals[1:]
            resumed_totals = None
        # a resumed epoch replays its draws up to where it stopped; the batches before are drawn, not read
        for batch, (images, labels, *drawn) in enumerate(epoch_batches(
                data.train, train.batch_size, *generators(), augment.crop_padding, augment.flip, with_views=cached,
                start=skip_batches), start=skip_batches):
            x = normalize(images, data.info, channels_last=opts.channels_last)
            logits = teacher_cache.lookup(*drawn) if cached else None
            if graphs:  # a new iteration: CUDA-graph outputs of the last step may be overwritten from here on
                torch.compiler.cudagraph_mark_step_begin()
            terms = method.step(Batch(x, labels, epoch, train.epochs, logits, step=batch), ctx)
            for name, value in terms.items():  # summed on the device: no sync per step
                totals[name] = totals.get(name, 0) + value.float()
            steps += 1
            images_seen += labels.shape[0]
            if should_stop():
                totals = mean_over_devices(data.train, totals)  # several devices save the same sums
                if checkpoint is not None:
                    checkpoint(state(epoch, batch + 1, totals, steps, images_seen))
                raise Interrupted(f"stopped in epoch {epoch + 1} after step {batch + 1}")
        skip_batches = 0
        totals = mean_over_devices(data.train, totals)  # several devices log and check the same numbers
        train_loss = {f"train_{k}": (v / steps).item() for k, v in totals.items()}
        train_time = time.perf_counter() - start
        total_loss = sum(train_loss.values())
        if not math.isfinite(total_loss):
            raise Diverged(f"training loss became {total_loss} in epoch {epoch + 1}")
        if total_loss > EXPLODED:
            raise Diverged(f"training loss exploded to {total_loss:.3g} in epoch {epoch + 1}")
        metrics = {"train_loss": total_loss, **train_loss, **evaluated(),
                   "lr": optimizers["student"].param_groups[0]["lr"], "epoch_time": time.perf_counter() - start,
                   "images_per_sec": images_seen / train_time}
        metrics.update(method.epoch_metrics())  # a method's own per-epoch numbers (attention weights...)
        if combiner is not None:
            metrics.update(combiner.epoch_metrics())  # PCGrad: fraction of term pairs in conflict, cosines
        if method.trains_teacher:
            metrics["teacher_test_acc"] = evaluate(teacher, data.test, data, opts, eval_batch_size)["acc"]
        history.append(metrics)
        if keep_route is not None and on_route is not None and keep_route(epoch + 1):
            on_route(epoch + 1, {k: v.detach().clone() for k, v in student.state_dict().items()})
        # Checkpoint before logging: a crash in between re-logs this epoch from the checkpoint's history, once.
        if checkpoint is not None:
            checkpoint(state(epoch + 1, 0, {}, 0, 0))
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        if should_stop() and epoch + 1 < train.epochs:
            raise Interrupted(f"stopped after epoch {epoch + 1}")
    return FitResult(metrics, history, passes)
