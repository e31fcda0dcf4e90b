"""Reports from a real MLflow store: one tiny suite is run once for the module, then its tables and figure are
checked against the runs, with every number recomputed here from MLflow independently of kdbench.report.

The suite has a teacher that diverges (an absurd learning rate) so its students fail, a method that
diverges (an absurd KD weight), a method left out of the run (not run) and a seed left out (partial cells).
"""

from __future__ import annotations

import io
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml
from matplotlib.container import ErrorbarContainer
from mlflow.tracking import MlflowClient
from rich.console import Console

from kdbench import KdbenchError
from kdbench.run.executors.inprocess import InProcessExecutor as Executor
from kdbench.plan import make_plan
from kdbench.report.figures import accuracy_figure
from kdbench.report.cells import comparison_frame, pick, report_scope
from kdbench.report.runs import failure_reason, load_runs, open_client, find_parent
from kdbench.report.write import write_report
from kdbench.config.load import load_suite
from kdbench.tracking import Tracker

from conftest import REPO
GOOD, BAD, STUDENT = "mnist_mlp_100x2", "mnist_mlp_400x2", "mnist_mlp_30x2"
SUITE = {
    "name": "reportsuite",
    "data": {"dataset": "synthetic", "train_size": 192, "test_size": 200, "num_classes": 10, "image_size": 28},
    "teachers": [GOOD, BAD],
    "students": [STUDENT],
    "methods": ["baseline", "kd", {"method": "kd", "label": "kd_T8", "params": {"T": 8.0}},
                {"method": "kd", "label": "kd_boom", "params": {"kd_weight": 1.0e9}},  # diverges in epoch 1
                {"method": "kd", "label": "kd_skipped"}],  # left out of the run: "not run"
    "seeds": [0, 1, 2],  # seed 2 is left out of the run: partial cells
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "lr_by_model": {BAD: 1.0e6}},  # the BAD teacher diverges
    "reference": {
        "csv": "paper.csv", "table": "t1", "title": "A made-up paper, table 1", "metric": "test_errors",
        "test_images": 200, "protocol": "assumed: everything",
        "models": {"T": GOOD, "S": STUDENT, "plainT": None},
        "methods": {"Teacher": "teacher", "Student": "baseline", "KD": "kd", "AT": None},
    },
}
PAPER_CSV = """# A made-up table to test the mapping
table,dataset,teacher,student,method,value,note
t1,synthetic,T,S,Teacher,120,
t1,synthetic,T,S,Student,150,
t1,synthetic,T,S,KD,140,
t1,synthetic,T,S,AT,141,
t1,synthetic,plainT,S,KD,130,a model we lack
t1,cifar10,T,S,KD,10,another dataset
t2,synthetic,T,S,KD,1,another table
"""
RUN_METHODS = ["baseline", "kd", "kd_T8", "kd_boom"]
RUN_SEEDS = [0, 1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Run the suite once, in process, into a store of this module's own (the conftest's stores are per test)."""
    root = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    suite_path = root / "reportsuite.yaml"
    suite_path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    (root / "paper.csv").write_text(PAPER_CSV)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDBENCH_STORE", str(root / "models"))
        plan = make_plan(load_suite(suite_path), suite_path, methods=RUN_METHODS, seeds=RUN_SEEDS)
        outcome = Executor(plan, None, "cpu", tracker=Tracker(uri), console=Console(file=io.StringIO())).run()
    assert outcome.failed  # the diverging teacher and method
    return {"root": root, "uri": uri, "suite": suite_path, "parent": outcome.parent_run}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    folder = write_report(store["suite"], out, uri=store["uri"])
    return folder


def truth(store):
    """The numbers straight from MLflow: (role, label, teacher, student, seed) -> (status, last-epoch test_acc)."""
    client = MlflowClient(store["uri"])
    runs = client.search_runs([client.get_run(store["parent"]).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{store['parent']}'")
    out = {}
    for run in runs:
        t = run.data.tags
        history = client.get_metric_history(run.info.run_id, "test_acc")
        last = max(history, key=lambda m: m.step).value if history else None
        out[(t["kdbench.role"], t["kdbench.method"], t["kdbench.teacher"], t["kdbench.student"],
             int(t["kdbench.seed"]))] = (run.info.status, last, t.get("kdbench.failure", ""))
    return out


def accs(runs, label, teacher):
    """Finished accuracies per seed of a method in a pair; the student-alone runs have no teacher."""
    return {k[4]: v[1] for k, v in runs.items() if k[0] == "student" and k[1] == label
            and k[2] in (teacher, "") and v[0] == "FINISHED"}


def read_csv(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_comparison_numbers_match_the_runs(store, report):
    runs = truth(store)
    rows = {(r["row"], r["teacher"]): r for r in read_csv(report / "comparison.csv")}
    base = accs(runs, "baseline", GOOD)
    assert sorted(base) == RUN_SEEDS
    checked = 0
    for label in ("baseline", "kd", "kd_T8"):
        values = accs(runs, label, GOOD)
        row = rows[(label, GOOD)]
        assert int(row["n"]) == len(values) == 2
        assert float(row["mean"]) == pytest.approx(statistics.mean(values.values()), abs=1e-6)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values.values()), abs=1e-6)
        assert row["note"] == "1 not run"  # seed 2 of the suite was left out
        if label != "baseline":
            diffs = [values[s] - base[s] for s in RUN_SEEDS]
            assert int(row["delta_n"]) == 2
            assert float(row["delta_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-6)
            assert float(row["delta_std"]) == pytest.approx(statistics.stdev(diffs), abs=1e-6)
        checked += 1
    # The baseline is shared: the same numbers in the column of the pair whose teacher failed.
    assert rows[("baseline", BAD)]["mean"] == rows[("baseline", GOOD)]["mean"]
    teacher = next(v for k, v in runs.items() if k[0] == "teacher" and k[2] == GOOD)
    assert float(rows[("teacher", GOOD)]["mean"]) == pytest.approx(teacher[1], abs=1e-6)
    # The best method of the column is the highest mean among the methods (the teacher row is not a method).
    means = {label: statistics.mean(accs(runs, label, GOOD).values()) for label in ("baseline", "kd", "kd_T8")}
    best = max(means.values())
    assert {label for label in means if rows[(label, GOOD)]["best"] == "True"} == \
           {label for label, m in means.items() if m == best}
    assert checked == 3


def test_failed_diverged_and_missing_cells_say_why(store, report):
    runs = truth(store)
    bad_teacher = next(v for k, v in runs.items() if k[0] == "teacher" and k[2] == BAD)
    assert bad_teacher[0] == "FAILED" and bad_teacher[2].startswith("diverged")
    rows = {(r["row"], r["teacher"]): r for r in read_csv(report / "comparison.csv")}
    assert rows[("teacher", BAD)]["status"] == "diverged"
    # Every reason of an empty cell, in seed order (seed 2 was left out of the run).
    assert rows[("kd", BAD)]["status"] == "teacher failed, not run" and rows[("kd", BAD)]["n"] == "0"
    assert rows[("kd_boom", GOOD)]["status"] == "diverged, not run"
    assert rows[("kd_skipped", GOOD)]["status"] == "not run"
    md = (report / "comparison.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert lines["teacher"].count("– (diverged)") == 1
    assert lines["kd_boom"].count("– (diverged, not run)") == 1
    assert "– (teacher failed, not run)" in lines["kd_boom"]
    assert lines["kd_skipped"].count("– (not run)") == 2
    for line in lines.values():
        assert " |  |" not in line and "nan" not in line  # no silent holes
    assert "1 not run" in lines["kd"] and "**" in md
    tex = (report / "comparison.tex").read_text()
    assert r"\textbf{" in tex and "-- (diverged, not run)" in tex and "mnist\\_mlp\\_30x2" in tex
    report_md = (report / "report.md").read_text()
    assert "## Runs without a number" in report_md and "diverged: training loss" in report_md


def test_cost_table_counts_passes(report):
    cost = {(r["method"], r["teacher"]): r for r in read_csv(report / "cost.csv")}
    steps = 2 * math.ceil(192 / 64)  # passes of one run: epochs x batches
    kd = cost[("kd", GOOD)]
    assert kd["finished"] == "2" and float(kd["teacher_forward"]) == float(kd["student_backward"]) == steps
    assert float(kd["teacher_backward"]) == 0 and float(kd["wall_time"]) > 0 and float(kd["images_per_sec"]) > 0
    base = cost[("baseline", "")]
    assert float(base["teacher_forward"]) == 0 and float(base["student_forward"]) == steps
    teacher = cost[("teacher", GOOD)]  # a teacher's own training counts as the teacher's passes
    assert float(teacher["teacher_backward"]) == steps and float(teacher["student_forward"]) == 0
    assert cost[("teacher", BAD)]["status"] == "diverged"


def ci95(values):
    """The 95 % t interval of the mean, from scipy directly."""
    from scipy import stats

    return stats.t.interval(0.95, len(values) - 1, loc=statistics.mean(values), scale=stats.sem(values))


def test_figure_lines_and_band_match_the_table(store):
    client = open_client(store["uri"])
    suite = load_suite(store["suite"])
    runs = load_runs(client, find_parent(client, suite.name))
    scope = report_scope(make_plan(suite, store["suite"]), runs)
    fig = accuracy_figure(comparison_frame(runs, scope), scope)
    acc_ax, gain_ax = fig.axes
    truth_runs = truth(store)

    def params(name):
        return sum(p.numel() for p in timm.create_model(name, num_classes=10, in_chans=3).parameters())

    gap = params(GOOD) / params(STUDENT)
    lines = {c.get_label(): c for c in acc_ax.containers if isinstance(c, ErrorbarContainer)}
    assert sorted(lines) == ["kd", "kd_T8"]  # kd_boom and kd_skipped have no point; the baseline is a band
    xs = {}
    base = accs(truth_runs, "baseline", GOOD)
    for label, container in lines.items():
        values = accs(truth_runs, label, GOOD)
        data_line, _, (bars,) = container
        (xs[label],) = data_line.get_xdata()  # the diverged teacher's pair has no point
        assert xs[label] == pytest.approx(gap, rel=0.2)  # dodged beside the pair's gap, not on it
        assert list(data_line.get_ydata()) == pytest.approx([statistics.mean(values.values())])
        (segment,) = bars.get_segments()
        assert segment[:, 1] == pytest.approx(ci95(list(values.values())))  # 95 % interval, not one sd
        # Panel (b): the paired improvement over the student alone, with its interval.
        gain = next(c for c in gain_ax.containers if isinstance(c, ErrorbarContainer)
                    and c[0].get_color() == data_line.get_color())
        diffs = [values[s] - base[s] for s in sorted(values)]
        assert list(gain[0].get_ydata()) == pytest.approx([statistics.mean(diffs)])
        (segment,) = gain[2][0].get_segments()
        assert segment[:, 1] == pytest.approx(ci95(diffs))
    assert xs["kd"] != xs["kd_T8"]  # dodged: equal means never hide one marker under another
    (band,) = acc_ax.patches
    low, high = band.get_y(), band.get_y() + band.get_height()  # y in data units (x spans the axes)
    assert (low, high) == pytest.approx(ci95(list(base.values())), abs=1e-6)
    mean_line = next(l for l in acc_ax.lines if "student alone" in l.get_label())
    assert list(mean_line.get_ydata()) == pytest.approx([statistics.mean(base.values())] * 2)
    assert acc_ax.get_xscale() == "log" and "capacity gap" in acc_ax.get_xlabel()
    assert "accuracy" in acc_ax.get_ylabel() and "student alone" in gain_ax.get_ylabel()
    teacher = next(v[1] for k, v in truth_runs.items() if k[0] == "teacher" and k[2] == GOOD)
    assert [t.get_text() for t in acc_ax.get_xticklabels()] == [f"{gap:.1f}×\nT {teacher:.1f}%"]
    title = fig._suptitle.get_text()
    assert title.startswith("synthetic data:") and "95 % CI" in title and "reportsuite" not in title
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()][:2] == ["kd", "kd_T8"]

    fig = accuracy_figure(comparison_frame(runs, scope), scope, x="teacher_acc", methods=["kd"], title="T")
    acc_ax, _ = fig.axes
    (kd,) = [c for c in acc_ax.containers if isinstance(c, ErrorbarContainer)]
    assert kd.get_label() == "kd" and fig._suptitle.get_text() == "T"
    assert list(kd[0].get_xdata()) == pytest.approx([teacher]) and acc_ax.get_xscale() == "linear"
    with pytest.raises(KdbenchError, match="--methods: no method labelled 'nope'"):
        accuracy_figure(comparison_frame(runs, scope), scope, methods=["nope"])


def holm_reference(pvalues):
    """Holm's adjusted p-values written out as the definition: max over the smaller ones of (m - j) p_(j)."""
    ranked = sorted(p for p in pvalues if not math.isnan(p))
    m = len(ranked)
    return [math.nan if math.isnan(p) else
            min(1.0, max((m - j) * ranked[j] for j in range(ranked.index(p) + 1))) for p in pvalues]


