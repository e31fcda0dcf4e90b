"""Wide ResNets (WRN-d-k) of the CRD benchmark (RepDistiller ``models/wrn.py``).

Zagoruyko & Komodakis pre-activation WRN for 32x32 inputs: a 3x3 stem conv to
16 channels, three groups of ``(d - 4) / 6`` pre-activation BasicBlocks with
16k/32k/64k channels (strides 1/2/2), a final BN-ReLU, global average pooling
and a linear layer.  Parameter names match the reference (``conv1``,
``blockK.layer.i.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['WideResNet']


class WideBasicBlock(nn.Module):
    """Pre-activation block; when the shape changes the shortcut is a 1x1 conv of the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # the reference only creates the shortcut conv when needed (so the state_dict matches)
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(StagedNet):
    """WRN-depth-widen_factor for 32x32 inputs.

    Args:
        depth: 6n + 4.
        widen_factor: k.
        num_classes: classifier outputs (0 -> identity head).
        in_chans: input channels.
        drop_rate: dropout before the classifier (not in the reference; default 0).
        block_drop_rate: dropout inside each block (the reference's ``dropRate``; default 0).
    """
    head_name = 'fc'

    def __init__(
            self,
            depth: int = 16,
            widen_factor: int = 1,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            block_drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f'depth must be 6n+4, got {depth}')
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, block_drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, block_drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, block_drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = ch[3]
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([
            (ch[0], 1, 'conv1'),
            (ch[1], 1, 'block1'),
            (ch[2], 2, 'block2'),
            (ch[3], 4, 'block3'),
        ])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')  # N(0, 2/(k*k*out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _init_classifier(self, layer: nn.Linear) -> None:
        nn.init.zeros_(layer.bias)

    def _stage_fns(self) -> List:
        return [self.conv1, self.block1, self.block2, self.block3]

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(8, 8), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='conv1',
)


def _create(variant: str, depth: int, widen_factor: int, pretrained: bool, **kwargs) -> WideResNet:
    return timm_entry_model(WideResNet, variant, pretrained, data_cfg=_CFG, depth=depth, widen_factor=widen_factor,
                            **kwargs)


@register_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create('cifar_wrn_16_1', 16, 1, pretrained, **kwargs)


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create('cifar_wrn_16_2', 16, 2, pretrained, **kwargs)


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create('cifar_wrn_40_1', 40, 1, pretrained, **kwargs)


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create('cifar_wrn_40_2', 40, 2, pretrained, **kwargs)
