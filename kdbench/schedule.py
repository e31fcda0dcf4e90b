"""Epoch counts moved between schedules (--epochs), and which epochs keep a route checkpoint.
"""

from __future__ import annotations
from typing import Any


def scale_epochs(value: int, old: int, new: int) -> int:
    """An epoch count on a schedule of `old` epochs, moved to one of `new` (as milestones are): at least 1 if it was."""
    scaled = round(value * new / old) if old else value
    return max(1, scaled) if value >= 1 else scaled


def scale_epoch_params(method, params: dict[str, Any], old: int, new: int, teacher_old: int, teacher_new: int,
                       route: list[int]) -> dict[str, Any]:
    """A method's epoch-counted params for a schedule shrunk by --epochs from `old` to `new` epochs (its
    `epoch_params`) and a teachers' run shrunk from `teacher_old` to `teacher_new` (its `teacher_epoch_params`:
    moved to the nearest of the teacher's `route` epochs, ties to the earlier; 0, the final teacher, stays)."""
    out = dict(params)
    for name in method.epoch_params:
        if isinstance(out.get(name), (int, float)) and not isinstance(out[name], bool):
            out[name] = type(out[name])(scale_epochs(out[name], old, new))
    for name in method.teacher_epoch_params:
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and route:
            scaled = scale_epochs(value, teacher_old, teacher_new)
            out[name] = min(route, key=lambda e: (abs(e - scaled), e))
    return out


ROUTE_CHECKPOINTS = 24  # at most this many route checkpoints by default


def default_route_every(epochs: int) -> int:
    """The smallest divisor of `epochs` that keeps at most 24 route checkpoints (240 epochs: every 10): `epochs`
    over its largest divisor up to 24 (a prime number of epochs over 24: only the last)."""
    if not epochs:
        return 1
    return epochs // max(q for q in range(1, ROUTE_CHECKPOINTS + 1) if epochs % q == 0)
