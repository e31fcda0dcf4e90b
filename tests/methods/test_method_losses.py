"""Golden tests for the method plugins' losses: each against an independent float64 computation written
out with explicit sums (no call into the code under test for the expected value)."""

import math

import torch

from kdbench.losses import hint_mse, kd_terms
from kdbench.method import Batch, Outputs
from kdbench.registry import get_method
from kdbench.zoo import create_model


def softmax64(row, T=1.0):
    m = max(row)
    exps = [math.exp((v - m) / T) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl64(p, q):
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q) if pc > 0)


def randn(seed, *shape, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def ce64(row, label):
    return -math.log(softmax64(row)[label])


def test_hint_mse_averages_over_every_element():
    r, h = randn(0, 3, 4, 5, 5, scale=1.0), randn(1, 3, 4, 5, 5, scale=1.0)
    flat_r, flat_h = r.double().flatten().tolist(), h.double().flatten().tolist()
    expected = sum((a - b) ** 2 for a, b in zip(flat_r, flat_h)) / len(flat_r)  # over batch, channels, positions
    assert math.isclose(hint_mse(r, h).item(), expected, rel_tol=1e-5)


def test_kd_terms_weigh_ce_and_T2_kl_batchmean():
    zs, zt, y = randn(2, 6, 10), randn(3, 6, 10), torch.tensor([0, 9, 3, 3, 5, 1])
    T, a, b = 3.0, 0.25, 0.75
    rows = list(zip(zs.double().tolist(), zt.double().tolist(), y.tolist()))
    ce = sum(ce64(s, label) for s, _, label in rows) / 6
    kl = sum(kl64(softmax64(t, T), softmax64(s, T)) for s, t, _ in rows) / 6
    terms = kd_terms(zs, zt, y, T, a, b)
    assert math.isclose(terms["ce"].item(), a * ce, rel_tol=1e-5)
    assert math.isclose(terms["kd"].item(), b * T * T * kl, rel_tol=1e-5)


def test_fitnets_one_stage_terms_are_ce_plus_100_mse():
    method = get_method("fitnets")({}, create_model("cifar_resnet8", 4, 3), create_model("cifar_resnet14", 4, 3),
                                   (3, 16, 16))
    zs, y = randn(6, 2, 4), torch.tensor([3, 0])
    f_s, f_t = randn(7, 2, 32, 8, 8, scale=1.0), randn(8, 2, 32, 8, 8, scale=1.0).relu()
    method.eval()  # the regressor's BatchNorm on running statistics: r(f_s) below is the same fixed map
    with torch.no_grad():
        regressed = method.regressor(f_s).double().flatten().tolist()
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs, [f_s]), Outputs(randn(9, 2, 4), [f_t]))
    hint = f_t.double().flatten().tolist()
    mse = sum((a - b) ** 2 for a, b in zip(regressed, hint)) / len(hint)
    ce = sum(ce64(s, label) for s, label in zip(zs.double().tolist(), y.tolist())) / 2
    assert set(terms) == {"ce", "hint"}  # no KD term in the CRD variant
    assert math.isclose(terms["hint"].item(), 100 * mse, rel_tol=1e-5)
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
