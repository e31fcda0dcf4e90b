"""`kdbench bench`: the classic loop and the engine do the same augmentation work, and a tiny run measures
all three loops and writes its table. (Speed itself is measured by the benchmark, never asserted here.)"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from kdbench import KdbenchError
from kdbench.tools.bench_setup import BenchSettings, check_settings
from kdbench.tools.bench_loops import PilDataset, classic_transform
from kdbench.tools.bench import run_bench
from kdbench.tools.bench_output import write_result
from kdbench.data.spec import DataSpec, dataset_info
from kdbench.data.batches import crop_flip, normalize


def test_engine_crop_flip_equals_torchvision_randomcrop_and_flip(monkeypatch):
    """The classic loop's PIL RandomCrop(32, padding=4) + RandomHorizontalFlip, with the offsets it drew, is the
    engine's crop_flip with the same offsets and flips: pixel for pixel, and after normalisation."""
    info = dataset_info(DataSpec("cifar100"))
    n = 48
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    drawn = []
    get_params = T.RandomCrop.get_params

    def recording(img, output_size):  # the (top, left) torchvision drew in the padded image
        params = get_params(img, output_size)
        drawn.append(params[:2])
        return params

    monkeypatch.setattr(T.RandomCrop, "get_params", staticmethod(recording))
    full = classic_transform(info)
    crop_and_flip = T.Compose(full.transforms[:2])
    assert [type(t) for t in full.transforms] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert full.transforms[0].padding == 4 and full.transforms[0].size == (32, 32)
    dataset = PilDataset(images.permute(0, 2, 3, 1).numpy(), list(range(n)), full)
    flips = []
    for i in range(n):
        torch.manual_seed(i)
        classic, label = dataset[i]
        torch.manual_seed(i)  # the same draws again, stopping before ToTensor: the uint8 pixels
        pixels = torch.from_numpy(np.array(crop_and_flip(Image.fromarray(images[i].permute(1, 2, 0).numpy()))))
        top, left = drawn[2 * i]
        assert drawn[2 * i + 1] == (top, left) and label == i
        ours = {f: crop_flip(images[i:i + 1], torch.tensor([top]), torch.tensor([left]), torch.tensor([f]), 4)[0]
                for f in (False, True)}
        matches = [f for f, img in ours.items() if torch.equal(img, pixels.permute(2, 0, 1))]
        assert len(matches) == 1  # exactly one flip state reproduces torchvision's pixels
        flips.append(matches[0])
        engine = normalize(ours[matches[0]][None], info)[0]
        torch.testing.assert_close(engine, classic, rtol=0, atol=1e-5)  # ToTensor + Normalize vs one addcmul
    offsets = {d for d in drawn}
    assert any(flips) and not all(flips) and len(offsets) > 20  # both flips and many offsets exercised


def test_tiny_bench_measures_three_loops_and_writes_them(tmp_path):
    settings = BenchSettings(device="cpu", pairs=(("cifar_resnet14", "cifar_resnet8"),), batch_sizes=(8,), rounds=2,
                             steps=1, workers=0, cache_cell=True, cell_train_size=16, cell_epochs=1,
                             cell_batch_size=8, cell_methods=2, cell_seeds=1)
    result = run_bench(settings)
    assert [(r.loop, r.batch_size, len(r.rates)) for r in result.rows] == [
        ("classic", 8, 2), ("kdbench", 8, 2), ("ceiling", 8, 2)]
    assert all(rate > 0 for r in result.rows for rate in r.rates) and result.peak > 0
    kd = result.rows[1]
    assert result.ratio(kd, "classic") > 0 and result.ratio(kd, "ceiling") > 0
    assert result.cell["identical"] and result.cell["teacher_images_with"] < result.cell["teacher_images_without"]
    md, csv_path, js = write_result(result, tmp_path)
    text = md.read_text()
    for needle in ("| resnet14 -> resnet8 | 8 | classic |", "| resnet14 -> resnet8 | 8 | kdbench |",
                   "| resnet14 -> resnet8 | 8 | ceiling |", "torch " + torch.__version__, "command:",
                   "Shared teacher outputs"):
        assert needle in text
    data = json.loads(js.read_text())
    assert [r["loop"] for r in data["rows"]] == ["classic", "kdbench", "ceiling"]
    assert data["rows"][1]["kdbench_over_classic"] == pytest.approx(result.ratio(kd, "classic"))
    assert len(csv_path.read_text().splitlines()) == 4


@pytest.mark.parametrize("change,message", [
    ({"pairs": (("cifar_resnet56", "nope"),)}, "--pairs: unknown model 'nope'"),
    ({"batch_sizes": (0,)}, "--batch-sizes"),
    ({"loops": ("fast",)}, "--loops"),
    ({"dataset": "imagenet"}, "--dataset"),
])
def test_bench_settings_errors_are_one_line(change, message):
    with pytest.raises(KdbenchError, match=message.replace("'", ".")):
        check_settings(BenchSettings(**change))
