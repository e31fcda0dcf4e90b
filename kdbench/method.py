"""The method contract: what a distillation method declares and computes.

A loss-only method subclasses `Method`, sets `name` and `defaults`, and implements `losses()`:
it gets the batch and both models' outputs and returns named loss terms, which the engine sums.
Extra trainable modules (a FitNets regressor) are attributes of the method: the engine optimises
them with the student. A method that changes the procedure declares what it needs (class
attributes below, or `needs(params)` when a parameter decides), overrides `step()` (two models
trained together) or `start_epoch()` (a stage switch); it never reaches into the engine.
See docs/methods.md for the walk-through.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from kdbench import KdbenchError


@dataclass
class Batch:
    images: torch.Tensor  # normalised float input, on the training device
    labels: torch.Tensor
    epoch: int  # 0-based epoch of the job being trained
    epochs: int  # the job's total epochs (for warm-ups and schedules inside a method)
    teacher_logits: torch.Tensor | None = None  # shared teacher outputs for this batch, when the engine has them
    step: int = 0  # 0-based index of this batch in its epoch: with `epoch` and `StepContext.seed`, seeds a per-step draw


@dataclass
class Outputs:
    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)  # stage outputs, when the method asked for them


@dataclass
class PassCounts:
    """Forward and backward passes per model, for the cost table. Plain ints: counting never syncs."""

    teacher_forward: int = 0
    teacher_backward: int = 0
    student_forward: int = 0
    student_backward: int = 0


@dataclass(frozen=True)
class Needs:
    """What a method asks the plan and the executor for. The plan turns it into jobs, the executor provides it.

    teacher: "none" (the student alone), "trained" (the stored, converged teacher, frozen unless the
      method trains it), "random" (a freshly initialised teacher: ProKT) or "checkpoint" (the stored
      teacher as it was after `teacher_epoch` epochs, one of its route checkpoints; 0 = the final one).
    route: the stored teacher's route checkpoints, lent to the method as `StepContext.route` (RCO).
    assistants: models trained between the teacher and the student, in order (TAKD): each an ordinary
      KD run from the model before it, stored like a teacher; ("auto",) lets the executor choose one;
      ("between",) takes the suite's models between teacher and student in size, largest first, at most
      `max_assistants` of them (0: all), spread evenly over that range (DGKD).
    dense: the method learns from every model of the chain at once (DGKD): the frozen teacher and all
      assistants before this job are lent as `StepContext.guides`, teacher first; an assistant job of such
      a method gets the models above it.
    choice: a choice these params make on the validation split (e.g. "assistants 'auto'"), in words for the
      error that refuses a suite without `data.val_size`; "" when the method chooses nothing.
    """

    teacher: str = "trained"
    teacher_epoch: int = 0
    route: bool = False
    assistants: tuple[str, ...] = ()
    max_assistants: int = 0
    dense: bool = False
    choice: str = ""


AUTO = "auto"  # an assistant chosen at run time, once the accuracies it is chosen by exist
BETWEEN = "between"  # the suite's models between teacher and student in size, chosen when the plan is made


@dataclass(frozen=True)
class TeacherRoute:
    """The stored teacher's route checkpoints (with BatchNorm statistics): epochs ascending, the final one last."""

    epochs: list[int]
    load: Callable[[int], dict[str, torch.Tensor]]  # load(epoch) -> state_dict, checked against its sha256


@dataclass
class StepContext:
    """What the engine lends a method for one step: the models and a way to apply a loss to one of them."""

    student: nn.Module
    teacher: nn.Module | None
    # update(which: "student" | "teacher", loss, clip_grad_norm=None). `loss` is a tensor, or a dict of named
    # terms: the engine sums them, or combines them as the suite's `combine` says (PCGrad, kdbench.combine).
    update: Callable[..., None]
    passes: PassCounts
    autocast: Callable[[], Any]  # `with ctx.autocast():` around forward passes (bf16 on GPU, a no-op on CPU)
    route: TeacherRoute | None = None  # when the method declared `needs_route`
    # probe(n): the first n validation images (normalised, not augmented) and labels, for choices a method makes
    # during training (RCO's greedy anchors; declare them in `Needs.choice`). Never the test or training split.
    probe: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    seed: int = 0  # the job's seed: a method's random draws come from kdbench.seeding streams of it
    guides: list[nn.Module] = field(default_factory=list)  # `Needs.dense`: frozen teacher and assistants, teacher first


