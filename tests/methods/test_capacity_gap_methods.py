"""The capacity-gap baselines DIST, ESKD (an early-stopped teacher) and DGKD (densely guided KD): golden tests
against independent float64 computations, and behaviour tests that catch each method's classic mistake."""

import math
from pathlib import Path

import pytest
import torch

from kdbench import KdbenchError
from kdbench.method import Batch, Outputs
from kdbench.plan import make_plan
from kdbench.registry import get_method
from kdbench.config.schema import SuiteError
from kdbench.config.load import load_suite

from test_method_losses import ce64, kl64, randn, softmax64
from test_methods import Harness, batch, has_grad, model, plugin_module, rco_route, state
from test_methods_plan import GAP, jobs


# ------------------------------------------------------------------------------------------------ DIST

def pearson64(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = math.sqrt(sum((x - ma) ** 2 for x in a))
    vb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (va * vb)


def dist64(zs, zt, tau):
    """Inter: 1 - mean over examples of corr(y_s[i, :], y_t[i, :]); intra: the same over classes (columns)."""
    ys = [softmax64(row, tau) for row in zs]
    yt = [softmax64(row, tau) for row in zt]
    inter = 1 - sum(pearson64(s, t) for s, t in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(pearson64([r[c] for r in ys], [r[c] for r in yt]) for c in cols) / len(cols)
    return inter, intra


def test_dist_matches_pearson_relations_between_and_within_classes():
    zs, zt, y = randn(10, 6, 7), randn(11, 6, 7), torch.tensor([0, 6, 2, 2, 5, 1])
    method = get_method("dist")({}, None, None, (3, 8, 8))
    p = method.params
    assert (p["tau"], p["beta"], p["gamma"], p["ce_weight"]) == (4.0, 2.0, 2.0, 1.0)
    for params in ({}, {"tau": 1.0, "beta": 1.0, "gamma": 3.0}):
        method = get_method("dist")(params, None, None, (3, 8, 8))
        p = method.params
        inter, intra = dist64(zs.double().tolist(), zt.double().tolist(), p["tau"])
        terms = method.losses(Batch(None, y, 0, 1), Outputs(zs), Outputs(zt))
        ce = sum(ce64(s, label) for s, label in zip(zs.double().tolist(), y.tolist())) / 6
        assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
        assert math.isclose(terms["inter"].item(), p["tau"] ** 2 * p["beta"] * inter, rel_tol=1e-4)
        assert math.isclose(terms["intra"].item(), p["tau"] ** 2 * p["gamma"] * intra, rel_tol=1e-4)
        assert not math.isclose(inter, intra, rel_tol=1e-2)  # rows and columns are different relations


def test_dist_ignores_a_linear_change_of_the_probabilities_that_kd_would_punish():
    """Relations, not exact values: a student whose probabilities are a positive linear map of the teacher's (the
    same map for every example) has both correlations 1, so DIST is ~0 while the KL is not; on logits instead of
    probabilities, or with the batch's pairing lost, it would not be."""
    tau, k = 4.0, 0.05
    zt = randn(12, 8, 5)
    yt = torch.softmax(zt.double() / tau, 1)
    ys = (yt + k) / (1 + 5 * k)  # still a distribution over the 5 classes
    zs = (tau * ys.log()).float().requires_grad_()
    method = get_method("dist")({"tau": tau}, None, None, (3, 8, 8))
    terms = method.losses(Batch(None, torch.zeros(8, dtype=torch.long), 0, 1), Outputs(zs), Outputs(zt))
    assert terms["inter"].item() < 1e-5 and terms["intra"].item() < 1e-5
    kl = sum(kl64(t, s) for t, s in zip(yt.tolist(), ys.tolist())) / 8
    assert kl > 1e-3
    shuffled = method.losses(Batch(None, torch.zeros(8, dtype=torch.long), 0, 1), Outputs(zs[torch.arange(7, -1, -1)]),
                             Outputs(zt))
    assert shuffled["intra"].item() > 0.1  # each class compared across the same examples, in the same order
    sum(terms.values()).backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


def test_dist_step_trains_the_student_only():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet14", 1)
    method = get_method("dist")({}, student, teacher, (3, 16, 16))
    h = Harness(method, student, teacher)
    assert set(method.step(batch(), h.ctx)) == {"ce", "inter", "intra"}
    assert h.calls == [("student", {"student"}, {"student"})]


# ------------------------------------------------------------------------------------------------ ESKD

def holds(module, states):
    """The route epoch whose weights `module` holds."""
    return next(e for e, s in states.items() if all(torch.equal(s[k], v) for k, v in module.state_dict().items()))


def test_eskd_distills_from_the_early_route_checkpoint_not_the_final_teacher():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)
    route, states, loaded = rco_route("cifar_resnet8", [2, 4, 6, 8])  # a teacher run of 8 epochs
    method = get_method("eskd")({}, student, teacher, (3, 16, 16))  # teacher_fraction 0.5: epoch 4 of 8
    h = Harness(method, student, teacher)
    h.ctx.route = route
    b = batch()
    early, final = model("cifar_resnet8", 9).eval(), model("cifar_resnet8", 9).eval()
    early.load_state_dict(states[4])
    final.load_state_dict(states[8])
    for epoch in range(3):
        method.start_epoch(epoch, 3, h.ctx)
        assert holds(teacher, states) == 4
    assert loaded == [4]  # loaded once, kept for the whole run
    assert method.record["teacher_epoch"] == "4"
    student0 = state(student)
    terms = method.step(b, h.ctx)
    student.load_state_dict(student0)
    with torch.no_grad():
        zs = student.train()(b.images)
        zt_early, zt_final = early(b.images), final(b.images)
    T = method.params["T"]
    kd = lambda zt: 0.9 * T * T * sum(kl64(softmax64(t, T), softmax64(s, T))  # noqa: E731
                                      for s, t in zip(zs.double().tolist(), zt.double().tolist())) / len(zs)
    assert math.isclose(terms["kd"].item(), kd(zt_early), rel_tol=1e-4)
    assert not math.isclose(terms["kd"].item(), kd(zt_final), rel_tol=1e-2)
    assert h.calls == [("student", {"student"}, {"student"})]  # no gradient into the (early) teacher

    teacher.load_state_dict(states[8])  # a process resumed in the middle of an epoch: no start_epoch first
    resumed = get_method("eskd")({}, student, teacher, (3, 16, 16))
    resumed.step(batch(epoch=1, epochs=3), h.ctx)
    assert holds(teacher, states) == 4
    named = get_method("eskd")({"teacher_epoch": 6}, student, teacher, (3, 16, 16))
    named.start_epoch(0, 3, h.ctx)
    assert holds(teacher, states) == 6
    missing = get_method("eskd")({"teacher_epoch": 5}, student, teacher, (3, 16, 16))
    with pytest.raises(KdbenchError, match="teacher_epoch 5.*route checkpoints at epochs"):
        missing.start_epoch(0, 3, h.ctx)


def test_eskd_switches_kd_off_after_kd_until_and_stops_running_the_teacher():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)
    route, _, _ = rco_route("cifar_resnet8", [1, 2])
    method = get_method("eskd")({"kd_until": 0.5}, student, teacher, (3, 16, 16))
    h = Harness(method, student, teacher)
    h.ctx.route = route
    kd_per_epoch, teacher_runs = [], []
    for epoch in range(4):
        method.start_epoch(epoch, 4, h.ctx)
        before = h.ctx.passes.teacher_forward
        b = batch(epoch=epoch)
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(student.train()(b.images), b.labels).item()
        terms = method.step(b, h.ctx)
        kd_per_epoch.append(terms["kd"].item())
        teacher_runs.append(h.ctx.passes.teacher_forward - before)
        weight = 0.1 if epoch < 2 else 1.0  # CE alone, at full weight, once KD is off
        assert math.isclose(terms["ce"].item(), weight * ce, rel_tol=1e-4)
    assert kd_per_epoch[0] > 0 and kd_per_epoch[1] > 0 and kd_per_epoch[2:] == [0.0, 0.0]
    assert teacher_runs == [1, 1, 0, 0]
    assert method.record["kd_epochs"] == "2"
    assert all(grads == {"student"} for _, grads, _ in h.calls)


