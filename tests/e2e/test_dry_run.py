"""`kdbench run --dry-run`: a small plan is listed job by job; a large one is summarised (counts per role, method and
pair) in a screenful, and `--all` lists every job."""

import sys

import pytest
from rich.console import Console

from kdbench import commands
from kdbench.cli import main
from kdbench.plan import WAVES

ROLES = tuple(WAVES)


def dry_run(monkeypatch, capsys, suite, *args) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", str(suite), "--dry-run", *args])
    monkeypatch.setattr(commands, "out", Console(width=200))  # wide enough that no column is cut
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    return capsys.readouterr().out.splitlines()


def roles(lines: list[str]) -> list[str]:
    """The role column of the job table's rows (`#  role  model ...`)."""
    rows = [line.split() for line in lines]
    return [row[1] for row in rows if len(row) > 2 and row[0].isdigit() and row[1] in ROLES]


def test_a_small_plan_lists_every_job(monkeypatch, capsys, write_suite):
    lines = dry_run(monkeypatch, capsys, write_suite({"seeds": [0, 1]}))
    assert any("5 jobs, 4 cells" in line for line in lines)
    assert roles(lines) == ["teacher"] + ["student"] * 4
    assert not any("summary" in line for line in lines)


def test_a_large_plan_prints_a_summary_and_all_of_it_on_request(monkeypatch, capsys, write_suite):
    suite = write_suite({"seeds": list(range(300)), "students": ["cifar_resnet8", "cifar_resnet8x4"],
                         "teachers": ["cifar_resnet14", "cifar_resnet32x4"]})
    lines = dry_run(monkeypatch, capsys, suite)
    text = "\n".join(lines)
    assert len(lines) < 60, text
    # 3 pairs (r14->r8, r32x4->r8, r32x4->r8x4): kd a student per pair and seed, the baseline one per student and seed
    assert "3 pairs x 2 methods x 300 seeds = 1800 cells, 1502 jobs" in text
    counts = {tuple(line.split()[:3]) for line in lines if line.split()}
    assert {("teacher", "2", "0"), ("student", "1500", "0")} <= counts  # jobs by role: jobs, reused
    assert {("baseline", "900", "600"), ("kd", "900", "900")} <= counts  # by method: cells, student jobs
    assert ("cifar_resnet14->cifar_resnet8", "600", "600") in counts  # by pair: kd 300 + baseline 300
    full = dry_run(monkeypatch, capsys, suite, "--all")
    assert roles(full) == ["teacher"] * 2 + ["student"] * 1500
