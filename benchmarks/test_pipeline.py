"""The data pipeline per batch: the engine's device-resident gather + crop-and-flip + normalise, and what one
classic DataLoader worker does for a batch (PIL crop, flip, ToTensor, Normalize per image, then collate)."""

import pytest
import torch
from torch.utils.data import default_collate

from conftest import synchronize
from kdbench.tools.bench_loops import PilDataset, classic_transform
from kdbench.tools.bench_setup import bench_data
from kdbench.data.batches import epoch_batches, make_generator, normalize


@pytest.fixture(scope="module")
def data(device):
    return bench_data("synthetic", None, device)  # 50,000 CIFAR-100-shaped images


@pytest.mark.parametrize("batch_size", [64, 512])
def test_engine_batch(benchmark, data, device, batch_size):
    train = data[0]

    def batch():
        batches = epoch_batches(train.train, batch_size, make_generator(device, 0), make_generator(device, 1), 4, True)
        images, labels = next(batches)
        x = normalize(images, train.info, channels_last=device.type == "cuda")
        synchronize(device)
        return x

    assert benchmark(batch).shape == (batch_size, 3, 32, 32)


@pytest.mark.parametrize("batch_size", [64, 512])
def test_classic_batch(benchmark, data, batch_size):
    train, images, labels = data
    dataset = PilDataset(images[:4096].permute(0, 2, 3, 1).contiguous().numpy(), labels[:4096].tolist(),
                         classic_transform(train.info))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:batch_size].tolist()

    def batch():
        return default_collate([dataset[i] for i in order])

    x, y = benchmark(batch)
    assert x.shape == (batch_size, 3, 32, 32) and x.dtype == torch.float32