def check_ranges(params: dict[str, Any], positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = ()) -> str | None:
    """For `check_params`: the first of these params out of its range, as a reason; None if all are in range."""
    for key in positive:
        if not params[key] > 0:
            return f"{key} must be positive, got {params[key]!r}"
    for key in non_negative:
        if not params[key] >= 0:
            return f"{key} must be at least 0, got {params[key]!r}"
    return None


Layer = int | str  # a stage index into the model's feature_info, or a module name (a forward hook)


def resolve_layer(model: nn.Module, layer: Layer) -> Layer:
    """A stage index, or a module name that is a stage in `feature_info` (-> its index), or another module name."""
    info = getattr(model, "feature_info", None) or []
    modules = [f["module"] for f in info]
    if isinstance(layer, int):
        if not -len(modules) <= layer < len(modules):
            raise KdbenchError(f"{type(model).__name__}: stage index {layer} out of range: the model has "
                               f"{len(modules)} stages ({', '.join(modules) or 'none'})")
        return layer % len(modules)
    if layer in modules:
        return modules.index(layer)
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise KdbenchError(f"{type(model).__name__}: no module named '{layer}' (stages: {', '.join(modules)})") from None
    return layer


@contextmanager
def _hooked(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the outputs of named modules during one forward (torchdistill's way for any model)."""
    got: dict[str, torch.Tensor] = {}

    def keep(name):
        # clone: a following in-place op (ReLU(inplace=True)) would otherwise change the captured tensor
        return lambda module, args, output: got.__setitem__(name, output.clone())

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def run_model(model: nn.Module, images: torch.Tensor, feature_indices: list[Layer] | None) -> Outputs:
    """Logits, plus the features named by `feature_indices`, from an unmodified timm-style model.

    Stage indices come from `forward_intermediates()`; module names (see `resolve_layer`) from forward hooks.
    """
    if not feature_indices:
        return Outputs(logits=model(images))
    if all(isinstance(i, int) for i in feature_indices):
        final, feats = model.forward_intermediates(images, indices=list(feature_indices))
        order = sorted(set(feature_indices))  # forward_intermediates returns them in stage order
        return Outputs(logits=model.forward_head(final), features=[feats[order.index(i)] for i in feature_indices])
    names = [i if isinstance(i, str) else model.feature_info[i]["module"] for i in feature_indices]
    with _hooked(model, list(dict.fromkeys(names))) as got:
        # A compiled model would skip hooks added after it was compiled: the hooked forward runs eagerly.
        logits = getattr(model, "eager_module", model)(images)
    return Outputs(logits=logits, features=[got[n] for n in names])


class Method(nn.Module):
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}  # every hyper-parameter with its default; all are logged as params
    summary: ClassVar[str] = ""  # one line for `kdbench methods`
    needs_teacher: ClassVar[bool] = True  # False: the student trains alone (the baseline)
    trains_teacher: ClassVar[bool] = False  # True: the teacher gets its own optimiser and is updated by step()
    teacher_init: ClassVar[str] = "trained"  # see `Needs.teacher`
    needs_route: ClassVar[bool] = False  # True: the teacher's route checkpoints, as `StepContext.route`
    student_features: ClassVar[list[Layer] | None] = None  # stages (index or module name) the method reads
    teacher_features: ClassVar[list[Layer] | None] = None  # (instances may set their own, e.g. from params)
    protocol_note: ClassVar[str | None] = None  # e.g. "protocol assumed", shown beside the method's results
    param_types: ClassVar[dict[str, tuple[type, ...]]] = {}  # types a param may take beyond its default's
    # True: losses() reads only the frozen teacher's logits, so the engine may hand it shared teacher
    # outputs (computed once per image and view, reused across epochs, methods and seeds) instead of a forward.
    teacher_logits_only: ClassVar[bool] = False
    # Params that count epochs of the job's own schedule (DKD's warm-up): when --epochs shrinks the schedule,
    # the plan scales them as it scales the milestones, and the scaled value is the one logged.
    epoch_params: ClassVar[tuple[str, ...]] = ()
    # Params that count epochs of the stored teacher's run (ProKT's teacher_epoch): scaled with the teachers'
    # schedule and moved to the nearest route checkpoint it keeps; 0 stays 0.
    teacher_epoch_params: ClassVar[tuple[str, ...]] = ()
    # False: the student's update is not a sum of several named terms (ProKT: one KL term in its own step()),
    # so a suite's `combine: pcgrad` would change nothing and is refused when the suite is loaded.
    combinable: ClassVar[bool] = True
    # True: the method only computes losses (no step, stage, draw or procedure of its own), so the seeds of a cell
    # may train as one stacked model (a suite's `stack_seeds`, kdbench.train.stacked); see `stack_problem`.
    stackable: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], student: nn.Module, teacher: nn.Module | None,
                 input_shape: tuple[int, int, int]):
        super().__init__()
        self.params = {**self.defaults, **params}
        self.record: dict[str, str] = {}  # procedure details (an anchor used, a layer resolved): logged as params

    @classmethod
    def needs(cls, params: dict[str, Any]) -> Needs:
        """What this method needs for these params. The default reads the class attributes."""
        return Needs(teacher=cls.teacher_init if cls.needs_teacher else "none", route=cls.needs_route)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> str | None:
        """A reason why these params (defaults filled in) cannot work, found at suite load time; None if fine."""
        return None

    @classmethod
    def stack_problem(cls, params: dict[str, Any]) -> str | None:
        """Why the seeds of these params cannot train as one stacked model; None when they can."""
        return None if cls.stackable else "it has a procedure of its own (or has not declared `stackable`)"

    @classmethod
    def check_models(cls, params: dict[str, Any], student: nn.Module, teacher: nn.Module | None) -> str | None:
        """A reason why these params cannot work with this pair's models, found when the plan is made (the
        models are built on the meta device: shapes and modules, no weights, no data); None if fine."""
        return None

    def start_epoch(self, epoch: int, epochs: int, ctx: StepContext) -> None:
        """Called by the engine before each of the job's `epochs` (0-based `epoch`): a method's stage switch.

        Not called again for an epoch resumed in its middle: what it set must be in the method's state (see
        `extra_state`) or be restored by `resumed`.
        """

    def extra_state(self) -> dict[str, Any]:
        """State outside parameters and buffers that a resumed job needs; the engine checkpoints it beside the
        method's state_dict. Override with `{**super().extra_state(), ...}` and extend `load_extra_state`.
        (Not torch's get_extra_state: that would put a non-tensor into every `state_dict()`.)"""
        return {"record": dict(self.record)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.record = dict(state["record"])

    def resumed(self, ctx: StepContext) -> None:
        """Called once when a job resumes from a checkpoint, after its state is loaded and before training goes on:
        restore what lives outside the method and the trainable models (RCO reloads its anchor into the teacher)."""

    def losses(self, batch: Batch, student: Outputs, teacher: Outputs | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def epoch_metrics(self) -> dict[str, float]:
        """Numbers that are not losses, logged as metrics at the end of each epoch (e.g. attention weights).

        Accumulate them on the device in losses() (no host sync per step, in buffers so a resumed job keeps
        them), read and reset them here: the engine calls it once per epoch.
        """
        return {}

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One training step. The default: frozen teacher forward, student forward, sum of losses, update."""
        with ctx.autocast():
            # The teacher first: the student's backward then follows its forward while its saved activations
            # are still in cache (about 12% faster on CPU; the numbers are the same either way).
            teacher_out = None
            if batch.teacher_logits is not None:  # the same numbers as the forward below, computed once
                teacher_out = Outputs(logits=batch.teacher_logits)
            elif ctx.teacher is not None:
                with torch.no_grad():  # not inference_mode: feature losses must be able to save these tensors
                    teacher_out = run_model(ctx.teacher, batch.images, self.teacher_features)
                ctx.passes.teacher_forward += 1
            student_out = run_model(ctx.student, batch.images, self.student_features)
            ctx.passes.student_forward += 1
            terms = self.losses(batch, student_out, teacher_out)
        ctx.update("student", terms)  # named terms: summed, or combined as the suite says (`combine`)
        return {k: v.detach() for k, v in terms.items()}
