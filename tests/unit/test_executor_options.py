"""Executor options: a per-machine file, the command line over it, and one-line errors naming the file and field."""

from __future__ import annotations

import pytest

from kdbench import KdbenchError
from kdbench.run.executors import get_executor, load_options


def test_the_file_section_of_the_executor_then_the_command_line(tmp_path, monkeypatch):
    config = tmp_path / "executor.yaml"
    config.write_text("slurm: {partition: gpu, gpus_per_job: 1, mem_gb: 32, time_min: 90}\nray: {address: auto}\n")
    opts = load_options("slurm", config, mem_gb=64, partition=None)
    assert (opts.partition, opts.gpus_per_job, opts.mem_gb, opts.time_min, opts.address) == ("gpu", 1.0, 64.0, 90, None)
    monkeypatch.setenv("KDBENCH_EXECUTOR_CONFIG", str(config))  # found without --executor-config
    assert load_options("ray").address == "auto"
    assert load_options("inprocess").partition is None


@pytest.mark.parametrize("text, message", [
    ("slurm: {partiton: gpu}", "executor.yaml: slurm: unknown option 'partiton'"),
    ("slurm: {time_min: 1.5}", "executor.yaml: slurm: option 'time_min': expected int, got 1.5"),
    ("slurm: {mem_gb: -1}", "executor.yaml: slurm: option 'mem_gb': expected a non-negative number"),
    ("slurm: [gpu]", "executor.yaml: expected a mapping of executor name to options"),
])
def test_bad_config_files_say_file_field_and_what_was_expected(tmp_path, text, message):
    config = tmp_path / "executor.yaml"
    config.write_text(text)
    with pytest.raises(KdbenchError) as err:
        load_options("slurm", config)
    assert str(err.value).startswith(str(config)) and message in str(err.value) and "\n" not in str(err.value)


def test_unknown_executor_and_missing_file(tmp_path):
    with pytest.raises(KdbenchError, match="--executor: expected one of local, inprocess, ray, slurm, got 'k8s'"):
        get_executor("k8s")
    with pytest.raises(KdbenchError, match="nope.yaml: executor config file not found"):
        load_options("ray", tmp_path / "nope.yaml")
