"""Paper suites: a published table's numbers beside ours, cell by cell, with the difference.

A paper suite (suites/papers/*.yaml) has a `reference:` block naming a long-format CSV beside it
(table,dataset,teacher,student,method,value,note: the published numbers, with their source in the
file's comment lines) and maps the paper's model and row names to ours. Every name of the paper's
table must be mapped, to ours or to null (not in our zoo, not implemented), so that no published
number is silently left out.
"""

from __future__ import annotations
import math
from pathlib import Path
import pandas as pd
from kdbench.report.format import DASH, latex_escape, latex_table, markdown_table, number, spread
from kdbench.report.cells import TEACHER, ReportScope, SeedValues, student_cell, teacher_cell
from kdbench.config.schema import ReferenceConfig, Suite
from kdbench.config.reference import read_reference


PAPER_COLUMNS = ["dataset", "paper_teacher", "paper_student", "paper_method", "paper", "teacher", "student", "method",
                 "n", "mean", "std", "seeds", "values", "diff", "status", "note", "protocol"]


def to_metric(cell: SeedValues, ref: ReferenceConfig) -> SeedValues:
    if ref.metric == "test_errors":  # errors are whole images: accuracy x test size is exact up to rounding
        return cell.map(lambda acc: float(round(ref.test_images * (100 - acc) / 100)))
    return cell


def paper_frame(suite: Suite, suite_path: Path, runs: pd.DataFrame, scope: ReportScope) -> pd.DataFrame:
    """One row per published number: the paper's value, ours (mean, sd, n per seed) and ours minus the paper's."""
    ref = suite.reference
    students = set(scope.students)
    pairs = {(p.teacher, p.student) for p in scope.pairs}
    records = []
    for _, row in read_reference(suite_path, ref).iterrows():
        teacher, student = ref.models.get(row.teacher), ref.models.get(row.student)
        label = ref.methods.get(row.method)
        cell, why = None, ""
        needed = {TEACHER: [row.teacher], scope.baseline: [row.student]}.get(label, [row.teacher, row.student])
        absent = [name for name in needed if ref.models.get(name) is None]
        if row.dataset != suite.data.dataset:
            why = f"other dataset: {row.dataset}"
        elif label is None:
            why = "not implemented"
        elif absent:
            why = f"{absent[0]} not in our zoo"
        elif label == TEACHER:
            if teacher in {p.teacher for p in scope.pairs}:
                cell = teacher_cell(runs, teacher)
            else:
                why = f"teacher {teacher} not in suite"
        elif label not in scope.methods:
            why = f"{label} not in suite"
        elif label == scope.baseline and student not in students:
            why = f"student {student} not in suite"
        elif label != scope.baseline and (teacher, student) not in pairs:
            why = "pair not in suite"
        else:
            cell = student_cell(runs, label, teacher, student, scope.seeds)
        if cell is not None:
            cell = to_metric(cell, ref)
            why = "ok" if cell.n else cell.reason
        n = cell.n if cell else 0
        records.append({"dataset": row.dataset, "paper_teacher": row.teacher, "paper_student": row.student,
                        "paper_method": row.method, "paper": float(row.value), "teacher": teacher or "",
                        "student": student or "", "method": label or "", "n": n,
                        "mean": cell.mean if n else math.nan, "std": cell.std if n else math.nan,
                        "seeds": " ".join(map(str, sorted(cell.values))) if n else "",
                        "values": " ".join(f"{cell.values[s]:.4f}" for s in sorted(cell.values)) if n else "",
                        "diff": cell.mean - float(row.value) if n else math.nan, "status": why,
                        "note": cell.note if n else "", "protocol": cell.protocol if cell else ""})
    return pd.DataFrame(records, columns=PAPER_COLUMNS)


def _digits(ref: ReferenceConfig) -> tuple[int, int]:
    """Digits for the paper's numbers and ours: errors are counts (ours a mean of counts)."""
    return (0, 1) if ref.metric == "test_errors" else (2, 2)


def _columns(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys(zip(frame.dataset, frame.paper_teacher, frame.paper_student)))


def _column_title(col: tuple[str, str, str], several_datasets: bool) -> str:
    dataset, teacher, student = col
    return (f"{dataset}: " if several_datasets else "") + f"{teacher} → {student}"


def _cell_parts(r, ref: ReferenceConfig) -> tuple[str, str, str]:
    pd_, od = _digits(ref)
    paper = number(r.paper, pd_)
    if not r.n:
        return paper, f"{DASH} ({r.status})", ""
    ours = spread(r["mean"], r["std"], od) + f" (n={r.n}{'; ' + r.note if r.note else ''})"
    return paper, ours + (" †" if r.protocol else ""), number(r["diff"], od, sign=True)


def _grid(frame: pd.DataFrame):
    cols = _columns(frame)
    for method in dict.fromkeys(frame.paper_method):
        mine = frame[frame.paper_method == method]
        cells = []
        for col in cols:
            hit = mine[(mine.dataset == col[0]) & (mine.paper_teacher == col[1]) & (mine.paper_student == col[2])]
            cells.append(hit.iloc[0] if len(hit) else None)
        yield method, cells


def _explanation(frame: pd.DataFrame, ref: ReferenceConfig) -> str:
    what = ("test errors (of {:,} test images)".format(ref.test_images) if ref.metric == "test_errors"
            else "top-1 test accuracy (%)")
    text = (f"Each cell: the paper's number · ours, mean ± standard deviation over seeds (n seeds), last epoch · "
            f"Δ = ours − paper. Metric: {what}.")
    protocols = sorted(set(frame.protocol) - {""})
    if protocols:
        text += " †: " + "; ".join(protocols) + "."
    if ref.protocol:
        text += f"\n\nProtocol assumed: {ref.protocol.strip()}"
    return text + "\n"


def paper_markdown(frame: pd.DataFrame, ref: ReferenceConfig) -> str:
    cols = _columns(frame)
    several = len({c[0] for c in cols}) > 1
    header = ["paper row"] + [_column_title(c, several) for c in cols]
    rows = []
    for method, cells in _grid(frame):
        texts = []
        for r in cells:
            if r is None:
                texts.append(f"{DASH} (not in paper)")
                continue
            paper, ours, diff = _cell_parts(r, ref)
            texts.append(f"{paper} · {ours}" + (f" · Δ {diff}" if diff else ""))
        rows.append([method] + texts)
    table = markdown_table(header, rows, "l" + "r" * len(cols))
    return f"**{ref.title}**\n\n{table}\n{_explanation(frame, ref)}"


def paper_latex(frame: pd.DataFrame, ref: ReferenceConfig) -> str:
    cols = _columns(frame)
    several = len({c[0] for c in cols}) > 1
    header = ["paper row"] + [latex_escape(_column_title(c, several)) for c in cols]
    rows = []
    for method, cells in _grid(frame):
        texts = []
        for r in cells:
            if r is None:
                texts.append("--")
                continue
            paper, ours, diff = (latex_escape(p) for p in _cell_parts(r, ref))
            texts.append(f"{paper} / {ours}" + (f" / {diff}" if diff else ""))
        rows.append([latex_escape(method)] + texts)
    caption = (f"{latex_escape(ref.title)}: the paper's number / ours (mean $\\pm$ sd, n seeds) / ours $-$ paper."
               + (f" Protocol assumed: {latex_escape(ref.protocol.strip())}" if ref.protocol else ""))
    return latex_table(header, rows, "l" + "r" * len(cols), caption)
