"""One job on several devices: each device's part of every batch.

Every process of a data-parallel job draws the same epoch (the same permutation and the same crops and flips,
from generators seeded by (seed, epoch), as one device would) and takes its own contiguous slice of each
batch: the batch of one device is cut into `world` parts, so the images a step sees are the same whatever
the number of devices. The slices of a batch differ in size by at most one image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch

from kdbench.data.batches import DeviceData, Split, Views, apply_views, epoch_views


@dataclass(frozen=True)
class Shard:
    """This process's part of every batch: the `rank`-th of `world` contiguous slices."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of the {self.world} devices")

    def part(self, n: int) -> slice:
        """This device's slice of a batch of `n` images (the first n % world devices get one image more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def slice_views(views: Views | None, part: slice) -> Views | None:
    return None if views is None else Views(views.top[part], views.left[part], views.flip[part])


def shard_problem(n: int, batch_size: int, world: int) -> str | None:
    """Why `n` training images in batches of `batch_size` cannot be shared by `world` devices; None if they can.

    Every full batch must split evenly (one per-device batch size, and the gradient is then exactly the one
    device's mean), and no device may be left without an image in the epoch's last, partial batch."""
    if batch_size % world:
        return (f"train.batch_size {batch_size} does not split evenly over {world} devices (the batch is the "
                f"global batch: choose a multiple of {world})")
    last = n % batch_size
    if 0 < last < world:
        return (f"the epoch's last batch holds {last} of the {n} training images, fewer than the {world} devices; "
                f"change train_size or batch_size so that it holds none or at least {world}")
    return None


class ShardedSplit:
    """A device-resident split of which this process trains on, and evaluates, its part of every batch.

    `len()` is the whole split's: accuracies are divided by it once the devices' sums are added up."""

    def __init__(self, split: Split, shard: Shard):
        self.split = split
        self.shard = shard

    def __len__(self) -> int:
        return len(self.split)

    def epoch_batches(self, batch_size: int, order_gen: torch.Generator, aug_gen: torch.Generator | None,
                      padding: int, flip: bool, drop_last: bool = False, with_views: bool = False,
                      start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """As kdbench.data.batches.epoch_batches draws the epoch, then this device's slice of each batch."""
        split = self.split
        for step, (idx, views) in enumerate(epoch_views(len(split), batch_size, order_gen, aug_gen, padding, flip,
                                                        drop_last)):
            if step < start:
                continue
            part = self.shard.part(len(idx))
            idx, views = idx[part], slice_views(views, part)
            images = apply_views(split.images.index_select(0, idx), views, padding)
            labels = split.labels.index_select(0, idx)
            yield (images, labels, idx, views) if with_views else (images, labels)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This device's slice of each evaluation batch, in order; a device with nothing in a batch skips it."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self.split)
        for start in range(0, n, batch_size):
            part = self.shard.part(min(batch_size, n - start))
            if part.start == part.stop:
                continue
            lo, hi = start + part.start, start + part.stop
            yield self.split.images[lo:hi], self.split.labels[lo:hi]

    def eval_labels(self, batch_size: int) -> torch.Tensor:
        return torch.cat([labels for _, labels in self.eval_batches(batch_size)])  # views: no images copied


def shard_data(data: DeviceData, shard: Shard) -> DeviceData:
    """`data` with its training and test splits shared among the devices. The validation split stays whole on
    every device: methods choose on it (RCO's anchors, DFA's search), and every device must choose alike."""
    return replace(data, train=ShardedSplit(data.train, shard), test=ShardedSplit(data.test, shard))
