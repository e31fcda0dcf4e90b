"""Modifiers (kdbench.modifier): logit standardization and CTKD's curriculum temperature, each with a float64
golden test written out here and a behaviour test for its classic mistake; how a suite names them, where they
are refused, and how they enter a job's key."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdbench.config.load import load_suite
from kdbench.config.schema import SuiteError
from kdbench.method import Batch, Outputs
from kdbench.modifier import modify
from kdbench.storage.files import content_hash
from kdbench.plan import _without_method_code, make_plan
from kdbench.registry import get_method, get_modifier, method_hash, methods, modifier_hash, modifiers
from kdbench.report.cells import report_scope

from test_dkd import dkd64
from test_method_losses import ce64, kl64, randn, softmax64
from test_mlkd import mlkd64


def modified(method, modifier, params=None, modifier_params=None):
    return modify(get_method(method)(params or {}, None, None, (3, 8, 8)), get_modifier(modifier)(modifier_params or {}))


def zscore64(row):
    """(z - mean) / (1e-7 + sample standard deviation), the authors' normalize()."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (1e-7 + std) for v in row]


def kd64(zs, zt, T):
    return T * T * sum(kl64(softmax64(t, T), softmax64(s, T)) for s, t in zip(zs, zt)) / len(zs)


def test_both_modifiers_are_registered_beside_the_methods():
    assert {"logit_std", "ctkd"} <= set(modifiers())
    assert "logit_std" not in methods()


# ------------------------------------------------------------------------------------ logit standardization

def test_kd_with_logit_std_is_kd_on_z_scored_logits_and_ce_on_the_raw_ones():
    zs, zt, y = randn(70, 5, 7), randn(71, 5, 7), torch.tensor([0, 6, 2, 2, 4])
    method = modified("kd", "logit_std", {"T": 2.0, "kd_weight": 9.0})  # the authors' CIFAR setting
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    s, t = zs.double().tolist(), zt.double().tolist()
    kd = kd64([zscore64(r) for r in s], [zscore64(r) for r in t], 2.0)
    assert math.isclose(terms["kd"].item(), 9.0 * kd, rel_tol=1e-5)
    assert math.isclose(terms["ce"].item(), 0.1 * sum(ce64(r, c) for r, c in zip(s, y.tolist())) / 5, rel_tol=1e-5)


def test_logit_std_removes_the_logits_scale_and_shift_that_kd_would_punish():
    """The classic point of the z-score: a student whose logits are a*z_t + b (a > 0, per example) has the
    teacher's logit relations, and matches it exactly; plain KD at the same T punishes the scale."""
    zt = randn(72, 6, 8)
    a, b = torch.rand(6, 1, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.1, randn(73, 6, 1)
    zs, y = a * zt + b, torch.zeros(6, dtype=torch.long)
    standardized = modified("kd", "logit_std").losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))["kd"]
    plain = get_method("kd")({}, None, None, (3, 8, 8)).losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))["kd"]
    assert standardized.item() < 1e-6 and plain.item() > 0.1


def test_dkd_with_logit_std_standardises_both_decoupled_terms():
    zs, zt, y = randn(74, 5, 8), randn(75, 5, 8), torch.tensor([1, 0, 7, 2, 2])
    method = modified("dkd", "logit_std", {"T": 2.0, "warmup": 0})
    terms = method.losses(Batch(None, y, 0, 240), Outputs(zs), Outputs(zt))
    s, t = [zscore64(r) for r in zs.double().tolist()], [zscore64(r) for r in zt.double().tolist()]
    tckd, nckd = dkd64(s, t, y.tolist(), 1.0, 8.0, 2.0)
    assert math.isclose(terms["tckd"].item(), tckd, rel_tol=1e-4)
    assert math.isclose(terms["nckd"].item(), nckd, rel_tol=1e-4)
    ce = sum(ce64(r, c) for r, c in zip(zs.double().tolist(), y.tolist())) / 5
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)


