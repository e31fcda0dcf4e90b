"""Which seeds may train together as one stacked model (kdbench.train.stacked), and why others may not.

A suite with `stack_seeds: true` trains the seeds of a (method, pair) cell as one model whose parameters carry a
leading seed dimension. That gives each seed's numbers within float32 round-off of its own job only where every
seed's step is the same function of its own parameters and data: a method that only computes losses (no step,
stage or draw of its own), and a model of layers whose batched form is exact and that draws nothing at random.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Layers that vmap runs exactly as a seed's own (grouped convolutions, batched matmuls, per-seed statistics).
STACKABLE_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def model_problem(model: nn.Module) -> str | None:
    """Why this model's seeds cannot train stacked; None when they can. (Built on the meta device is enough.)"""
    if getattr(model, "max_norm", None):
        return "its max-norm constraint is applied to one model's weights"
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        leaf = not list(module.children())
        if (leaf or own) and not isinstance(module, STACKABLE_LAYERS):
            return f"its layer {name or type(model).__name__} ({type(module).__name__}) is not one kdbench stacks"
        if isinstance(module, nn.Dropout) and module.p > 0:
            return "dropout draws its masks from one generator shared by the seeds"
    return None


def entry_problem(method: Any, params: dict[str, Any], needs: Any, entry: Any) -> str | None:
    """Why a method entry's seeds cannot train stacked; None when they can. `method`: its Method class, `needs`
    its Needs for these params, `entry` the suite's MethodEntry."""
    if entry.modify is not None:
        return f"the modifier {entry.modify} changes the method's logits and temperature on its own"
    if entry.combine != "sum":
        return f"combine {entry.combine} projects one model's gradients"
    if method.trains_teacher or needs.teacher not in ("trained", "none") or needs.route or needs.dense \
            or needs.assistants:
        return "it needs a teacher, route, guides or assistants of its own"
    return method.stack_problem(params)
