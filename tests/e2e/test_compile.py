"""torch.compile in the engine: compiled training follows the eager loss curve, resumes, and keeps state_dict keys.

On CPU the engine compiles with inductor's default mode (CUDA graphs need CUDA); the CUDA-marked test checks
mode "reduce-overhead" with bf16 on a GPU (scripts/device_check.py runs it)."""

from __future__ import annotations

import pytest
import torch

from kdbench.data.spec import DataSpec
from kdbench.data.load import load_data
from kdbench import Interrupted
from kdbench.train.engine import COMPILED_PREFIX, Compiled, EngineOptions, Hooks, fit, plain_state_dict
from kdbench.method import run_model
from kdbench.registry import get_method
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.zoo import create_model

AUG = AugmentConfig(crop_padding=1, flip=True)


def tiny_mlp(width: int) -> torch.nn.Module:
    return create_model("mnist_mlp", 4, 3, hidden=(width,), img_size=8)


def test_options_compile_on_cuda_only_by_default():
    cpu = EngineOptions.for_device("cpu")
    assert not cpu.compile and cpu.compile_mode == "default"
    assert EngineOptions.for_device("cpu", compile=True).compile
    assert EngineOptions(torch.device("cuda"), True, True, True).compile_mode == "reduce-overhead"


def test_compiled_model_delegates_everything_but_the_call_and_hooks_run_eagerly():
    model = create_model("cifar_resnet8", 4, 3)
    wrapped = Compiled(model, EngineOptions.for_device("cpu", compile=True))

    def never(*args, **kwargs):  # compiling costs a minute on CPU: this test must not reach it
        raise AssertionError("the compiled forward ran")

    wrapped._call = never
    assert wrapped.eager_module is model and wrapped.feature_info is model.feature_info
    wrapped.load_state_dict(model.state_dict())  # keys without torch.compile's prefix
    x = torch.randn(2, 3, 32, 32)
    out = run_model(wrapped, x, ["layer2"])  # a module name: forward hooks, so the eager model
    assert out.features[0].shape[0] == 2
    out = run_model(wrapped, x, [1])  # a stage index: forward_intermediates, the plain model's method
    assert out.logits.shape == (2, 4)
    with pytest.raises(AssertionError, match="compiled forward ran"):
        run_model(wrapped, x, None)


def test_plain_state_dict_strips_only_the_compile_prefix():
    sd = {f"{COMPILED_PREFIX}fc.weight": 1, "fc.bias": 2, "a._orig_mod.b": 3}
    assert plain_state_dict(sd) == {"fc.weight": 1, "fc.bias": 2, "a._orig_mod.b": 3}


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec("synthetic", train_size=128, test_size=32, num_classes=4, image_size=8), None,
                     torch.device("cpu"))


TRAIN = TrainConfig(epochs=4, batch_size=32, lr=0.05, schedule="step", milestones=[3])  # 16 steps


def run(data, compile: bool, **kw):
    torch.manual_seed(1)
    student, teacher = tiny_mlp(16), tiny_mlp(32).eval()
    method = get_method("kd")({}, student, teacher, (3, 8, 8))
    opts = EngineOptions.for_device("cpu", compile=compile)
    return fit(student, method, teacher, data, TRAIN, AUG, 0, opts, **kw), student


@pytest.mark.slow
def test_compiled_training_follows_the_eager_curve_and_resumes(data):
    eager, eager_model = run(data, compile=False)
    compiled, model = run(data, compile=True)
    # inductor fuses and reorders float32 sums: close, not bit-identical
    for e, c in zip(eager.history, compiled.history):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-4)
    for a, b in zip(eager_model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == list(eager_model.state_dict())  # no _orig_mod. prefix in checkpoints

    # Stopped mid-epoch 2 and resumed compiled, from a checkpoint whose keys carry torch.compile's prefix
    # (a model saved as a compiled module): the numbers of the uninterrupted compiled run.
    saved, steps = {}, [0]

    def should_stop():
        steps[0] += 1
        return steps[0] == 6

    with pytest.raises(Interrupted):
        run(data, compile=True, hooks=Hooks(checkpoint=lambda s: saved.update(state=s), should_stop=should_stop))
    state = saved["state"]
    state["models"] = {k: {COMPILED_PREFIX + n: v for n, v in sd.items()} for k, sd in state["models"].items()}
    resumed, resumed_model = run(data, compile=True, resume=state)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in compiled.history],
                                                                       rel=1e-6)
    for a, b in zip(resumed_model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_follow_the_eager_curve_in_bf16():
    """reduce-overhead (CUDA graphs) against eager, both bf16, a CIFAR ResNet pair over 200 steps."""
    dev = torch.device("cuda")
    d = load_data(DataSpec("synthetic", train_size=64 * 50, test_size=1000, num_classes=10, image_size=32), None, dev)
    train = TrainConfig(epochs=4, batch_size=64, lr=0.05, schedule="step", milestones=[3])
    histories = {}
    for compile in (False, True):
        torch.manual_seed(1)
        student = create_model("cifar_resnet20", 10, 3).to(dev).to(memory_format=torch.channels_last)
        teacher = create_model("cifar_resnet56", 10, 3).to(dev).to(memory_format=torch.channels_last).eval()
        method = get_method("kd")({}, student, teacher, (3, 32, 32)).to(dev)
        opts = EngineOptions.for_device("cuda", compile=compile)
        assert opts.bf16 and opts.compile == compile
        histories[compile] = fit(student, method, teacher, d, train, AugmentConfig(crop_padding=4, flip=True), 0,
                                 opts).history
    for e, c in zip(histories[False], histories[True]):
        # bf16 rounds differently in fused kernels, and 200 steps amplify it: the curves agree, not the bits
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=0.05)
        assert abs(c["test_acc"] - e["test_acc"]) < 5


@pytest.mark.slow
def test_bench_reports_the_compile_cost_of_each_model(tmp_path):
    from kdbench.tools.bench_setup import BenchSettings
    from kdbench.tools.bench_output import markdown
    from kdbench.tools.bench import run_bench

    result = run_bench(BenchSettings(device="cpu", pairs=(("cifar_resnet8", "cifar_resnet8"),), batch_sizes=(4,),
                                     rounds=1, steps=1, workers=0, loops=("kdbench", "ceiling"), compile=True))
    assert [(c["role"], c["batch_size"], c["mode"]) for c in result.compile] == [
        ("teacher", 4, "default"), ("student", 4, "default")]
    assert all(c["seconds"] >= 0 and c["first_calls_s"] > c["steady_calls_s"] for c in result.compile)
    text = markdown(result)
    assert "## Compile cost per model" in text and "torch.compile: default" in text
