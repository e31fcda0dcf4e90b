"""PCGrad across a method's loss terms (`combine: pcgrad`): golden test against a float64 computation written
here, the classic mistake (projecting a pair that does not conflict), the engine's hook, and the suite option."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdbench.train.combine import pcgrad
from kdbench.data.spec import DataSpec
from kdbench.data.load import load_data
from kdbench import Interrupted
from kdbench.train.engine import EngineOptions, Hooks, Provided, fit
from kdbench.plan import make_plan
from kdbench.registry import get_method
from kdbench.report.cells import report_scope
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.config.load import load_suite
from kdbench.zoo import create_model


def dot64(a, b):
    return sum(x * y for x, y in zip(a, b))


def pcgrad64(grads, orders):
    """Yu et al.'s procedure written out on Python floats. grads[i][p]: term i's gradient on parameter p
    (a flat list) or None; orders[i]: the order in which term i visits the others."""
    n, n_params = len(grads), len(grads[0])
    size = [len(next(g[p] for g in grads if g[p] is not None)) if any(g[p] is not None for g in grads) else 0
            for p in range(n_params)]
    shared = [p for p in range(n_params) if sum(g[p] is not None for g in grads) >= 2]
    vecs = [[x for p in shared for x in (g[p] if g[p] is not None else [0.0] * size[p])] for g in grads]
    projected = []
    for i in range(n):
        gi = list(vecs[i])
        for j in orders[i]:
            if j == i:
                continue
            d = dot64(gi, vecs[j])  # against the original g_j
            if d < 0:
                gi = [a - d / dot64(vecs[j], vecs[j]) * b for a, b in zip(gi, vecs[j])]
        projected.append(gi)
    total = [sum(col) for col in zip(*projected)]
    out, at = [], 0
    for p in range(n_params):
        if p in shared:
            out.append(total[at:at + size[p]])
            at += size[p]
        else:
            own = [g[p] for g in grads if g[p] is not None]
            out.append(own[0] if own else None)
    return out


def random_grads(seed, pattern, shapes):
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": [torch.randn(*s, generator=gen, dtype=torch.float64).float() if reach else None
                      for reach, s in zip(row, shapes)] for i, row in enumerate(pattern)}


def test_pcgrad_matches_the_projection_written_out_in_float64():
    shapes = [(3, 4), (5,), (2, 2), (6,), (4,)]
    # parameter 0: all three terms; 1: terms 0 and 2; 2: term 1 only; 3: no term; 4: terms 1 and 2
    pattern = [[True, True, False, False, False], [True, False, True, False, True], [True, True, False, False, True]]
    for seed in range(6):  # several draws: some pairs conflict, some do not
        grads = random_grads(seed, pattern, shapes)
        combined, gram = pcgrad(grads, torch.Generator().manual_seed(100 + seed))
        order_gen = torch.Generator().manual_seed(100 + seed)  # the same seeded stream: one permutation per term
        orders = [torch.randperm(3, generator=order_gen).tolist() for _ in range(3)]
        rows = [[g.double().flatten().tolist() if g is not None else None for g in row] for row in grads.values()]
        expected = pcgrad64(rows, orders)
        for got, want in zip(combined, expected):
            if want is None:
                assert got is None
            else:
                assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                           for a, b in zip(got.double().flatten().tolist(), want))
        assert combined[2] is grads["t1"][2]  # a parameter of one term keeps that term's gradient, untouched
        shared = [0, 1, 4]  # the Gram matrix is over the shared parameters only
        for i, ri in enumerate(rows):
            for j, rj in enumerate(rows):
                d = sum(dot64(ri[p] or [0.0] * len(rows[0][p] or rows[1][p]), rj[p] or [0.0] * len(rows[0][p] or rows[1][p]))
                        for p in shared)
                assert math.isclose(gram[i, j].item(), d, rel_tol=1e-9, abs_tol=1e-9)


def test_a_pair_that_does_not_conflict_is_not_projected():
    g1, g2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 3.0])  # g1 . g2 = 2 > 0
    combined, _ = pcgrad({"a": [g1], "b": [g2]}, torch.Generator().manual_seed(0))
    assert torch.equal(combined[0], g1 + g2)  # exactly the plain sum
    g4 = torch.tensor([-1.0, 0.0, 0.0])  # conflicts with g1 only (g2 . g4 = 0: no conflict, no projection)
    combined, _ = pcgrad({"a": [g2], "b": [g4]}, torch.Generator().manual_seed(0))
    assert torch.equal(combined[0], g2 + g4)
    combined, _ = pcgrad({"a": [g1], "b": [g4]}, torch.Generator().manual_seed(0))
    # conflict: each gradient loses its component along the other, so the sum now agrees with both
    assert not torch.allclose(combined[0], g1 + g4)
    assert torch.dot(combined[0], g1) >= 0 and torch.dot(combined[0], g4) >= -1e-6


def test_terms_without_a_gradient_path_are_skipped_or_zero():
    grads = {"a": [torch.tensor([1.0, -1.0]), None], "b": [None, None], "c": [torch.tensor([-1.0, 0.0]), None]}
    combined, gram = pcgrad(grads, torch.Generator().manual_seed(0))
    assert torch.isfinite(combined[0]).all() and combined[1] is None
    assert gram[1].abs().sum() == 0  # the term reaching nothing: zero row, so never in conflict
    assert pcgrad({"a": [None], "b": [None]}, torch.Generator())[0] == [None]


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec("synthetic", train_size=96, test_size=32, num_classes=4, image_size=16), None,
                     torch.device("cpu"))


TRAIN = TrainConfig(epochs=2, batch_size=32, lr=0.05, schedule="step", milestones=[1])


def fit_kd(data, combine, **kw):
    torch.manual_seed(1)
    student, teacher = create_model("cifar_resnet8", 4, 3), create_model("cifar_resnet8", 4, 3).eval()
    with torch.no_grad():  # a teacher that always says class 0: KD pulls against CE, so the terms conflict
        teacher.get_classifier().bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    method = get_method("kd")({"ce_weight": 1.0}, student, teacher, (3, 16, 16))
    result = fit(student, method, teacher, data, TRAIN, AugmentConfig(crop_padding=4, flip=True), 0,
                 EngineOptions.for_device("cpu"), provided=Provided(combine=combine), **kw)
    return result, student


def test_engine_applies_pcgrad_logs_conflicts_per_epoch_and_resumes_identically(data):
    summed, _ = fit_kd(data, "sum")
    reference, ref_model = fit_kd(data, "pcgrad")
    assert "pcgrad_conflict" not in summed.metrics
    for epoch in reference.history:
        assert 0 < epoch["pcgrad_conflict"] <= 1 and -1 <= epoch["pcgrad_cosine"] <= 1  # conflicts to resolve
        assert epoch["pcgrad_cosine.ce.kd"] == epoch["pcgrad_cosine"]  # one pair: the mean is that pair's
    assert reference.passes.student_backward == 2 * summed.passes.student_backward  # one backward per term
    assert reference.history[-1]["test_loss"] != summed.history[-1]["test_loss"]  # it changed the updates
    # stopped mid-epoch and resumed: the same orders drawn, the same statistics, the same weights
    saved, steps = {}, [0]

    def should_stop():
        steps[0] += 1
        return steps[0] == 2

    with pytest.raises(Interrupted):
        fit_kd(data, "pcgrad", hooks=Hooks(checkpoint=lambda s: saved.update(state=s), should_stop=should_stop))
    resumed, model = fit_kd(data, "pcgrad", resume=saved["state"])
    assert resumed.history == [{**h, **{k: r[k] for k in ("epoch_time", "images_per_sec")}}
                               for h, r in zip(reference.history, resumed.history)]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


def test_suite_entry_combine_is_in_the_label_and_the_job_key(write_suite):
    path = write_suite({"methods": ["kd", {"method": "kd", "combine": "pcgrad"},
                                    {"method": "dkd", "label": "dkd_pc", "combine": "pcgrad"}]})
    plan = make_plan(load_suite(path), Path(path))
    jobs = {j.method.label: j for j in plan.jobs if j.role == "student"}
    assert set(jobs) == {"kd", "kd+pcgrad", "dkd_pc"}
    assert jobs["kd+pcgrad"].key != jobs["kd"].key and jobs["kd+pcgrad"].config["combine"] == "pcgrad"
    assert "combine" not in jobs["kd"].config  # summed: the hash of existing jobs is unchanged
    alone = make_plan(load_suite(write_suite({"methods": ["kd"]}, name="alone.yaml")), Path(path))
    assert [j.key for j in alone.jobs if j.role == "student"] == [jobs["kd"].key]
    # refused where it would change nothing, or misspelt: tests/malformed_suites/combine_*.yaml
    # the report's vanilla-KD reference is the summed entry, even when kd+pcgrad comes first
    first = write_suite({"methods": [{"method": "kd", "combine": "pcgrad"}, "kd"]}, name="order.yaml")
    runs = pd.DataFrame(columns=["role", "pair", "method", "method_name", "seed"])
    assert report_scope(make_plan(load_suite(first), Path(first)), runs).kd == "kd"
