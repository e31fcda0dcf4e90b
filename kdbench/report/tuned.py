"""The tuned report (`kdbench report-tuned`): every method at its default and at its tuned setting, side by side
with paired differences; the setting each search chose; how sensitive each method is to its parameters.

Read from MLflow only: the reporting runs under the latest parent of `<suite>.tuned`, the trials under the latest
parent of `<suite>.tune` (their last-epoch validation accuracy and drawn parameters). A tuned entry whose setting
is the default is the same job as the default (one key), so its rows are the default's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from kdbench import KdbenchError
from kdbench.config.load import load_suite
from kdbench.config.tuning import search_space
from kdbench.plan import make_plan
from kdbench.report.figures import save_figure
from kdbench.report.format import markdown_table, number, p_value, write_csv, write_text
from kdbench.report.runs import find_parent, load_runs, open_client
from kdbench.report.stats import ALPHA, Paired, holm, mean_ci
from kdbench.tracking import SEARCH_SUFFIX, TUNED_LABEL, TUNED_SUFFIX, JobTags, RunStatus, tag

PARAM_PREFIX = "method."


def student_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished student runs with a number (collapsed and failed runs have none)."""
    done = runs[(runs.role == "student") & (runs.status == RunStatus.FINISHED) & runs.test_acc.notna()]
    return done.copy()


def seed_values(rows: pd.DataFrame, label: str, student: str, pair: str) -> dict[int, float]:
    """A method's per-seed test accuracy on a pair; the student alone (no pair) is matched by its student model."""
    mine = rows[(rows.method == label) & (rows.student == student) & ((rows.pair == pair) | (rows.pair == ""))]
    return dict(zip(mine.seed.astype(int), mine.test_acc))


def _by_gap(pair_order: list[str]):
    """A sort key: pairs in `pair_order` (by growing capacity gap) first, in that order, any others after by name."""
    rank = {pair: i for i, pair in enumerate(pair_order)}
    return lambda pair: (rank.get(pair, len(rank)), pair)


def tuned_frame(runs: pd.DataFrame, labels: list[str], baseline: str, kd: str | None,
                pair_order: list[str] = ()) -> pd.DataFrame:
    """Per pair and method: default and tuned mean test accuracy, tuned minus default, and the tuned method
    against the tuned student alone and tuned KD; one Holm family over every paired test of the table. Pairs in
    `pair_order` (by growing capacity gap), any others after them by name."""
    rows = student_rows(runs)
    pairs = sorted({p for p in rows.pair if p}, key=_by_gap(pair_order))
    out = []
    for pair in pairs:
        student = pair.split("->")[1]
        tuned = {m: seed_values(rows, m + TUNED_LABEL, student, pair) or seed_values(rows, m, student, pair)
                 for m in labels}  # no "<m> tuned" run: its setting is the default, the same job
        for label in labels:
            default = seed_values(rows, label, student, pair)
            record = {"pair": pair, "method": label, "default_mean": _mean(default), "tuned_mean": _mean(tuned[label])}
            for name, reference in (("gain", default), ("vs_alone", tuned[baseline]),
                                    ("vs_kd", tuned[kd] if kd else {})):
                test = Paired.of(tuned[label], reference) if reference and label != {"vs_alone": baseline,
                                                                                     "vs_kd": kd}.get(name) else None
                record.update({f"{name}_mean": test.mean if test else math.nan,
                               f"{name}_ci_low": test.ci_low if test else math.nan,
                               f"{name}_ci_high": test.ci_high if test else math.nan,
                               f"{name}_p": test.p if test else math.nan})
            out.append(record)
    frame = pd.DataFrame(out)
    if len(frame):
        columns = [f"{n}_p" for n in ("gain", "vs_alone", "vs_kd")]
        adjusted = holm([v for c in columns for v in frame[c]])
        for i, column in enumerate(columns):
            frame[column + "_holm"] = adjusted[i * len(frame):(i + 1) * len(frame)]
    return frame


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan


def trial_frame(client, suite_name: str) -> pd.DataFrame:
    """One row per trial job of the latest search: method, pair, seed, drawn params, last-epoch val accuracy."""
    parent = find_parent(client, suite_name + SEARCH_SUFFIX)
    records, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                                f"tags.`{tag('trial')}` = 'true'")
        for run in page:
            job = JobTags.from_tags(run.data.tags)
            params = {k[len(PARAM_PREFIX):]: v for k, v in sorted(run.data.params.items()) if k.startswith(PARAM_PREFIX)}
            records.append({"method": job.method, "pair": job.pair, "student": job.student, "seed": job.seed,
                            "job": job.job, "params": params, "val_acc": run.data.metrics.get("val_acc", math.nan)})
        token = page.token
        if not token:
            break
    frame = pd.DataFrame(records, columns=["method", "pair", "student", "seed", "job", "params", "val_acc"])
    return frame.sort_values(["method", "pair", "job", "seed"], kind="stable").reset_index(drop=True)


def sensitivity_frame(trials: pd.DataFrame, pair_order: list[str] = ()) -> pd.DataFrame:
    """Per method and pair (pairs by `pair_order`): the settings tried, and the spread of their validation
    accuracy (seed means)."""
    out = []
    by_gap = _by_gap(pair_order)
    groups = sorted(trials.groupby(["method", "pair"], sort=True),
                    key=lambda group: (group[0][0], by_gap(group[0][1])))
    for (method, pair), rows in groups:
        per_setting = rows.assign(setting=rows.params.map(lambda p: tuple(sorted(p.items())))) \
            .groupby("setting", sort=True).val_acc.mean()
        low, high = mean_ci(list(per_setting))
        out.append({"method": method, "pair": pair or "(student alone)", "settings": len(per_setting),
                    "val_min": per_setting.min(), "val_max": per_setting.max(),
                    "val_range": per_setting.max() - per_setting.min(),
                    "val_std": per_setting.std(ddof=1) if len(per_setting) > 1 else math.nan})
    return pd.DataFrame(out)


