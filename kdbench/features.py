"""Feature-map helpers shared by the feature-based methods (FitNets, DFA, attention over teacher layers): a
model's feature shapes found by a probe forward, and the CRD benchmark's regressor from one feature shape to
another (FitNets' hint regressor; DFA's per stage)."""

from math import prod

import torch
from torch import nn

from kdbench.method import run_model


def layer_name(model: nn.Module, layer) -> str:
    """A stage index or module name (see `kdbench.method.resolve_layer`) as the module's name."""
    return model.feature_info[layer]["module"] if isinstance(layer, int) else layer


@torch.no_grad()
def feature_shapes(model: nn.Module, layers: list, input_shape) -> list[tuple[int, ...]]:
    """The shapes of `layers`' outputs (stage indices or module names) for a batch of 2, by a probe forward."""
    was_training = model.training
    model.eval()  # a probe must not move BatchNorm statistics
    device = next(model.parameters()).device
    out = run_model(model, torch.zeros(2, *input_shape, device=device), list(layers))
    model.train(was_training)
    return [tuple(f.shape) for f in out.features]


def feature_shape(model: nn.Module, layer, input_shape) -> tuple[int, ...]:
    return feature_shapes(model, [layer], input_shape)[0]


def make_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """The CRD benchmark's regressor: student map -> teacher map, with BatchNorm and ReLU; channels = the hint's."""
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        (_, sc, sh, sw), (_, tc, th, tw) = student_shape, teacher_shape
        if sh == 2 * th:
            conv = nn.Conv2d(sc, tc, kernel_size=3, stride=2, padding=1)
        elif 2 * sh == th:
            conv = nn.ConvTranspose2d(sc, tc, kernel_size=4, stride=2, padding=1)
        elif sh >= th:  # a kernel that maps the spatial size: sh - k + 1 = th
            conv = nn.Conv2d(sc, tc, kernel_size=(1 + sh - th, 1 + sw - tw))
        else:  # smaller and not half: the transposed conv that maps it, sh + k - 1 = th
            conv = nn.ConvTranspose2d(sc, tc, kernel_size=(1 + th - sh, 1 + tw - sw))
        return nn.Sequential(conv, nn.BatchNorm2d(tc), nn.ReLU())
    # vectors (MLP stages), or a map on one side only: flatten, a linear map, back to the hint's shape
    out = prod(teacher_shape[1:])
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(student_shape[1:]), out), nn.BatchNorm1d(out), nn.ReLU(),
                         nn.Unflatten(1, teacher_shape[1:]))
