"""Seeds trained together: the students of a cell's seeds as one model whose parameters carry a leading seed
dimension (torch.func.stack_module_state), run by vmap over functional_call, and their methods side by side.

Each seed keeps its own initialisation (its student is built as its own job builds it), its own data order and
augmentation draws (fit draws a batch per seed from that seed's generators), its own BatchNorm statistics and
its own optimizer state (SGD and AdamW act per element, so one optimizer over the stacked parameters steps each
seed as its own would). The summed loss gives each seed's parameters the gradient of that seed's loss alone.
Only what kdbench.stacking allows is stacked: methods with losses only, models of exactly batched layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdbench.method import Batch, Method, Outputs, StepContext, run_model


def _name(path: str) -> str:
    return path.replace(".", "__")  # a registered parameter's name may not contain dots


class _Forward(nn.Module):
    """One seed's forward as run_model runs it (logits, then the asked features), for functional_call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers: list | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = run_model(self.model, x, self.layers)
        return (out.logits, *out.features)


class StackedStudent(nn.Module):
    """The students of S seeds as one module: parameters and buffers (S, ...) that one optimizer steps and one
    checkpoint saves; `run` takes a batch per seed, (S, B, ...). `lanes` are the seeds' own modules, brought up
    to date by `unstack` (for evaluation)."""

    def __init__(self, students: list[nn.Module]):
        super().__init__()
        params, buffers = stack_module_state(students)
        self.paths = (list(params), list(buffers))
        for path, value in params.items():
            self.register_parameter(_name(path), nn.Parameter(value.detach().clone()))
        for path, value in buffers.items():
            self.register_buffer(_name(path), value.clone())
        # Not submodules: their own tensors are not this module's state; the first is the forward's template.
        object.__setattr__(self, "lanes", list(students))
        object.__setattr__(self, "_forward", _Forward(students[0]))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        names, buffers = self.paths
        return ({f"model.{p}": getattr(self, _name(p)) for p in names},
                {f"model.{p}": getattr(self, _name(p)) for p in buffers})

    def run(self, images: torch.Tensor, layers: list | None) -> Outputs:
        """Each seed's student on its own batch: logits (S, B, classes) and features (S, B, ...)."""
        self._forward.layers = layers
        params, buffers = self._state()
        out = vmap(lambda p, b, x: functional_call(self._forward, (p, b), (x,)), randomness="error")(
            params, buffers, images)
        return Outputs(logits=out[0], features=list(out[1:]))

    def train(self, mode: bool = True) -> "StackedStudent":
        super().train(mode)
        for lane in self.lanes:
            lane.train(mode)
        return self

    @torch.no_grad()
    def unstack(self) -> list[nn.Module]:
        """The seeds' own modules with their current parameters and buffers."""
        params, buffers = self._state()
        for path, value in {**params, **buffers}.items():
            for i, lane in enumerate(self.lanes):
                _lane_tensor(lane, path.removeprefix("model.")).copy_(value[i])
        return self.lanes


def _lane_tensor(model: nn.Module, path: str) -> torch.Tensor:
    module, _, name = path.rpartition(".")
    return getattr(model.get_submodule(module), name)


class StackedMethod(Method):
    """The methods of S seeds, one per seed (each with its own modules: a FitNets regressor), stepped together:
    one teacher forward over all seeds' batches, one stacked student forward, each seed's losses by its own method,
    one update of their sum. Engine machinery: a method never sees it."""

    def __init__(self, lanes: list[Method], seeds: list[int]):
        nn.Module.__init__(self)
        self.lanes = nn.ModuleList(lanes)
        self.seeds = list(seeds)
        self.name = lanes[0].name
        self.params = lanes[0].params
        self.record = {}
        self.teacher_logits_only = lanes[0].teacher_logits_only

    def start_epoch(self, epoch: int, epochs: int, ctx: StepContext) -> None:
        for lane in self.lanes:
            lane.start_epoch(epoch, epochs, ctx)

    def resumed(self, ctx: StepContext) -> None:
        for lane in self.lanes:
            lane.resumed(ctx)

    def extra_state(self) -> dict[str, Any]:
        return {"lanes": [lane.extra_state() for lane in self.lanes]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for lane, own in zip(self.lanes, state["lanes"]):
            lane.load_extra_state(own)

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One step of every seed; returns each loss term as (S,): each seed's value."""
        first = self.lanes[0]
        with ctx.autocast():
            teacher = self._teacher(batch, ctx, first.teacher_features)
            student = ctx.student.run(batch.images, first.student_features)
            ctx.passes.student_forward += 1
            terms = [lane.losses(Batch(batch.images[i], batch.labels[i], batch.epoch, batch.epochs, None,
                                       step=batch.step), _lane(student, i), _lane(teacher, i))
                     for i, lane in enumerate(self.lanes)]
        ctx.update("student", sum(sum(t.values()) for t in terms))
        return {k: torch.stack([t[k] for t in terms]).detach() for k in terms[0]}

    @staticmethod
    def _teacher(batch: Batch, ctx: StepContext, layers: list | None) -> Outputs | None:
        """The frozen teacher on every seed's batch in one forward (or its shared outputs), split by seed."""
        if batch.teacher_logits is not None:
            return Outputs(logits=batch.teacher_logits)
        if ctx.teacher is None:
            return None
        seeds, size = batch.images.shape[:2]
        with torch.no_grad():
            out = run_model(ctx.teacher, batch.images.flatten(0, 1), layers)
        ctx.passes.teacher_forward += 1
        return Outputs(out.logits.unflatten(0, (seeds, size)), [f.unflatten(0, (seeds, size)) for f in out.features])


def _lane(outputs: Outputs | None, i: int) -> Outputs | None:
    return None if outputs is None else Outputs(outputs.logits[i], [f[i] for f in outputs.features])
