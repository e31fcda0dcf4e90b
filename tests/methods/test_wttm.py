"""WTTM: its float64 golden test, and its classic mistakes: the weight normalised away (a weighted mean over
the batch), or taken from the tempered distribution, or from the student."""

import math

import torch

from kdbench.method import Batch, Outputs
from kdbench.registry import get_method

from test_method_losses import ce64, kl64, randn, softmax64


def wttm64(zs, zt, T):
    """mean_i w_i KL(softmax(z_t / T) || softmax(z_s)), w_i = sum_c softmax(z_t)_c^(1/T), written out."""
    total = 0.0
    for s, t in zip(zs, zt):
        weight = sum(v ** (1 / T) for v in softmax64(t))
        total += weight * kl64(softmax64(t, T), softmax64(s))
    return total / len(zs)


def test_wttm_weighs_each_examples_ttm_term_by_the_teachers_power_sum():
    zs, zt, y = randn(40, 5, 9), randn(41, 5, 9), torch.tensor([2, 8, 3, 0, 1])
    method = get_method("wttm")({}, None, None, (3, 8, 8))
    p = method.params
    assert (p["T"], p["beta"], p["ce_weight"]) == (5.0, 4.0, 1.0)
    rows = zs.double().tolist(), zt.double().tolist()
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    assert math.isclose(terms["ce"].item(), sum(ce64(s, c) for s, c in zip(rows[0], y.tolist())) / 5, rel_tol=1e-5)
    assert math.isclose(terms["wttm"].item(), 4.0 * wttm64(*rows, 5.0), rel_tol=1e-5)


def test_wttm_weight_runs_from_one_for_a_sure_teacher_to_c_to_the_one_minus_gamma_for_a_uniform_one():
    """A batch of a sure teacher and a uniform one: the uniform example's term counts C^(1 - gamma) times, and the
    loss is the plain mean of the weighted terms (a weighted mean, sum w KL / sum w, would be smaller)."""
    C, T = 10, 2.0
    zt = torch.zeros(2, C)
    zt[0, 3] = 60.0  # p_t ~ one-hot: w ~ 1
    zs = randn(42, 2, C)
    method = get_method("wttm")({"T": T, "beta": 1.0, "ce_weight": 0.0}, None, None, (3, 8, 8))
    loss = method.losses(Batch(None, torch.zeros(2, dtype=torch.long), 0, 1), Outputs(zs), Outputs(zt))["wttm"]
    s = zs.double().tolist()
    kl_sure = kl64(softmax64(zt[0].double().tolist(), T), softmax64(s[0]))
    kl_uniform = kl64([1 / C] * C, softmax64(s[1]))
    w_uniform = C ** (1 - 1 / T)
    assert math.isclose(loss.item(), (1.0 * kl_sure + w_uniform * kl_uniform) / 2, rel_tol=1e-5)
    weighted_mean = (kl_sure + w_uniform * kl_uniform) / (1 + w_uniform)
    assert abs(loss.item() - weighted_mean) > 0.1


def test_wttm_weight_depends_on_the_teacher_only():
    zt, zs = randn(43, 4, 6), randn(44, 4, 6)
    method = get_method("wttm")({"beta": 1.0, "ce_weight": 0.0}, None, None, (3, 8, 8))
    y = torch.zeros(4, dtype=torch.long)
    zs = zs.requires_grad_()
    loss = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))["wttm"]
    loss.backward()
    T = method.params["T"]
    weights = torch.tensor([sum(v ** (1 / T) for v in softmax64(t)) for t in zt.double().tolist()], dtype=torch.float64)
    grad = weights[:, None] * (torch.softmax(zs.detach().double(), 1) - torch.softmax(zt.double() / T, 1)) / 4
    assert torch.allclose(zs.grad.double(), grad, atol=1e-6)
