"""Beyond accuracy: how closely each student matches its teacher (agreement, KL) and how well calibrated it is
(ECE, NLL, Brier), per method and pair, as columns of the comparison table, fidelity.md and a figure of agreement
against the capacity gap.

Every number is the last epoch's, on the test split, from the same runs as the accuracy beside it (one run per
seed, one method code per cell: cells.pick). A cell without a number says why: the student alone and the teachers
have no teacher to agree with; runs logged before kdbench measured these have none ("not logged"), except the NLL,
which every run has always logged as its test loss.
"""

from __future__ import annotations

import math

import pandas as pd

from kdbench.report.cells import TEACHER, ReportScope, student_cell, teacher_cell
from kdbench.report.figures import _errors, dodge_offsets, method_colors, shown_methods
from kdbench.report.format import DASH, interval, markdown_table, spread
from kdbench.report.runs import MEASURES
from kdbench.report.tables import pair_header, row_title

# measure -> (what it is, for a reader; digits)
DESCRIBED = {"agreement": ("top-1 agreement with the teacher (%)", 2),
             "kl": ("KL(teacher ‖ student) at T = 1 (nats)", 3),
             "ece": ("expected calibration error, 15 equal-width bins (%)", 2),
             "nll": ("negative log-likelihood of the labels (nats)", 3),
             "brier": ("Brier score (sum over classes, 0 to 2)", 4)}
AGAINST_TEACHER = ("agreement", "kl")
NO_TEACHER = "no teacher"


def measure_columns() -> list[str]:
    return [f"{m}_{part}" for m in MEASURES for part in ("n", "mean", "std", "ci_low", "ci_high", "status")]


def add_measures(table: pd.DataFrame, runs: pd.DataFrame, scope: ReportScope) -> pd.DataFrame:
    """The comparison table with, per row, each measure's seeds, mean, spread, 95 % t interval and status."""
    records = []
    for _, r in table.iterrows():
        record = {}
        for m in MEASURES:
            alone = r.role == "teacher" or r.row == scope.baseline
            if m in AGAINST_TEACHER and alone:
                record.update({f"{m}_n": 0, f"{m}_mean": math.nan, f"{m}_std": math.nan, f"{m}_ci_low": math.nan,
                               f"{m}_ci_high": math.nan, f"{m}_status": NO_TEACHER})
                continue
            cell = (teacher_cell(runs, r.teacher, f"test_{m}") if r.row == TEACHER else
                    student_cell(runs, r.row, r.teacher, r.student, scope.seeds, f"test_{m}"))
            low, high = cell.ci
            record.update({f"{m}_n": cell.n, f"{m}_mean": cell.mean, f"{m}_std": cell.std, f"{m}_ci_low": low,
                           f"{m}_ci_high": high, f"{m}_status": "ok" if cell.n else cell.reason})
        records.append(record)
    return pd.concat([table, pd.DataFrame(records, columns=measure_columns(), index=table.index)], axis=1)


def measure_text(r, m: str) -> str:
    if not r[f"{m}_n"]:
        return f"{DASH} ({r[f'{m}_status']})"
    digits = DESCRIBED[m][1]
    ci = interval(r[f"{m}_ci_low"], r[f"{m}_ci_high"], digits)
    return spread(r[f"{m}_mean"], r[f"{m}_std"], digits) + (f" {ci}" if ci else "") + f" (n={r[f'{m}_n']})"


def measure_markdown(table: pd.DataFrame, scope: ReportScope, m: str) -> str:
    """One measure: a method per row, a pair per column; one line when no run of the report logged it."""
    what = DESCRIBED[m][0]
    title = f"**{what[0].upper()}{what[1:]}**"
    if not (table[f"{m}_n"] > 0).any():
        return f"{title}: {DASH} (not logged by these runs: they were made before kdbench measured it)\n"
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    gaps = table.drop_duplicates(["teacher", "student"]).gap
    header = ["method"] + [pair_header(scope.name(t), scope.name(s)) for t, s in pairs]
    rows = [["capacity gap (params)"] + [f"{g:.1f}×" for g in gaps]]
    for row in dict.fromkeys(table.row):
        if m in AGAINST_TEACHER and row in (TEACHER, scope.baseline):
            continue  # nothing to agree with: the rows would be all dashes
        cells = table[table.row == row]
        rows.append([row_title(row, scope.baseline)] + [measure_text(r, m) for _, r in cells.iterrows()])
    return f"{title}\n\n" + markdown_table(header, rows, "l" + "r" * len(pairs))


