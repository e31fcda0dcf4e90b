"""Attention over teacher layers (the research proposal, part 2): each student layer chooses, by attention,
which teacher layers it learns from.

Student layer m (feature S_m) gets k candidate teacher layers T_{m_1} ... T_{m_k}: by default every teacher
stage at or after the one matched to it by depth (`k` > 0 keeps the first k of them). Each candidate is
brought to S_m's shape by its own trainable projection P_i, the FitNets regressor (conv, BatchNorm, ReLU;
a linear map for vectors); a map that is neither the same size, twice nor half S_m's is first resized to
S_m's size (bilinear up, average pooling down). The weights, per example:
    attn_m = softmax_i(q_m . key_{m,i} / sqrt(width)),  q_m = W_q,m pool(S_m),  key_{m,i} = W_k,m,i pool(T_{m_i}),
pool the global average over space (vectors as they are), W linear maps (with bias) of width 128. Then
    L_m = MSE(sum_i attn_m^i P_i(T_{m_i}), S_m)   (averaged over every element)
    L = ce_weight CE + beta sum_m L_m (+ kd_weight T^2 KL(p_t^T || p_s^T), off by default).
Gradients reach the student through S_m (as the MSE's target and through its query), the projections and the
query/key maps; the teacher is frozen.

Layers: `student_layers` / `teacher_layers` are lists of stage indices or module names; the default is every
stage after the stem (index 0) for models with more than two stages, every stage otherwise (MLPs). Depth match:
student layer j of n_s goes with teacher layer round(j (n_t - 1) / (n_s - 1)) of n_t.
Assumed (no paper defines this method): beta = 50, the width-128 linear query/key maps with bias, the resizing,
the default layers; its runs say "protocol assumed". The published relative, "Show, Attend and Distill" (Ji et
al. AAAI 2021), goes the other way (every teacher layer attends over all student layers, loss weight 200 on
spatial energy maps); it is not offered here as a variant.

The attention weights, averaged over each epoch's examples, are logged every epoch as metrics
`attn/<student layer>/<teacher layer>`; the candidates of each student layer are recorded as
`procedure.attend.<student layer>`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.features import feature_shape, layer_name, make_regressor
from kdbench.losses import cross_entropy, hint_mse, kd_loss
from kdbench.method import Method, resolve_layer


def default_layers(model: nn.Module) -> list[int]:
    stages = len(model.feature_info)
    return list(range(1, stages)) if stages > 2 else list(range(stages))


def projection(source: tuple[int, ...], target: tuple[int, ...]) -> nn.Module:
    """Teacher feature shape -> student feature shape: the FitNets regressor, after a resize when it needs one."""
    if len(source) == 4 and len(target) == 4:
        (_, c, h, w), (_, _, th, tw) = source, target
        if (h, w) != (th, tw) and (h, w) != (2 * th, 2 * tw) and (2 * h, 2 * w) != (th, tw):
            resize = nn.Upsample(size=(th, tw), mode="bilinear", align_corners=False) if h < th \
                else nn.AdaptiveAvgPool2d((th, tw))
            return nn.Sequential(resize, make_regressor((source[0], c, th, tw), target))
    return make_regressor(source, target)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    return feature.float().mean(dim=(2, 3)) if feature.dim() == 4 else feature.float().flatten(1)


class LayerAttention(Method):
    name = "layer_attention"
    summary = "each student layer attends over teacher layers (at or after its depth): CE + beta sum MSE"
    defaults = {"beta": 50.0, "ce_weight": 1.0, "kd_weight": 0.0, "T": 4.0, "width": 128, "k": 0,
                "student_layers": None, "teacher_layers": None}
    param_types = {"student_layers": (list,), "teacher_layers": (list,)}
    protocol_note = "protocol assumed"

    @classmethod
    def check_params(cls, params):
        if params["k"] < 0:
            return f"k must be 0 (every candidate) or a positive count, got {params['k']}"
        if params["width"] < 1:
            return f"width must be positive, got {params['width']}"
        for key in ("student_layers", "teacher_layers"):
            layers = params[key]
            if layers is not None and (not layers or not all(isinstance(x, (int, str)) for x in layers)):
                return f"{key} must be a non-empty list of stage indices or module names, got {layers!r}"
        return None

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        p = self.params
        s_layers = [resolve_layer(student, x) for x in (p["student_layers"] or default_layers(student))]
        t_layers = [resolve_layer(teacher, x) for x in (p["teacher_layers"] or default_layers(teacher))]
        self.student_features, self.teacher_features = s_layers, t_layers
        s_shapes = [feature_shape(student, x, input_shape) for x in s_layers]
        t_shapes = [feature_shape(teacher, x, input_shape) for x in t_layers]
        n_s, n_t = len(s_layers), len(t_layers)
        # candidates[m]: positions in teacher_features that student layer m attends over
        self.candidates: list[list[int]] = []
        for m in range(n_s):
            matched = round(m * (n_t - 1) / (n_s - 1)) if n_s > 1 else n_t - 1
            chosen = list(range(matched, n_t))
            self.candidates.append(chosen[:p["k"]] if p["k"] else chosen)
        width = p["width"]
        self.queries = nn.ModuleList(nn.Linear(s_shapes[m][1], width) for m in range(n_s))
        self.keys = nn.ModuleList(nn.ModuleList(nn.Linear(t_shapes[i][1], width) for i in self.candidates[m])
                                  for m in range(n_s))
        self.projections = nn.ModuleList(nn.ModuleList(projection(t_shapes[i], s_shapes[m]) for i in self.candidates[m])
                                         for m in range(n_s))
        # The epoch's attention weights, summed on the device (buffers: a resumed job keeps them).
        for m in range(n_s):
            self.register_buffer(f"attn_sum{m}", torch.zeros(len(self.candidates[m]), dtype=torch.float64))
        self.register_buffer("attn_examples", torch.zeros((), dtype=torch.float64))
        self.s_names = [layer_name(student, x) for x in s_layers]
        self.t_names = [layer_name(teacher, x) for x in t_layers]
        self.record = {f"attend.{self.s_names[m]}": ", ".join(self.t_names[i] for i in self.candidates[m])
                       for m in range(n_s)}

    def attention(self, m: int, s_feature: torch.Tensor, t_features: list[torch.Tensor]) -> torch.Tensor:
        """(batch, k) weights of student layer m over its candidates; each row sums to one."""
        q = self.queries[m](pooled(s_feature)).float()
        keys = torch.stack([key(pooled(t_features[i])).float() for key, i in zip(self.keys[m], self.candidates[m])], 1)
        scores = (keys @ q[:, :, None]).squeeze(2) / math.sqrt(self.params["width"])
        return F.softmax(scores, dim=1)

    def losses(self, batch, student, teacher):
        p = self.params
        t_features = [f.detach() for f in teacher.features]
        hint = 0.0
        for m, s_feature in enumerate(student.features):
            attn = self.attention(m, s_feature, t_features)
            projected = torch.stack([proj(t_features[i]).float()
                                     for proj, i in zip(self.projections[m], self.candidates[m])], 1)
            mixed = (attn.view(*attn.shape, *[1] * (projected.dim() - 2)) * projected).sum(1)
            hint = hint + hint_mse(mixed, s_feature)
            getattr(self, f"attn_sum{m}").add_(attn.detach().double().sum(0))
        self.attn_examples.add_(batch.labels.shape[0])
        terms = {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels), "attn_hint": p["beta"] * hint}
        if p["kd_weight"]:
            terms["kd"] = p["kd_weight"] * kd_loss(student.logits, teacher.logits.detach(), p["T"])
        return terms

    def epoch_metrics(self):
        n = self.attn_examples.item()
        out = {}
        if n:
            for m, s_name in enumerate(self.s_names):
                sums = getattr(self, f"attn_sum{m}")
                for i, value in zip(self.candidates[m], (sums / n).tolist()):
                    out[f"attn/{s_name}/{self.t_names[i]}"] = value
                sums.zero_()
        self.attn_examples.zero_()
        return out
