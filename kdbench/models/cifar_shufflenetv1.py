"""CIFAR ShuffleNetV1 of the CRD benchmark (RepDistiller ``models/ShuffleNetv1.py``, ``ShuffleV1``).

ShuffleNet (g=3) for 32x32 inputs: a 1x1 conv-BN-ReLU stem to 24 channels, three
stages of [4, 8, 4] shuffle units with 240/480/960 output channels, each stage
starting with a stride-2 unit whose shortcut is a 3x3 avg-pool concatenated to
the residual branch; global average pooling and a linear classifier.  The first
unit's 1x1 group conv uses one group (its input has only 24 channels).
Parameter names match the reference (``conv1``, ``bn1``,
``layerK.i.{conv1..3,bn1..3}``, ``linear``).  Like the reference, the weights
keep PyTorch's default initialisation.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['CifarShuffleNetV1', 'channel_shuffle']


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> [N, c*g, H, W] (interleave the groups' channels)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class ShuffleUnit(nn.Module):
    """ShuffleNetV1 unit. ``out_planes`` is the residual branch width (stride 2: total minus input)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=first_groups)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(out)


class CifarShuffleNetV1(StagedNet):
    """ShuffleNetV1 for 32x32 inputs.

    Args:
        out_planes: output channels of the three stages.
        num_blocks: units per stage.
        groups: group count of the 1x1 group convolutions.
        num_classes: classifier outputs (0 -> identity head).
        in_chans: input channels.
        drop_rate: dropout before the classifier (not in the reference; default 0).
    """
    head_name = 'linear'

    def __init__(
            self,
            out_planes: Sequence[int] = (240, 480, 960),
            num_blocks: Sequence[int] = (4, 8, 4),
            groups: int = 3,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        stem = 24
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU()
        self.in_planes = stem
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, first=True)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.num_features = out_planes[2]
        self.head_drop = nn.Dropout(drop_rate)
        self.linear = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([
            (stem, 1, 'act1'),
            (out_planes[0], 2, 'layer1'),
            (out_planes[1], 4, 'layer2'),
            (out_planes[2], 8, 'layer3'),
        ])

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int, first: bool = False) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0
            first_groups = 1 if (first and i == 0) else groups
            layers.append(ShuffleUnit(self.in_planes, out_planes - cat_planes, stride, groups, first_groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _stage_fns(self) -> List:
        return [self._stem, self.layer1, self.layer2, self.layer3]


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(4, 4), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='conv1',
)


@register_model
def cifar_shufflenetv1(pretrained: bool = False, **kwargs) -> CifarShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: groups 3, stages (240, 480, 960) x (4, 8, 4)."""
    return timm_entry_model(CifarShuffleNetV1, 'cifar_shufflenetv1', pretrained, data_cfg=_CFG, **kwargs)
