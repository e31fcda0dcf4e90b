"""Where a job's batches come from: the device-resident splits (kdbench.data.load), or streamed from disk
(kdbench.data.stream) as the suite's `data.loader` says; shared among devices when one job runs on several.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdbench.data import load
from kdbench.data.batches import DeviceData
from kdbench.data.shard import Shard, shard_data
from kdbench.data.spec import DataSpec
from kdbench.data.stream import StreamData, cached_stream_fingerprint, load_stream


def load_splits(spec: DataSpec, root: Path | None, device: torch.device | str,
                shard: Shard | None = None) -> DeviceData | StreamData:
    """The dataset's splits on `device`; with `shard`, this device's part of every training and test batch."""
    if spec.loader == "stream":
        return load_stream(spec, root, device, shard)
    data = load.load_data(spec, root, device)
    return shard_data(data, shard) if shard is not None else data


def cached_fingerprint(spec: DataSpec, root: Path | None) -> str | None:
    """The data's fingerprint where it is known without reading the data (dry runs); None otherwise."""
    if spec.loader == "stream":
        return cached_stream_fingerprint(spec, root)
    return load.cached_fingerprint(spec, root)


def data_fingerprint(spec: DataSpec, root: Path | None) -> str | None:
    """The data's fingerprint: cached, or found by reading the data (None for generated data)."""
    if spec.loader == "stream":
        return load_stream(spec, root, "cpu", workers=0).fingerprint
    return load.data_fingerprint(spec, root)
