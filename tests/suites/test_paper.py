"""Paper suites: their published numbers load and map to ours; Hinton's MNIST table, regenerated and committed in
results/hinton_mnist/, matches the runs in its MLflow store."""

from __future__ import annotations

import csv
import re
import sqlite3
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kdbench.report.paper import paper_frame
from kdbench.config.reference import read_reference
from kdbench.plan import make_plan
from kdbench.report.runs import RUN_COLUMNS
from kdbench.report.cells import report_scope
from kdbench.report.tuned import write_tuned_report
from kdbench.report.write import write_report
from kdbench.config.schema import SuiteError
from kdbench.config.load import load_suite

from conftest import REPO
PAPERS = sorted((REPO / "suites" / "papers").glob("*.yaml"))
HINTON = REPO / "results" / "hinton_mnist"


@pytest.mark.parametrize("path", PAPERS, ids=lambda p: p.stem)
def test_paper_suites_map_every_published_number(path):
    suite = load_suite(path)
    published = read_reference(path, suite.reference)
    empty = pd.DataFrame(columns=RUN_COLUMNS)
    frame = paper_frame(suite, path, empty, report_scope(make_plan(suite, path), empty))
    assert len(frame) == len(published)  # every published number has its row, none is dropped
    assert list(frame.paper) == [float(v) for v in published.value]
    assert frame["mean"].isna().all() and (frame.status != "").all()  # nothing run here: every cell says why
    statuses = dict(zip(zip(frame.paper_method, frame.paper_teacher, frame.dataset), frame.status))
    if suite.name.startswith("crd"):
        assert statuses[("AT", "resnet56" if suite.name == "crd_table1" else "vgg13", "cifar100")] == "not implemented"
        assert statuses[("KD", "vgg13", "cifar100")] == "not run"
    if suite.name == "takd_cifar100":
        assert statuses[("KD", "plain10", "cifar100")] == "plain10 not in our zoo"
        assert statuses[("KD", "plain10", "cifar10")] == "other dataset: cifar10"
        assert statuses[("KD", "resnet110", "cifar100")] == "not run"


def test_reference_block_errors_are_one_line(tmp_path):
    (tmp_path / "paper.csv").write_text("table,dataset,teacher,student,method,value,note\n"
                                        "t,mnist,big,small,KD,1.0,\n")
    base = {"name": "p", "data": {"dataset": "mnist"}, "teachers": ["mnist_mlp_400x2"],
            "students": ["mnist_mlp_30x2"], "methods": ["kd"], "seeds": [0], "train": {"epochs": 1}}
    ref = {"csv": "paper.csv", "table": "t", "title": "x", "models": {"big": "mnist_mlp_400x2", "small": None},
           "methods": {"KD": "kd"}}
    cases = [({"csv": "nope.csv"}, "field 'reference.csv': no such file"),
             ({"table": "t9"}, "field 'reference.table': no table 't9'"),
             ({"models": {"big": "mnist_mlp_400x2"}}, "the paper's 'small' is not mapped"),
             ({"methods": {}}, "field 'reference.methods': the paper's 'KD' is not mapped"),
             ({"models": {"big": "mnist_mlp_999", "small": None}}, "unknown model 'mnist_mlp_999'"),
             ({"metric": "test_errors"}, "needs test_images")]
    for change, message in cases:
        path = tmp_path / "suite.yaml"
        path.write_text(yaml.safe_dump({**base, "reference": {**ref, **change}}))
        with pytest.raises(SuiteError, match=re.escape(message)) as info:
            load_suite(path)
        assert "\n" not in str(info.value)


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def hinton_runs():
    db = HINTON / "mlflow.db"
    if not db.is_file():
        pytest.skip("results/hinton_mnist/mlflow.db not present")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:  # read-only: the committed store stays untouched
        rows = con.execute("""
            select r.run_uuid, r.status,
                   (select value from tags t where t.run_uuid = r.run_uuid and t.key = 'kdbench.role'),
                   (select value from tags t where t.run_uuid = r.run_uuid and t.key = 'kdbench.method'),
                   (select value from tags t where t.run_uuid = r.run_uuid and t.key = 'kdbench.seed'),
                   (select value from metrics m where m.run_uuid = r.run_uuid and m.key = 'test_acc'
                    order by m.step desc limit 1)
            from runs r
            where exists (select 1 from tags t where t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId')
              and (select value from tags t where t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId') =
                  (select r2.run_uuid from runs r2 join tags t2 on t2.run_uuid = r2.run_uuid
                   where t2.key = 'kdbench.role' and t2.value = 'suite' order by r2.start_time desc limit 1)
        """).fetchall()
    return rows