def test_eskd_nearest_route_epoch_and_bad_params(write_suite):
    nearest = plugin_module("eskd").nearest_route_epoch
    assert nearest([10, 20, 30, 240], 0.5) == 30 and nearest([10, 20], 0.75) == 10 and nearest([5, 10], 1.0) == 10
    for params, field in (({"teacher_fraction": 0.0}, "teacher_fraction"), ({"kd_until": 1.5}, "kd_until")):
        path = write_suite({"methods": [{"eskd": params}]})
        with pytest.raises(SuiteError, match=field):
            load_suite(path)


# ------------------------------------------------------------------------------------------------ DGKD

def test_dgkd_loss_is_ce_plus_the_sum_of_the_kept_guides_kd():
    zs, y = randn(20, 5, 6), torch.tensor([5, 0, 1, 1, 3])
    guides = [randn(21 + i, 5, 6) for i in range(3)]
    method = get_method("dgkd")({"T": 3.0, "ce_weight": 0.3, "kd_weight": 0.7}, None, None, (3, 8, 8))
    rows = zs.double().tolist()
    ce = sum(ce64(s, label) for s, label in zip(rows, y.tolist())) / 5
    for kept in ([0, 1, 2], [1], [0, 2]):
        kd = sum(sum(kl64(softmax64(t, 3.0), softmax64(s, 3.0)) for s, t in zip(rows, guides[g].double().tolist())) / 5
                 for g in kept)
        terms = method.guided_losses(y, zs, [guides[g] for g in kept])
        assert math.isclose(terms["ce"].item(), 0.3 * ce, rel_tol=1e-5)
        assert math.isclose(terms["kd"].item(), 0.7 * 9.0 * kd, rel_tol=1e-4)


