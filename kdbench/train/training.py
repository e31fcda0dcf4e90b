"""What trains and what a checkpoint holds: the models with their optimisers and learning-rate schedule, the
update a method applies through `ctx.update`, an epoch's running loss totals, and each seed's history.
Used by the training loop in kdbench.train.engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kdbench.config.schema import TrainConfig
from kdbench.method import Method, PassCounts
from kdbench.train.combine import PCGrad


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


@dataclass
class EpochTotals:
    """An epoch's loss terms summed on the device (no host sync per step), and its steps and images so far."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    images: int = 0

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0) + value.float()
        self.steps += 1
        self.images += images

    def means(self, lane: int | None = None) -> dict[str, float]:
        """The mean of each term; of one stacked seed's (`lane`), whose terms are (seeds,)."""
        return {f"train_{k}": (v / self.steps if lane is None else v[lane] / self.steps).item()
                for k, v in self.terms.items()}

    @classmethod
    def restored(cls, state: dict[str, Any], device: torch.device) -> "EpochTotals":
        return cls({k: v.to(device) for k, v in state["totals"].items()}, state["steps"], state["images_seen"])


class Training:
    """The models that train (the student with the method's modules; the teacher when the method trains it),
    their optimisers, the update a method applies through `ctx.update`, and the run's history and pass
    counts: all that a checkpoint saves and a resumed run restores, with the method's state and the RNGs."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, method: Method, train: TrainConfig,
                 seed: int, combine: str, device: torch.device, lanes: int = 1):
        self.models = {"student": student}
        self.params = {"student": list(student.parameters()) + list(method.parameters())}
        if teacher is not None and method.trains_teacher:
            self.models["teacher"] = teacher
            self.params["teacher"] = list(teacher.parameters())
        self.optimizers = {k: make_optimizer(p, train) for k, p in self.params.items()}
        self.combiner = PCGrad(seed) if combine == "pcgrad" else None
        self.method, self.train, self.device = method, train, device
        self.passes = PassCounts()
        self.histories: list[list[dict[str, float]]] = [[] for _ in range(lanes)]  # one per stacked seed
        self.history = self.histories[0]
        self.diverged = [""] * lanes  # a stacked seed that diverged: why; it is no longer evaluated or logged

    def start_epoch(self, epoch: int) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = self.train.lr * lr_factor(self.train, epoch)
        self.models["student"].train()
        self.method.train()
        if "teacher" in self.models:
            self.models["teacher"].train()

    @property
    def lr(self) -> float:
        return self.optimizers["student"].param_groups[0]["lr"]

    def update(self, epoch: int, step: int, which: str, loss: torch.Tensor | dict[str, torch.Tensor],
               clip_grad_norm: float | None = None) -> None:
        """`ctx.update` of step `step` of 0-based `epoch` (fit binds both): PCGrad draws the projection order of a
        step from (seed, epoch, step), so a resumed run draws the same orders."""
        opt = self.optimizers[which]
        opt.zero_grad(set_to_none=True)
        backwards = 1
        if self.combiner is not None and which == "student" and isinstance(loss, dict):
            backwards = self.combiner.backward(loss, self.params[which], epoch, step)
        else:
            (sum(loss.values()) if isinstance(loss, dict) else loss).backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params[which], clip_grad_norm)
        opt.step()
        setattr(self.passes, f"{which}_backward", getattr(self.passes, f"{which}_backward") + backwards)
        model = self.models[which]
        if getattr(model, "max_norm", None):  # Hinton 2012's max-norm constraint, where the model asks for it
            model.apply_max_norm_(model.max_norm)

    def epoch_metrics(self) -> dict[str, float]:
        return self.combiner.epoch_metrics() if self.combiner is not None else {}  # PCGrad: conflicts, cosines

    def state_dict(self, epoch: int, batch: int, totals: EpochTotals) -> dict[str, Any]:
        """The state of a run about to do step `batch` of 0-based `epoch`, with that epoch's totals so far."""
        return {"epoch": epoch, "batch": batch, "steps": totals.steps, "images_seen": totals.images,
                "totals": {k: v.detach().clone() for k, v in totals.terms.items()},
                "models": {k: m.state_dict() for k, m in self.models.items()},
                "method": self.method.state_dict(), "method_extra": self.method.extra_state(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "history": list(self.history), "passes": asdict(self.passes), "cpu_rng": torch.get_rng_state(),
                "histories": [list(h) for h in self.histories], "diverged": list(self.diverged),
                "combine": self.combiner.state_dict() if self.combiner is not None else None,
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, sd in state["models"].items():
            self.models[k].load_state_dict(plain_state_dict(sd))
        self.method.load_state_dict(state["method"])
        self.method.load_extra_state(state["method_extra"])
        for k, sd in state["optimizers"].items():
            self.optimizers[k].load_state_dict(sd)
        self.history[:] = state["history"]
        for history, saved in zip(self.histories[1:], state.get("histories", [])[1:]):
            history[:] = saved
        self.diverged[:] = state.get("diverged", self.diverged)
        self.passes.__dict__.update(state["passes"])
        if self.combiner is not None and state.get("combine"):
            self.combiner.load_state_dict(state["combine"])
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
