"""CIFAR MobileNetV2 of the CRD benchmark (RepDistiller ``models/mobilenetv2.py``, ``mobile_half``).

MobileNetV2 (expansion T=6, width multiplier 0.5) for 32x32 inputs: a stride-2
3x3 conv-BN-ReLU stem, the seven inverted-residual groups of the paper
(t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1)
(6,160,3,2) (6,320,1,1) with channels scaled by the width, a 1x1 conv-BN-ReLU
to 1280 channels, global average pooling and a linear classifier.  As in the
reference, the t=1 block keeps its (1x expansion) point-wise conv.  Parameter
names match the reference (``conv1.*``, ``blocks.g.i.conv.*``, ``conv2.*``,
``classifier.0``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['CifarMobileNetV2']


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pw
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # dw
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class CifarMobileNetV2(StagedNet):
    """MobileNetV2 for 32x32 inputs.

    Args:
        expand_ratio: T, the expansion of all but the first group.
        width_mult: channel multiplier (0.5 for the benchmark's ``mobile_half``).
        num_classes: classifier outputs (0 -> identity head).
        in_chans: input channels.
        drop_rate: dropout before the classifier (not in the reference; default 0).
    """
    head_name = 'classifier.0'  # the Linear sits in a Sequential, as in the reference

    def __init__(
            self,
            expand_ratio: int = 6,
            width_mult: float = 0.5,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        T = expand_ratio
        setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        self.num_classes = num_classes
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        group_out = []
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
            group_out.append(output_channel)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.num_features = self.last_channel
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Sequential(self._make_classifier(num_classes))
        # feature taps as in the reference's is_feat outputs: stem, after groups 1, 2, 4, 6
        self.feature_info = _as_feature_info([
            (int(32 * width_mult), 2, 'conv1'),
            (group_out[1], 2, 'blocks.1'),
            (group_out[2], 4, 'blocks.2'),
            (group_out[4], 8, 'blocks.4'),
            (group_out[6], 16, 'blocks.6'),
        ])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')  # N(0, 2/(k*k*out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                self._init_classifier(m)

    def _init_classifier(self, layer: nn.Linear) -> None:
        nn.init.normal_(layer.weight, 0, 0.01)
        nn.init.zeros_(layer.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier[0]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, 'avg'):
            raise ValueError(f'only global_pool="avg" is supported, got {global_pool!r}')
        ref = next(self.parameters(), None)
        self.num_classes = num_classes
        self.classifier[0] = self._make_classifier(num_classes, ref)

    def _s1(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x))

    def _s3(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[4](self.blocks[3](x))

    def _s4(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[6](self.blocks[5](x))

    def _stage_fns(self) -> List:
        return [self.conv1, self._s1, self.blocks[2], self._s3, self._s4]

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(2, 2), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='conv1.0',
)


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """RepDistiller's ``mobile_half``: MobileNetV2, T=6, width 0.5."""
    return timm_entry_model(CifarMobileNetV2, 'cifar_mobilenetv2', pretrained, data_cfg=_CFG,
                            **dict(dict(expand_ratio=6, width_mult=0.5), **kwargs))


@register_model
def cifar_mobilenetv2_half(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """Alias of ``cifar_mobilenetv2`` (RepDistiller's ``mobile_half``)."""
    return timm_entry_model(CifarMobileNetV2, 'cifar_mobilenetv2_half', pretrained, data_cfg=_CFG,
                            **dict(dict(expand_ratio=6, width_mult=0.5), **kwargs))
