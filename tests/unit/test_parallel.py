"""kdbench.train.parallel without a process group: what a model is made into before it trains on several devices, and
that alone (one device, no group) everything is as it was. On two gloo processes: tests/e2e/test_devices.py."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from kdbench import KdbenchError
from kdbench.train import parallel
from kdbench.zoo import create_model


def test_batchnorm_is_swapped_in_place_and_alone_computes_what_torch_does():
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", 4, 3)
    twin = create_model("cifar_resnet8", 4, 3)
    twin.load_state_dict(model.state_dict())
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, nn.BatchNorm2d)}
    keys = list(model.state_dict())
    assert parallel.synchronise_batchnorm(model) is model and layers
    for name, layer in model.named_modules():  # the same objects (a method's hooks still hold), another class
        if name in layers:
            assert layer is layers[name] and type(layer) is parallel.WholeBatchBatchNorm2d
    assert list(model.state_dict()) == keys
    x = torch.randn(6, 3, 16, 16)
    model.train(), twin.train()
    assert parallel.current() is None and torch.equal(model(x), twin(x))  # no group: torch's own BatchNorm
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    parallel.synchronise_batchnorm(model)  # twice: already swapped, left alone
    assert type(layers[next(iter(layers))]) is parallel.WholeBatchBatchNorm2d


def test_timm_batchnorm_with_activation_keeps_its_activation():
    layer = BatchNormAct2d(3, act_layer=nn.ReLU)
    parallel.synchronise_batchnorm(layer)
    assert type(layer) is parallel.WholeBatchBatchNormAct2d
    assert parallel.WholeBatchBatchNormAct2d._after(layer, torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]


def test_a_batchnorm_of_unknown_behaviour_is_refused_in_one_line():
    class OddNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 3, 1), OddNorm(3))
    with pytest.raises(KdbenchError, match=r"^one job on several devices: OddNorm at '1' is a BatchNorm kdbench "
                                           r"cannot share among devices; train this model on one device$"):
        parallel.synchronise_batchnorm(model)


def test_alone_the_group_functions_leave_things_as_they_are(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.launched_world() == 1
    stop = lambda: True  # noqa: E731
    assert parallel.agreed(stop) is stop
    grads = [torch.ones(2), None]
    assert parallel.average_term_gradients(grads) is grads and grads[0].tolist() == [1.0, 1.0]
    terms = {"kd": torch.tensor(2.0)}

    class Split:
        shard = None

    assert parallel.mean_over_devices(Split(), terms) is terms
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(KdbenchError, match="WORLD_SIZE: expected a number of processes, got 'two'"):
        parallel.launched_world()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KdbenchError, match="the launcher's environment lacks 'RANK'"):
        parallel.start("cpu")
    assert parallel.current() is None
