"""A ranking's files: ranking.md (the table, the tests, which run of each suite), ranking.csv, scores.csv (every
number it rests on) and the critical-difference diagram beside the gains over KD (PNG, SVG, PDF).
Same runs, same bytes: the bootstrap is seeded and the figures carry no dates.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pandas as pd

from kdbench.report.figures import save_figure
from kdbench.report.format import DASH, interval, markdown_table, number, p_value, write_csv, write_text
from kdbench.report.rank import Ranking
from kdbench.report.robust import REPS, SEED
from kdbench.tracking import SuiteTags

FIGURE = "critical_difference"


def runs_markdown(ranking: Ranking) -> str:
    """Which run of each suite the ranking took, as a report says it."""
    rows = []
    for study in ranking.studies:
        env, info = SuiteTags.from_tags(study.parent.data.tags).env, study.parent.info
        start = datetime.datetime.fromtimestamp(info.start_time / 1000, datetime.timezone.utc)
        code = env.get("git_commit", "")[:12] + (" (uncommitted changes)" if env.get("git_dirty") == "true" else "")
        rows.append([study.suite.name, study.source, f"`{info.run_id}`", f"{start:%Y-%m-%d %H:%M} UTC",
                     code or DASH, str(len(study.scope.pairs))])
    return markdown_table(["suite", "from", "parent run", "started", "commit", "tasks"], rows, "lllllr")


def ranking_markdown(ranking: Ranking, command: str) -> str:
    t = ranking.table
    alone = {s.scope.baseline for s in ranking.studies}
    rows = [[r.method + (" (student alone)" if r.method in alone else ""), f"{r.average_rank:.2f}",
             (number(r.iqm_gain, sign=True) + f" {interval(r.iqm_gain_low, r.iqm_gain_high, sign=True)}"
              + f" (n={r.paired_runs})") if not math.isnan(r.iqm_gain) else f"{DASH} (vanilla KD itself)",
             f"{r.p_improve:.2f} {interval(r.p_improve_low, r.p_improve_high)}" if not math.isnan(r.p_improve)
             else DASH] for r in t.itertuples()]
    table = markdown_table(["method", "average rank", "IQM gain over KD (pp) [95 % CI]",
                            "P(improves on KD) [95 % CI]"], rows, "lrrr")
    chi2, p = ranking.friedman
    tests = (f"Friedman's test that the {len(t)} methods rank alike over the {len(ranking.tasks)} tasks: "
             f"χ² = {chi2:.2f}, p {'< 0.001' if p < 0.001 else '= ' + p_value(p)}. Nemenyi's post-hoc test: two methods whose average ranks differ by "
             f"less than the critical difference CD = {ranking.critical_difference:.2f} (α = 0.05) are not told "
             f"apart (joined by a bar in the diagram); its p-value for every pair is in `nemenyi.csv`."
             if not math.isnan(chi2) else "Friedman's test needs three methods or more and two tasks: not run.")
    left = ("\nLeft out: " + "; ".join(f"{m} ({why})" for m, why in ranking.left_out.items()) + ".\n"
            if ranking.left_out else "")
    if ranking.merged:
        left += ("\nMethods by label (`--by-label`): each suite's method at its own setting; these labels mean other "
                 "settings or code in other suites: " + "; ".join(f"**{m}**: {why}" for m, why in ranking.merged.items())
                 + ".\n")
    suites = ", ".join(s.suite.name for s in ranking.studies)
    return (f"# Ranking over {suites}\n\n{len(ranking.tasks)} tasks (every teacher-student pair of every suite), "
            f"{len(t)} methods with a number in every task.\n\n{table}\n"
            "Average rank: 1 is the most accurate method of a task (mean last-epoch test accuracy over seeds), ties "
            "share their mean rank. IQM gain over KD: the interquartile mean, over every seed of every task, of a "
            "method's last-epoch test accuracy minus vanilla KD's (its suite's `kd`) with the same seed; P(improves on "
            "KD): the probability that a run of the method is more accurate than a run of KD on the same task (ties "
            "count half), averaged over tasks. Intervals: 95 % percentile intervals of a stratified bootstrap "
            f"(runs resampled within each task, {REPS:,} resamples, seed {SEED}): rliable's estimators "
            "(Agarwal et al., 2021).\n\n"
            f"{tests}\n\n![critical-difference diagram and gains over KD]({FIGURE}.png)\n{left}\n"
            f"## Runs\n\nThe latest run of each suite as its file is now (as `kdbench report` takes it):\n\n"
            f"{runs_markdown(ranking)}\nEvery number: `scores.csv`. Regenerate: `{command}`\n")


def _lift_cd_bar(ax, by: float = 0.6) -> None:
    """scikit-posthocs draws the CD bar and its label at y 0.5 and 0.65, over the rank axis's tick labels: lift them."""
    for line in ax.lines:
        if list(line.get_ydata()) == [0.5, 0.5]:
            line.set_ydata([0.5 + by, 0.5 + by])
    for text in ax.texts:
        if text.get_text().startswith("CD ="):
            text.set_y(text.get_position()[1] + by)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + by)


