"""Behaviour of the method plugins, step by step, on real timm models and small random batches."""

import contextlib
import copy
import math
import sys

import pytest
import torch

from kdbench.method import Batch, PassCounts, StepContext, TeacherRoute
from kdbench.registry import get_method
from kdbench.zoo import create_model

from test_method_losses import kl64, softmax64


def plugin_module(name):
    return sys.modules[get_method(name).__module__]


def model(name, seed, classes=4):
    torch.manual_seed(seed)
    return create_model(name, classes, 3)


def batch(seed=0, n=8, size=16, classes=4, epoch=0, epochs=4):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g), epoch, epochs)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def has_grad(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


class Harness:
    """The engine's update contract (separate SGD optimisers), recording for every update which modules got
    gradients and which changed. All gradients are cleared before each backward, so a leak cannot hide."""

    def __init__(self, method, student, teacher):
        self.modules = {"student": student, "teacher": teacher, "method": method}
        if not method.trains_teacher:
            teacher.eval()  # as the engine does (gradients stay enabled here, so that a leak would show)
        self.opts = {"student": torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.1),
                     "teacher": torch.optim.SGD(teacher.parameters(), lr=0.1)}
        self.calls = []
        self.ctx = StepContext(student, teacher, self.update, PassCounts(), contextlib.nullcontext)

    def update(self, which, loss, clip_grad_norm=None):
        for m in self.modules.values():
            m.zero_grad(set_to_none=True)
        before = {name: state(m) for name, m in self.modules.items()}
        (sum(loss.values()) if isinstance(loss, dict) else loss).backward()  # named terms: summed, as by default
        grads = {name for name, m in self.modules.items() if has_grad(m)}
        self.opts[which].step()
        setattr(self.ctx.passes, f"{which}_backward", getattr(self.ctx.passes, f"{which}_backward") + 1)
        moved = {name for name, m in self.modules.items() if changed(before[name], m)}
        self.calls.append((which, grads, moved))


def kl_batchmean64(p_logits, q_logits):
    rows = list(zip(p_logits.double().tolist(), q_logits.double().tolist()))
    return sum(kl64(softmax64(p), softmax64(q)) for p, q in rows) / len(rows)


def test_prokt_teacher_step_moves_only_the_teacher_then_student_follows_the_updated_teacher():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet14", 1)
    with torch.no_grad():  # confident heads: KL's two directions then differ clearly
        student.fc.weight.mul_(20)
        teacher.fc.weight.mul_(20)
    method = get_method("prokt")({}, student, teacher, (3, 16, 16))
    h = Harness(method, student, teacher)
    b = batch()
    student0, teacher0 = copy.deepcopy(student), copy.deepcopy(teacher)
    with torch.no_grad():
        z_s_eval = student0.eval()(b.images)  # the fixed target of the teacher step: student in eval mode
        z_t_train = teacher0.train()(b.images)  # the teacher being trained: train mode
        z_s_train = student0.train()(b.images)  # the student in its own step (its weights have not moved yet)
    terms = method.step(b, h.ctx)

    (w1, grads1, moved1), (w2, grads2, moved2) = h.calls
    assert (w1, grads1, moved1) == ("teacher", {"teacher"}, {"teacher"})  # detached student: no gradient leaks
    assert (w2, grads2, moved2) == ("student", {"student"}, {"student"})  # detached teacher
    with torch.no_grad():
        z_t_new = teacher.eval()(b.images)  # the *updated* teacher, in eval mode: the local target
    lam = method.params["lambda"]
    assert math.isclose(terms["teacher_kl"].item(), lam * kl_batchmean64(z_s_eval, z_t_train), rel_tol=1e-4)
    assert math.isclose(terms["student_kl"].item(), kl_batchmean64(z_t_new, z_s_train), rel_tol=1e-4)
    # the other direction, or the pre-update teacher, would give other numbers
    assert not math.isclose(terms["teacher_kl"].item(), lam * kl_batchmean64(z_t_train, z_s_eval), rel_tol=1e-2)
    with torch.no_grad():
        z_t_old_eval = teacher0.eval()(b.images)
    assert not math.isclose(terms["student_kl"].item(), kl_batchmean64(z_t_old_eval, z_s_train), rel_tol=1e-2)
    assert "ce" not in terms and "student_ce" not in terms  # no cross-entropy for the student
    p = h.ctx.passes
    assert (p.teacher_forward, p.teacher_backward, p.student_forward, p.student_backward) == (2, 1, 2, 1)


