"""What a job's key holds besides its own model, seed, method and schedule: the store version, the data and
its fingerprint, the augmentation, the torch runtime, and how the entry combines and modifies its losses.

Every field here enters the content hash of the jobs it applies to (kdbench.plan); a field left at its default
stays out of the key, so the keys of committed stores stay valid when one is added.
"""

from __future__ import annotations

from typing import Any

from kdbench.config.schema import MethodEntry, Suite
from kdbench.data.spec import keyed_data_fields
from kdbench.registry import get_modifier, modifier_hash
from kdbench.runtime import runtime_config
from kdbench.schedule import scale_epoch_params

STORE_VERSION = 2  # bump when a change to the engine changes what a given config trains to
# 2: channels_last on CPU too (other convolution kernels, so other last bits)


def base_config(suite: Suite, data_fingerprint: str | None = None,
                runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    data = keyed_data_fields(suite.data.model_dump())  # the streaming loader's fields only where they are set
    if not data["val_size"]:  # no validation split trains on what suites before val_size trained on: same keys
        del data["val_size"]
    config = {"store_version": STORE_VERSION, "data": data, "augment": suite.augment.model_dump(),
              "runtime": runtime or runtime_config()}
    if data_fingerprint is not None:  # data read from disk: its content, not only its name (see data.py)
        config["data_fingerprint"] = data_fingerprint
    return config


def combine_config(entry: MethodEntry) -> dict[str, str]:
    """How the entry combines its loss terms, for a job's hash: absent when summed, so existing keys stay valid."""
    return {"combine": entry.combine} if entry.combine != "sum" else {}


def modify_config(entry: MethodEntry, suite_epochs: int, epochs: int) -> dict[str, Any]:
    """The entry's modifier for a job's hash: its name, every param (defaults filled in; its epoch counts scaled
    from the suite's schedule to the job's, as a method's) and its code's hash (a `method_hash`: left out of the
    job's identity, like the method's). Absent without a modifier, so existing keys stay valid."""
    if entry.modify is None:
        return {}
    modifier = get_modifier(entry.modify)
    params = scale_epoch_params(modifier, {**modifier.defaults, **entry.modify_params}, suite_epochs, epochs, 0, 0, [])
    return {"modify": {"name": entry.modify, "params": params, "method_hash": modifier_hash(entry.modify)}}
