"""TTM (transformed teacher matching): its float64 golden test, and its classic mistake, a temperature on the
student's side too (that is KD without T^2)."""

import math

import torch

from kdbench.method import Batch, Outputs
from kdbench.registry import get_method

from test_method_losses import ce64, kl64, randn, softmax64


def ttm64(zs, zt, T):
    """mean_i KL(softmax(z_t / T) || softmax(z_s)), written out: the teacher tempered, the student not."""
    return sum(kl64(softmax64(t, T), softmax64(s)) for s, t in zip(zs, zt)) / len(zs)


def test_ttm_matches_the_transformed_teacher_against_the_untempered_student():
    zs, zt, y = randn(30, 5, 9), randn(31, 5, 9), torch.tensor([0, 8, 3, 3, 1])
    method = get_method("ttm")({}, None, None, (3, 8, 8))
    p = method.params
    assert (p["T"], p["beta"], p["ce_weight"]) == (10.0, 45.0, 1.0)  # the authors' README example (gamma 0.1)
    rows = zs.double().tolist(), zt.double().tolist()
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    ce = sum(ce64(s, label) for s, label in zip(rows[0], y.tolist())) / 5
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(terms["ttm"].item(), 45.0 * ttm64(*rows, 10.0), rel_tol=1e-5)
    # the power transform p^gamma / sum p^gamma is the softmax at T = 1 / gamma
    pt = softmax64(rows[1][0])
    powered = [v ** 0.1 for v in pt]
    assert all(math.isclose(a / sum(powered), b, rel_tol=1e-9) for a, b in zip(powered, softmax64(rows[1][0], 10.0)))


def test_ttm_is_zero_when_the_student_matches_the_tempered_teacher_untempered():
    """The student's optimum is z_s = z_t / T (up to a shift): KD at T (both sides tempered) would be
    minimised by z_s = z_t instead, and would not vanish here; nor is there a T^2 factor."""
    T, zt = 4.0, randn(32, 6, 7)
    method = get_method("ttm")({"T": T, "beta": 1.0, "ce_weight": 0.0}, None, None, (3, 8, 8))
    y = torch.zeros(6, dtype=torch.long)
    at_optimum = method.losses(Batch(None, y, 0, 1), Outputs(zt / T + 2.5), Outputs(zt))["ttm"]
    assert at_optimum.item() < 1e-6
    zs = zt.clone().requires_grad_()  # KD's optimum: a positive TTM loss, and a gradient toward z_t / T
    loss = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))["ttm"]
    expected = sum(kl64(softmax64(t, T), softmax64(t)) for t in zt.double().tolist()) / 6
    assert loss.item() > 0.05 and math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    grad = (torch.softmax(zt.double(), 1) - torch.softmax(zt.double() / T, 1)) / 6  # d/dz_s, untempered: no 1/T
    assert torch.allclose(zs.grad.double(), grad, atol=1e-6)
