"""Models by timm name: kdbench's CIFAR and MNIST networks are registered into timm, so any name works."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=None)
def model_stats(name: str, num_classes: int, input_shape: tuple[int, int, int], kwargs: tuple = ()) -> ModelStats:
    """Parameters and MACs, measured on the meta device: no memory, no data, no weights needed."""
    with torch.device("meta"):
        model = create_model(name, num_classes, input_shape[0], **dict(kwargs)).eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, *input_shape))
    return ModelStats(name, params, counter.get_total_flops() // 2)
