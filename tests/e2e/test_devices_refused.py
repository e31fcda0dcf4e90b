"""`kdbench run --devices N` before anything runs: what a dry run says of the batch's layout (the ImageNet suites
on 8 devices, without the data), and what is refused in one line with exit 2 (no process is started, nothing is
written). The training itself on two processes is tests/e2e/test_devices.py (slow)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO
from rich.console import Console

from kdbench import commands
from kdbench.cli import main


def kdbench_run(monkeypatch, capsys, suite, *args) -> tuple[int, str, str]:
    """`kdbench run SUITE ARGS` in this process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", str(suite), *args])
    monkeypatch.setattr(commands, "out", Console(width=200))
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code or 0, captured.out, captured.err


@pytest.mark.parametrize("suite, jobs", [("imagenet.yaml", 10), ("papers/imagenet_r34_r18.yaml", 5)])
def test_the_imagenet_suites_dry_run_on_eight_devices_without_the_data(monkeypatch, capsys, tmp_path, suite, jobs):
    code, out, err = kdbench_run(monkeypatch, capsys, REPO / "suites" / suite, "--dry-run", "--devices", "8",
                                 "--data-root", str(tmp_path))
    assert code == 0, err
    assert f"{jobs} jobs" in out
    assert ("each job on 8 devices: global batch 256, 32 per device; learning rates as the suite gives them "
            "(not scaled") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a dry run writes nothing


STREAMED = {"data": {"dataset": "imagefolder", "path": "tree", "num_classes": 3, "image_size": 16, "loader": "stream"}}


@pytest.mark.parametrize("suite, args, env, message", [
    ({}, ["--devices", "0"], {}, "--devices: expected a positive number of devices, got 0"),
    ({}, ["--devices", "3"], {}, "field 'train.batch_size': teacher cifar_resnet14 seed 0 has batch_size 64, "
                                   "which does not split over 3 devices"),
    ({}, ["--devices", "2", "--executor", "ray"], {}, "not with --executor ray"),
    ({}, ["--devices", "2", "--compile"], {}, "--compile: not with several devices yet"),
    ({"seeds": [0, 1], "stack_seeds": True}, ["--devices", "2"], {}, "field 'stack_seeds': not with several devices"),
    ({}, ["--devices", "2"], {"WORLD_SIZE": "4"}, "torchrun started 4 processes; give the same number"),
    ({}, ["--executor", "slurm"], {"WORLD_SIZE": "2"}, "started by kdbench, not by torchrun"),
    (STREAMED, ["--teacher-cache"], {}, "--teacher-cache: the shared teacher outputs need data held on the device"),
])
def test_what_cannot_run_on_several_devices_is_refused_in_one_line(monkeypatch, capsys, write_suite, tmp_path,
                                                                   suite, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = write_suite(suite)
    code, out, err = kdbench_run(monkeypatch, capsys, path, *args)
    assert code == 2 and err.startswith("kdbench: error: ") and message in err, err
    assert err.count("\n") == 1 and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no database, store or process started