def test_hinton_table_matches_its_runs(hinton_runs):
    """Errors recomputed from the store's raw SQL (accuracy x 10,000 test images) against the committed table."""
    errors: dict[str, list[float]] = {}
    for _, status, role, method, seed, acc in hinton_runs:
        assert status == "FINISHED"
        row = "Teacher" if role == "teacher" else {"baseline": "Student alone", "kd_T20": "Distilled student"}[method]
        errors.setdefault(row, []).append(round(10000 * (100 - acc) / 100))
    assert {k: len(v) for k, v in errors.items()} == {"Teacher": 1, "Student alone": 3, "Distilled student": 3}
    table = {r["paper_method"]: r for r in read(HINTON / "paper_table.csv")}
    for row, values in errors.items():
        assert float(table[row]["mean"]) == pytest.approx(statistics.mean(values), abs=1e-6)
        assert int(table[row]["n"]) == len(values)
        if len(values) > 1:
            assert float(table[row]["std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert float(table[row]["diff"]) == pytest.approx(statistics.mean(values) - float(table[row]["paper"]))
    assert [float(table[r]["paper"]) for r in ("Teacher", "Student alone", "Distilled student")] == [67, 146, 74]


def test_hinton_results_are_what_the_committed_command_writes(hinton_runs, tmp_path):
    """Regenerating the report from the committed store gives the committed tables, and the README shows them."""
    folder = write_report(REPO / "suites" / "papers" / "hinton_mnist.yaml", tmp_path,
                          uri=f"sqlite:///{HINTON / 'mlflow.db'}")
    for name in ("paper_table.md", "paper_table.csv", "comparison.md", "comparison.csv", "cost.csv", "runs.csv"):
        assert (folder / name).read_text() == (HINTON / name).read_text(), name
    readme = (HINTON / "README.md").read_text()
    table = [line for line in (HINTON / "paper_table.md").read_text().splitlines() if line.startswith("|")]
    assert all(line in readme for line in table)
    assert "kdbench run suites/papers/hinton_mnist.yaml" in readme and "kdbench report" in readme


@pytest.mark.parametrize("tour", ["quickstart", "tour_all_methods"])
def test_the_committed_tours_regenerate_byte_for_byte(tour, tmp_path):
    """results/quickstart/ and results/tour_all_methods/ are what the report code writes from their stores."""
    committed = REPO / "results" / tour
    if not (committed / "mlflow.db").is_file():
        pytest.skip(f"results/{tour}/mlflow.db not present")
    folder = write_report(REPO / "suites" / f"{tour}.yaml", tmp_path, uri=f"sqlite:///{committed / 'mlflow.db'}")
    for name in ("comparison.md", "comparison.csv", "cost.md", "runs.csv", "accuracy_vs_gap.svg"):
        assert (folder / name).read_bytes() == (committed / name).read_bytes(), name


def test_the_readme_shows_the_committed_quickstart_table():
    quickstart = REPO / "results" / "quickstart"
    snippet = (REPO / "README.md").read_text()
    table = [line for line in (quickstart / "comparison.md").read_text().splitlines() if line.startswith("|")]
    assert table and all(line in snippet for line in table)
    assert "results/quickstart/accuracy_vs_gap.png" in snippet


def test_the_readmes_job_counts_are_the_tours():
    """The tour's job counts where a newcomer reads them: planned (the dry run's count) and run (the committed run's
    child runs: TAKD's assistants are added once chosen), on the front page and in the tour's own README."""
    suite = REPO / "suites" / "quickstart.yaml"
    planned, ran = len(make_plan(load_suite(suite), suite).jobs), len(read(REPO / "results" / "quickstart" / "runs.csv"))
    assert ran > planned
    for readme in (REPO / "README.md", REPO / "results" / "quickstart" / "README.md"):
        assert f"{planned} jobs planned, {ran} run" in readme.read_text(), readme


STUDIES = sorted(p.parent.name for p in (REPO / "results").glob("study_*/mlflow.db") if p.parent.suffix != ".tuned")
TUNED_STUDIES = sorted(p.parent.name for p in (REPO / "results").glob("study_*.tuned/mlflow.db"))


@pytest.mark.parametrize("study", STUDIES)
def test_study_results_are_what_the_committed_store_gives_and_the_readme_quotes_them(study, tmp_path):
    """A committed study regenerates byte for byte from its MLflow store (tables, the figures' data), and its README
    quotes the by-gap tables as the code writes them."""
    committed = REPO / "results" / study
    folder = write_report(REPO / "suites" / f"{study}.yaml", tmp_path, uri=f"sqlite:///{committed / 'mlflow.db'}")
    for name in ("comparison.md", "comparison.csv", "differences.md", "by_gap.md", "cost.csv", "runs.csv",
                 "learning_curves.csv", "accuracy_vs_gap.svg", "learning_curves.svg"):
        assert (folder / name).read_bytes() == (committed / name).read_bytes(), name
    readme = (committed / "README.md").read_text()
    table = [line for line in (committed / "by_gap.md").read_text().splitlines() if line.startswith("|")]
    assert table and all(line in readme for line in table)
    assert f"kdbench run suites/{study}.yaml" in readme and f"kdbench report suites/{study}.yaml" in readme


@pytest.mark.parametrize("study", TUNED_STUDIES)
def test_tuned_study_results_are_what_the_committed_store_gives_and_the_readme_quotes_them(study, tmp_path):
    """A committed tuned study (`kdbench tune`) regenerates byte for byte from its MLflow store: the tuned table,
    the trials, the chosen settings, the sensitivity and its figure; its README quotes the tuned table."""
    committed = REPO / "results" / study
    suite = study.removesuffix(".tuned")
    folder = write_tuned_report(REPO / "suites" / f"{suite}.yaml", tmp_path, uri=f"sqlite:///{committed / 'mlflow.db'}")
    for name in ("tuned.csv", "trials.csv", "sensitivity.csv", "settings.csv", "sensitivity.svg"):
        assert (folder / name).read_bytes() == (committed / name).read_bytes(), name
    tables = [line for line in (folder / "tuned.md").read_text().splitlines() if line.startswith("|")]
    assert tables == [line for line in (committed / "tuned.md").read_text().splitlines() if line.startswith("|")]
    readme = (committed / "README.md").read_text()
    first = (folder / "tuned.md").read_text().split("\n## ")[0]  # the tuned table, before the chosen settings
    assert all(line in readme for line in first.splitlines() if line.startswith("|"))
    assert f"kdbench tune suites/{suite}.yaml" in readme and f"kdbench report-tuned suites/{suite}.yaml" in readme