def ranking_figure(ranking: Ranking):
    """(a) the critical-difference diagram (scikit-posthocs); (b) IQM gain over KD and (c) probability of improving
    on KD, each with its 95 % stratified-bootstrap interval, methods in the order of their average rank."""
    import scikit_posthocs
    from matplotlib.figure import Figure

    t = ranking.table
    fig = Figure(figsize=(11, 3.2 + 0.32 * len(t) * 2), layout="constrained")
    axes = fig.subplot_mosaic([["cd", "cd"], ["gain", "improve"]], height_ratios=[1, 1.2])
    ax = axes["cd"]
    ranks = pd.Series(t.average_rank.to_numpy(), index=t.method)
    if ranking.nemenyi is not None:
        drawn = scikit_posthocs.critical_difference_diagram(ranks, ranking.nemenyi, ax=ax, alpha=0.05,
                                                            cd=ranking.critical_difference,
                                                            label_fmt_left="{label} ({rank:.2f})",
                                                            label_fmt_right="({rank:.2f}) {label}")
        for lines in drawn["crossbars"]:  # drawn through a set's members, in hash order: left to right instead,
            for line in lines:  # so the same ranking gives the same bytes in every process
                xs, ys = line.get_data()
                line.set_data(sorted(xs), ys)
        _lift_cd_bar(ax)
        ax.set_title(f"(a) average rank over {len(ranking.tasks)} tasks (1: most accurate); a bar joins methods "
                     f"Nemenyi's test does not tell apart (α = 0.05)", loc="left", fontsize="medium", pad=28)
    else:
        ax.set_axis_off()
        ax.set_title("(a) average ranks: " + ", ".join(f"{m} {r:.2f}" for m, r in ranks.items()), loc="left")
    ys = list(range(len(t)))[::-1]
    for key, column, zero, label, unit in (
            ("gain", "iqm_gain", 0.0, "(b) IQM gain over KD", "percentage points of test accuracy"),
            ("improve", "p_improve", 0.5, "(c) P(a run beats a KD run)", "probability (0.5: no better, no worse)")):
        ax = axes[key]
        shown = t[t[column].notna()]
        y = [ys[i] for i in shown.index]
        ax.errorbar(shown[column], y, xerr=[shown[column] - shown[f"{column}_low"],
                                            shown[f"{column}_high"] - shown[column]],
                    fmt="o", color="C0", capsize=3)
        ax.axvline(zero, color="0.4", linestyle="--", linewidth=1)
        ax.set_yticks(ys, [f"{m} (reference)" if math.isnan(g) else m for m, g in zip(t.method, t.iqm_gain)])
        ax.set_xlabel(unit)
        ax.set_ylim(-0.7, len(t) - 0.3)
        ax.set_title(label + ", 95 % stratified-bootstrap CI", loc="left", fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Methods across " + ", ".join(s.suite.name for s in ranking.studies))
    return fig


def write_ranking(ranking: Ranking, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(ranking.table, out / "ranking.csv")
    write_csv(ranking.scores, out / "scores.csv")
    if ranking.nemenyi is not None:
        write_csv(ranking.nemenyi.rename_axis("method").reset_index(), out / "nemenyi.csv")
    write_text(out / "ranking.md", ranking_markdown(ranking, command))
    save_figure(ranking_figure(ranking), out / FIGURE)
    return out
