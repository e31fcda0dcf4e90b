"""The report's tables as text: comparison, differences, by gap, cost (Markdown and LaTeX).
"""

from __future__ import annotations
import math
import pandas as pd
from kdbench.report.cells import TEACHER, ReportScope
from kdbench.report.format import DASH, interval, latex_escape, latex_table, markdown_table, number, p_value, spread
from kdbench.report.runs import PASSES


def delta_text(r, ref: str) -> str:
    """A paired difference: "+0.30 [−0.12, +0.72]*" (* when it survives Holm's correction)."""
    ci = interval(r[f"{ref}_ci_low"], r[f"{ref}_ci_high"], sign=True)
    return (number(r[f"{ref}_mean"], sign=True) + (f" {ci}" if ci else "")
            + ("*" if r[f"{ref}_significant"] else ""))


def md_cell(r, baseline: str | None) -> str:
    if not r.n:
        return f"{DASH} ({r.status})"
    text = spread(r["mean"], r["std"])
    text = f"**{text}**" if r.best else text
    ci = interval(r.ci_low, r.ci_high)
    text += (f" {ci}" if ci else "") + f" (n={r.n}{'; ' + r.note if r.note else ''})"
    if r.role == "student" and r.row != baseline and r.delta_n:
        text += f", Δ {delta_text(r, 'delta')}"
    return text + (" †" if r.protocol else "")


def pair_header(teacher: str, student: str) -> str:
    return f"{teacher} → {student}"


def row_title(row: str, baseline: str | None) -> str:
    if row == TEACHER:
        return "teacher"
    return f"{row} (student alone)" if row == baseline else row


def comparison_markdown(table: pd.DataFrame, scope: ReportScope) -> str:
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    header = ["method"] + [pair_header(t, s) for t, s in pairs]
    gaps = table.drop_duplicates(["teacher", "student"]).gap
    rows = [["capacity gap (params)"] + [f"{g:.1f}×" for g in gaps]]
    for row in dict.fromkeys(table.row):
        cells = table[table.row == row]
        rows.append([row_title(row, scope.baseline)] + [md_cell(r, scope.baseline) for _, r in cells.iterrows()])
    text = markdown_table(header, rows, "l" + "r" * len(pairs))
    text += ("\nLast-epoch test accuracy (%), mean ± standard deviation over seeds [95 % confidence interval of the "
             "mean, t distribution] (n seeds); Δ: difference to the student alone, paired by seed, with its 95 % "
             "interval; *: significant after Holm's correction across the table (paired t-test, α = 0.05; see the "
             "differences table); **bold**: the best method of each pair.")
    protocols = sorted(set(table.protocol) - {""})
    if protocols:
        text += " †: " + "; ".join(protocols) + "."
    return text + "\n"


def tex_cell(r, baseline: str | None) -> str:
    if not r.n:
        return f"-- ({latex_escape(r.status)})"
    text = spread(r["mean"], r["std"], pm=r"$\pm$").replace("−", "-")
    text = rf"\textbf{{{text}}}" if r.best else text
    text += f" ({r.n})"
    if r.role == "student" and r.row != baseline and r.delta_n:
        text += rf" {{\scriptsize ${number(r.delta_mean, sign=True).replace('−', '-')}$}}"
    return text + (r"$^\dagger$" if r.protocol else "")


def comparison_latex(table: pd.DataFrame, scope: ReportScope) -> str:
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    header = ["method"] + [latex_escape(pair_header(t, s)) for t, s in pairs]
    rows = []
    for row in dict.fromkeys(table.row):
        cells = table[table.row == row]
        rows.append([latex_escape(row_title(row, scope.baseline))] + [tex_cell(r, scope.baseline)
                                                                       for _, r in cells.iterrows()])
    caption = (f"{latex_escape(scope.suite)}: last-epoch test accuracy (\\%), mean $\\pm$ standard deviation over "
               "seeds (number of seeds); small: difference to the student alone, paired by seed; bold: best.")
    return latex_table(header, rows, "l" + "r" * len(pairs), caption)


def difference_rows(table: pd.DataFrame, scope: ReportScope) -> pd.DataFrame:
    """The rows of the differences table: every method on every pair except the student alone."""
    return table[(table.role == "student") & (table.row != scope.baseline)]


def differences_caption(table: pd.DataFrame, scope: ReportScope) -> str:
    tests = int(table.delta_p.notna().sum() + table.kd_p.notna().sum())
    kd = f" and against vanilla KD (`{scope.kd}`)" if scope.kd else ""
    alone = f"`{scope.baseline}`" if scope.baseline else "not in this suite: no differences to it"
    return (f"Each method against the student alone ({alone}){kd}: mean difference in last-epoch test "
            f"accuracy (percentage points), paired by seed, with its 95 % t interval; p: two-sided paired t-test "
            f"(scipy); p (Holm): adjusted for the {tests} tests of this table (Holm's step-down correction); *: "
            f"p (Holm) < 0.05. A dash: fewer than two paired seeds, or no spread to test.")