def test_dgkd_drop_mask_is_seeded_by_job_epoch_and_step_never_by_the_global_generator():
    kept_guides = plugin_module("dgkd").kept_guides
    draws = {}
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # an unseeded mask (torch.rand without a generator) would follow this
        draws[global_seed] = [kept_guides(4, 0.5, 0, 7, epoch, step) for epoch in range(3) for step in range(40)]
    assert draws[0] == draws[1]
    assert len({tuple(k) for k in draws[0]}) > 5  # the mask changes from step to step
    assert draws[0] != [kept_guides(4, 0.5, 0, 8, epoch, step) for epoch in range(3) for step in range(40)]
    assert all(k for k in draws[0])  # never every guide dropped
    kept_fraction = sum(len(k) for k in draws[0]) / (4 * len(draws[0]))
    assert 0.45 < kept_fraction < 0.65  # drop rate 0.5 (plus the kept-one rule)
    always_one = [kept_guides(3, 0.999, 0, 0, 0, s) for s in range(50)]
    assert all(len(k) == 1 for k in always_one) and len({k[0] for k in always_one}) > 1
    exact = [kept_guides(3, 0.5, 1, 0, 0, s) for s in range(30)]  # the authors' code: drop exactly one
    assert all(len(k) == 2 for k in exact) and len({tuple(k) for k in exact}) == 3
    assert [kept_guides(1, 0.5, 1, 0, 0, s) for s in range(5)] == [[0]] * 5


def test_dgkd_step_runs_only_the_kept_guides_and_trains_the_student_only():
    student = model("cifar_resnet8", 0)
    guides = [model("cifar_resnet14", 1), model("cifar_resnet14", 2), model("cifar_resnet8", 3)]
    method = get_method("dgkd")({}, student, guides[-1], (3, 16, 16))
    h = Harness(method, student, guides[-1])
    h.modules.update({f"guide{i}": g.eval() for i, g in enumerate(guides[:-1])})
    h.ctx.guides, h.ctx.seed = guides, 5
    kept_guides = plugin_module("dgkd").kept_guides
    T = method.params["T"]
    for step in range(4):
        b = batch(seed=step, epoch=1)
        b.step = step
        kept = kept_guides(3, 0.5, 0, 5, 1, step)
        before = h.ctx.passes.teacher_forward
        student0 = state(student)
        terms = method.step(b, h.ctx)
        assert h.ctx.passes.teacher_forward - before == len(kept)
        student_after = state(student)
        student.load_state_dict(student0)
        with torch.no_grad():
            zs = student.train()(b.images).double().tolist()
            kd = sum(sum(kl64(softmax64(t, T), softmax64(s, T)) for s, t in zip(zs, guides[g](b.images).double().tolist()))
                     for g in kept) / len(zs)
        student.load_state_dict(student_after)
        assert math.isclose(terms["kd"].item(), 0.9 * T * T * kd, rel_tol=1e-4)
    assert all(call == ("student", {"student"}, {"student"}) for call in h.calls)  # no gradient into any guide
    assert not any(has_grad(g) for g in guides)


def test_dgkd_plan_chains_the_models_between_each_assistant_guided_by_every_model_above(write_suite):
    path = write_suite({**GAP, "methods": [{"method": "dgkd", "label": "two"},
                                           {"method": "dgkd", "label": "all", "params": {"max_assistants": 0}}]})
    plan = make_plan(load_suite(path), Path(path))
    teacher, = jobs(plan, "teacher")
    two, every = jobs(plan, "student", "two")[0], jobs(plan, "student", "all")[0]
    assert two.assistants == ("cifar_resnet32", "cifar_resnet14")  # 2 of the 3 between, spread out
    assert every.assistants == ("cifar_resnet32", "cifar_resnet20", "cifar_resnet14")
    assert two.assistant_choice == "between: cifar_resnet32, cifar_resnet14"
    guides = [plan.job(k) for k in plan.guide_keys(two)]
    assert [g.model for g in guides] == ["cifar_resnet56", "cifar_resnet32", "cifar_resnet14"] and guides[0] == teacher
    assert [plan.job(k).model for k in plan.guide_keys(guides[2])] == ["cifar_resnet56", "cifar_resnet32"]
    assert all(g.method.method == "dgkd" for g in guides[1:])  # assistants densely guided too
    # the first assistant is the same job for both chains (same teacher, model, loss): trained once
    assert plan.guide_keys(every)[1] == guides[1].key
    assert len(jobs(plan, "assistant")) == 4
