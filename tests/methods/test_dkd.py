"""DKD, the method added by following docs/methods.md alone: its golden test."""

import math

import torch

from kdbench.method import Batch, Outputs
from kdbench.registry import get_method

from test_method_losses import ce64, kl64, randn, softmax64

def dkd64(zs, zt, labels, alpha, beta, T):
    """Decoupled KD written out: binary target/non-target KL, and the KL among non-target classes only."""
    tckd = nckd = 0.0
    for s, t, y in zip(zs, zt, labels):
        ps, pt = softmax64(s, T), softmax64(t, T)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        tckd += kl64(bt, bs)
        others = [c for c in range(len(s)) if c != y]
        qs = softmax64([s[c] for c in others], T)  # the softmax over non-target classes only
        qt = softmax64([t[c] for c in others], T)
        nckd += kl64(qt, qs)
    n = len(labels)
    return alpha * T * T * tckd / n, beta * T * T * nckd / n


def test_dkd_matches_decoupled_kl_terms_and_warms_up():
    zs, zt, y = randn(4, 5, 8), randn(5, 5, 8), torch.tensor([1, 0, 7, 2, 2])
    method = get_method("dkd")({}, None, None, (3, 8, 8))
    p = method.params
    assert (p["alpha"], p["beta"], p["T"], p["warmup"]) == (1.0, 8.0, 4.0, 20)  # the paper's defaults
    tckd, nckd = dkd64(zs.double().tolist(), zt.double().tolist(), y.tolist(), p["alpha"], p["beta"], p["T"])
    ce = sum(ce64(s, label) for s, label in zip(zs.double().tolist(), y.tolist())) / 5
    for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):  # linear warm-up over 20 epochs
        terms = method.losses(Batch(None, y, epoch, 240), Outputs(zs), Outputs(zt))
        assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
        assert math.isclose(terms["tckd"].item(), factor * tckd, rel_tol=1e-4)
        assert math.isclose(terms["nckd"].item(), factor * nckd, rel_tol=1e-4)




def test_dkd_gradients_are_finite_and_reach_the_student_only():
    zs, zt = randn(6, 4, 5).requires_grad_(), randn(7, 4, 5).requires_grad_()
    method = get_method("dkd")({"warmup": 0}, None, None, (3, 8, 8))
    terms = method.losses(Batch(None, torch.tensor([0, 4, 2, 2]), 0, 1), Outputs(zs), Outputs(zt.detach()))
    sum(terms.values()).backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0 and zt.grad is None
