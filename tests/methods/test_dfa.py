"""DFA (differentiable feature aggregation): its loss against a float64 computation, its search against finite
differences of the unrolled validation loss, and the behaviour of search then freeze (alpha moved only by
validation images, never by the training loss; the teacher never trained; BatchNorm statistics moved once)."""

import copy
import math

import torch
from torch.func import functional_call

from kdbench.losses import cross_entropy
from kdbench.method import Batch, Outputs, run_model
from kdbench.registry import get_method

from test_method_losses import ce64, randn, softmax64
from test_methods import Harness, batch, model, state

BLOCKS = [[f"layer{s}.{b}" for b in range(3)] for s in (1, 2, 3)]


def test_dfa_loss_is_ce_plus_mse_to_the_softmax_weighted_teacher_blocks():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet20", 1)
    method = get_method("dfa")({}, student, teacher, (3, 16, 16))
    assert method.candidates == BLOCKS and method.student_features == [1, 2, 3]
    alphas = ([0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0])
    with torch.no_grad():
        for a, values in zip(method.alpha, alphas):
            a.copy_(torch.tensor(values))
    method.eval()  # the regressors' BatchNorm on running statistics: r(S) below is the same fixed map
    shapes = [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    s_feats = [randn(30 + m, *shape, scale=1.0) for m, shape in enumerate(shapes)]
    t_feats = [randn(40 + i, *shapes[i // 3], scale=1.0) for i in range(9)]
    zs, y = randn(50, 2, 4), torch.tensor([3, 1])
    terms = method.losses(Batch(None, y, 0, 1), Outputs(zs, s_feats), Outputs(randn(51, 2, 4), t_feats))
    mses = []
    for m in range(3):
        with torch.no_grad():
            regressed = method.regressors[m](s_feats[m]).double().flatten().tolist()
        w = softmax64(alphas[m])
        blocks = [t.double().flatten().tolist() for t in t_feats[3 * m:3 * m + 3]]
        hint = [sum(wi * b[j] for wi, b in zip(w, blocks)) for j in range(len(regressed))]
        mses.append(sum((r - h) ** 2 for r, h in zip(regressed, hint)) / len(hint))
    ce = sum(ce64(s, label) for s, label in zip(zs.double().tolist(), y.tolist())) / 2
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(terms["hint"].item(), 100.0 * sum(mses) / 3, rel_tol=1e-4)


def unrolled_val_loss(method, student, teacher_groups, b, val, alphas, xi, create_graph=False):
    """CE on the validation batch after one virtual SGD step of the student on the training loss, at `alphas`."""
    buffers = {n: x.clone() for n, x in student.named_buffers()}
    params = dict(student.named_parameters())
    weights = [torch.softmax(a, 0) for a in alphas]
    terms = method.terms(b.labels, run_model(student, b.images, method.student_features), teacher_groups, weights)
    grads = torch.autograd.grad(sum(terms.values()), list(params.values()), create_graph=create_graph)
    virtual = {n: (p if create_graph else p.detach()) - xi * g for (n, p), g in zip(params.items(), grads)}
    logits = functional_call(student, {**virtual, **{n: x.clone() for n, x in buffers.items()}}, (val[0],))
    for n, x in student.named_buffers():
        x.data.copy_(buffers[n])
    return cross_entropy(logits, val[1])


def test_dfa_hypergradient_matches_finite_differences_of_the_unrolled_validation_loss():
    torch.manual_seed(0)
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet20", 1)
    method = get_method("dfa")({"xi": 0.5}, student, teacher, (3, 16, 16)).double()
    student, teacher = student.double(), teacher.double().eval()  # the losses themselves compute in float32
    with torch.no_grad():
        for a in method.alpha:
            a.copy_(torch.randn(3, dtype=torch.float64))
    b = batch(n=8)
    b.images = b.images.double()
    val = (batch(seed=9, n=8).images.double(), batch(seed=9, n=8).labels)
    with torch.no_grad():
        groups = method.grouped(run_model(teacher, b.images, method.teacher_features).features)
    h = Harness(method, student, teacher)
    h.ctx.probe = lambda n: val
    captured = []
    method.alpha_step = lambda grads: captured.append(grads)
    method.search_step(b, groups, h.ctx)
    (grads,) = captured
    assert any(g.abs().max() > 1e-6 for g in grads)  # not the zero a first-order (no unrolling) search gives
    alphas = [a.detach().clone().requires_grad_() for a in method.alpha]  # the same, written out with autograd
    expected = torch.autograd.grad(unrolled_val_loss(method, student, groups, b, val, alphas, 0.5, True), alphas)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(grads, expected))
    eps = 1e-3  # and against finite differences, as one vector (loose: the losses round in float32, ReLUs have kinks)
    fd = []
    for m in range(3):
        for i in range(3):
            values = []
            for sign in (1, -1):
                alphas = [a.detach().clone() for a in method.alpha]
                alphas[m][i] += sign * eps
                values.append(unrolled_val_loss(method, student, groups, b, val, alphas, 0.5).item())
            fd.append((values[0] - values[1]) / (2 * eps))
    fd, hyper = torch.tensor(fd, dtype=torch.float64), torch.cat(grads)
    assert torch.nn.functional.cosine_similarity(fd, hyper, dim=0) > 0.98, (fd, hyper)
    assert 0.9 < hyper.norm() / fd.norm() < 1.1


def test_dfa_searches_alpha_on_validation_images_only_then_freezes_it():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet20", 1)
    method = get_method("dfa")({"search_fraction": 0.5, "alpha_lr": 0.05}, student, teacher, (3, 16, 16))
    twin = copy.deepcopy((student, teacher, method))
    val_a, val_b = batch(seed=7, n=16), batch(seed=8, n=16)
    probes = []

    def run(student, teacher, method, val, epoch):
        h = Harness(method, student, teacher)
        h.ctx.probe = lambda n: probes.append(n) or (val.images[:n], val.labels[:n])
        method.start_epoch(epoch, 4, h.ctx)
        b = batch(seed=1, epoch=epoch, epochs=4)
        student0 = copy.deepcopy(student)
        alpha0 = [a.detach().clone() for a in method.alpha]
        method.step(b, h.ctx)
        return h, student0, alpha0, b

    teacher0 = state(teacher)
    h, student0, alpha0, b = run(student, teacher, method, val_a, 0)
    assert probes == [5000]  # the validation (probe) images, asked for once
    assert method.alpha_steps.item() == 1 and method.alpha_avg0.abs().sum() > 0  # Adam's state: in state_dict
    assert all(not torch.equal(a0, a) for a0, a in zip(alpha0, method.alpha))  # searched
    twin_h, *_ = run(*twin, val_b, 0)
    assert not all(torch.equal(a, t) for a, t in zip(method.alpha, twin[2].alpha))  # driven by the validation images
    assert h.calls == [("student", {"student", "method"}, {"student", "method"})]  # never the teacher
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher0.items())
    # BatchNorm running statistics moved once (the update's forward), not by the virtual step
    with torch.no_grad():
        student0.train()(b.images)
    bn = {k: v for k, v in student.state_dict().items() if "running" in k}
    assert all(torch.allclose(v, student0.state_dict()[k]) for k, v in bn.items())
    for m in range(3):
        weights = [float(x.split(":")[1]) for x in method.record[f"stage{m + 1}.weights"].split(", ")]
        assert math.isclose(sum(weights), 1.0, abs_tol=1e-3)
    # epochs 2 and 3 of 4: frozen; the training loss never moves alpha (the harness's SGD holds it too)
    probes.clear()
    for epoch in (2, 3):
        h, _, alpha0, _ = run(student, teacher, method, val_a, epoch)
        assert all(torch.equal(a0, a) for a0, a in zip(alpha0, method.alpha))
    assert probes == [] and method.record["search"] == "2 of 4 epochs; frozen after epoch 2"
    p = h.ctx.passes
    assert (p.teacher_forward, p.student_forward, p.student_backward) == (1, 1, 1)  # as FitNets once frozen


def test_dfa_without_several_blocks_per_stage_searches_nothing():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)  # one block per stage
    method = get_method("dfa")({}, student, teacher, (3, 16, 16))
    h = Harness(method, student, teacher)
    method.start_epoch(0, 4, h.ctx)
    method.step(batch(epoch=0), h.ctx)  # no probe lent here: a search would fail
    assert method.record["search"].startswith("none") and h.ctx.passes.student_forward == 1


def test_dfa_alpha_step_is_adam_with_dartss_betas_and_l2_decay():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet20", 1)
    method = get_method("dfa")({"alpha_lr": 0.1, "alpha_weight_decay": 0.01}, student, teacher, (3, 16, 16))
    reference = [torch.nn.Parameter(a.detach().clone() + 0.3) for a in method.alpha]
    with torch.no_grad():
        for a, r in zip(method.alpha, reference):
            a.copy_(r)
    adam = torch.optim.Adam(reference, lr=0.1, betas=(0.5, 0.999), weight_decay=0.01)
    for k in range(3):
        grads = [randn(60 + 3 * k + m, 3, scale=1.0) for m in range(3)]
        method.alpha_step(grads)
        for r, g in zip(reference, grads):
            r.grad = g
        adam.step()
    assert all(torch.allclose(a, r, atol=1e-5) for a, r in zip(method.alpha, reference))
