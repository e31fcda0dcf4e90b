"""CIFAR ResNets of the CRD distillation benchmark (resnet8 ... resnet110, resnet8x4, resnet32x4).

Architecture follows RepDistiller's ``models/resnet.py`` (Tian et al., "Contrastive
Representation Distillation", ICLR 2020): a 3x3 stem conv-BN-ReLU, three stages
of BasicBlocks (post-activation: ReLU after the residual add), strides 1/2/2,
global average pooling and one linear layer.  Depth ``6n + 2`` gives ``n``
blocks per stage.  Parameter names match the reference (``conv1``, ``bn1``,
``layerK.i.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``), so its
checkpoints load with ``load_state_dict``.

The ``preact``/``is_last`` outputs of the reference are not implemented.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['CifarResNet', 'BasicBlock']


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class CifarResNet(StagedNet):
    """ResNet for 32x32 inputs with ``(depth - 2) / 6`` BasicBlocks per stage.

    Args:
        depth: 6n + 2.
        num_filters: channels of (stem, stage1, stage2, stage3).
        num_classes: classifier outputs (0 -> no classifier, identity head).
        in_chans: input channels.
        drop_rate: dropout before the classifier (not in the reference; default 0).
    """
    head_name = 'fc'

    def __init__(
            self,
            depth: int = 20,
            num_filters: Sequence[int] = (16, 16, 32, 64),
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f'depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}')
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.num_features = num_filters[3] * BasicBlock.expansion
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([
            (num_filters[0], 1, 'act1'),
            (num_filters[1], 1, 'layer1'),
            (num_filters[2], 2, 'layer2'),
            (num_filters[3], 4, 'layer3'),
        ])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _stage_fns(self) -> List:
        return [self._stem, self.layer1, self.layer2, self.layer3]


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(8, 8), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='conv1',
)


def _create(variant: str, depth: int, num_filters: Sequence[int], pretrained: bool, **kwargs) -> CifarResNet:
    return timm_entry_model(CifarResNet, variant, pretrained, data_cfg=_CFG, depth=depth, num_filters=num_filters,
                            **kwargs)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet8', 8, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet14', 14, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet20', 20, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet32', 32, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet44', 44, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet56', 56, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet110', 110, (16, 16, 32, 64), pretrained, **kwargs)


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet8x4', 8, (32, 64, 128, 256), pretrained, **kwargs)


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create('cifar_resnet32x4', 32, (32, 64, 128, 256), pretrained, **kwargs)