def differences_markdown(table: pd.DataFrame, scope: ReportScope) -> str:
    header = ["pair", "method", "n", "Δ vs student alone [95 % CI]", "p", "p (Holm)"]
    if scope.kd:
        header += ["Δ vs KD [95 % CI]", "p", "p (Holm)"]
    rows = []
    for _, r in difference_rows(table, scope).iterrows():
        row = [pair_header(r.teacher, r.student), r.row, str(r.delta_n or r.n)]
        for ref in ("delta", "kd") if scope.kd else ("delta",):
            if r[f"{ref}_n"]:
                row += [delta_text(r, ref), p_value(r[f"{ref}_p"]), p_value(r[f"{ref}_p_holm"])]
            else:
                row += [DASH, DASH, DASH]
        rows.append(row)
    text = markdown_table(header, rows, "llr" + "rrr" * (2 if scope.kd else 1))
    return text + "\n" + differences_caption(table, scope) + "\n"


def by_gap_markdown(table: pd.DataFrame, scope: ReportScope) -> str:
    """The differences table turned into the study's answer: a method per row, a pair per column (growing gap),
    each cell a method's paired difference to vanilla KD (and, in a second table, to the student alone)."""
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    gaps = table.drop_duplicates(["teacher", "student"]).gap.tolist()
    header = ["method"] + [f"{scope.name(t)} ({g:.1f}×)" for (t, _), g in zip(pairs, gaps)]
    rows = difference_rows(table, scope)
    parts = []
    for ref, against in (("kd", f"vanilla KD (`{scope.kd}`)"), ("delta", f"the student alone (`{scope.baseline}`)")):
        if (ref == "kd" and not scope.kd) or (ref == "delta" and not scope.baseline):  # not in the suite
            continue
        body = []
        for method in dict.fromkeys(rows.row):
            if ref == "kd" and method == scope.kd:
                continue
            cells = rows[rows.row == method]
            body.append([scope.name(method)] + [delta_text(r, ref) if r[f"{ref}_n"] else DASH
                                                for _, r in cells.iterrows()])
        parts.append(f"Against {against}: percentage points, teacher (capacity gap) per column\n\n"
                     + markdown_table(header, body, "l" + "r" * len(pairs)))
    note = ("\nMean paired difference in last-epoch test accuracy [95 % t interval]; *: significant after Holm's "
            "correction across the differences table (p values there); a dash: fewer than two paired seeds or a "
            "collapsed run.\n")
    return "\n".join(parts) + note


def differences_latex(table: pd.DataFrame, scope: ReportScope) -> str:
    header = ["pair", "method", "$n$", r"$\Delta$ alone [95\% CI]", r"$p_\mathrm{Holm}$"]
    if scope.kd:
        header += [r"$\Delta$ KD [95\% CI]", r"$p_\mathrm{Holm}$"]
    rows = []
    for _, r in difference_rows(table, scope).iterrows():
        row = [latex_escape(pair_header(r.teacher, r.student)), latex_escape(r.row), str(r.delta_n or r.n)]
        for ref in ("delta", "kd") if scope.kd else ("delta",):
            if r[f"{ref}_n"]:
                row += [latex_escape(delta_text(r, ref)).replace("*", r"$^*$"), latex_escape(p_value(r[f"{ref}_p_holm"]))]
            else:
                row += ["--", "--"]
        rows.append(row)
    caption = latex_escape(differences_caption(table, scope).replace("`", ""))
    return latex_table(header, rows, "llr" + "rr" * (2 if scope.kd else 1), caption)


def cost_markdown(cost: pd.DataFrame) -> str:
    header = ["job", "teacher", "student", "runs", "test acc (%)", "wall time (s)", "images/s",
              "teacher fwd", "teacher bwd", "student fwd", "student bwd"]
    rows = []
    for _, r in cost.iterrows():
        dash = DASH if not r.finished else f"{DASH} ({r.status})"  # an empty row says why once, in its first cell
        job = r.method if r.role in ("teacher", "student") else f"{r.role} ({r.method})"
        rows.append([job, r.teacher or DASH, r.student or DASH, f"{r.finished}/{r.runs}",
                     number(r.test_acc) if r.finished else f"{DASH} ({r.status})",
                     f"{r.wall_time:.1f}" if not math.isnan(r.wall_time) else dash,
                     f"{r.images_per_sec:.0f}" if not math.isnan(r.images_per_sec) else dash,
                     *[f"{r[p]:.0f}" if not math.isnan(r[p]) else dash for p in PASSES]])
    text = markdown_table(header, rows, "lllrrrrrrrr")
    return text + ("\nPer run, mean over the finished runs of each job: wall time of training (evaluation included), "
                   "images per second (mean over epochs), forward and backward passes (batches) of each model.\n")


def cost_latex(cost: pd.DataFrame, suite: str) -> str:
    header = ["job", "teacher", "student", "runs", "acc (\\%)", "wall (s)", "img/s", "T fwd", "T bwd", "S fwd", "S bwd"]
    rows = []
    for _, r in cost.iterrows():
        dash = "--" if not r.finished else f"-- ({latex_escape(r.status)})"
        rows.append([latex_escape(x) for x in (r.method, r.teacher or "--", r.student or "--")] +
                    [f"{r.finished}/{r.runs}", f"{r.test_acc:.2f}" if r.finished else f"-- ({latex_escape(r.status)})",
                     f"{r.wall_time:.1f}" if not math.isnan(r.wall_time) else dash,
                     f"{r.images_per_sec:.0f}" if not math.isnan(r.images_per_sec) else dash,
                     *[f"{r[p]:.0f}" if not math.isnan(r[p]) else dash for p in PASSES]])
    return latex_table(header, rows, "lllrrrrrrrr", f"{latex_escape(suite)}: cost per run.")
