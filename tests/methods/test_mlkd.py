"""MLKD: its float64 golden test (instance, batch and class levels at five temperatures, the confidence masks), and
its classic mistakes: the masks taken as a selection of examples (the authors' code scales averaged losses), the
two Gram matrices swapped, a single temperature."""

import math

import torch

from kdbench.method import Batch, Outputs
from kdbench.registry import get_method

from test_method_losses import ce64, kl64, randn, softmax64

TEMPS = [4.0, 3.0, 5.0, 2.0, 6.0]


def gram64(P, rows):
    """P P' (rows: examples x examples) or P' P (classes x classes), as nested lists."""
    n, c = len(P), len(P[0])
    if rows:
        return [[sum(P[i][k] * P[j][k] for k in range(c)) for j in range(n)] for i in range(n)]
    return [[sum(P[k][a] * P[k][b] for k in range(n)) for b in range(c)] for a in range(c)]


def gap64(Gs, Gt, n):
    return sum((t - s) ** 2 for rs, rt in zip(Gs, Gt) for s, t in zip(rs, rt)) / n


def fraction_at_or_below_median(values):
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return sum(v <= median for v in values) / n


def mlkd64(zs, zt):
    """(instance, batch, class, m, m_class) written out with explicit sums."""
    B, C = len(zs), len(zs[0])
    instance = batch = klass = 0.0
    for T in TEMPS:
        Ps, Pt = [softmax64(r, T) for r in zs], [softmax64(r, T) for r in zt]
        instance += T * T * sum(kl64(t, s) for s, t in zip(Ps, Pt)) / B
        batch += gap64(gram64(Ps, True), gram64(Pt, True), B)
        klass += gap64(gram64(Ps, False), gram64(Pt, False), C)
    P1 = [softmax64(r) for r in zt]
    m = fraction_at_or_below_median([max(r) for r in P1])
    m_class = fraction_at_or_below_median([sum(r[c] for r in P1) for c in range(C)])
    return instance, batch, klass, m, m_class


def test_mlkd_matches_the_three_levels_written_out_in_float64():
    zs, zt, y = randn(50, 7, 6), randn(51, 7, 6), torch.tensor([0, 5, 2, 2, 1, 4, 3])
    method = get_method("mlkd")({}, None, None, (3, 8, 8))
    p = method.params
    assert [p["T"], *p["extra_temperatures"]] == TEMPS and (p["ce_weight"], p["kd_weight"]) == (0.1, 0.9)
    instance, batch, klass, m, m_class = mlkd64(zs.double().tolist(), zt.double().tolist())
    assert (m, m_class) == (4 / 7, 3 / 6)  # 7 examples: 4 at or below the median; 6 classes: 3
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    ce = sum(ce64(s, c) for s, c in zip(zs.double().tolist(), y.tolist())) / 7
    assert math.isclose(terms["ce"].item(), 0.1 * ce, rel_tol=1e-5)
    assert math.isclose(terms["instance"].item(), 0.9 * m * instance, rel_tol=1e-5)
    assert math.isclose(terms["batch"].item(), 0.9 * m * batch, rel_tol=1e-4)
    assert math.isclose(terms["class"].item(), 0.9 * m_class * klass, rel_tol=1e-4)


def test_mlkd_masks_scale_the_averaged_losses_they_do_not_select_the_unsure_examples():
    """The unsure half of the batch agrees with the student, the sure half does not: selecting the unsure
    examples would give about 0; the authors' code (mask times an averaged loss) gives half the full mean."""
    zt = randn(52, 8, 5, scale=1.0)
    zt[:4, 0] += 12.0  # examples 0-3: a sure teacher
    zs = zt.clone()
    zs[:4] = randn(53, 4, 5)  # the student disagrees exactly where the teacher is sure
    method = get_method("mlkd")({"extra_temperatures": []}, None, None, (3, 8, 8))
    instance = method.losses(Batch(None, torch.zeros(8, dtype=torch.long), 0, 1), Outputs(zs), Outputs(zt))["instance"]
    full = 16 * sum(kl64(softmax64(t, 4.0), softmax64(s, 4.0))
                    for s, t in zip(zs.double().tolist(), zt.double().tolist())) / 8
    assert full > 0.5 and math.isclose(instance.item(), 0.9 * 0.5 * full, rel_tol=1e-5)


def test_mlkd_batch_level_relates_examples_and_class_level_relates_classes():
    """A student that swaps two classes for every example keeps the teacher's example-to-example relations (the
    B x B Gram is unchanged) but not its class co-occurrences; swapping the Gram matrices would invert this."""
    zt = randn(54, 6, 5)
    zs = zt[:, [1, 0, 2, 3, 4]]
    method = get_method("mlkd")({"extra_temperatures": []}, None, None, (3, 8, 8))
    terms = method.losses(Batch(None, torch.zeros(6, dtype=torch.long), 0, 1), Outputs(zs), Outputs(zt))
    assert terms["batch"].item() < 1e-7 and terms["class"].item() > 1e-4
    assert terms["instance"].item() > 1e-3
