"""Golden and behaviour tests of the seed methods (issue 12): Tang et al.'s three synthetic teachers, weighted
soft labels and attention over teacher layers. Expected values are float64 computations written out here."""

import math

import pytest
import torch

from kdbench.method import Batch, Outputs, run_model
from kdbench.registry import get_method
from kdbench.zoo import create_model

from test_method_losses import ce64, kl64, randn, softmax64


def tang_target64(t_row, label, kind, T, eps=None, k=3):
    pt = softmax64(t_row, T)
    C = len(pt)
    if kind == "tang_smooth":
        return [(1 - eps) * (c == label) + eps / C for c in range(C)]
    if kind == "tang_confidence":
        return [pt[label] if c == label else (1 - pt[label]) / (C - 1) for c in range(C)]
    top = sorted(range(C), key=lambda c: -pt[c])[:k]
    rest = (1 - sum(pt[c] for c in top)) / (C - k)
    return [pt[c] if c in top else rest for c in range(C)]


@pytest.mark.parametrize("kind", ["tang_smooth", "tang_confidence", "tang_topk"])
def test_tang_synthetic_teachers_match_their_definitions(kind):
    zs, zt, y = randn(10, 5, 7), randn(11, 5, 7), torch.tensor([0, 6, 3, 3, 1])
    method = get_method(kind)({}, None, None, (3, 8, 8))
    p = method.params
    assert (p["T"], p["ce_weight"], p["kd_weight"]) == (4.0, 0.1, 0.9)  # KD's (CRD) defaults
    T = p["T"]
    rows = list(zip(zs.double().tolist(), zt.double().tolist(), y.tolist()))
    eps = sum(1 - softmax64(t, T)[label] for _, t, label in rows) / len(rows)  # the teacher's mean non-target mass
    targets = [tang_target64(t, label, kind, T, eps) for _, t, label in rows]
    assert all(math.isclose(sum(q), 1.0, rel_tol=1e-12) for q in targets)
    kd = p["kd_weight"] * T * T * sum(kl64(q, softmax64(s, T)) for q, (s, _, _) in zip(targets, rows)) / len(rows)
    ce = p["ce_weight"] * sum(ce64(s, label) for s, _, label in rows) / len(rows)
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(terms["kd"].item(), kd, rel_tol=1e-4)
    # the reversed KL, KL(p_s^T || q), would be another number
    reverse = p["kd_weight"] * T * T * sum(kl64(softmax64(s, T), q) for q, (s, _, _) in zip(targets, rows)) / len(rows)
    assert not math.isclose(terms["kd"].item(), reverse, rel_tol=1e-2)


@pytest.mark.parametrize("kind", ["tang_smooth", "tang_confidence", "tang_topk", "wsl"])
def test_no_gradient_reaches_the_teacher_and_the_student_gets_one(kind):
    zs, zt = randn(12, 4, 6).requires_grad_(), randn(13, 4, 6).requires_grad_()
    method = get_method(kind)({}, None, None, (3, 8, 8))
    terms = method.losses(Batch(None, torch.tensor([1, 5, 0, 0]), 0, 1), Outputs(zs), Outputs(zt))
    sum(terms.values()).backward()
    assert zt.grad is None  # even a teacher whose logits carry a graph gets nothing
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


def test_tang_topk_keeps_the_k_largest_and_spreads_the_rest():
    zt = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    method = get_method("tang_topk")({"k": 2, "T": 1.0}, None, None, (3, 8, 8))
    target = method.target(zt, torch.tensor([5]))[0].double().tolist()
    pt = softmax64(zt[0].double().tolist())
    assert math.isclose(target[0], pt[0], rel_tol=1e-6) and math.isclose(target[1], pt[1], rel_tol=1e-6)
    assert all(math.isclose(v, (1 - pt[0] - pt[1]) / 4, rel_tol=1e-6) for v in target[2:])  # the label is not kept


def wsl64(zs, zt, labels, T, alpha, ce_weight):
    total_kd = total_ce = 0.0
    weights = []
    for s, t, y in zip(zs, zt, labels):
        w = 1 - math.exp(-ce64(s, y) / (ce64(t, y) + 1e-7))  # student over teacher cross-entropy, T = 1
        weights.append(w)
        total_kd += w * kl64(softmax64(t, T), softmax64(s, T))
        total_ce += ce64(s, y)
    n = len(labels)
    return ce_weight * total_ce / n, alpha * T * T * total_kd / n, weights


def test_wsl_weights_each_examples_kl_by_the_cross_entropy_ratio():
    zs, zt, y = randn(14, 6, 5), randn(15, 6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    method = get_method("wsl")({}, None, None, (3, 8, 8))
    p = method.params
    assert (p["T"], p["alpha"], p["ce_weight"]) == (4.0, 2.25, 1.0)  # the authors' CIFAR settings
    ce, kd, weights = wsl64(zs.double().tolist(), zt.double().tolist(), y.tolist(), p["T"], p["alpha"], p["ce_weight"])
    assert len({round(w, 3) for w in weights}) > 1  # the weights differ between examples: the test can tell
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(terms["wsl"].item(), kd, rel_tol=1e-4)


def test_wsl_weight_is_detached_the_gradient_is_w_times_the_kl_gradient():
    """d/dz_s [alpha T^2 mean_i w_i KL_i] = alpha T w_i (p_s^T - p_t^T) / n with w a constant; a weight that
    carried a gradient would add terms through CE_s."""
    zs, zt, y = randn(16, 4, 5).requires_grad_(), randn(17, 4, 5), torch.tensor([3, 0, 1, 4])
    method = get_method("wsl")({"ce_weight": 0.0}, None, None, (3, 8, 8))
    method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))["wsl"].backward()
    T, alpha = method.params["T"], method.params["alpha"]
    _, _, weights = wsl64(zs.detach().double().tolist(), zt.double().tolist(), y.tolist(), T, alpha, 0.0)
    for row, (s, t, w) in enumerate(zip(zs.detach().double().tolist(), zt.double().tolist(), weights)):
        ps, pt = softmax64(s, T), softmax64(t, T)
        expected = [alpha * T * w * (a - b) / 4 for a, b in zip(ps, pt)]
        assert all(math.isclose(g, e, rel_tol=1e-4, abs_tol=1e-7) for g, e in zip(zs.grad[row].tolist(), expected))


