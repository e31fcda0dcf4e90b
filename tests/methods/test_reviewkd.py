"""ReviewKD: float64 golden tests of the hierarchical context loss (explicit sums) and of the review path (every
operation redone in float64 from the modules' weights), and its classic mistake: fusing in the wrong direction
(a shallow student level must not reach the deeper levels' maps)."""

import math

import torch
import torch.nn.functional as F

from kdbench.method import Batch, run_model
from kdbench.registry import get_method
from kdbench.zoo import create_model

from test_method_losses import randn
from test_methods import plugin_module

SHAPE = (3, 16, 16)


def mse64(a, b):
    flat_a, flat_b = a.double().flatten().tolist(), b.double().flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)


def pool64(m, size):
    """Adaptive average pooling to size x size of an (n, c, h, w) map whose sides size divides, as nested lists."""
    n, c, h, w = m.shape
    v, kh, kw = m.double().tolist(), h // size, w // size
    return [[[[sum(v[i][j][a * kh + y][b * kw + x] for y in range(kh) for x in range(kw)) / (kh * kw)
               for b in range(size)] for a in range(size)] for j in range(c)] for i in range(n)]


def hcl64(fs, ft):
    """MSE + sum over the pools smaller than the map of 2^-k MSE(pooled), divided by the weights' sum."""
    loss, weight, total = mse64(fs, ft), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= fs.shape[2]:
            continue
        weight /= 2
        loss += weight * mse64(torch.tensor(pool64(fs, size)), torch.tensor(pool64(ft, size)))
        total += weight
    return loss / total


def test_hcl_is_mse_plus_the_halved_pyramid_normalised():
    fs, ft = randn(60, 2, 3, 4, 4, scale=1.0), randn(61, 2, 3, 4, 4, scale=1.0)
    hcl = plugin_module("reviewkd").hcl
    assert math.isclose(hcl(fs, ft).item(), hcl64(fs, ft), rel_tol=1e-5)  # 4x4: pools 2 and 1, weights 1/2, 1/4
    expected = (mse64(fs, ft) + mse64(fs.mean((2, 3)), ft.mean((2, 3))) / 4 + 0.5 * mse64(
        torch.tensor(pool64(fs, 2)), torch.tensor(pool64(ft, 2)))) / 1.75
    assert math.isclose(hcl(fs, ft).item(), expected, rel_tol=1e-5)
    one = randn(62, 2, 3, 1, 1), randn(63, 2, 3, 1, 1)
    assert math.isclose(hcl(*one).item(), mse64(*one), rel_tol=1e-5)  # a 1x1 level: no pyramid


def bn64(x, bn):
    return (x - bn.running_mean.double()[None, :, None, None]) / torch.sqrt(
        bn.running_var.double()[None, :, None, None] + bn.eps) * bn.weight.double()[None, :, None, None] \
        + bn.bias.double()[None, :, None, None]


def review64(method, levels):
    """The review path in float64: deepest level first, each fused with the (resized) result of the one below."""
    out, deeper = [], None
    for k in reversed(range(len(method.abfs))):
        abf = method.abfs[k]
        x = bn64(F.conv2d(levels[k].double(), abf.conv1[0].weight.double()), abf.conv1[1])
        if abf.att_conv is not None:
            up = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            conv = abf.att_conv[0]
            a = torch.sigmoid(F.conv2d(torch.cat([x, up], 1), conv.weight.double(), conv.bias.double()))
            x = x * a[:, :1] + up * a[:, 1:]
        x = F.interpolate(x, size=method.t_sizes[k], mode="nearest")
        out.insert(0, bn64(F.conv2d(x, abf.conv2[0].weight.double(), padding=1), abf.conv2[1]))
        deeper = x
    return out


def built(student="cifar_resnet8", teacher="cifar_resnet14", params=None):
    torch.manual_seed(0)
    s, t = create_model(student, 5, 3), create_model(teacher, 5, 3)
    return get_method("reviewkd")(params or {}, s, t, SHAPE), s, t


def test_reviewkd_loss_matches_the_review_path_and_hcl_in_float64():
    method, s, t = built()
    assert method.record["levels"] == "layer1->layer1, layer2->layer2, layer3->layer3, pooled"
    method.eval()  # BatchNorm on running statistics: a fixed map to recompute
    for module in method.modules():  # non-trivial BatchNorm statistics, so that the recomputation uses them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x, y = randn(64, 2, *SHAPE, scale=1.0), torch.tensor([1, 4])
    s_out, t_out = run_model(s.eval(), x, method.student_features), run_model(t.eval(), x, method.teacher_features)
    terms = method.losses(Batch(x, y, 4, 40), s_out, t_out)  # epoch 5 of a 20-epoch warm-up: ramp 1/4
    levels = s_out.features + [s_out.features[-1].mean((2, 3), keepdim=True)]
    targets = t_out.features + [t_out.features[-1].mean((2, 3), keepdim=True)]
    reviewed = review64(method, levels)
    expected = 0.25 * 5.0 * sum(hcl64(f, g) for f, g in zip(reviewed, targets))
    assert math.isclose(terms["review"].item(), expected, rel_tol=1e-4)
    assert [tuple(f.shape[1:]) for f in reviewed] == [tuple(g.shape[1:]) for g in targets]


def test_review_runs_deep_to_shallow_a_shallow_level_never_reaches_a_deeper_map():
    method, s, t = built()
    method.eval()
    levels = method.levels(run_model(s.eval(), randn(65, 2, *SHAPE, scale=1.0), method.student_features).features)
    base = method.review(levels)
    shallow = method.review([levels[0] + 1.0] + levels[1:])
    assert not torch.allclose(shallow[0], base[0])
    assert all(torch.equal(a, b) for a, b in zip(shallow[1:], base[1:]))
    deep = method.review(levels[:-1] + [levels[-1] + 1.0])
    assert all(not torch.allclose(a, b) for a, b in zip(deep, base))  # the deepest level reaches every map


def test_reviewkd_trains_the_student_and_the_fusion_never_the_teacher_and_maps_mlp_vectors():
    torch.manual_seed(0)
    s, t = create_model("mnist_mlp_30x2", 4, 1), create_model("mnist_mlp_100x2", 4, 1)
    method = get_method("reviewkd")({"warmup": 0}, s, t, (1, 28, 28))
    assert method.record["levels"] == "hidden.0->hidden.0, hidden.1->hidden.1"  # vectors: 1x1 maps, no pooled level
    x = randn(66, 4, 1, 28, 28, scale=1.0)
    terms = method.losses(Batch(x, torch.tensor([0, 1, 2, 3]), 0, 1), run_model(s, x, method.student_features),
                          run_model(t, x, method.teacher_features))
    assert terms["review"].item() > 0
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in method.abfs.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
