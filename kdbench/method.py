"""The method contract: what a distillation method declares and computes.

A loss-only method subclasses `Method`, sets `name` and `defaults`, and implements `losses()`:
it gets the batch and both models' outputs and returns named loss terms, which the engine sums.
Extra trainable modules (a FitNets regressor) are attributes of the method: the engine optimises
them with the student. A method that changes the procedure declares what it needs (class
attributes below) or overrides `step()`; it never reaches into the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


@dataclass
class Batch:
    images: torch.Tensor  # normalised float input, on the training device
    labels: torch.Tensor
    epoch: int  # 0-based epoch of the job being trained
    epochs: int  # the job's total epochs (for warm-ups and schedules inside a method)
    teacher_logits: torch.Tensor | None = None  # shared teacher outputs for this batch, when the engine has them


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


@dataclass
class StepContext:
    """What the engine lends a method for one step: the models and a way to apply a loss to one of them."""

    student: nn.Module
    teacher: nn.Module | None
    update: Callable[..., None]  # update(which: "student" | "teacher", loss, clip_grad_norm=None)
    passes: PassCounts
    autocast: Callable[[], Any]  # `with ctx.autocast():` around forward passes (bf16 on GPU, a no-op on CPU)


def run_model(model: nn.Module, images: torch.Tensor, feature_indices: list[int] | None) -> Outputs:
    """Logits, plus the stage outputs named by `feature_indices`, from an unmodified timm-style model."""
    if feature_indices is None:
        return Outputs(logits=model(images))
    final, feats = model.forward_intermediates(images, indices=feature_indices)
    return Outputs(logits=model.forward_head(final), features=list(feats))


class Method(nn.Module):
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}  # every hyper-parameter with its default; all are logged as params
    summary: ClassVar[str] = ""  # one line for `kdbench methods`
    needs_teacher: ClassVar[bool] = True  # False: the student trains alone (the baseline)
    trains_teacher: ClassVar[bool] = False  # True: the teacher gets its own optimiser and is updated by step()
    student_features: ClassVar[list[int] | None] = None  # stage indices the method reads, or None for logits only
    teacher_features: ClassVar[list[int] | None] = None
    protocol_note: ClassVar[str | None] = None  # e.g. "protocol assumed", shown beside the method's results
    # True: losses() reads only the frozen teacher's logits, so the engine may hand it shared teacher
    # outputs (computed once per image and view, reused across epochs, methods and seeds) instead of a forward.
    teacher_logits_only: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], student: nn.Module, teacher: nn.Module | None,
                 input_shape: tuple[int, int, int]):
        super().__init__()
        self.params = {**self.defaults, **params}

    def losses(self, batch: Batch, student: Outputs, teacher: Outputs | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

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
        ctx.update("student", sum(terms.values()))
        return {k: v.detach() for k, v in terms.items()}
