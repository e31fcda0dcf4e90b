"""Shared teacher outputs: a frozen teacher's logits per (training image, augmented view), computed once.

A method that reads only the teacher's logits (``Method.teacher_logits_only``) needs, for each batch,
the teacher's logits on exactly the augmented images the student sees. CIFAR's crop-and-flip has
only ``num_views(4, True) == 162`` views of an image, while a 240-epoch run draws 240 of them per
image and a cell of 5 methods x 3 seeds draws 3,600: most teacher forwards recompute a number
already computed. This cache computes each (image, view) once and hands the stored logits back.

Exactness: the logits are computed by the same code as the engine's own teacher forward (same
normalisation, memory format, autocast, eval mode, ``no_grad``), stored in the dtype the forward
returns (bfloat16 under the GPU's autocast, float32 on CPU: no rounding on the way in or out), in
chunks of the job's batch size, so a full batch gets the numbers a fresh forward of that batch gives.
(A backend may pick another kernel for another batch size, e.g. a partial last batch; on CPU we saw
that only for batches of one image, and then in the last bits.)

Memory: an int32 slot per (image, view), plus one row of logits per view actually drawn, so the
cache grows with use: at most 50,000 x 162 x 100 logits for CIFAR-100 (1.6 GB in bfloat16 on a GPU,
3.2 GB in float32 on CPU), and after one 240-epoch run about 77% of that.

Filling happens once per epoch, before it starts: :meth:`fill` replays the epoch's draws (the same
generators, seeded by (seed, epoch)), finds the views never computed (the epoch's only extra host
sync) and runs the teacher on them; :meth:`lookup` during the epoch is a pure gather.

The teacher's outputs on the evaluation splits (test, validation), which a student's agreement with its teacher
is measured against, are kept here too (:meth:`eval_outputs`): computed once for all the jobs that share them.
"""

from __future__ import annotations

from typing import ContextManager, Iterable, Protocol

import torch
from torch import nn

from kdbench.data.spec import DatasetInfo
from kdbench.data.batches import Split, Views, apply_views, eval_batches, normalize, num_views, view_ids, views_from_ids


class ForwardOptions(Protocol):
    """What the cache needs of the engine's options (kdbench.engine.EngineOptions), named here so the cache
    does not import the engine that imports it."""

    channels_last: bool

    def autocast(self) -> ContextManager: ...


@torch.no_grad()
def split_logits(model: nn.Module, split: Split, info: DatasetInfo, opts: ForwardOptions,
                 batch_size: int) -> torch.Tensor:
    """A model's logits on a whole split, in order, in eval mode and the engine's evaluation precision."""
    was_training = model.training
    model.eval()
    chunks = []
    for images, _ in eval_batches(split, batch_size):  # as evaluate reads it (on several devices: this one's part)
        images = normalize(images, info, channels_last=opts.channels_last)
        with opts.autocast():
            chunks.append(model(images).float())
    model.train(was_training)
    return torch.cat(chunks)


class TeacherCache:
    def __init__(self, teacher: nn.Module, split: Split, info: DatasetInfo, padding: int, flip: bool,
                 opts: ForwardOptions):
        self.teacher = teacher
        self.split = split
        self.info = info
        self.padding = padding
        self.flip = flip
        self.opts = opts
        self.num_views = num_views(padding, flip)
        device = split.images.device
        self.slot = torch.full((len(split), self.num_views), -1, dtype=torch.int32, device=device)
        self.values: torch.Tensor | None = None  # (capacity, classes), rows [0, size) filled
        self.size = 0
        self._capacity = 0
        self.images_computed = 0  # teacher forwards, counted in images
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a split's images, the teacher's logits on them)

    @torch.no_grad()
    def fill(self, drawn: Iterable[tuple[torch.Tensor, Views | None]], batch_size: int) -> int:
        """Compute the logits of every (image, view) in ``drawn`` not yet cached; returns the teacher forwards run."""
        drawn = list(drawn)
        if not drawn:
            return 0
        device = self.slot.device
        idx = torch.cat([i for i, _ in drawn])
        vid = torch.cat([view_ids(v, len(i), self.padding, self.flip, device) for i, v in drawn])
        keys = idx * self.num_views + vid
        missing = torch.unique(keys[self.slot.view(-1)[keys] < 0])  # the fill's one host sync
        n = int(missing.numel())
        if n == 0:
            return 0
        self._reserve(n)
        was_training = self.teacher.training
        self.teacher.eval()
        calls = 0
        for start in range(0, n, batch_size):
            chunk = missing[start : start + batch_size]
            images = self.split.images.index_select(0, chunk // self.num_views)
            views = views_from_ids(chunk % self.num_views, self.padding, self.flip)
            images = normalize(apply_views(images, views if self.num_views > 1 else None, self.padding), self.info,
                               channels_last=self.opts.channels_last)
            with self.opts.autocast():  # as the engine's own teacher forward: same precision, same numbers
                logits = self.teacher(images)
            if self.values is None:
                self.values = logits.new_empty((self._capacity, logits.shape[1]))
            self.values[self.size + start : self.size + start + len(chunk)] = logits
            calls += 1
        rows = torch.arange(self.size, self.size + n, dtype=torch.int32, device=device)
        self.slot.view(-1)[missing] = rows
        self.size += n
        self.images_computed += n
        self.teacher.train(was_training)
        return calls

    def eval_outputs(self, split: Split, batch_size: int) -> torch.Tensor:
        """The teacher's logits on an evaluation split (test, validation), computed on first use and kept."""
        for images, logits in self._eval:
            if images is split.images:
                return logits
        logits = split_logits(self.teacher, split, self.info, self.opts, batch_size)
        self._eval.append((split.images, logits))
        return logits

    def serves(self, split: Split, padding: int, flip: bool) -> bool:
        return split.images is self.split.images and (padding, flip) == (self.padding, self.flip)

    def lookup(self, idx: torch.Tensor, views: Views | None) -> torch.Tensor:
        """The cached logits of a batch (every view must have been filled): a gather, no host sync."""
        vid = view_ids(views, len(idx), self.padding, self.flip, self.slot.device)
        return self.values.index_select(0, self.slot[idx, vid].long())

    @property
    def nbytes(self) -> int:
        values = 0 if self.values is None else self.size * self.values.shape[1] * self.values.element_size()
        return self.slot.numel() * self.slot.element_size() + values

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more rows; grows geometrically (bounded by every view of every image)."""
        need = self.size + n
        if need <= self._capacity:
            return
        self._capacity = min(max(need, 2 * self._capacity), self.slot.numel())
        if self.values is not None:
            grown = self.values.new_empty((self._capacity, self.values.shape[1]))
            grown[: self.size] = self.values[: self.size]
            self.values = grown
