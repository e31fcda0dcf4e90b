"""Reports: MLflow runs -> pandas -> tables (Markdown, LaTeX, CSV) and figures (PNG, SVG) in results/<suite>/.

A report is a pure function of the MLflow store: it never trains and never reads log files, and the
same runs give the same bytes (stable order, fixed number formats, figures without dates or random ids).
The suite file supplies only what was asked for (pairs, method labels, seeds), so a cell that was asked
for and has no number shows as a dash with its reason, never as a silent hole.
"""

from __future__ import annotations
import time
from pathlib import Path
import pandas as pd
from kdbench import KdbenchError
from kdbench.report.figures import X_AXES, accuracy_figure, save_figure
from kdbench.tracking import RunStatus, SuiteTags, sqlite_path, tracking_uri
from kdbench.report.cells import comparison_frame, cost_frame, report_scope
from kdbench.report.format import write_csv, write_text
from kdbench.report.runs import find_parent, load_runs, open_client
from kdbench.report.tables import (by_gap_markdown, comparison_latex, comparison_markdown, cost_latex, cost_markdown,
                                   differences_latex, differences_markdown)
from kdbench.registry import method_hash, methods
from kdbench.report.curves import curves_figure, curves_frame
from kdbench.report.fidelity import add_measures, agreement_figure, fidelity_markdown, has_agreement
from kdbench.report.artifacts import log_report
from kdbench.report.paper import paper_frame, paper_latex, paper_markdown
from kdbench.plan import make_plan
from kdbench.config.load import load_suite


# ---------------------------------------------------------------------------------------------- the report

def describe_parent(parent, runs: pd.DataFrame) -> str:
    import datetime

    env = SuiteTags.from_tags(parent.data.tags).env
    start = datetime.datetime.fromtimestamp(parent.info.start_time / 1000, datetime.timezone.utc)
    code = env.get("git_commit", "")[:12] + (" (uncommitted changes)" if env.get("git_dirty") == "true" else "")
    counts = runs.status.value_counts().sort_index()
    return (f"Parent run `{parent.info.run_id}` ({parent.info.status}, started {start:%Y-%m-%d %H:%M} UTC) on "
            f"{env.get('device', '?')}, kdbench {env.get('kdbench_version', '?')}"
            f"{', commit ' + code if code else ''}; {len(runs)} child runs: "
            + ", ".join(f"{k} {v.lower()}" for v, k in counts.items()) + ".\n")


