"""CIFAR ShuffleNetV2 of the CRD benchmark (RepDistiller ``models/ShuffleNetv2.py``, ``ShuffleV2``).

ShuffleNetV2 1.0x for 32x32 inputs: a 1x1 conv-BN-ReLU stem to 24 channels,
three stages (116, 232, 464 channels) each made of a stride-2 down-sampling unit
followed by [3, 7, 3] basic units (channel split 1/2, shuffle with 2 groups),
a 1x1 conv-BN-ReLU to 1024 channels, global average pooling, linear classifier.
Parameter names match the reference (``conv1``, ``bn1``, ``layerK.i.*``,
``conv2``, ``bn2``, ``linear``).  Like the reference, the weights keep
PyTorch's default initialisation.

Note: the reference puts ``num_blocks`` basic units after the down-sampling unit
(so 3+1, 7+1, 3+1 units per stage); this is kept, as the benchmark's parameter
count (1.36M) depends on it.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model
from .cifar_shufflenetv1 import ShuffleBlock

__all__ = ['CifarShuffleNetV2', 'SHUFFLENETV2_CFGS']

SHUFFLENETV2_CFGS = {
    0.2: dict(out_channels=(40, 80, 160, 512), num_blocks=(3, 3, 3)),
    0.3: dict(out_channels=(40, 80, 160, 512), num_blocks=(3, 7, 3)),
    0.5: dict(out_channels=(48, 96, 192, 1024), num_blocks=(3, 7, 3)),
    1.0: dict(out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)),
    1.5: dict(out_channels=(176, 352, 704, 1024), num_blocks=(3, 7, 3)),
    2.0: dict(out_channels=(224, 488, 976, 2048), num_blocks=(3, 7, 3)),
}


class BasicUnit(nn.Module):
    """Stride-1 unit: split channels, transform the second half, concat, shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class DownUnit(nn.Module):
    """Stride-2 unit: two branches (dw-pw and pw-dw-pw), concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class CifarShuffleNetV2(StagedNet):
    """ShuffleNetV2 for 32x32 inputs.

    Args:
        net_size: width key of ``SHUFFLENETV2_CFGS`` (the benchmark uses 1.0).
        num_classes: classifier outputs (0 -> identity head).
        in_chans: input channels.
        drop_rate: dropout before the classifier (not in the reference; default 0).
    """
    head_name = 'linear'

    def __init__(
            self,
            net_size: float = 1.0,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        cfg = SHUFFLENETV2_CFGS[float(net_size)]
        out_channels: Sequence[int] = cfg['out_channels']
        num_blocks: Sequence[int] = cfg['num_blocks']
        stem = 24
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU()
        self.in_channels = stem
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.num_features = out_channels[3]
        self.head_drop = nn.Dropout(drop_rate)
        self.linear = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([
            (stem, 1, 'act1'),
            (out_channels[0], 2, 'layer1'),
            (out_channels[1], 4, 'layer2'),
            (out_channels[2], 8, 'layer3'),
        ])

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: List[nn.Module] = [DownUnit(self.in_channels, out_channels)]
        for _ in range(num_blocks):
            layers.append(BasicUnit(out_channels))
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _stage_fns(self) -> List:
        return [self._stem, self.layer1, self.layer2, self.layer3]

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)))


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(4, 4), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='conv1',
)


@register_model
def cifar_shufflenetv2(pretrained: bool = False, **kwargs) -> CifarShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net_size 1.0)."""
    return timm_entry_model(CifarShuffleNetV2, 'cifar_shufflenetv2', pretrained, data_cfg=_CFG, **kwargs)
