"""Micro-benchmarks (pytest-benchmark), kept out of the default test run (pyproject's testpaths is `tests`).

    python -m pytest benchmarks --benchmark-autosave      # run, and save the results
    python -m pytest benchmarks --benchmark-compare       # run, and compare with the last saved results

Results are stored in results/perf/micro/ (committed), not in pytest-benchmark's default ./.benchmarks,
so a regression shows against the numbers in the repository. Add --benchmark-compare-fail=mean:25% to fail
on a slowdown. CPU by default; KDBENCH_BENCH_DEVICE=cuda runs them on a GPU.
"""

import os
from pathlib import Path

import pytest
import torch

STORAGE = Path(__file__).resolve().parents[1] / "results" / "perf" / "micro"


def pytest_configure(config):
    try:
        storage = config.getoption("benchmark_storage")
    except ValueError:  # pytest-benchmark not installed: nothing to configure
        return
    if storage == "file://./.benchmarks":  # the plugin's default: keep the results in the repository instead
        config.option.benchmark_storage = f"file://{STORAGE}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("KDBENCH_BENCH_DEVICE", "cpu"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