def test_statistics_match_scipy(store, report):
    """Every interval and p-value of the table, recomputed here from MLflow's numbers with scipy."""
    from scipy import stats

    runs = truth(store)
    rows = {(r["row"], r["teacher"]): r for r in read_csv(report / "comparison.csv")}
    base = accs(runs, "baseline", GOOD)
    kd = accs(runs, "kd", GOOD)
    for label in ("baseline", "kd", "kd_T8"):
        values = accs(runs, label, GOOD)
        row = rows[(label, GOOD)]
        low, high = ci95(list(values.values()))
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), abs=1e-5)
    row = rows[("kd_T8", GOOD)]
    t8 = accs(runs, "kd_T8", GOOD)
    tested = 0
    for ref, other in (("delta", base), ("kd", kd)):
        diffs = [t8[s] - other[s] for s in RUN_SEEDS]
        assert float(row[f"{ref}_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-6)
        if statistics.stdev(diffs) == 0:  # the same difference on every seed: a point, and nothing to test
            assert float(row[f"{ref}_ci_low"]) == float(row[f"{ref}_ci_high"]) == pytest.approx(diffs[0])
            assert row[f"{ref}_p"] == ""
            continue
        assert (float(row[f"{ref}_ci_low"]), float(row[f"{ref}_ci_high"])) == pytest.approx(ci95(diffs), abs=1e-5)
        p = stats.ttest_rel([t8[s] for s in RUN_SEEDS], [other[s] for s in RUN_SEEDS]).pvalue
        assert float(row[f"{ref}_p"]) == pytest.approx(p, abs=1e-6)
        tested += 1
    assert tested
    # Holm across every test of the table.
    all_rows = read_csv(report / "comparison.csv")
    raw = [float(r["delta_p"]) if r["delta_p"] else math.nan for r in all_rows]
    raw += [float(r["kd_p"]) if r["kd_p"] else math.nan for r in all_rows]
    adjusted = [float(r["delta_p_holm"]) if r["delta_p_holm"] else math.nan for r in all_rows]
    adjusted += [float(r["kd_p_holm"]) if r["kd_p_holm"] else math.nan for r in all_rows]
    assert sum(not math.isnan(p) for p in raw) >= 2
    for got, want in zip(adjusted, holm_reference(raw)):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-6)
    significant = [r["delta_significant"] == "True" for r in all_rows]
    assert significant == [not math.isnan(p) and p < 0.05 for p in adjusted[:len(all_rows)]]
    md = (report / "differences.md").read_text()
    assert "Holm" in md and "kd_T8" in md and "nan" not in md


def test_holm_on_known_values():
    from kdbench.report.stats import holm

    # Four tests: sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06, 0.06 (monotone), nan untouched.
    got = holm([0.03, 0.01, math.nan, 0.04, 0.02])
    assert got[:2] == pytest.approx([0.06, 0.04]) and math.isnan(got[2])
    assert got[3:] == pytest.approx([0.06, 0.06])


def test_paper_table_beside_the_runs(store, report):
    runs = truth(store)
    paper = {(r["paper_teacher"], r["paper_method"], r["dataset"]): r for r in read_csv(report / "paper_table.csv")}
    assert len(paper) == 6  # table t1 only

    def errors(acc):
        return round(200 * (100 - acc) / 100)

    teacher = next(v[1] for k, v in runs.items() if k[0] == "teacher" and k[2] == GOOD)
    row = paper[("T", "Teacher", "synthetic")]
    assert float(row["mean"]) == errors(teacher) and float(row["diff"]) == errors(teacher) - 120
    for method, label, published in (("Student", "baseline", 150), ("KD", "kd", 140)):
        values = [errors(a) for a in accs(runs, label, GOOD).values()]
        row = paper[("T", method, "synthetic")]
        assert float(row["mean"]) == pytest.approx(statistics.mean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values))
        assert float(row["diff"]) == pytest.approx(statistics.mean(values) - published) and row["n"] == "2"
    assert paper[("T", "AT", "synthetic")]["status"] == "not implemented"
    assert paper[("plainT", "KD", "synthetic")]["status"] == "plainT not in our zoo"
    assert paper[("T", "KD", "cifar10")]["status"] == "other dataset: cifar10"
    md = (report / "paper_table.md").read_text()
    assert "A made-up paper, table 1" in md and "Protocol assumed: assumed: everything" in md
    assert "141 · – (not implemented)" in md and "cifar10: T → S" in md
    assert "**" not in md.split("\n", 2)[2].split("Each cell")[0].replace("**A made-up", "")  # no stray bold