def test_prokt_dual_variant_ascends_beta_projected_at_zero():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)
    method = get_method("prokt")({"dual": True, "eps": 1e6, "eta": 1.0, "beta0": 0.5}, student, teacher, (3, 16, 16))
    method.step(batch(), Harness(method, student, teacher).ctx)
    assert method.beta.item() == 0.0  # KL - eps < 0 pushes beta down, and the projection stops it at 0


def test_fitnets_regressor_learns_and_the_teacher_gets_no_gradient_across_architectures():
    student, teacher = model("cifar_resnet8", 0), model("cifar_vgg8", 1)
    # guided layer by module name (stage layer1, 16x16 here), hint layer by stage index (act2 of VGG: 4x4)
    method = get_method("fitnets")({"guided_layer": "layer1", "hint_layer": 2}, student, teacher, (3, 16, 16))
    assert isinstance(method.regressor[0], torch.nn.Conv2d) and method.regressor[0].kernel_size == (13, 13)
    assert method.record["guided_layer"].startswith("layer1") and method.record["hint_layer"].startswith("act2")
    h = Harness(method, student, teacher)
    terms = method.step(batch(), h.ctx)
    assert set(terms) == {"ce", "hint"}
    (which, grads, moved), = h.calls
    assert which == "student" and grads == {"student", "method"} and moved == {"student", "method"}


def test_fitnets_hooks_any_named_module_and_maps_vectors_with_a_linear_regressor():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet14", 1)
    method = get_method("fitnets")({"guided_layer": "layer3.0.conv1"}, student, teacher, (3, 16, 16))
    assert method.student_features == ["layer3.0.conv1"]  # not a stage: a forward hook
    assert isinstance(method.regressor[0], torch.nn.ConvTranspose2d)  # 4x4 -> 8x8: half the hint's size
    h = Harness(method, student, teacher)
    method.step(batch(), h.ctx)
    assert h.calls[0][1] == {"student", "method"}
    mlp_teacher = create_model("mnist_mlp_100x2", 4, 3, img_size=16)
    mlp = get_method("fitnets")({}, student, mlp_teacher, (3, 16, 16))  # a map guided toward a vector hint
    assert mlp.record["hint_layer"] == "hidden.1 [100]" and isinstance(mlp.regressor[1], torch.nn.Linear)


@pytest.mark.parametrize("s_side,t_side,kind", [(16, 8, "Conv2d"), (8, 16, "ConvTranspose2d"), (8, 8, "Conv2d"),
                                                (8, 5, "Conv2d"), (5, 8, "ConvTranspose2d")])
def test_fitnets_regressor_shapes_map_the_student_map_onto_the_hint(s_side, t_side, kind):
    make_regressor = plugin_module("fitnets").make_regressor
    reg = make_regressor((2, 6, s_side, s_side), (2, 10, t_side, t_side))
    assert type(reg[0]).__name__ == kind
    assert reg(torch.randn(2, 6, s_side, s_side)).shape == (2, 10, t_side, t_side)


