"""MNIST networks: Hinton et al. (2015) MLPs and a small CNN.

* :class:`MnistMLP` -- flatten, optional input dropout, then ``Linear-ReLU-Dropout``
  per hidden layer, then a linear classifier.  Hinton's teacher is
  784-1200-1200-10 trained with dropout (0.2 input / 0.5 hidden) and a max-norm
  constraint on each hidden unit's incoming weights; the dropout rates and the
  max-norm bound are constructor arguments, all off by default.
* :class:`MnistCNN` -- conv32-pool-conv64-pool-fc128-fc10 (3x3 'same' convs).
* :class:`MnistConvNet` -- a family of growing width and depth for capacity-gap
  studies on 28x28 images: two stages (28 -> 14 -> 7) of ``depth``
  conv3x3-BN-ReLU blocks, widths ``(w, 2w)``, global average pool, linear head.
  ``mnist_convnet_{w}x{depth}`` from 0.4k to 0.26M parameters.

Registered: ``mnist_mlp`` (takes ``hidden=``), ``mnist_mlp_1200x2``,
``mnist_mlp_800x2``, ``mnist_mlp_400x2``, ``mnist_mlp_100x2``,
``mnist_mlp_30x2``, ``mnist_cnn``, ``mnist_convnet_4x1``, ``mnist_convnet_8x1``, ``mnist_convnet_16x1``,
``mnist_convnet_32x1``, ``mnist_convnet_48x1``, ``mnist_convnet_32x2``, ``mnist_convnet_64x2``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import register_model

from ._common import MNIST_MEAN, MNIST_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['MnistMLP', 'MnistCNN', 'MnistConvNet']


class MnistMLP(StagedNet):
    """Fully connected ReLU network on flattened images.

    Args:
        hidden: widths of the hidden layers.
        num_classes: classifier outputs (0 -> identity head).
        in_chans: input channels.
        img_size: input height = width.
        dropout: dropout after each hidden ReLU (Hinton's teacher: 0.5).
        input_dropout: dropout on the flattened input (Hinton's teacher: 0.2).
        max_norm: if set, the training engine calls ``apply_max_norm_(max_norm)``
            after each optimiser step (Hinton's teacher used a max-norm constraint).
        drop_rate: alias accepted for timm's ``drop_rate``; same as ``dropout``
            when ``dropout`` is 0.

    Stages (``feature_info``): one per hidden layer, ``hidden.<i>``, whose output
    (post-ReLU, post-dropout, shape (B, width)) is the feature.
    """
    head_name = 'fc'

    def __init__(
            self,
            hidden: Sequence[int] = (1200, 1200),
            num_classes: int = 10,
            in_chans: int = 1,
            img_size: int = 28,
            dropout: float = 0.0,
            input_dropout: float = 0.0,
            max_norm: Optional[float] = None,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if dropout == 0.0 and drop_rate:
            dropout = drop_rate
        self.num_classes = num_classes
        self.hidden_sizes = hidden
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.max_norm = max_norm
        self.in_features = in_chans * img_size * img_size
        self.input_drop = nn.Dropout(input_dropout)
        self.hidden = nn.ModuleList()
        width = self.in_features
        for h in hidden:
            self.hidden.append(nn.Sequential(OrderedDict([
                ('fc', nn.Linear(width, h)),
                ('act', nn.ReLU()),
                ('drop', nn.Dropout(dropout)),
            ])))
            width = h
        self.num_features = width
        self.head_drop = nn.Identity()  # dropout already follows the last hidden layer
        self.fc = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([(h, 1, f'hidden.{i}') for i, h in enumerate(hidden)])

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_drop(x.flatten(1))

    def _stage_fns(self) -> List:
        fns = list(self.hidden)
        if not fns:
            return []
        first = fns[0]
        return [lambda x: first(self._input(x))] + fns[1:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.hidden) == 0:
            return self._input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False):
        if len(self.hidden) == 0:
            x = self._input(x)
        return super().forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)

    @torch.no_grad()
    def apply_max_norm_(self, max_norm: Optional[float] = None) -> None:
        """Scale each hidden unit's incoming weight vector (a row of ``hidden[i].fc.weight``,
        bias excluded) down to L2 norm ``max_norm`` if it exceeds it (Hinton et al. 2012).
        The output layer is not constrained.  ``None`` -> use ``self.max_norm``; no-op if unset."""
        if max_norm is None:
            max_norm = self.max_norm
        if max_norm is None:
            return
        for block in self.hidden:
            w = block.fc.weight
            norms = w.norm(p=2, dim=1, keepdim=True)
            scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
            w.mul_(scale.to(w.dtype))


class MnistCNN(StagedNet):
    """conv(3x3, 32)-ReLU-maxpool2 -> conv(3x3, 64)-ReLU-maxpool2 -> fc(128)-ReLU -> dropout -> fc.

    ``forward_features`` returns the (B, 64, 7, 7) map; ``forward_head`` flattens
    it, applies fc1-ReLU-dropout (``pre_logits=True`` returns this 128-d vector)
    and the classifier ``fc``.
    """
    head_name = 'fc'

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 1,
            img_size: int = 28,
            widths: Sequence[int] = (32, 64),
            fc_width: int = 128,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        c1, c2 = widths
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, c1, kernel_size=3, padding=1)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = img_size // 4
        self.num_features = c2
        self.head_hidden_size = fc_width
        self.fc1 = nn.Linear(c2 * side * side, fc_width)
        self.act3 = nn.ReLU()
        self.head_drop = nn.Dropout(drop_rate)
        self._fc_in = fc_width
        self.fc = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([(c1, 2, 'pool1'), (c2, 4, 'pool2')])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)

    def _make_classifier(self, num_classes: int, ref: Optional[torch.Tensor] = None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        return nn.Linear(self._fc_in, num_classes, **kw)

    def _s0(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool1(self.act1(self.conv1(x)))

    def _s1(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool2(self.act2(self.conv2(x)))

    def _stage_fns(self) -> List:
        return [self._s0, self._s1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.act3(self.fc1(x.flatten(1))))
        return x if pre_logits else self.fc(x)


class MnistConvNet(StagedNet):
    """Two stages of ``depth`` conv3x3-BN-ReLU blocks (widths ``width`` and ``2 * width``), each followed by a
    2x2 max-pool, then the global-average-pool + linear head: width and depth grow independently, so a suite
    can space teachers over two decades of parameters with one design (BatchNorm keeps every size trainable
    with one recipe).  Stages (``feature_info``): ``stages.0`` (B, w, 14, 14) and ``stages.1`` (B, 2w, 7, 7).
    """
    head_name = 'fc'

    def __init__(self, width: int = 16, depth: int = 1, num_classes: int = 10, in_chans: int = 1,
                 img_size: int = 28, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.stages = nn.ModuleList()
        channels = in_chans
        for out in (width, 2 * width):
            blocks = []
            for _ in range(depth):
                blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
            self.stages.append(nn.Sequential(*blocks, nn.MaxPool2d(2)))
        self.num_features = channels
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([(width, 2, 'stages.0'), (2 * width, 4, 'stages.1')])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def _stage_fns(self) -> List:
        return list(self.stages)


_CFG = dict(
    input_size=(1, 28, 28), mean=MNIST_MEAN, std=MNIST_STD,
    interpolation='bilinear', crop_pct=1.0,
)


def _mlp(variant: str, hidden: Sequence[int], pretrained: bool, **kwargs) -> MnistMLP:
    return timm_entry_model(MnistMLP, variant, pretrained, data_cfg=dict(_CFG, first_conv='hidden.0.fc'),
                            hidden=hidden, **kwargs)


@register_model
def mnist_mlp(pretrained: bool = False, **kwargs) -> MnistMLP:
    """MLP with configurable ``hidden=(w1, w2, ...)`` (default 1200x2)."""
    return timm_entry_model(MnistMLP, 'mnist_mlp', pretrained, data_cfg=dict(_CFG, first_conv='hidden.0.fc'), **kwargs)


@register_model
def mnist_mlp_1200x2(pretrained: bool = False, **kwargs) -> MnistMLP:
    """Hinton et al. (2015) teacher, 784-1200-1200-10 (pass dropout=0.5, input_dropout=0.2, max_norm=... for the
    original regularisation)."""
    return _mlp('mnist_mlp_1200x2', (1200, 1200), pretrained, **kwargs)


@register_model
def mnist_mlp_800x2(pretrained: bool = False, **kwargs) -> MnistMLP:
    """Hinton et al. (2015) student, 784-800-800-10."""
    return _mlp('mnist_mlp_800x2', (800, 800), pretrained, **kwargs)


@register_model
def mnist_mlp_400x2(pretrained: bool = False, **kwargs) -> MnistMLP:
    return _mlp('mnist_mlp_400x2', (400, 400), pretrained, **kwargs)


@register_model
def mnist_mlp_100x2(pretrained: bool = False, **kwargs) -> MnistMLP:
    return _mlp('mnist_mlp_100x2', (100, 100), pretrained, **kwargs)


@register_model
def mnist_mlp_30x2(pretrained: bool = False, **kwargs) -> MnistMLP:
    return _mlp('mnist_mlp_30x2', (30, 30), pretrained, **kwargs)


@register_model
def mnist_cnn(pretrained: bool = False, **kwargs) -> MnistCNN:
    """Small CNN: conv32-conv64-fc128 (~0.42M parameters)."""
    return timm_entry_model(MnistCNN, 'mnist_cnn', pretrained, data_cfg=dict(_CFG, first_conv='conv1'), **kwargs)


def _convnet(width: int, depth: int, pretrained: bool, **kwargs) -> MnistConvNet:
    return timm_entry_model(MnistConvNet, f'mnist_convnet_{width}x{depth}', pretrained,
                            data_cfg=dict(_CFG, first_conv='stages.0.0'), width=width, depth=depth, **kwargs)


@register_model
def mnist_convnet_4x1(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 4-8, one conv per stage (438 parameters): the CNN study's student, cheap enough for CPU."""
    return _convnet(4, 1, pretrained, **kwargs)


@register_model
def mnist_convnet_8x1(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 8-16, one conv per stage (1.4k parameters)."""
    return _convnet(8, 1, pretrained, **kwargs)


@register_model
def mnist_convnet_16x1(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 16-32, one conv per stage (5.2k parameters)."""
    return _convnet(16, 1, pretrained, **kwargs)


@register_model
def mnist_convnet_32x1(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 32-64, one conv per stage (20k parameters)."""
    return _convnet(32, 1, pretrained, **kwargs)


@register_model
def mnist_convnet_48x1(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 48-96, one conv per stage (43k parameters): the CNN study's largest teacher, 99x the 4x1."""
    return _convnet(48, 1, pretrained, **kwargs)


@register_model
def mnist_convnet_32x2(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 32-64, two convs per stage (66k parameters)."""
    return _convnet(32, 2, pretrained, **kwargs)


@register_model
def mnist_convnet_64x2(pretrained: bool = False, **kwargs) -> MnistConvNet:
    """Widths 64-128, two convs per stage (0.26M parameters)."""
    return _convnet(64, 2, pretrained, **kwargs)