def test_rerun_writes_identical_files_and_cli_works(store, report, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdbench.cli", "report", str(store["suite"]), "--out", str(tmp_path),
                           "--run", store["parent"]], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]})
    assert proc.returncode == 0, proc.stderr
    again = tmp_path / "reportsuite"
    names = sorted(p.name for p in report.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"comparison.md", "comparison.tex", "comparison.csv", "cost.md", "cost.csv", "accuracy_vs_gap.png",
            "accuracy_vs_gap.svg", "accuracy_vs_gap.pdf", "differences.md", "differences.tex", "paper_table.md", "paper_table.csv", "runs.csv", "report.md"} <= set(names)
    for name in names:
        if name != "report.md":  # report.md names the command that made it
            assert (report / name).read_bytes() == (again / name).read_bytes(), name


def test_report_errors_are_one_line(store, tmp_path):
    with pytest.raises(KdbenchError, match="no MLflow store at"):
        write_report(store["suite"], tmp_path, uri=f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()  # looking for a store never creates one
    with pytest.raises(KdbenchError, match="--run nope: no such run"):
        write_report(store["suite"], tmp_path, run_id="nope", uri=store["uri"])
    with pytest.raises(KdbenchError, match="not a suite's parent run"):
        client = MlflowClient(store["uri"])
        run = client.search_runs([client.get_run(store["parent"]).info.experiment_id],
                                 filter_string="tags.`kdbench.role` = 'student'", max_results=1)[0]
        write_report(store["suite"], tmp_path, run_id=run.info.run_id, uri=store["uri"])
    with pytest.raises(KdbenchError, match="--x"):
        write_report(store["suite"], tmp_path, x="width", uri=store["uri"])


def test_statuses_beyond_finished_and_failed():
    import pandas as pd

    assert failure_reason("FAILED", "diverged: loss became nan") == "diverged"
    assert failure_reason("FAILED", "its teacher failed: diverged: x") == "teacher failed"
    assert failure_reason("FAILED", "Traceback ...") == "failed"
    assert failure_reason("KILLED", "interrupted") == "killed" and failure_reason("RUNNING", "") == "running"
    runs = pd.DataFrame({"seed": [0, 0, 1, 2], "status": ["KILLED", "FINISHED", "KILLED", "RUNNING"],
                         "test_acc": [50.0, 60.0, math.nan, math.nan], "start_time": [1, 2, 3, 4],
                         "reason": ["killed", "", "killed", "running"], "protocol": ["", "", "", ""]})
    cell = pick(runs, [0, 1, 2, 3])  # a resumed seed 0 counts once, with its finished run
    assert cell.values == {0: 60.0} and cell.missing == {1: "killed", 2: "running", 3: "not run"}
    assert cell.note == "1 killed, 1 running, 1 not run"


def test_learning_curves_are_the_teachers_and_the_student_alone_per_epoch(store, report):
    """learning_curves.csv holds every epoch of every finished teacher and student-alone run, straight from MLflow,
    and nothing else (no distilled student, no failed teacher); the figure is written beside it."""
    client = MlflowClient(store["uri"])
    rows = read_csv(report / "learning_curves.csv")
    got = {(r["run_id"], r["metric"], int(r["epoch"])): float(r["value"]) for r in rows}
    runs = client.search_runs([client.get_run(store["parent"]).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{store['parent']}'")
    expected = {}
    for run in runs:
        t = run.data.tags
        wanted = (t["kdbench.role"] == "teacher" or (t["kdbench.role"] == "student" and t["kdbench.method"] == "baseline"))
        if not wanted or run.info.status != "FINISHED":
            continue
        for metric in ("val_acc", "test_acc", "train_loss"):
            for m in client.get_metric_history(run.info.run_id, metric):
                expected[(run.info.run_id, metric, m.step)] = m.value
    assert {k[0] for k in expected} and len(expected) == len(rows)
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[k], expected[k], rel_tol=1e-5, abs_tol=1e-6) for k in got)
    roles = {(r["role"], r["model"]) for r in rows}
    assert roles == {("teacher", GOOD), ("student alone", STUDENT)}  # the diverged teacher has no curve
    for suffix in (".png", ".svg", ".pdf"):
        assert (report / f"learning_curves{suffix}").stat().st_size > 1000

    # The figure: a panel per metric the runs have (no validation split here: no empty validation panel), and a
    # legend naming the teacher and the student alone.
    from kdbench.report.curves import curves_figure, curves_frame

    suite = load_suite(store["suite"])
    runs = load_runs(client, find_parent(client, suite.name))
    scope = report_scope(make_plan(suite, store["suite"]), runs)
    fig = curves_figure(curves_frame(client, runs, scope.baseline), scope)
    metrics = {r["metric"] for r in rows}
    assert "val_acc" not in metrics and len(fig.axes) == len(metrics)
    assert all(ax.lines for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"{GOOD} (teacher)", f"{STUDENT} (student alone, each seed)"]


def test_by_gap_tables_hold_the_paired_differences_per_pair(report):
    """by_gap.md: a row per method, a column per pair, each cell the comparison table's paired difference."""
    rows = [r for r in read_csv(report / "comparison.csv") if r["role"] == "student" and r["row"] != "baseline"]
    text = (report / "by_gap.md").read_text()
    vs_kd, vs_alone = text.split("Against the student alone")
    for r in rows:
        for ref, part in (("kd", vs_kd), ("delta", vs_alone)):
            if ref == "kd" and r["row"] == "kd":
                assert "| kd |" not in part
                continue
            line = next(line for line in part.splitlines() if line.startswith(f"| {r['row']} |"))
            if int(r[f"{ref}_n"]):
                assert f"{float(r[f'{ref}_mean']):+.2f}".replace("-", "−") in line


def test_a_suite_without_the_student_alone_has_no_table_against_it(store):
    """A suite of distillers only (the GPU check's): no table against a student alone it never trained, no `None`."""
    import dataclasses

    from kdbench.report.tables import by_gap_markdown, differences_markdown

    client = open_client(store["uri"])
    suite = load_suite(store["suite"])
    runs = load_runs(client, find_parent(client, suite.name))
    scope = dataclasses.replace(report_scope(make_plan(suite, store["suite"]), runs), baseline=None)
    table = comparison_frame(runs, scope)
    by_gap, differences = by_gap_markdown(table, scope), differences_markdown(table, scope)
    assert "Against vanilla KD" in by_gap and "Against the student alone" not in by_gap
    assert "None" not in by_gap + differences and "student alone (not in this suite" in differences


def test_a_collapsed_mean_is_an_arrow_at_the_bottom_not_a_flattened_axis():
    """Means more than 10 pp below the student alone are left out of the y range and marked at the bottom edge
    with their value, so one failing method does not squash every other into a line."""
    from matplotlib.figure import Figure

    from kdbench.report.figures import _fit_means, _mark_off_scale

    ax = Figure().subplots()
    means = [96.5, 96.9, 97.1, 20.1]
    ax.plot([1, 2, 3, 4], means)
    _fit_means(ax, means, anchor=96.7)
    low, high = ax.get_ylim()
    assert 90 < low < 96.5 and high > 97.1
    _mark_off_scale(ax, [1, 2, 3, 4], means, "C0")
    assert [t.get_text() for t in ax.texts] == ["20.1"]
    assert ax.lines[-1].get_marker() == "v" and list(ax.lines[-1].get_ydata()) == [low]


def test_interval_ends_near_the_student_alone_stay_on_the_axes_and_a_huge_one_runs_off():
    """The CNN follow-up's KD bars reached 3.6 pp below the student alone and were cut at the axis fitted to the
    means; ends within 5 pp are now kept, while one cell's 27-pp interval still does not flatten the rest."""
    from matplotlib.figure import Figure

    from kdbench.report.figures import _fit_means

    ax = Figure().subplots()
    _fit_means(ax, [77.5, 80.0, 81.0], anchor=80.0, ends=[76.3, 81.5, 53.0, 107.0])
    low, high = ax.get_ylim()
    assert low < 76.3 and high > 81.5  # the near ends are on the axes
    assert low > 70 and high < 90  # the far ones are not


@pytest.mark.parametrize("x, count", [("gap", 5), ("gap", 16), ("teacher_acc", 5)])
def test_figure_x_range_holds_every_dodged_point(x, count):
    """Two pairs far apart (a study at both ends of its gap) dodge wide: the x range must still show the outermost
    points (it was a fixed 0.15 decades, which cut them off at 3.6x and 96.6x with five methods)."""
    import pandas as pd
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from kdbench.report.figures import _pair_ticks, dodge_offsets

    pairs = pd.DataFrame({"gap": [3.6, 96.6], "teacher_acc": [89.5, 90.5]})
    offsets = dodge_offsets(list(pairs[x]), count, log=x == "gap")
    ax = Figure().subplots()
    ax.set_xscale("log" if x == "gap" else "linear")
    _pair_ticks(ax, pairs, x, None, NullFormatter, offsets)
    low, high = ax.get_xlim()
    dodged = [v * o if x == "gap" else v + o for v in pairs[x] for o in offsets]
    assert low < min(dodged) and max(dodged) < high


def test_reference_results_beside_their_own_store_are_never_overwritten_by_a_report_of_another(store, tmp_path):
    """A committed folder (results/quickstart/: the report and the mlflow.db it was made from) stays as it is when
    a user reports their own run of the suite: that report goes to results/local/<suite>/, and says so."""
    import shutil

    reference = tmp_path / "results" / "reportsuite"
    reference.mkdir(parents=True)
    shutil.copy(store["root"] / "mlflow.db", reference / "mlflow.db")
    (reference / "comparison.md").write_text("the reference\n")
    heard = []
    folder = write_report(store["suite"], tmp_path / "results", uri=store["uri"], notice=heard.append)
    assert folder == tmp_path / "results" / "local" / "reportsuite" and (folder / "comparison.md").is_file()
    assert (reference / "comparison.md").read_text() == "the reference\n"
    said = [line for line in heard if "holds reference results made from" in line]
    assert len(said) == 1 and "results/local/reportsuite/" in said[0], heard
    # Regenerating the reference from its own store writes it in place, as the committed READMEs say.
    own = f"sqlite:///{reference / 'mlflow.db'}"
    assert write_report(store["suite"], tmp_path / "results", uri=own) == reference
    assert (reference / "comparison.md").read_text() != "the reference\n"