def settings_frame(client, parent, labels: list[str]) -> pd.DataFrame:
    """The chosen setting of every tuned method and pair, as its reporting runs record it (params method.*)."""
    out = []
    for run in client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
        job = JobTags.from_tags(run.data.tags)
        if job.role != "student":
            continue
        base = job.method[:-len(TUNED_LABEL)] if job.method.endswith(TUNED_LABEL) else job.method
        if base in labels:
            params = {k[len(PARAM_PREFIX):]: v for k, v in run.data.params.items() if k.startswith(PARAM_PREFIX)}
            out.append({"method": job.method, "pair": job.pair or "(every pair)",
                        "setting": ", ".join(f"{k} {_short(v)}" for k, v in sorted(params.items()))})
    return pd.DataFrame(out, columns=["method", "pair", "setting"]).drop_duplicates() \
        .sort_values(["method", "pair"], kind="stable").reset_index(drop=True)


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def tuned_markdown(frame: pd.DataFrame) -> str:
    header = ["pair", "method", "default", "tuned", "tuned - default", "vs tuned student alone", "vs tuned KD"]
    rows = []
    for r in frame.itertuples():
        cells = [r.pair, r.method] + [number(v) if not math.isnan(v) else "–" for v in (r.default_mean, r.tuned_mean)]
        for name in ("gain", "vs_alone", "vs_kd"):
            mean, holm_p = getattr(r, f"{name}_mean"), getattr(r, f"{name}_p_holm")
            mark = " *" if not math.isnan(holm_p) and holm_p < ALPHA else ""
            cells.append("" if math.isnan(mean) else f"{number(mean, sign=True)} (p {p_value(holm_p)}){mark}")
        rows.append(cells)
    note = ("\nTest accuracy (%) of the last epoch, mean over the reporting seeds; differences paired by seed, "
            "p-values Holm-adjusted over every test of this table (* below 0.05).\n")
    return markdown_table(header, rows, "llrrrrr") + note


def sensitivity_figure(trials: pd.DataFrame, spaces: dict[str, str]):
    """Validation accuracy of every trial against its method's main parameter (the first of its search space)."""
    import matplotlib.pyplot as plt

    shown = [m for m in sorted(spaces) if spaces[m] and m in set(trials.method)]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.2 * max(len(shown), 1), 3.4), squeeze=False,
                             layout="constrained")
    for ax, method in zip(axes[0], shown):
        rows = trials[trials.method == method]
        for pair, group in rows.groupby("pair", sort=True):
            xs = [float(p[spaces[method]]) for p in group.params]
            ax.scatter(xs, group.val_acc, s=14, label=pair)
        ax.set_xlabel(spaces[method])
        ax.set_title(method)
        ax.set_ylabel("validation accuracy (%)")
    if shown:  # below the panels: inside one it hid the best trials, which sit at the top
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize="small",
                   frameon=False)
    return fig


def write_tuned_report(suite_path: Path, out: Path = Path("results"), uri: str | None = None) -> Path:
    """The tuned report of a suite into out/<suite>.tuned/: tuned.md, tuned.csv, settings, sensitivity, figure."""
    suite = load_suite(suite_path)
    if suite.tune is None:
        raise KdbenchError(f"{suite_path}: field 'tune': the suite was never tuned (no tune: block)")
    client = open_client(uri)
    parent = find_parent(client, suite.name + TUNED_SUFFIX)
    runs = load_runs(client, parent)
    labels = [m.label for m in suite.methods]
    baseline = next((m.label for m in suite.methods if m.method == "baseline"), labels[0])
    kd = next((m.label for m in suite.methods if m.method == "kd"), None)
    pair_order = [p.name for p in sorted(make_plan(suite, suite_path).pairs, key=lambda p: p.gap)]
    frame = tuned_frame(runs, labels, baseline, kd, pair_order)
    trials = trial_frame(client, suite.name)
    sensitivity = sensitivity_frame(trials, pair_order)
    settings = settings_frame(client, parent, labels)
    spaces = {m.label: next(iter(search_space(suite, m)), "") for m in suite.methods}
    folder = out / (suite.name + TUNED_SUFFIX)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(frame, folder / "tuned.csv")
    write_csv(trials.assign(params=trials.params.map(lambda p: " ".join(f"{k}={v}" for k, v in p.items()))),
              folder / "trials.csv")
    write_csv(sensitivity, folder / "sensitivity.csv")
    write_csv(settings, folder / "settings.csv")
    save_figure(sensitivity_figure(trials, spaces), folder / "sensitivity")
    sens_rows = [[r.method, r.pair, str(r.settings), number(r.val_min), number(r.val_max), number(r.val_range)]
                 for r in sensitivity.itertuples()]
    text = [f"# {suite.name}, every method tuned on validation ({suite.tune.trials} trials each)\n\n",
            tuned_markdown(frame), "\n## Chosen settings\n\n",
            markdown_table(["method", "pair", "setting"], settings.values.tolist(), "lll"),
            "\n## Sensitivity (validation accuracy across the trials)\n\n",
            markdown_table(["method", "pair", "settings", "min", "max", "range"], sens_rows, "llrrrr"),
            "\n![validation accuracy against each method's main parameter](sensitivity.png)\n",
            f"\nRegenerate: `kdbench report-tuned {suite_path.as_posix()}`\n"]
    write_text(folder / "tuned.md", "".join(text))
    return folder
