"""Rankings across pairs and studies (`kdbench rank`): does a method win everywhere, or in one cell?

A task is one teacher-student pair of one suite; a method's score on it is the last-epoch test accuracy of each
seed, from the runs a report of that suite would read (the latest run of the suite as its file is now, one run per
seed, one method code per cell: report.cells.pick). Over the tasks where every ranked method has a number:

- each method's average rank (1 = the most accurate on a task; ties share their mean rank);
- Friedman's test that all methods rank alike, then Nemenyi's post-hoc test of every pair (scikit-posthocs) and
  the critical difference of average ranks, drawn as a critical-difference diagram;
- the interquartile mean of its gain over vanilla KD, paired by seed within each task, with a 95 %
  stratified-bootstrap interval, and the probability that one of its runs beats one of KD's (report.robust).

Runs of different code or settings never mix: a method label that means other parameters or other method code in
another suite becomes a method of its own, named with its suite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdbench import KdbenchError
from kdbench.config.load import load_suite
from kdbench.plan import make_plan
from kdbench.report.cells import ReportScope, report_scope, student_cell
from kdbench.report.robust import improvement_interval, iqm_interval
from kdbench.report.runs import find_parent, load_runs, open_client
from kdbench.report.stats import ALPHA
from kdbench.tracking import SUITE_ROLE, SuiteTags, tag, tracking_uri

SCORE_COLUMNS = ["suite", "task", "method", "label", "seed", "test_acc"]
RANK_COLUMNS = ["method", "average_rank", "tasks", "iqm_gain", "iqm_gain_low", "iqm_gain_high", "paired_runs",
                "p_improve", "p_improve_low", "p_improve_high"]


@dataclass(frozen=True)
class Study:
    """One suite as a report reads it: the run chosen, its runs, what the suite asked for."""
    source: str  # the argument as given
    suite_path: Path
    uri: str
    suite: object  # config.schema.Suite
    parent: object  # the MLflow parent run
    runs: pd.DataFrame
    scope: ReportScope


def suite_and_store(source: Path) -> tuple[Path, str]:
    """A suite file (its runs in MLFLOW_TRACKING_URI's store), or a results folder holding its mlflow.db (the suite
    file its runs were made from, as they name it)."""
    if source.is_file():
        return source, tracking_uri()
    if not source.is_dir():
        raise KdbenchError(f"{source}: no such suite file or results folder")
    db = source / "mlflow.db"
    if not db.is_file():
        raise KdbenchError(f"{source}: no mlflow.db in this folder; pass a results folder that holds its store, or "
                           f"a suite file (its runs read from MLFLOW_TRACKING_URI)")
    uri = f"sqlite:///{db}"
    client = open_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(experiments, filter_string=f"tags.`{tag('role')}` = '{SUITE_ROLE}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not latest:
        raise KdbenchError(f"{source}: its store has no suite run")
    named = Path(SuiteTags.from_tags(latest[0].data.tags).suite_file)
    if not named.is_file():
        raise KdbenchError(f"{source}: its runs name the suite file '{named}', not found from {Path.cwd()}: run "
                           f"kdbench rank where the suite was run, or pass the suite file with MLFLOW_TRACKING_URI")
    return named, uri


def load_study(source: Path, notice=None) -> Study:
    suite_path, uri = suite_and_store(source)
    suite = load_suite(suite_path)
    plan = make_plan(suite, suite_path)
    client = open_client(uri)
    parent = find_parent(client, suite.name, None, plan.data_free_hash, notice)
    runs = load_runs(client, parent)
    return Study(source.as_posix(), suite_path, uri, suite, parent, runs, report_scope(plan, runs))


def method_names(studies: list[Study], by_label: bool = False) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """(suite, label) -> the method's name in the ranking: its label, unless the label means other parameters or
    other method code (method_hash) in another suite; then the label and the suites where it means this. With
    `by_label` a label stays one method whatever it means where (each suite's method at its own setting, as papers
    compare them): the second mapping says, per label merged so, in which suites it differs."""
    settings = {}
    for study in studies:
        specs = {m.label: m for m in study.suite.methods}
        for label in study.scope.methods:
            spec = specs.get(label)
            done = study.runs[(study.runs.role == "student") & (study.runs.method == label)
                              & (study.runs.status == "FINISHED")]
            setting = (spec.method, json.dumps(spec.params, sort_keys=True), spec.combine) if spec else ("",)
            settings[(study.suite.name, label)] = (setting, tuple(sorted(set(done.method_hash) - {""})))
    names, merged = {}, {}
    for label in dict.fromkeys(label for _, label in settings):
        groups: dict[tuple, list[str]] = {}
        for (suite, other), setting in settings.items():
            if other == label:
                groups.setdefault(setting, []).append(suite)
        if by_label and len(groups) > 1:
            merged[label] = "; ".join(f"{', '.join(suites)}: {_setting_text(setting)}" for setting, suites in groups.items())
        for setting, suites in groups.items():
            for suite in suites:
                names[(suite, label)] = label if len(groups) == 1 or by_label else f"{label} ({', '.join(suites)})"
    return names, merged


def _setting_text(setting: tuple) -> str:
    """A (method, parameters, combine) and method-code pair as one short phrase."""
    (method, *rest), hashes = setting
    params = json.loads(rest[0]) if rest else {}
    text = method + (" " + ", ".join(f"{k} {v}" for k, v in params.items()) if params else " (its defaults)")
    return text + (f" (code {', '.join(h[:8] for h in hashes)})" if hashes else "")


def score_frame(studies: list[Study], names: dict[tuple[str, str], str]) -> pd.DataFrame:
    """One row per (task, method, seed) with a number: last-epoch test accuracy."""
    rows = []
    for study in studies:
        scope = study.scope
        for pair in scope.pairs:
            task = f"{study.suite.name}: {pair.name}"
            for label in scope.methods:
                cell = student_cell(study.runs, label, pair.teacher, pair.student, scope.seeds)
                rows += [(study.suite.name, task, names[(study.suite.name, label)], label, seed, acc)
                         for seed, acc in sorted(cell.values.items())]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


@dataclass(frozen=True)
class Ranking:
    studies: list[Study]
    scores: pd.DataFrame
    table: pd.DataFrame  # RANK_COLUMNS, best average rank first
    left_out: dict[str, str]  # method -> why it is not ranked
    merged: dict[str, str]  # --by-label: label -> the settings and code it has in which suites, where they differ
    tasks: list[str]
    friedman: tuple[float, float]  # (chi-square, p); nan below three methods or two tasks
    nemenyi: pd.DataFrame | None  # p-values of every pair of ranked methods
    critical_difference: float


def rank(studies: list[Study], methods: list[str] | None = None, by_label: bool = False) -> Ranking:
    names, merged = method_names(studies, by_label)
    scores = score_frame(studies, names)
    tasks = list(dict.fromkeys(f"{s.suite.name}: {p.name}" for s in studies for p in s.scope.pairs))
    means = scores.groupby(["task", "method"], sort=False).test_acc.mean().unstack().reindex(tasks)
    order = list(dict.fromkeys(names[(s.suite.name, label)] for s in studies for label in s.scope.methods))
    means = means.reindex(columns=order)
    left_out = {m: f"no number in {int(means[m].isna().sum())} of {len(tasks)} tasks" for m in order
                if means[m].isna().any()}
    if methods:
        unknown = [m for m in methods if m not in order]
        if unknown:
            raise KdbenchError(f"--methods: no method '{unknown[0]}' in these suites (methods: {', '.join(order)})")
        missing = [m for m in methods if m in left_out]
        if missing:
            raise KdbenchError(f"--methods: '{missing[0]}' has {left_out[missing[0]]}: a ranking needs a number for "
                               f"every ranked method in every task")
        left_out = {m: "not asked for (--methods)" for m in order if m not in methods}
    ranked = [m for m in order if m not in left_out]
    if len(ranked) < 2:
        raise KdbenchError(f"fewer than two methods have a number in every one of the {len(tasks)} tasks: nothing to "
                           f"rank ({'; '.join(f'{m}: {why}' for m, why in left_out.items())})")
    complete = means[ranked]
    average = complete.rank(axis=1, ascending=False, method="average").mean()
    friedman, nemenyi, cd = significance(complete)
    table = pd.DataFrame([gains(scores, studies, names, m, average[m], len(tasks)) for m in ranked],
                         columns=RANK_COLUMNS)
    table = table.sort_values(["average_rank", "method"], kind="stable").reset_index(drop=True)
    return Ranking(studies, scores, table, left_out, merged, tasks, friedman, nemenyi, cd)


def significance(complete: pd.DataFrame) -> tuple[tuple[float, float], pd.DataFrame | None, float]:
    """Friedman's test over the tasks, Nemenyi's p-values for every pair, and the critical difference of average
    ranks at α = 0.05 (Demšar 2006): q_α(k, ∞) / √2 · √(k (k + 1) / (6 N))."""
    import scikit_posthocs  # seconds to import (statsmodels, seaborn): only when a ranking is made
    from scipy import stats

    n, k = complete.shape
    if k < 3 or n < 2:
        return (math.nan, math.nan), None, math.nan
    chi2, p = stats.friedmanchisquare(*[complete[m].to_numpy() for m in complete])
    nemenyi = scikit_posthocs.posthoc_nemenyi_friedman(complete.to_numpy())
    nemenyi.index = nemenyi.columns = list(complete.columns)
    q = stats.studentized_range.ppf(1 - ALPHA, k, np.inf) / math.sqrt(2)
    return (float(chi2), float(p)), nemenyi, float(q * math.sqrt(k * (k + 1) / (6 * n)))


def gains(scores: pd.DataFrame, studies: list[Study], names: dict, method: str, average: float, tasks: int) -> dict:
    """A method against its suite's vanilla KD on every task: IQM of the paired gain, probability of improvement."""
    diffs, mine, theirs = [], [], []
    for study in studies:
        kd = study.scope.kd
        if kd is None:
            continue
        kd_name = names[(study.suite.name, kd)]
        for task in dict.fromkeys(scores[scores.suite == study.suite.name].task):
            here = scores[scores.task == task]
            a = dict(zip(here[here.method == method].seed, here[here.method == method].test_acc))
            b = dict(zip(here[here.method == kd_name].seed, here[here.method == kd_name].test_acc))
            if method == kd_name or not a or not b:
                continue
            diffs.append(np.array([a[s] - b[s] for s in sorted(a) if s in b]))
            mine.append(np.array(list(a.values())))
            theirs.append(np.array(list(b.values())))
    gain = iqm_interval(diffs)
    improve = improvement_interval(mine, theirs)
    return dict(zip(RANK_COLUMNS, [method, float(average), tasks, *gain, int(sum(len(d) for d in diffs)),
                                   *improve]))