def fidelity_markdown(table: pd.DataFrame, scope: ReportScope) -> str:
    parts = [measure_markdown(table, scope, m) for m in MEASURES]
    note = ("\nLast epoch, test split; mean ± standard deviation over seeds [95 % t interval of the mean] (n seeds), "
            "from the runs of the accuracy table. Agreement and KL are measured against the model that taught the "
            "student, as the job was given it (the pair's teacher; TAKD's assistant; a teacher trained with the "
            "student, as it was at the last epoch). A dash says why there is no number: no teacher (the student "
            "alone, the teachers), not logged (runs from before kdbench measured it), or the accuracy cell's "
            "reason.\n")
    return "\n".join(parts) + note


def has_agreement(table: pd.DataFrame) -> bool:
    return bool((table.agreement_n > 0).any())


def agreement_figure(table: pd.DataFrame, scope: ReportScope, methods: list[str] | None = None):
    """Per student: (a) agreement with the teacher, (b) KL(teacher || student), each against the capacity gap,
    mean and 95 % interval over seeds, methods dodged and coloured as in the accuracy figure."""
    from matplotlib.figure import Figure

    shown = shown_methods(scope, methods)
    students = scope.students
    fig = Figure(figsize=(11, 4.3 * len(students) + 0.9), layout="constrained")
    grid = fig.subplots(len(students), 2, squeeze=False)
    colors = method_colors(scope, shown)
    points_all = table[(table.role == "student") & (table.agreement_n > 0) & table.row.isin(shown)]
    offsets = dict(zip(shown, dodge_offsets(list(points_all.gap) or [1.0], len(shown), True)))
    handles = {}
    for axes, student in zip(grid, students):
        mine = points_all[points_all.student == student]
        for ax, m in zip(axes, AGAINST_TEACHER):
            for label in shown:
                points = mine[(mine.row == label) & (mine[f"{m}_n"] > 0)].sort_values("gap", kind="stable")
                if len(points):
                    handles[label] = ax.errorbar(points.gap.to_numpy() * offsets[label], points[f"{m}_mean"].to_numpy(),
                                                 yerr=_errors(points, f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high"),
                                                 color=colors[label], marker="o", markersize=5, capsize=3,
                                                 linewidth=1.4, label=scope.name(label))
            ticks = mine.drop_duplicates("teacher").sort_values("gap")
            ax.set_xscale("log")
            if len(ticks):
                ax.set_xticks(ticks.gap.to_numpy(), [f"{g:.1f}×\n{scope.name(t)}" for g, t in
                                                     zip(ticks.gap, ticks.teacher)], fontsize="small")
                ax.set_xlim(ticks.gap.min() / 10 ** 0.3, ticks.gap.max() * 10 ** 0.3)
            low, high = ax.get_ylim()  # agreement lies in [0, 100] and KL above 0: a t interval past them runs off
            ax.set_ylim(max(low, 0.0), min(high, 100.0) if m == "agreement" else high)
            ax.minorticks_off()
            ax.set_xlabel("capacity gap: teacher / student parameters (log scale)")
            ax.set_ylabel(DESCRIBED[m][0])
            ax.grid(True, alpha=0.3)
        name = scope.name(student)
        axes[0].set_title(f"(a) student {name}: agreement with its teacher", loc="left", fontsize="medium")
        axes[1].set_title(f"(b) student {name}: KL(teacher ‖ student)", loc="left", fontsize="medium")
    ordered = [handles[k] for k in shown if k in handles]
    if ordered:
        fig.legend(handles=ordered, loc="outside lower center", ncol=min(len(ordered), 5), fontsize="small",
                   frameon=False)
    fig.suptitle(f"{scope.dataset}: how closely the student matches its teacher\n(mean and 95 % CI over seeds, "
                 f"last epoch, test split)")  # two lines: with a long dataset name one ran off both edges
    return fig