def test_mlkd_with_logit_std_changes_the_instance_level_only():
    zs, zt, y = randn(76, 6, 5), randn(77, 6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    terms = modified("mlkd", "logit_std").losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    raw = get_method("mlkd")({}, None, None, (3, 8, 8)).losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    s, t = [zscore64(r) for r in zs.double().tolist()], [zscore64(r) for r in zt.double().tolist()]
    instance, *_ = mlkd64(s, t)
    assert math.isclose(terms["instance"].item(), 0.9 * 0.5 * instance, rel_tol=1e-5)
    for key in ("ce", "batch", "class"):  # the batch and class levels see the raw logits (the authors' code)
        assert torch.equal(terms[key], raw[key])


# ---------------------------------------------------------------------------------------------- CTKD

def test_ctkd_replaces_the_temperature_and_reverses_its_gradient_by_the_curriculum():
    """KD at T = 1 + 20 sigmoid(theta); theta's gradient is -lambda(e) dL/dtheta (dL/dT by central differences
    of the float64 loss), the student's is the ordinary one. theta starts at -2 (T about 3.4), where dL/dT is
    large enough for float32; the default, 1, starts at T 15.6."""
    zs, zt, y = randn(78, 4, 6).requires_grad_(), randn(79, 4, 6), torch.tensor([0, 5, 1, 1])
    method = modified("kd", "ctkd", {"ce_weight": 0.0, "kd_weight": 1.0}, {"init": -2.0})
    ctkd = method.modifier
    sig = 1 / (1 + math.exp(2.0))
    T = 1 + 20 * sig
    for epoch, lam in ((0, (1 - math.cos(math.pi / 10)) / 2), (4, (1 - math.cos(math.pi / 2)) / 2), (30, 1.0)):
        ctkd.theta.grad = zs.grad = None
        loss = method.losses(Batch(None, y, epoch, 240), Outputs(zs), Outputs(zt))["kd"]
        s, t = zs.detach().double().tolist(), zt.double().tolist()
        assert math.isclose(loss.item(), kd64(s, t, T), rel_tol=1e-5)
        loss.backward()
        h = 1e-4
        dL_dT = (kd64(s, t, T + h) - kd64(s, t, T - h)) / (2 * h)
        assert math.isclose(ctkd.theta.grad.item(), -lam * dL_dT * 20 * sig * (1 - sig), rel_tol=1e-3, abs_tol=1e-9)
        student = (torch.softmax(zs.detach().double() / T, 1) - torch.softmax(zt.double() / T, 1)) * T / 4
        assert torch.allclose(zs.grad.double(), student, atol=1e-5)  # T^2 * (p_s - p_t) / T / batch
    assert method.params["T"] == 4.0  # the method's own value is untouched between steps


def test_ctkd_temperature_ascends_the_loss_the_student_descends_it():
    """The classic mistake is a temperature that helps the student (no reversal): one SGD step on theta must
    raise the distillation loss once lambda > 0."""
    zs, zt, y = randn(80, 8, 6), randn(81, 8, 6), torch.zeros(8, dtype=torch.long)
    method = modified("dkd", "ctkd", {"warmup": 0}, {"init": -2.0})
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    before = sum(method.losses(Batch(None, y, 20, 240), Outputs(zs), Outputs(zt)).values())
    before.backward()
    opt.step()
    after = sum(method.losses(Batch(None, y, 20, 240), Outputs(zs), Outputs(zt)).values())
    assert after.item() > before.item()
    assert method.epoch_metrics()["ctkd_T"] != 1 + 20 / (1 + math.exp(2.0))


# ------------------------------------------------------------------------------------ suites and job keys

GAP = {"teachers": ["cifar_resnet14"], "students": ["cifar_resnet8"]}


def test_a_suite_entry_names_a_modifier_its_label_and_key_say_so(write_suite):
    path = write_suite({**GAP, "methods": ["kd", {"method": "kd", "modify": "logit_std", "params": {"T": 2}},
                                           {"method": "dkd", "modify": {"ctkd": {"curriculum_epochs": 20}}},
                                           {"method": "dkd", "modify": "ctkd", "combine": "pcgrad"}],
                        "train": {"epochs": 40, "batch_size": 64}})
    plan = make_plan(load_suite(path), Path(path))
    jobs = {j.method.label: j for j in plan.jobs if j.role == "student"}
    assert set(jobs) == {"kd", "kd+logit_std", "dkd+ctkd", "dkd+ctkd+pcgrad"}
    assert "modify" not in jobs["kd"].config  # no modifier: the key of an unmodified job is unchanged
    spec = jobs["dkd+ctkd"].config["modify"]
    assert spec["name"] == "ctkd" and spec["params"]["curriculum_epochs"] == 20 and spec["params"]["t_range"] == 20.0
    assert spec["method_hash"] == modifier_hash("ctkd") != method_hash("dkd")
    assert jobs["kd+logit_std"].config["method_hash"] == method_hash("kd")
    # --epochs scales the curriculum as it scales DKD's warm-up
    short = make_plan(load_suite(path), Path(path), epochs=4)
    job = next(j for j in short.jobs if j.method.label == "dkd+ctkd")
    assert job.config["modify"]["params"]["curriculum_epochs"] == 2 and job.config["method_params"]["warmup"] == 2
    # the modifier's code is method code: a job differing only in it has the same identity
    ids = plan.identities()
    config = {**jobs["dkd+ctkd"].config, "modify": {**spec, "method_hash": "edited"}}
    assert content_hash(_without_method_code(config, ids)) == ids[jobs["dkd+ctkd"].key]


@pytest.mark.parametrize("entry,expected", [
    ({"method": "fitnets", "modify": "logit_std"}, "modifier 'logit_std' cannot modify method 'fitnets': it declares "
                                                   "no logit losses"),
    ({"method": "kd", "modify": "logit_stdd"}, "unknown modifier 'logit_stdd' (known: ctkd, kl_mean, logit_std"),
    ({"method": "kd", "modify": {"ctkd": {"curriculum": 3}}}, "modifier 'ctkd' has no parameter 'curriculum'"),
    ({"method": "kd", "modify": {"ctkd": {"t_start": "one"}}}, "modifier 'ctkd': t_start: expected float"),
    ({"method": "kd", "modify": {"ctkd": {"lambda_max": -1.0}}}, "need 0 <= lambda_min <= lambda_max"),
    ({"method": "baseline", "modify": "ctkd"}, "cannot modify method 'baseline'"),
])
def test_a_modifier_is_refused_in_one_line_where_it_cannot_work(write_suite, entry, expected):
    with pytest.raises(SuiteError) as info:
        load_suite(write_suite({**GAP, "methods": [entry]}))
    message = str(info.value)
    assert "field 'methods.0.modify'" in message and expected in message and "\n" not in message


def test_the_reports_plain_kd_reference_is_never_a_modified_kd(write_suite):
    path = write_suite({**GAP, "methods": [{"method": "kd", "modify": "ctkd"}, "kd"]})
    runs = pd.DataFrame(columns=["role", "pair", "method", "method_name", "seed"])
    assert report_scope(make_plan(load_suite(path), Path(path)), runs).kd == "kd"


# ------------------------------------------------------------------------ the authors' reduction (TAKD, DGKD)

def test_kl_mean_is_nn_kldivloss_default_mean_over_every_element():
    """TAKD's and DGKD's code: lambda T^2 nn.KLDivLoss()(log p_s^T, p_t^T), the mean over batch AND classes."""
    zs, zt, y = randn(82, 5, 10), randn(83, 5, 10), torch.tensor([0, 9, 3, 3, 1])
    method = modified("takd", "kl_mean", {"assistants": "cifar_resnet20", "T": 3.0})
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
    s, t = zs.double().tolist(), zt.double().tolist()
    elements = [pc * (math.log(pc) - math.log(qc)) for a, b in zip(t, s)
                for pc, qc in zip(softmax64(a, 3.0), softmax64(b, 3.0))]
    assert math.isclose(terms["kd"].item(), 0.9 * 9.0 * sum(elements) / len(elements), rel_tol=1e-5)
    assert math.isclose(terms["kd"].item(), 0.9 * kd64(s, t, 3.0) / 10, rel_tol=1e-5)  # lambda / C
    ce = sum(ce64(r, c) for r, c in zip(s, y.tolist())) / 5
    assert math.isclose(terms["ce"].item(), 0.1 * ce, rel_tol=1e-5)  # the label term is not divided
