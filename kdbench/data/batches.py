"""Device-resident splits, and augmentation done there in batches (after airbench).

A split is one contiguous uint8 tensor ``(N, C, H, W)`` plus an int64 label tensor, on the
training device. An epoch is a permutation drawn on the device; each batch is gathered with
``index_select`` and augmented (random crop with zero padding, horizontal flip) by one
vectorised gather, with offsets drawn from a device generator seeded per (seed, epoch).
Nothing here calls ``.item()``/``.cpu()`` inside an epoch, so the host never waits.
"""

from __future__ import annotations
import functools
from dataclasses import dataclass
from typing import Iterator, NamedTuple
import torch
from kdbench.data.spec import DatasetInfo




# ----------------------------------------------------------------------------------------------------
# Device-resident splits


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W), contiguous, on the device
    labels: torch.Tensor  # int64, (N,), on the device

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DeviceData:
    info: DatasetInfo
    train: Split  # what is trained on: the training images less the validation ones
    test: Split  # only ever reported
    fingerprint: str | None = None  # of the whole dataset as read from disk (None: generated, nothing on disk)
    val: Split | None = None  # held out of the training images, for every choice; None without data.val_size


# ----------------------------------------------------------------------------------------------------
# Batch augmentation on the device


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by ``padding``, crop HxW at ``(top[i], left[i])`` of the padded image, then flip where ``flip[i]``.

    Equals torchvision ``RandomCrop(size, padding=padding)`` (fill 0) then ``RandomHorizontalFlip`` with the
    same offsets and flips. ``0 <= top, left <= 2*padding`` is the caller's promise (checking it would
    need a host sync). One gather over the batch; any dtype, any device; returns a new contiguous tensor.
    """
    if images.ndim != 4:
        raise ValueError(f"crop_flip expects (N, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    dev = images.device
    if padding:
        padded = images.new_zeros((n, c, h + 2 * padding, w + 2 * padding))
        padded[:, :, padding : padding + h, padding : padding + w] = images
    else:
        padded = images
    wp = w + 2 * padding
    top = top.to(device=dev, dtype=torch.long)
    left = left.to(device=dev, dtype=torch.long)
    flip = flip.to(device=dev, dtype=torch.bool)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = top[:, None] + ar_h  # (n, h)
    # Flipping after the crop reads column w-1-x of the crop, i.e. left + w-1-x of the padded image.
    cols = left[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (n, w)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = padded.reshape(n, c, -1).gather(2, index)
    return out.view(n, c, h, w)


class Views(NamedTuple):
    """The crop-and-flip drawn for each image of a batch: crop offsets into the padded image, and flips."""

    top: torch.Tensor  # (n,) long
    left: torch.Tensor  # (n,) long
    flip: torch.Tensor  # (n,) bool


def draw_views(n: int, generator: torch.Generator, padding: int, flip: bool) -> Views | None:
    """Draw ``n`` crop offsets (uniform in [0, 2*padding]) and flips (p=0.5) from ``generator``, on its device.

    Draw order (fixed, part of reproducibility): top, left, then the flip bits; with padding 0 only the
    flips are drawn, with flip False no flips are drawn; with neither nothing is drawn and None is returned.
    """
    if padding == 0 and not flip:
        return None
    dev = generator.device
    if padding:
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    else:
        top = left = torch.zeros(n, dtype=torch.long, device=dev)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=dev).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=dev)
    return Views(top, left, flips)


def apply_views(images: torch.Tensor, views: Views | None, padding: int) -> torch.Tensor:
    """The augmented batch: ``images`` cropped and flipped as ``views`` says (None: unchanged)."""
    if views is None:
        return images
    if padding == 0:
        # flip only: no padding or gather needed
        return torch.where(views.flip[:, None, None, None], images.flip(-1), images)
    return crop_flip(images, views.top, views.left, views.flip, padding)


def num_views(padding: int, flip: bool) -> int:
    """How many distinct views the crop-and-flip can produce of one image (CIFAR's padding 4 + flip: 162)."""
    return (2 * padding + 1) ** 2 * (2 if flip else 1)


def view_ids(views: Views | None, n: int, padding: int, flip: bool, device: torch.device) -> torch.Tensor:
    """Each image's view as one integer in [0, num_views): (top * (2p+1) + left) * 2 + flip (no flip: * 1)."""
    if views is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    ids = views.top * (2 * padding + 1) + views.left
    return ids * 2 + views.flip.long() if flip else ids


def views_from_ids(ids: torch.Tensor, padding: int, flip: bool) -> Views:
    """The inverse of :func:`view_ids`."""
    crop, flips = (ids // 2, (ids % 2).bool()) if flip else (ids, torch.zeros_like(ids, dtype=torch.bool))
    return Views(crop // (2 * padding + 1), crop % (2 * padding + 1), flips)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop and random flip of a batch, drawn from ``generator`` (which must live on the images' device).

    :func:`draw_views` then :func:`apply_views`; the draw order is documented there.
    """
    return apply_views(images, draw_views(images.shape[0], generator, padding, flip), padding)


@functools.lru_cache(maxsize=64)
def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype):
    # Cached: building a small tensor on a GPU each batch would be a host-to-device copy (and a sync).
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=dtype).view(-1, 1, 1).to(device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=dtype).view(-1, 1, 1).to(device)
    return scale, shift


def normalize(images_u8: torch.Tensor, info: DatasetInfo, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """``(x/255 - mean)/std`` as ``dtype``; computed in float32 (float64 if asked) and then cast."""
    if images_u8.ndim < 3 or images_u8.shape[-3] != len(info.mean):
        raise ValueError(f"normalize: expected (..., {len(info.mean)}, H, W) for {info.name}, got shape {tuple(images_u8.shape)}")
    if channels_last and images_u8.ndim != 4:
        raise ValueError("normalize: channels_last needs a 4D (N, C, H, W) tensor")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = _norm_constants(tuple(info.mean), tuple(info.std), images_u8.device, compute)
    x = torch.addcmul(shift, images_u8.to(compute), scale)  # x*scale + shift == (x/255 - mean)/std
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def epoch_views(
    n: int,
    batch_size: int,
    order_gen: torch.Generator,
    aug_gen: torch.Generator | None,
    padding: int,
    flip: bool,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, Views | None]]:
    """One epoch's draws without the images: ``(indices, views)`` per batch, exactly as :func:`epoch_batches`
    draws them from the same generators (so the teacher-output cache can see an epoch's views ahead)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(n, generator=order_gen, device=order_gen.device)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        views = draw_views(min(batch_size, stop - start), aug_gen, padding, flip) if aug_gen is not None else None
        yield idx, views


def epoch_batches(
    split: Split,
    batch_size: int,
    order_gen: torch.Generator,
    aug_gen: torch.Generator | None,
    padding: int,
    flip: bool,
    drop_last: bool = False,
    with_views: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One training epoch: ``(uint8 images, labels)`` batches over a permutation drawn from ``order_gen``.

    Both generators must live on the split's device. Batches are augmented with ``aug_gen`` when it is
    given. Everything stays on the device; batch boundaries come from the (host-known) split length.
    ``with_views`` adds each batch's image indices and drawn :class:`Views` (None without augmentation).
    ``start``: the batches before it are drawn (the generators end where a whole epoch leaves them) but not
    gathered, for an epoch resumed in its middle. A split that makes its own batches (streamed from disk,
    or shared among devices: kdbench.data.stream, kdbench.data.shard) is asked for them with the same draws.
    """
    if not isinstance(split, Split):
        yield from split.epoch_batches(batch_size, order_gen, aug_gen, padding, flip, drop_last, with_views, start)
        return
    for step, (idx, views) in enumerate(epoch_views(len(split), batch_size, order_gen, aug_gen, padding, flip,
                                                    drop_last)):
        if step < start:
            continue
        images = apply_views(split.images.index_select(0, idx), views, padding)
        labels = split.labels.index_select(0, idx)
        yield (images, labels, idx, views) if with_views else (images, labels)


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, without augmentation (views, no copies)."""
    if not isinstance(split, Split):  # streamed from disk, or shared among devices: it reads its own batches
        yield from split.eval_batches(batch_size)
        return
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]


def eval_labels(split: Split, batch_size: int) -> torch.Tensor:
    """The labels in the order eval_batches gives the images (of a split shared among devices: this one's part)."""
    if not isinstance(split, Split):
        return split.eval_labels(batch_size)
    return split.labels


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g
