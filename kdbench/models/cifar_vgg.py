"""CIFAR VGGs with batch norm of the CRD benchmark (RepDistiller ``models/vgg.py``, ``vggN_bn``).

Five conv groups (3x3 conv-BN-ReLU; the group's last ReLU is applied outside the
group's Sequential, as in the reference), 2x2 max-pools after groups 0-2, no
pool before group 4 for 32x32 inputs (the reference pools there only when the
input is 64x64), global average pooling and a single linear classifier (no
VGG FC stack).  Parameter names match the reference (``blockK.<idx>``,
``classifier``).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from timm.models import register_model

from ._common import CIFAR100_MEAN, CIFAR100_STD, StagedNet, _as_feature_info, timm_entry_model

__all__ = ['CifarVGG', 'VGG_CFGS']

VGG_CFGS = {
    'vgg8': [[64], [128], [256], [512], [512]],
    'vgg11': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'vgg13': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'vgg16': [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    'vgg19': [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_group(widths: Sequence[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for v in widths:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the group's final ReLU is applied by the model (act<k>)


class CifarVGG(StagedNet):
    """VGG for CIFAR.

    Args:
        cfg: channel widths of the five conv groups.
        batch_norm: BN after each conv (the benchmark uses True).
        num_classes: classifier outputs (0 -> identity head).
        in_chans: input channels.
        drop_rate: dropout before the classifier (not in the reference; default 0).
    """
    head_name = 'classifier'

    def __init__(
            self,
            cfg: Sequence[Sequence[int]] = VGG_CFGS['vgg13'],
            batch_norm: bool = True,
            num_classes: int = 100,
            in_chans: int = 3,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.block0 = _make_group(cfg[0], in_chans, batch_norm)
        self.block1 = _make_group(cfg[1], cfg[0][-1], batch_norm)
        self.block2 = _make_group(cfg[2], cfg[1][-1], batch_norm)
        self.block3 = _make_group(cfg[3], cfg[2][-1], batch_norm)
        self.block4 = _make_group(cfg[4], cfg[3][-1], batch_norm)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        for i in range(5):
            self.add_module(f'act{i}', nn.ReLU())
        self.num_features = cfg[4][-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = self._make_classifier(num_classes)
        self.feature_info = _as_feature_info([
            (cfg[0][-1], 1, 'act0'),
            (cfg[1][-1], 2, 'act1'),
            (cfg[2][-1], 4, 'act2'),
            (cfg[3][-1], 8, 'act3'),
            (cfg[4][-1], 8, 'act4'),  # 32x32 input; 16 for a 64x64 input
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

    def _s0(self, x: torch.Tensor) -> torch.Tensor:
        return self.act0(self.block0(x))

    def _s1(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.block1(self.pool0(x)))

    def _s2(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.block2(self.pool1(x)))

    def _s3(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(self.block3(self.pool2(x)))

    def _s4(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 8:  # reference: pool3 only for 64x64 inputs (map is 8x8 here)
            x = self.pool3(x)
        return self.act4(self.block4(x))

    def _stage_fns(self) -> List:
        return [self._s0, self._s1, self._s2, self._s3, self._s4]


_CFG = dict(
    input_size=(3, 32, 32), pool_size=(4, 4), mean=CIFAR100_MEAN, std=CIFAR100_STD,
    interpolation='bilinear', crop_pct=1.0, first_conv='block0.0',
)


def _create(variant: str, arch: str, pretrained: bool, **kwargs) -> CifarVGG:
    return timm_entry_model(CifarVGG, variant, pretrained, data_cfg=_CFG, cfg=VGG_CFGS[arch], **kwargs)


@register_model
def cifar_vgg8(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create('cifar_vgg8', 'vgg8', pretrained, **kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create('cifar_vgg11', 'vgg11', pretrained, **kwargs)


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create('cifar_vgg13', 'vgg13', pretrained, **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create('cifar_vgg16', 'vgg16', pretrained, **kwargs)


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create('cifar_vgg19', 'vgg19', pretrained, **kwargs)
