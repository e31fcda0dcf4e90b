"""The modifier contract: a change to how any logit method sees its logits or its temperature, not a loss of
its own. A suite entry `{method: kd, modify: logit_std}` (labelled `kd+logit_std`) trains KD with it.

A modifier is a `Modifier` subclass in a methods folder (the registry finds it beside the methods). It may
- transform the logits the method's logit losses see (`changes_logits`, `logits()`: applied to the student's
  and the teacher's alike; the method's other terms, its cross-entropy on the labels, still see the raw ones);
- replace the method's temperature parameter with a value of its own, a tensor that may carry gradients
  (`changes_temperature`, `temperature()`);
- rewrite the method's logit terms once computed (`changes_terms`, `terms()`: a reduction, a weight);
- hold trainable parameters (optimised with the student) and buffers (checkpointed with the method).

A method can be modified when it declares logit losses: `logit_terms = ("kd",)` names the terms a modifier
changes; a method that reads only the frozen teacher's logits (`teacher_logits_only`) without declaring them
has every term but `ce` changed. A temperature modifier also needs the method's temperature parameter:
`temperature_param = "T"` where declared, else the method's `T`, else its `tau`. Anything else is refused when
the suite loads. This module is not part of any method's code hash (kdbench.registry.method_hash): a job with a
modifier carries the modifier's own hash, of its file and of this module.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from kdbench import KdbenchError
from kdbench.method import Batch, Method, Outputs

LABEL_TERM = "ce"  # the cross-entropy on the labels, in every built-in method: never changed by a modifier
TEMPERATURE_PARAMS = ("T", "tau")  # a method's temperature, when it does not declare `temperature_param`
ATTRIBUTE = "modifier"  # where a modified method holds its modifier (its state_dict keys start with it)


class Modifier(nn.Module):
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `kdbench methods`
    defaults: ClassVar[dict[str, Any]] = {}  # every hyper-parameter with its default; all enter the job's hash
    param_types: ClassVar[dict[str, tuple[type, ...]]] = {}  # types a param may take beyond its default's
    changes_logits: ClassVar[bool] = False  # True: logits() transforms what the method's logit losses see
    changes_temperature: ClassVar[bool] = False  # True: temperature() replaces the method's temperature
    changes_terms: ClassVar[bool] = False  # True: terms() rewrites the method's logit terms after losses()
    # Params that count epochs of the job's schedule: scaled by `kdbench run --epochs` as a method's are.
    epoch_params: ClassVar[tuple[str, ...]] = ()
    teacher_epoch_params: ClassVar[tuple[str, ...]] = ()  # (none: a modifier never names a teacher's epoch)

    def __init__(self, params: dict[str, Any]):
        super().__init__()
        self.params = {**self.defaults, **params}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> str | None:
        """A reason why these params (defaults filled in) cannot work, found when the suite loads; None if fine."""
        return None

    @classmethod
    def check_method(cls, method: type[Method], params: dict[str, Any]) -> str | None:
        """A reason why this method (with these params, defaults filled in) cannot be modified; None if it can."""
        if not logit_losses(method):
            return ("it declares no logit losses (a method declares them with `logit_terms`, or with "
                    "`teacher_logits_only` when every term but 'ce' compares logits)")
        if cls.changes_temperature and temperature_param(method) is None:
            return f"it has no temperature parameter ({' or '.join(TEMPERATURE_PARAMS)}; or declare `temperature_param`)"
        return None

    def logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What the method's logit losses see instead of `logits` (a student's or a teacher's)."""
        return logits

    def temperature(self, base: Any, batch: Batch) -> Any:
        """The temperature the method uses this step instead of its parameter's value `base`."""
        return base

    def terms(self, terms: dict[str, torch.Tensor], student: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        """The method's logit terms (only those a modifier changes) as the update uses them."""
        return terms

    def epoch_metrics(self) -> dict[str, float]:
        """Numbers logged at the end of each epoch beside the method's (read parameters here, not every step)."""
        return {}


def logit_losses(method: type[Method]) -> bool:
    return getattr(method, "logit_terms", None) is not None or (method.teacher_logits_only
                                                                and not method.trains_teacher)


def changed_term(method: type[Method], term: str) -> bool:
    """Whether a modifier changes this term of the method's losses()."""
    declared = getattr(method, "logit_terms", None)
    return term in declared if declared is not None else term != LABEL_TERM


def temperature_param(method: type[Method]) -> str | None:
    declared = getattr(method, "temperature_param", None)
    if declared is not None:
        return declared
    return next((k for k in TEMPERATURE_PARAMS if isinstance(method.defaults.get(k), (int, float))), None)


def check_modifier(modifier: type[Modifier], params: dict[str, Any], method: type[Method],
                   method_params: dict[str, Any]) -> str | None:
    """Why this modifier with these params cannot modify this method; None if it can. One line."""
    for key, value in params.items():
        if key not in modifier.defaults:
            known = ", ".join(modifier.defaults) or "none"
            return f"modifier '{modifier.name}' has no parameter '{key}' (known: {known})"
        expected = modifier.param_types.get(key, (type(modifier.defaults[key]),))
        number = float in expected and isinstance(value, int) and not isinstance(value, bool)
        if (not isinstance(value, expected) and not number) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join(t.__name__ for t in expected)
            return f"modifier '{modifier.name}': {key}: expected {names}, got {value!r}"
    problem = modifier.check_params({**modifier.defaults, **params})
    if problem:
        return f"modifier '{modifier.name}': {problem}"
    problem = modifier.check_method(method, method_params)
    return f"modifier '{modifier.name}' cannot modify method '{method.name}': {problem}" if problem else None


def modify(method: Method, modifier: Modifier) -> Method:
    """`method` with `modifier` applied to its logit losses, in place. The modifier becomes a submodule (its
    parameters train with the student's optimiser, its state is in the method's checkpoint); losses() and
    epoch_metrics() are wrapped on the instance, so a method's own step() calling self.losses() sees them."""
    if hasattr(method, ATTRIBUTE):
        raise KdbenchError(f"method '{method.name}' already has an attribute '{ATTRIBUTE}': it cannot be modified")
    method.add_module(ATTRIBUTE, modifier)
    plain_losses, plain_metrics = method.losses, method.epoch_metrics

    def losses(batch: Batch, student: Outputs, teacher: Outputs | None) -> dict[str, torch.Tensor]:
        return modified_losses(method, modifier, plain_losses, batch, student, teacher)

    method.losses = losses
    method.epoch_metrics = lambda: {**plain_metrics(), **modifier.epoch_metrics()}
    return method


def modified_losses(method: Method, modifier: Modifier, losses: Callable[..., dict[str, torch.Tensor]],
                    batch: Batch, student: Outputs, teacher: Outputs | None) -> dict[str, torch.Tensor]:
    """The method's terms with the modifier's temperature in its params and, for the changed terms, the
    modifier's logits. A logit modifier calls losses() twice (raw, then modified logits) and keeps each term
    from the call it belongs to: a method with side effects in losses() would see both calls."""
    params = method.params
    if modifier.changes_temperature:
        key = temperature_param(type(method))
        method.params = {**params, key: modifier.temperature(params[key], batch)}
    try:
        terms = losses(batch, student, teacher)
        if modifier.changes_logits:
            seen = losses(batch, replace(student, logits=modifier.logits(student.logits, batch)),
                          replace(teacher, logits=modifier.logits(teacher.logits, batch)))
            terms = {k: seen[k] if changed_term(type(method), k) else v for k, v in terms.items()}
    finally:
        method.params = params
    if modifier.changes_terms:
        terms.update(modifier.terms({k: v for k, v in terms.items() if changed_term(type(method), k)}, student, batch))
    return terms
