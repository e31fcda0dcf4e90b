"""Pairs, model statistics and job hashing."""

import subprocess
import sys
from pathlib import Path

from kdbench.schedule import default_route_every
from kdbench.plan import make_plan
from kdbench.config.load import load_suite

from conftest import REPO


def plan_of(path, **kw):
    return make_plan(load_suite(path), Path(path), **kw)


def test_wildcards_expand_and_rule_keeps_larger_teachers(write_suite):
    plan = plan_of(write_suite({"teachers": ["cifar_resnet1*", "cifar_resnet8"], "students": ["cifar_resnet14"]}))
    names = [(p.teacher.name, p.student.name) for p in plan.pairs]
    assert names == [("cifar_resnet110", "cifar_resnet14")]
    pair = plan.pairs[0]
    assert pair.gap == pair.teacher.params / pair.student.params > 1
    assert pair.teacher.macs > pair.student.macs > 0


def test_cells_share_baseline_and_teacher_jobs(write_suite):
    plan = plan_of(write_suite({"teachers": ["cifar_resnet20", "cifar_resnet14"], "seeds": [0, 1]}))
    teachers = [j for j in plan.jobs if j.role == "teacher"]
    students = [j for j in plan.jobs if j.role == "student"]
    assert len(teachers) == 2
    assert len(students) == 2 * 1 + 2 * 2  # baseline per seed (shared by both pairs) + kd per pair and seed
    assert len(plan.cells) == 2 * 2 * 2
    assert plan.jobs.index(teachers[-1]) < plan.jobs.index(students[0])


def test_hash_changes_with_any_setting_that_changes_numbers(write_suite):
    a = plan_of(write_suite())
    b = plan_of(write_suite({"train": {"epochs": 2, "batch_size": 64, "lr": 0.1, "milestones": [1]}}))
    c = plan_of(write_suite({"methods": ["baseline", {"kd": {"T": 8}}]}))
    key = lambda p, role, label: next(j.key for j in p.jobs if j.role == role and j.method.label == label)  # noqa
    assert key(a, "teacher", "baseline") != key(b, "teacher", "baseline")
    assert key(a, "teacher", "baseline") == key(c, "teacher", "baseline")
    assert key(a, "student", "kd") != key(c, "student", "kd")
    assert key(a, "student", "baseline") == key(c, "student", "baseline")


def test_narrowing_options(write_suite):
    plan = plan_of(write_suite({"seeds": [0, 1, 2]}), methods=["kd"], seeds=[5], epochs=1)
    students = [j for j in plan.jobs if j.role == "student"]
    assert [(j.method.label, j.seed, j.train.epochs) for j in students] == [("kd", 5, 1)]


def test_pairs_and_dry_run_work_without_the_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("KDBENCH_DATA", raising=False)
    suite = REPO / "suites" / "cifar100_gap.yaml"
    for args in (["pairs", str(suite)], ["run", str(suite), "--dry-run"]):
        proc = subprocess.run([sys.executable, "-m", "kdbench.cli", *args], capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})
        assert proc.returncode == 0, proc.stderr
        assert "cifar_resnet32x4" in proc.stdout and "cifar_resnet8" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


def _route_every_by_search(epochs: int) -> int:
    """default_route_every as it was written first: a walk over every divisor (a job key holds its result)."""
    return next(d for d in range(1, epochs + 1) if epochs % d == 0 and epochs // d <= 24) if epochs else 1


def test_default_route_every_keeps_every_old_answer_and_never_walks_the_divisors():
    # Checked once for every epochs up to 100,000; here all up to 3,000 and a spread of larger ones.
    for epochs in [*range(3001), *range(3001, 100_001, 997), 2**16, 24 * 4093, 99_991]:
        assert default_route_every(epochs) == _route_every_by_search(epochs), epochs
    assert default_route_every(240) == 10 and default_route_every(7) == 1 and default_route_every(97) == 97
    assert default_route_every(999_999_937) == 999_999_937  # a prime typed by mistake: planned at once


def test_a_teacher_keeps_its_route_every_route_every_epochs_and_the_last(write_suite):
    plan = plan_of(write_suite({"methods": ["rco"], "train": {"epochs": 10}, "teacher": {"route_every": 4}}))
    teacher = next(j for j in plan.jobs if j.role == "teacher")
    assert teacher.train.epochs == 10 and teacher.route_epochs == [4, 8, 10]
    student = next(j for j in plan.jobs if j.role == "student")
    assert student.route_epochs == [] and not student.keeps_route(student.train.epochs)


def test_piped_output_is_plain_full_width_text():
    """Into a pipe or a file (no COLUMNS): every column and every character, no box lines, nothing cut to 80."""
    import os
    import re

    from kdbench.registry import methods

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    suite = REPO / "suites" / "quickstart.yaml"
    listed = subprocess.run([sys.executable, "-m", "kdbench.cli", "methods"], capture_output=True, text=True,
                            timeout=300, env=env)
    dry = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(suite), "--dry-run", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert listed.returncode == 0 and dry.returncode == 0, listed.stderr + dry.stderr
    for text in (listed.stdout, dry.stdout):
        assert "…" not in text and "━" not in text and "─" not in text
    for name, cls in methods().items():  # each method on one line, with all its defaults
        assert any(line.startswith(name + " ") and ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) in line
                   for line in listed.stdout.splitlines()), name
    plan = plan_of(suite)
    rows = [line.split() for line in dry.stdout.splitlines() if re.match(r"\d+ +[a-z]+ +mnist_", line)]
    assert len(rows) == len(plan.jobs)
    for row, job in zip(rows, plan.jobs):  # number, role, model, method, seed, ..., epochs, key (with the data's
        assert row[1:5] == [job.role, job.model, job.method.label, str(job.seed)], row  # fingerprint when cached)
        assert re.fullmatch(r"[0-9a-f]{16}", row[-1]), row
