"""A job's runtime (device kind, torch threads, deterministic settings): in its key, set around it, put back after;
and the store keeps no empty folder of a finished job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdbench import KdbenchError
from kdbench.config.load import load_suite
from kdbench.plan import make_plan
from kdbench.runtime import runtime_config
from kdbench.run.context import job_runtime
from kdbench.run.executors import ExecutorOptions
from kdbench.storage.store import ModelStore

from conftest import TINY


def test_every_key_holds_the_runtime_and_another_runtime_changes_every_key(write_suite):
    path = write_suite({"methods": ["baseline", "kd", "takd"], "teachers": ["cifar_resnet20", "cifar_resnet14"],
                        "data": {**TINY["data"], "val_size": 64}})
    plan = make_plan(load_suite(path), path)
    assert all(j.config["runtime"] == runtime_config("cpu", 1) for j in plan.jobs)
    assert plan.for_runtime(runtime_config("cpu", 1)) is plan  # the default: nothing planned again
    two = plan.for_runtime(runtime_config("cpu", 2))
    assert {j.config["runtime"]["threads"] for j in two.jobs} == {2}
    assert not {j.key for j in plan.jobs} & {j.key for j in two.jobs}  # a 1-thread teacher is never reused
    assert two.data_free_hash == plan.data_free_hash  # the same suite for a report
    assert two.plan_hash != plan.plan_hash  # another parent run
    gpu = plan.for_runtime(runtime_config("cuda", 2))
    assert gpu.jobs[0].config["runtime"] == {"device": "cuda", "cudnn_deterministic": True, "cudnn_benchmark": False,
                                             "matmul_precision": "highest"}  # threads do not change CUDA numbers
    # TAKD's assistant, chosen at run time, is keyed by the same runtime.
    resolved, failed = two.resolve_assistants(lambda key: 50.0)
    assistants = [j for j in resolved.jobs if j.role == "assistant"]
    assert not failed and assistants and all(j.config["runtime"]["threads"] == 2 for j in assistants)


@pytest.mark.parametrize("cpus, threads", [(None, 1), (0.25, 1), (1, 1), (2, 2), (3.5, 3)])
def test_threads_per_job_are_the_cpus_per_job(cpus, threads):
    assert ExecutorOptions(cpus_per_job=cpus).threads == threads


def test_job_runtime_sets_torch_and_puts_it_back():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("medium")  # as a library might leave it
    try:
        with job_runtime(runtime_config("cpu", 3), torch.device("cpu")):
            assert torch.get_num_threads() == 3
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cudnn.benchmark
        assert torch.get_num_threads() == before[0] and torch.get_float32_matmul_precision() == "medium"
        assert torch.are_deterministic_algorithms_enabled() == before[1]
    finally:
        torch.set_float32_matmul_precision(before[2])


def test_a_job_keyed_for_another_device_is_refused():
    with pytest.raises(KdbenchError, match="job keyed for cuda runs on cpu"):
        with job_runtime(runtime_config("cuda"), torch.device("cpu")):
            pass


def test_finished_jobs_leave_no_folder_and_models_are_listed_first(tmp_path):
    store = ModelStore(tmp_path)
    for key in ("ffff000000000000", "1111000000000000"):  # a model, and a partial one (no meta.json) before it
        (tmp_path / key).mkdir()
    (tmp_path / "ffff000000000000" / "meta.json").write_text(json.dumps(
        {"model_sha256": "", "route": {}, "metrics": {}, "config": {"model": "m", "role": "teacher"}}))
    for key in ("aaaa000000000000", "bbbb000000000000"):
        path = store.checkpoint_path(key)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"state")
    assert [(e.key, e.kind) for e in store.entries()] == [
        ("ffff000000000000", "model"), ("1111000000000000", "partial"),
        ("aaaa000000000000", "checkpoint"), ("bbbb000000000000", "checkpoint")]
    store.drop_checkpoint("aaaa000000000000")
    store.drop_checkpoint("cccc000000000000")  # nothing there: nothing to do
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["bbbb000000000000"]
    assert Path(tmp_path / "jobs").is_dir()