def test_fitnets_two_stage_trains_the_lower_student_then_drops_the_regressor():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet14", 1)
    params = {"two_stage": True, "ce_weight": 0.1, "kd_weight": 0.9, "hint_fraction": 0.5}
    method = get_method("fitnets")(params, student, teacher, (3, 16, 16))
    h = Harness(method, student, teacher)
    method.start_epoch(0, 4, h.ctx)
    terms = method.step(batch(epoch=0), h.ctx)
    assert set(terms) == {"hint"}  # no labels in stage 1
    assert has_grad(student.layer2) and not has_grad(student.layer3) and not has_grad(student.fc)
    assert has_grad(method.regressor)
    method.start_epoch(2, 4, h.ctx)  # stage 2 from epoch 2 of 4
    terms = method.step(batch(epoch=2), h.ctx)
    assert set(terms) == {"ce", "kd"}
    assert has_grad(student.fc) and not has_grad(method.regressor)
    assert method.record["hint_epochs"] == "2"


def rco_route(teacher_name, epochs):
    """A fake route: distinct weights per epoch, and a log of which epochs were loaded."""
    states = {e: state(model(teacher_name, 100 + e)) for e in epochs}
    loaded = []
    return TeacherRoute(list(epochs), lambda e: loaded.append(e) or states[e]), states, loaded


def test_rco_distills_stage_i_from_anchor_i_and_records_it():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)
    route, states, _ = rco_route("cifar_resnet8", range(1, 9))  # a teacher run of 8 epochs
    method = get_method("rco")({}, student, teacher, (3, 16, 16))
    h = Harness(method, student, teacher)
    h.ctx.route = route
    anchors = []
    for epoch in range(8):  # a student run of 8 epochs: 4 stages of 2
        method.start_epoch(epoch, 8, h.ctx)
        anchors.append(next(e for e, s in states.items() if all(torch.equal(s[k], v)
                                                               for k, v in teacher.state_dict().items())))
        method.step(batch(epoch=epoch, epochs=8), h.ctx)
    assert anchors == [2, 2, 4, 4, 6, 6, 8, 8]  # equal epoch intervals, the converged teacher last
    assert [method.record[f"stage{i}.anchor_epoch"] for i in range(1, 5)] == ["2", "4", "6", "8"]
    assert method.record["stage1"] == "anchor epoch 2 of 8, student epochs 1-2"


def test_rco_split_and_too_few_epochs_keep_the_converged_teacher_last():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)
    route, _, loaded = rco_route("cifar_resnet8", [5, 10, 15, 20])
    method = get_method("rco")({"anchors": 2, "split": [3, 1]}, student, teacher, (3, 16, 16))
    ctx = Harness(method, student, teacher).ctx
    ctx.route = route
    for epoch in range(8):
        method.start_epoch(epoch, 8, ctx)
    assert loaded == [10, 20] and method.record["stage2"] == "anchor epoch 20 of 20, student epochs 7-8"
    short = get_method("rco")({}, student, teacher, (3, 16, 16))  # 4 stages, 2 epochs: the first two are empty
    loaded.clear()
    for epoch in range(2):
        short.start_epoch(epoch, 2, ctx)
    assert short.record["stage1"] == short.record["stage3"] == "empty: 0 epochs" and loaded == [10, 20]


def test_rco_greedy_takes_the_furthest_checkpoint_under_the_threshold():
    student, teacher = model("cifar_resnet8", 0), model("cifar_resnet8", 1)
    route, _, loaded = rco_route("cifar_resnet8", [1, 2, 3, 4, 5, 6])
    images = batch(n=16).images
    for threshold, expected_first in ((float("inf"), 6), (-1.0, 1)):
        method = get_method("rco")({"choice": "greedy", "gss_threshold": threshold, "anchors": 3}, student, teacher,
                                   (3, 16, 16))
        ctx = Harness(method, student, teacher).ctx
        ctx.route, ctx.probe = route, lambda n: (images[:n], None)
        method.start_epoch(0, 3, ctx)
        assert method.record["stage1.anchor_epoch"] == str(expected_first)
        assert len(method.record["stage1.gss_losses"].split(",")) == 6  # every candidate measured
        assert ctx.passes.teacher_forward == 6  # probe passes count in the cost