def linear64(weight, bias, x):
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]


def test_layer_attention_matches_the_written_out_weighted_feature_loss():
    torch.manual_seed(0)  # the models' and the method's initialisation: fixed, so the check below is stable
    student, teacher = create_model("cifar_resnet8", 4, 3), create_model("cifar_resnet14", 4, 3)
    method = get_method("layer_attention")({"student_layers": [2, 3], "teacher_layers": [2, 3]}, student, teacher,
                                           (3, 16, 16))
    assert method.candidates == [[0, 1], [1]]  # layer2 attends over teacher layer2 and layer3; layer3 over layer3
    assert method.record == {"attend.layer2": "layer2, layer3", "attend.layer3": "layer3"}
    x, y = randn(18, 3, 3, 16, 16, scale=1.0), torch.tensor([0, 3, 1])
    with torch.no_grad():
        s_out, t_out = run_model(student.eval(), x, [2, 3]), run_model(teacher.eval(), x, [2, 3])
        for lin in [*method.queries, *[k for keys in method.keys for k in keys]]:  # scores big enough to matter
            lin.weight.mul_(6)
    method.eval()  # the projections' BatchNorm on running statistics: fixed maps, evaluated below
    terms = method.losses(Batch(x, y, 0, 1), s_out, t_out)

    def pooled64(f):  # global average over space, per channel, per example
        return [[sum(ch) / len(ch) for ch in (c.flatten().tolist() for c in example)] for example in f.double()]

    width, hint = method.params["width"], 0.0
    for m, s_feature in enumerate(s_out.features):
        cands = method.candidates[m]
        q = [linear64(method.queries[m].weight.double().tolist(), method.queries[m].bias.double().tolist(), v)
             for v in pooled64(s_feature)]
        keys = [[linear64(key.weight.double().tolist(), key.bias.double().tolist(), v)
                 for v in pooled64(t_out.features[i])] for key, i in zip(method.keys[m], cands)]
        with torch.no_grad():
            projected = [proj(t_out.features[i]).double() for proj, i in zip(method.projections[m], cands)]
        sq, count = 0.0, 0
        for b in range(len(y)):
            scores = [sum(a * c for a, c in zip(q[b], keys[i][b])) / math.sqrt(width) for i in range(len(cands))]
            attn = softmax64(scores)
            if m == 0:
                assert 0.05 < max(attn) < 0.95  # both candidates weigh: the mixture is really tested
            mixed = sum(a * p[b] for a, p in zip(attn, projected)).flatten().tolist()
            target = s_feature[b].double().flatten().tolist()
            sq += sum((u - v) ** 2 for u, v in zip(mixed, target))
            count += len(target)
        hint += sq / count
    ce = sum(ce64(s, label) for s, label in zip(s_out.logits.double().tolist(), y.tolist())) / len(y)
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(terms["attn_hint"].item(), method.params["beta"] * hint, rel_tol=1e-4)
    assert method.params["beta"] == 50.0 and "kd" not in terms


def test_layer_attention_weights_sum_to_one_are_logged_per_epoch_and_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student, teacher = create_model("cifar_resnet8", 4, 3), create_model("cifar_resnet14", 4, 3)
    method = get_method("layer_attention")({"kd_weight": 0.5}, student, teacher, (3, 16, 16))
    assert method.candidates == [[0, 1, 2], [1, 2], [2]]  # every teacher stage at or after the depth-matched one
    x, y = randn(19, 4, 3, 16, 16, scale=1.0), torch.tensor([0, 1, 2, 3])
    for step in range(2):
        s_out = run_model(student, x, method.student_features)
        t_out = run_model(teacher, x, method.teacher_features)  # a teacher graph: a leak would show in its grads
        for m, f in enumerate(s_out.features):
            attn = method.attention(m, f, t_out.features)
            assert attn.shape == (4, len(method.candidates[m]))
            assert torch.allclose(attn.sum(1), torch.ones(4), atol=1e-6) and (attn >= 0).all()
        terms = method.losses(Batch(x, y, 0, 1), s_out, t_out)
        assert set(terms) == {"ce", "attn_hint", "kd"}
        sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.queries.parameters())  # the attention itself learns
    logged = method.epoch_metrics()
    assert set(logged) == {"attn/layer1/layer1", "attn/layer1/layer2", "attn/layer1/layer3", "attn/layer2/layer2",
                           "attn/layer2/layer3", "attn/layer3/layer3"}
    for s_name in ("layer1", "layer2", "layer3"):
        assert math.isclose(sum(v for k, v in logged.items() if k.startswith(f"attn/{s_name}/")), 1.0, rel_tol=1e-6)
    assert method.epoch_metrics() == {}  # reset for the next epoch