def failures_markdown(runs: pd.DataFrame) -> str:
    bad = runs[runs.status != RunStatus.FINISHED]
    if not len(bad):
        return ""
    lines = ["| job | seed | status | reason |", "|:---|---:|:---|:---|"]
    for _, r in bad.iterrows():
        job = f"teacher {r.teacher}" if r.role == "teacher" else f"{r.method} {r.pair or r.student}"
        lines.append(f"| {job} | {r.seed} | {r.status} | {(r.failure or r.reason).replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def stale_methods(runs: pd.DataFrame) -> list[str]:
    """Methods whose finished runs were trained by other code than the registered method's now."""
    known = methods()
    done = runs[(runs.status == RunStatus.FINISHED) & (runs.method_hash != "") & runs.method_name.isin(list(known))]
    return sorted({name for name, code in zip(done.method_name, done.method_hash) if code != method_hash(name)})


LOCAL = "local"  # out/local/<suite>/: reports of a suite whose out/<suite>/ holds reference results


def report_folder(out: Path, suite_name: str, uri: str, notice=None) -> Path:
    """out/<suite>/, unless that folder holds reference results made from its own MLflow store (an mlflow.db beside
    them, as the committed results/ have) and this report reads another store: then out/local/<suite>/, so that
    reporting your own run of a committed suite never overwrites the reference it is compared with."""
    folder = out / suite_name
    own, reading = folder / "mlflow.db", sqlite_path(uri)
    if not own.is_file() or (reading is not None and reading.resolve() == own.resolve()):
        return folder
    local = out / LOCAL / suite_name
    if notice is not None:
        notice(f"{folder}/ holds reference results made from {own}; this report reads {uri}, so it goes to {local}/")
    return local


def write_report(suite_path: Path, out: Path = Path("results"), run_id: str | None = None, x: str = "gap",
                 uri: str | None = None, methods: list[str] | None = None, title: str | None = None,
                 notice=None, log_artifacts: bool = False) -> Path:
    """Read the suite's runs from MLflow and write its tables and figure into out/<suite>/; returns that folder.
    log_artifacts: also log what it wrote as artifacts of the suite's parent run (report/ in the MLflow UI)."""
    started = time.time_ns()
    if x not in X_AXES:
        raise KdbenchError(f"--x: expected one of {', '.join(X_AXES)}, got '{x}'")
    suite = load_suite(suite_path)
    plan = make_plan(suite, suite_path)
    client = open_client(uri)
    parent = find_parent(client, suite.name, run_id, plan.data_free_hash, notice)
    runs = load_runs(client, parent)
    scope = report_scope(plan, runs)
    stale = stale_methods(runs)
    if stale and notice is not None:
        notice(f"runs of {', '.join(stale)} in this report were trained by other method code than today's "
             f"(param method_hash): run the suite again to retrain them")
    table = add_measures(comparison_frame(runs, scope), runs, scope)
    cost = cost_frame(runs, scope)

    folder = report_folder(out, suite.name, uri or tracking_uri(), notice)
    folder.mkdir(parents=True, exist_ok=True)
    # method_hash stays out of runs.csv for now: the committed results' files keep their bytes (it is in MLflow).
    write_csv(runs.drop(columns=["start_time", "method_hash"]), folder / "runs.csv")
    write_csv(table, folder / "comparison.csv")
    write_text(folder / "comparison.md", comparison_markdown(table, scope))
    write_text(folder / "comparison.tex", comparison_latex(table, scope))
    write_text(folder / "differences.md", differences_markdown(table, scope))
    write_text(folder / "differences.tex", differences_latex(table, scope))
    write_text(folder / "by_gap.md", by_gap_markdown(table, scope))
    write_csv(cost, folder / "cost.csv")
    write_text(folder / "cost.md", cost_markdown(cost))
    write_text(folder / "cost.tex", cost_latex(cost, suite.name))
    figure = f"accuracy_vs_{x}"
    save_figure(accuracy_figure(table, scope, x, methods, title), folder / figure)
    write_text(folder / "fidelity.md", fidelity_markdown(table, scope))
    if has_agreement(table):
        save_figure(agreement_figure(table, scope, methods), folder / "agreement_vs_gap")
    curves = curves_frame(client, runs, scope.baseline)
    write_csv(curves, folder / "learning_curves.csv")
    if len(curves):
        save_figure(curves_figure(curves, scope), folder / "learning_curves")

    sections = [f"# {suite.name}\n", (suite.description + "\n") if suite.description else "",
                describe_parent(parent, runs), "\n## Accuracy\n\n", comparison_markdown(table, scope),
                "\n## Differences by gap\n\n", by_gap_markdown(table, scope),
                "\n## Differences\n\n", differences_markdown(table, scope),
                f"\n![student accuracy vs {x}]({figure}.png)\n", beyond_accuracy(table, scope)]
    if len(curves):
        sections.append("\n## Learning curves\n\nThe teachers and the student alone, per epoch "
                        "(`learning_curves.csv`):\n\n![learning curves](learning_curves.png)\n")
    sections += ["\n## Cost\n\n", cost_markdown(cost)]
    if suite.reference is not None:
        paper = paper_frame(suite, suite_path, runs, scope)
        write_csv(paper, folder / "paper_table.csv")
        write_text(folder / "paper_table.md", paper_markdown(paper, suite.reference))
        write_text(folder / "paper_table.tex", paper_latex(paper, suite.reference))
        sections += ["\n## Published numbers beside ours\n\n", paper_markdown(paper, suite.reference)]
    failures = failures_markdown(runs)
    if failures:
        sections += ["\n## Runs without a number\n\n", failures]
    sections.append(f"\nRegenerate: `kdbench report {suite_path.as_posix()} --run {parent.info.run_id}`\n")
    write_text(folder / "report.md", "".join(sections))
    if log_artifacts:
        log_report(client, parent.info.run_id, folder, started, notice)
    return folder


def beyond_accuracy(table: pd.DataFrame, scope) -> str:
    """report.md's section on agreement with the teacher and calibration (fidelity.md), its figure when drawn."""
    figure = ("\n![agreement with the teacher vs capacity gap](agreement_vs_gap.png)\n" if has_agreement(table)
              else "\nNo run of this report measured agreement with its teacher (runs from before kdbench did).\n")
    return "\n## Beyond accuracy: agreement with the teacher, calibration\n" + figure + "\n" + \
        fidelity_markdown(table, scope)
