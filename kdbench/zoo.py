"""Models by timm name: kdbench's CIFAR and MNIST networks are registered into timm, so any name works."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import kdbench.models  # noqa: F401  (registers cifar_* and mnist_* into timm)


@lru_cache(maxsize=1)
def known_models() -> list[str]:
    return timm.list_models()


def create_model(name: str, num_classes: int, in_chans: int, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


@dataclass(frozen=True)
class ModelStats:
    name: str
    params: int
    macs: int  # multiply-accumulates of one forward pass on one image

    @property
    def params_m(self) -> float:
        return self.params / 1e6


def model_stats(name: str, num_classes: int, input_shape: tuple[int, int, int], kwargs: tuple = ()) -> ModelStats:
    """Parameters and MACs, measured on the meta device: no memory, no data, no weights needed."""
    # JSON: kwargs may hold lists (num_filters), which an lru_cache key cannot
    return _model_stats(name, num_classes, tuple(input_shape), json.dumps(dict(kwargs), sort_keys=True, default=str))


@lru_cache(maxsize=None)
def _model_stats(name: str, num_classes: int, input_shape: tuple[int, int, int], kwargs: str) -> ModelStats:
    with torch.device("meta"):
        model = create_model(name, num_classes, input_shape[0], **json.loads(kwargs)).eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, *input_shape))
    return ModelStats(name, params, counter.get_total_flops() // 2)


def _kind_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def model_kwargs_problem(name: str, num_classes: int, input_shape: tuple[int, int, int],
                         kwargs: dict[str, Any]) -> str | None:
    """Why `name` cannot be built with `kwargs` (an unknown keyword, a value of the wrong kind); None if it can.

    Built on the meta device and run once, as for its statistics; a keyword the constructor declares with a
    default must be given a value of the default's kind (timm would take drop_rate: true as 1.0).
    """
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes, input_shape[0], **kwargs)
        model_stats(name, num_classes, input_shape, tuple(sorted(kwargs.items())))
    except Exception as exc:  # noqa: BLE001 (any constructor error is the suite's: say it in one line)
        text = " ".join(str(exc).split()) or type(exc).__name__
        return f"{name} cannot be built with {kwargs}: {text}"
    params = inspect.signature(type(model).__init__).parameters
    for key, value in kwargs.items():
        default = params[key].default if key in params else None
        if default not in (None, inspect.Parameter.empty) and not _kind_ok(value, default):
            return (f"{key}: expected {type(default).__name__} (like its default, {default!r}, in "
                    f"{type(model).__name__}), got {value!r}")
    return None
