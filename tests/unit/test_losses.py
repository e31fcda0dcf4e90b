"""Golden tests: each loss against an independent float64 computation written out with explicit sums."""

import math

import torch

from kdbench.losses import cross_entropy, kd_loss, kl_div


def softmax64(row, T):
    exps = [math.exp(v / T) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl64(p, q):
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))


def logits(seed, shape=(5, 7), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_kl_div_is_batchmean_kl_of_target_against_trained():
    zt, zs = logits(0), logits(1)
    T = 2.5
    expected = sum(kl64(softmax64(t, T), softmax64(s, T)) for t, s in zip(zt.double().tolist(), zs.double().tolist()))
    expected /= zt.shape[0]  # batchmean: over the batch only, not over classes
    assert math.isclose(kl_div(zt, zs, T).item(), expected, rel_tol=1e-5)


def test_kd_loss_scales_by_T_squared_and_is_not_elementwise_mean():
    zt, zs = logits(2, (8, 100)), logits(3, (8, 100))
    T = 4.0
    kl = sum(kl64(softmax64(t, T), softmax64(s, T)) for t, s in zip(zt.double().tolist(), zs.double().tolist())) / 8
    value = kd_loss(zs, zt, T).item()
    assert math.isclose(value, T * T * kl, rel_tol=1e-5)
    assert not math.isclose(value, T * T * kl / 100, rel_tol=1e-2)  # the elementwise-mean bug would give this


def test_kd_loss_direction_is_teacher_to_student():
    zt, zs = logits(4), logits(5)
    T = 1.0
    forward = sum(kl64(softmax64(t, T), softmax64(s, T)) for t, s in zip(zt.tolist(), zs.tolist())) / 5
    reverse = sum(kl64(softmax64(s, T), softmax64(t, T)) for t, s in zip(zt.tolist(), zs.tolist())) / 5
    assert math.isclose(kd_loss(zs, zt, T).item(), forward, rel_tol=1e-5)
    assert not math.isclose(forward, reverse, rel_tol=1e-3)


def test_kd_loss_gradient_flows_into_student_only():
    zt, zs = logits(6).requires_grad_(), logits(7).requires_grad_()
    kd_loss(zs, zt.detach(), 4.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_cross_entropy_matches_explicit_sum():
    z = logits(8)
    y = torch.tensor([0, 3, 6, 2, 1])
    expected = 0.0
    for row, label in zip(z.double().tolist(), y.tolist()):
        expected += -math.log(softmax64(row, 1.0)[label])
    assert math.isclose(cross_entropy(z, y).item(), expected / 5, rel_tol=1e-5)
