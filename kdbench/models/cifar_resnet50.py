"""CIFAR ResNet-50 of CRD's cross-architecture table (RepDistiller ``models/resnetv2.py``).

ImageNet-style Bottleneck ResNet-50 ([3, 4, 6, 3] blocks, widths 64/128/256/512,
expansion 4) adapted to 32x32 inputs: a 3x3 stride-1 stem conv-BN-ReLU and no
max-pool, strides 1/2/2/2, global average pooling, linear classifier.
Parameter names match the reference (``conv1``, ``bn1``,
``layerK.i.{conv1..3,bn1..3,shortcut.0,shortcut.1}``, ``linear``).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['CifarResNetV2', 'Bottleneck']


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(StagedNet):
    """Four-stage Bottleneck ResNet for 32x32 inputs (RepDistiller's ``ResNet50``)."""
    head_name = 'linear'

    def __init__(
            self,
            num_blocks: Sequence[int] = (3, 4, 6, 3),
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            zero_init_residual: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        e = Bottleneck.expansion
        self.num_features = 512 * e
        self.head_drop = nn.Dropout(drop_rate)
        self.linear = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([
            (64, 1, 'act1'),
            (64 * e, 1, 'layer1'),
            (128 * e, 2, 'layer2'),
            (256 * e, 4, 'layer3'),
            (512 * e, 8, 'layer4'),
        ])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _stage_fns(self) -> List:
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(4, 4), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='conv1',
)


@register_model
def cifar_resnet50(pretrained: bool = False, **kwargs) -> CifarResNetV2:
    return timm_entry_model(CifarResNetV2, 'cifar_resnet50', pretrained, data_cfg=_CFG, num_blocks=(3, 4, 6, 3),
                            **kwargs)
