"""ReviewKD, knowledge review (Chen, Liu, Zhao, Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review";
code dvlab-research/ReviewKD): each student level learns its teacher level from a fusion of itself and every
deeper student level, and the loss compares them at several scales.

Levels: the stages after the stem (every stage of a model with two, the MLPs), the deepest aligned when the two
models have different counts, plus the last stage averaged over space (a 1x1 map) when it is a map. A vector
stage is a 1x1 map. Review path, deepest level first (attention-based fusion, ABF):
    x_k = BN(conv1x1(S_k)) (mid channels: min(512, the deepest student level's));
    below the deepest, x_k = a_0 x_k + a_1 up(r_{k+1}), (a_0, a_1) = sigmoid(conv1x1([x_k, up(r_{k+1})]))
    per position, up() nearest-neighbour resizing of the deeper level's r to x_k's size;
    r_k = x_k resized (nearest) to the teacher level's size;  F_k = BN(conv3x3(r_k)) with the teacher's channels.
Loss (hierarchical context loss): per level, MSE(F_k, T_k) plus MSE of both average-pooled to 4x4, 2x2 and 1x1
(only pools smaller than the map's height), weighted 1/2, 1/4, 1/8, divided by the sum of the weights used;
summed over levels:
    L = ce_weight CE + review_weight min(1, (epoch + 1) / warmup) sum_k HCL(F_k, T_k).
Defaults: review_weight 5 (the authors' CIFAR value for resnet32x4 -> resnet8x4 and most pairs; 0.6 for
resnet56 -> resnet20, 1 for resnet110 -> resnet32, 8 for resnet32x4 -> ShuffleNetV2), warm-up 20 epochs, CE 1.
Differences from the authors' code: the teacher's stage outputs are taken after their ReLU (kdbench's models
do not expose the pre-activation sums the authors' teacher returns), and the warm-up counts epochs from 1 (as
mdistiller's reimplementation and kdbench's DKD; the authors' code gives the first epoch weight 0).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.features import feature_shape, layer_name
from kdbench.losses import cross_entropy, hint_mse
from kdbench.method import Method, check_ranges

MAX_MID = 512  # the authors' cap on the fusion width
POOLS = (4, 2, 1)  # the context pyramid's output sizes, each weighted half the one before


def stages_after_stem(model: nn.Module) -> list[int]:
    n = len(model.feature_info)
    return list(range(1, n)) if n > 2 else list(range(n))


def as_map(feature: torch.Tensor) -> torch.Tensor:
    return feature if feature.dim() == 4 else feature.flatten(1)[:, :, None, None]


class ABF(nn.Module):
    """Attention-based fusion: a student level, fused with the deeper levels' result, mapped to the teacher level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # the authors' initialisation
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper, out_size):
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            a = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * a[:, 0:1] + deeper * a[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """The hierarchical context loss of one level: MSE, plus pooled MSEs weighted 1/2, 1/4, 1/8, normalised."""
    loss, weight, total = hint_mse(student_map, teacher_map), 1.0, 1.0
    for size in POOLS:
        if size >= student_map.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * hint_mse(F.adaptive_avg_pool2d(student_map.float(), size),
                                        F.adaptive_avg_pool2d(teacher_map.float(), size))
        total += weight
    return loss / total


class ReviewKD(Method):
    name = "reviewkd"
    summary = "knowledge review: each student level fused with the deeper ones (ABF) -> teacher level, multi-scale MSE"
    defaults = {"review_weight": 5.0, "ce_weight": 1.0, "warmup": 20}
    epoch_params = ("warmup",)  # --epochs scales the warm-up with the schedule
    protocol_note = "protocol differs: teacher features after the ReLU (the authors': before it)"

    @classmethod
    def check_params(cls, params):
        return check_ranges(params, non_negative=("review_weight", "ce_weight", "warmup"))

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        s_layers, t_layers = stages_after_stem(student), stages_after_stem(teacher)
        k = min(len(s_layers), len(t_layers))
        self.student_features, self.teacher_features = s_layers[-k:], t_layers[-k:]
        s_shapes = [feature_shape(student, i, input_shape) for i in self.student_features]
        t_shapes = [feature_shape(teacher, i, input_shape) for i in self.teacher_features]
        self.pooled = len(s_shapes[-1]) == 4 and len(t_shapes[-1]) == 4  # the last stage, averaged: one more level
        s_channels, t_channels = [s[1] for s in s_shapes], [t[1] for t in t_shapes]
        self.t_sizes = [tuple(t[2:]) if len(t) == 4 else (1, 1) for t in t_shapes]
        if self.pooled:
            s_channels, t_channels, self.t_sizes = s_channels + s_channels[-1:], t_channels + t_channels[-1:], \
                self.t_sizes + [(1, 1)]
        mid = min(MAX_MID, s_channels[-1])
        last = len(s_channels) - 1
        self.abfs = nn.ModuleList(ABF(s, mid, t, fuse=i < last) for i, (s, t) in enumerate(zip(s_channels, t_channels)))
        levels = [f"{layer_name(student, s)}->{layer_name(teacher, t)}"
                  for s, t in zip(self.student_features, self.teacher_features)]
        self.record = {"levels": ", ".join(levels + (["pooled"] if self.pooled else []))}

    def levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """A model's level maps, shallow to deep: its stages as maps, plus the last one averaged when it is a map."""
        maps = [as_map(f) for f in features]
        return maps + [maps[-1].mean((2, 3), keepdim=True)] if self.pooled else maps

    def review(self, student_levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's maps for each teacher level, shallow to deep, computed deepest first (the review path)."""
        out, deeper = [], None
        for k in reversed(range(len(self.abfs))):
            mapped, deeper = self.abfs[k](student_levels[k], deeper, self.t_sizes[k])
            out.insert(0, mapped)
        return out

    def losses(self, batch, student, teacher):
        p = self.params
        reviewed = self.review(self.levels(student.features))
        targets = self.levels([f.detach() for f in teacher.features])
        ramp = min((batch.epoch + 1) / p["warmup"], 1.0) if p["warmup"] else 1.0
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "review": ramp * p["review_weight"] * sum(hcl(s, t) for s, t in zip(reviewed, targets))}
