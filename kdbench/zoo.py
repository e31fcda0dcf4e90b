"""Models by timm name: kdbench's CIFAR and MNIST networks are registered into timm, so any name works."""

from __future__ import annotations

import fnmatch
import inspect
import json
import types
import typing
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


def meta_model(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The model on the meta device (shapes, no memory, no weights), built once per process: for planning."""
    return _meta_model(name, num_classes, in_chans, json.dumps(kwargs, sort_keys=True, default=str))


@lru_cache(maxsize=None)
def _meta_model(name: str, num_classes: int, in_chans: int, kwargs: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes, in_chans, **json.loads(kwargs)).eval()


@lru_cache(maxsize=None)
def _model_stats(name: str, num_classes: int, input_shape: tuple[int, int, int], kwargs: str) -> ModelStats:
    model = _meta_model(name, num_classes, input_shape[0], kwargs)
    with torch.device("meta"):
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, *input_shape))
    return ModelStats(name, params, counter.get_total_flops() // 2)


def _kinds(hint: Any) -> tuple | None:
    """The runtime classes a constructor annotation admits (None: anything, or not understood)."""
    if hint is Any:
        return None
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = []
    for a in args:
        a = typing.get_origin(a) or a
        if not isinstance(a, type):
            return None
        kinds.append(a)
    return tuple(kinds)


def _kind_ok(value: Any, kinds: tuple) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and (int in kinds or float in kinds):
        return True
    if isinstance(value, str):
        return str in kinds
    if isinstance(value, list):  # YAML has lists where constructors say tuple or Sequence
        return any(k in (list, tuple) or issubclass(list, k) for k in kinds)
    return isinstance(value, kinds)


def model_kwargs_problem(name: str, num_classes: int, input_shape: tuple[int, int, int],
                         kwargs: dict[str, Any]) -> str | None:
    """Why `name` cannot be built with `kwargs` (an unknown keyword, a value of the wrong kind); None if it can.

    Built on the meta device and run once, as for its statistics; a keyword the constructor declares with a
    default must be given a value of the default's kind (timm would take drop_rate: true as 1.0).
    """
    if not kwargs:
        return None
    return _kwargs_problem(name, num_classes, tuple(input_shape), json.dumps(kwargs, sort_keys=True, default=str))


@lru_cache(maxsize=None)
def _kwargs_problem(name: str, num_classes: int, input_shape: tuple[int, int, int], kwargs_json: str) -> str | None:
    kwargs = json.loads(kwargs_json)
    try:
        model = _meta_model(name, num_classes, input_shape[0], kwargs_json)
        model_stats(name, num_classes, input_shape, tuple(sorted(kwargs.items())))
    except Exception as exc:  # noqa: BLE001 (any constructor error is the suite's: say it in one line)
        text = " ".join(str(exc).split()) or type(exc).__name__
        return f"{name} cannot be built with {kwargs}: {text}"
    # A keyword the constructor declares must get a value of its annotated kind (or its default's): timm
    # would take drop_rate: true as 1.0. Keywords it does not declare went to timm and were accepted.
    init = type(model).__init__
    params = inspect.signature(init).parameters
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 (an annotation we cannot resolve: fall back to the defaults' kinds)
        hints = {}
    for key, value in kwargs.items():
        if key not in params:
            continue
        default = params[key].default
        kinds = _kinds(hints[key]) if key in hints else (
            None if default in (None, inspect.Parameter.empty) else (type(default),))
        if kinds is not None and value is not None and not _kind_ok(value, kinds):
            names = " or ".join(k.__name__ for k in kinds if k is not type(None))
            return f"{key}: expected {names} (as {type(model).__name__} declares it), got {value!r}"
    return None


def matching_models(patterns: list[str], names: list[str]) -> list[str]:
    """The names matching each pattern (a suite's teachers or students), sorted per pattern, each once."""
    out: list[str] = []
    for pattern in patterns:
        out += [n for n in sorted(fnmatch.filter(names, pattern)) if n not in out]
    return out


def models_between(models: dict[str, ModelStats], teacher: str, student: str, limit: int) -> tuple[str, ...]:
    """The suite's models strictly between teacher and student in parameters, largest first (`Needs.assistants`
    ("between",)); with more than `limit` (> 0), `limit` of them spread evenly over that order."""
    low, high = models[student].params, models[teacher].params
    found = sorted((m for m in models if low < models[m].params < high), key=lambda m: (-models[m].params, m))
    if limit and len(found) > limit:
        n = len(found)
        found = [found[round((i + 1) * (n + 1) / (limit + 1)) - 1] for i in range(limit)]
    return tuple(found)
