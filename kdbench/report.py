"""Reports: MLflow runs -> pandas -> tables (Markdown, LaTeX, CSV) and figures (PNG, SVG) in results/<suite>/.

A report is a pure function of the MLflow store: it never trains and never reads log files, and the
same runs give the same bytes (stable order, fixed number formats, figures without dates or random ids).
The suite file supplies only what was asked for (pairs, method labels, seeds), so a cell that was asked
for and has no number shows as a dash with its reason, never as a silent hole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from kdbench import KdbenchError
from kdbench.figures import X_AXES, accuracy_figure, save_figure
from kdbench.stats import ALPHA, NO_TEST, Paired, holm, mean_ci
from kdbench.store import atomic_write
from kdbench.tracking import TAG, check_tracking, tracking_uri

PASSES = ("teacher_forward", "teacher_backward", "student_forward", "student_backward")
TEACHER = "teacher"  # the row of teacher accuracies (teacher runs carry the method label "baseline")
DATASET_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST",
                 "synthetic": "synthetic data", "imagefolder": "image folder"}
RUN_COLUMNS = ["run_id", "role", "method", "method_name", "teacher", "student", "pair", "seed", "status", "reason",
               "failure", "protocol", "reused", "method_hash", "epochs", "test_acc", "wall_time", "images_per_sec",
               *PASSES, "start_time"]


# ---------------------------------------------------------------------------------------------- MLflow

def open_client(uri: str | None = None):
    """An MlflowClient on an existing store: a report never creates an empty database by looking for one."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise KdbenchError(f"no MLflow store at {uri[len('sqlite:///'):]} (MLFLOW_TRACKING_URI={uri}): "
                           f"run the suite first, or point MLFLOW_TRACKING_URI at the store that has it")
    if not uri.startswith("sqlite:///"):
        check_tracking(uri)  # a server that does not answer: one line now, not minutes of retries
    return MlflowClient(uri)


def find_parent(client, suite_name: str, run_id: str | None = None, plan_hash: str | None = None,
                notice=None):
    """The suite's parent run: the given one; else the latest run of the suite as it is now (`plan_hash`, the
    plan's data-free hash), else the latest run of any version of it. `notice(line)` hears which run was taken
    and why whenever that is not simply the latest run of the suite as it is."""
    from mlflow.exceptions import MlflowException

    notice = notice or (lambda line: None)
    where = client.tracking_uri
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise KdbenchError(f"--run {run_id}: no such run in {where}") from None
        role = run.data.tags.get(f"{TAG}role")
        if role != "suite":
            raise KdbenchError(f"--run {run_id}: not a suite's parent run (its role is {role or 'unset'}); "
                               f"pass the parent run's id")
        if run.data.tags.get(f"{TAG}suite") != suite_name:
            raise KdbenchError(f"--run {run_id}: a run of suite '{run.data.tags.get(f'{TAG}suite')}', "
                               f"not of '{suite_name}'")
        if plan_hash and plan_of(run) != plan_hash:
            notice(f"reporting run {run_id} as asked; it ran another version of the suite (or other --methods, "
                   f"--seeds, --epochs) than the suite file is now")
        return run
    exp = client.get_experiment_by_name(suite_name)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG}role` = 'suite'",
        order_by=["attributes.start_time DESC"], max_results=1000)
    if not runs:
        raise KdbenchError(f"suite '{suite_name}' has no runs in {where}: run it first (kdbench run SUITE)")
    if plan_hash is None:
        return runs[0]
    matching = [r for r in runs if plan_of(r) == plan_hash]
    if not matching:
        notice(f"no run of suite '{suite_name}' as its file is now (plan {plan_hash}); reporting the latest run "
               f"{runs[0].info.run_id} (plan {plan_of(runs[0]) or 'unknown'}), of another version of the suite or "
               f"made with --methods, --seeds or --epochs: run the suite again, or pass --run to choose")
        return runs[0]
    if matching[0] is not runs[0]:
        notice(f"reporting run {matching[0].info.run_id}, the latest of the suite as its file is now; the newer run "
               f"{runs[0].info.run_id} ran another version of it (pass --run to report that one)")
    return matching[0]


def plan_of(parent) -> str:
    """The data-free plan hash a parent run was made with (older runs: their plan hash)."""
    tags = parent.data.tags
    return tags.get(f"{TAG}suite_plan") or tags.get(f"{TAG}plan", "")


def failure_reason(status: str, failure: str) -> str:
    """Why a run has no number, in a word or two (the full message is in the run's kdbench.failure tag)."""
    if status == "FINISHED":
        return ""
    if status == "COLLAPSED":
        return "collapsed"
    if status == "FAILED":
        if failure.startswith("diverged"):
            return "diverged"
        if failure.startswith("its teacher failed"):
            return "teacher failed"
        return "failed"
    return {"KILLED": "killed", "RUNNING": "running", "SCHEDULED": "running"}.get(status, status.lower())


def run_record(client, run) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    finished = run.info.status == "FINISHED"
    # A finished run that collapsed (chance accuracy, a loss that never fell) has no number: shown as a dash
    # with its reason, as a failed run is, and never part of a mean.
    status = "COLLAPSED" if finished and tags.get(f"{TAG}collapsed") else run.info.status
    history = client.get_metric_history(run.info.run_id, "test_acc") if finished else []
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_sec")] if finished else []
    failure = tags.get(f"{TAG}failure", "") or tags.get(f"{TAG}collapsed", "")
    return {
        "run_id": run.info.run_id, "role": tags.get(f"{TAG}role", ""), "method": tags.get(f"{TAG}method", ""),
        "method_name": tags.get(f"{TAG}method_name", ""), "teacher": tags.get(f"{TAG}teacher", ""),
        "student": tags.get(f"{TAG}student", ""), "pair": tags.get(f"{TAG}pair", ""),
        "seed": int(tags.get(f"{TAG}seed", "-1")), "status": status,
        "reason": failure_reason(status, failure),
        "failure": failure.strip().splitlines()[-1] if failure else "",  # a traceback's last line says what
        "protocol": tags.get(f"{TAG}protocol", ""), "reused": tags.get(f"{TAG}reused", "") == "true",
        "method_hash": run.data.params.get("method_hash", ""),
        "epochs": max((m.step for m in history), default=math.nan),
        # The headline: the test accuracy of the last epoch (the latest step), never the best epoch.
        "test_acc": max(history, key=lambda m: (m.step, m.timestamp)).value if history else math.nan,
        "wall_time": metrics.get("wall_time", math.nan),
        "images_per_sec": sum(rates) / len(rates) if rates else math.nan,
        **{p: metrics.get(p, math.nan) for p in PASSES},
        "start_time": run.info.start_time,
    }


def load_runs(client, parent) -> pd.DataFrame:
    """One row per child run of `parent`, in a stable order."""
    records, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        records += [run_record(client, r) for r in page]
        token = page.token
        if not token:
            break
    runs = pd.DataFrame(records, columns=RUN_COLUMNS)
    return runs.sort_values(["role", "method", "teacher", "student", "seed", "start_time", "run_id"],
                            kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class PairInfo:
    teacher: str
    student: str
    gap: float  # teacher parameters over student parameters

    @property
    def name(self) -> str:
        return f"{self.teacher}->{self.student}"


@dataclass(frozen=True)
class Layout:
    """What the suite asked for, plus anything its runs hold beyond that (a suite edited since its run)."""
    suite: str
    pairs: tuple[PairInfo, ...]
    methods: tuple[str, ...]  # student method labels, in the suite's order
    baseline: str | None  # the label of the student trained alone
    seeds: tuple[int, ...]
    kd: str | None = None  # the label of vanilla KD (method kd, default parameters if there is such an entry)
    dataset: str = ""  # the dataset's name for a reader
    names: tuple[tuple[str, str], ...] = ()  # display names of models and methods (the suite's `display` block)
    title: str | None = None

    def name(self, key: str) -> str:
        """A model's or method's name as the suite's `display` block gives it (else its own)."""
        return dict(self.names).get(key, key)

    @property
    def students(self) -> list[str]:
        return list(dict.fromkeys(p.student for p in self.pairs))


def layout_for(plan, runs: pd.DataFrame) -> Layout:
    from kdbench.data import dataset_info
    from kdbench.zoo import model_stats

    suite = plan.suite
    info = dataset_info(suite.data.spec())

    def params(name: str) -> int:
        if name in plan.models:
            return plan.models[name].params
        kwargs = tuple(sorted(suite.model_kwargs.get(name, {}).items()))
        return model_stats(name, info.num_classes, info.input_shape, kwargs).params

    pairs = [PairInfo(p.teacher.name, p.student.name, p.gap) for p in plan.pairs]
    students = runs[runs.role == "student"]
    for name in sorted(set(students.pair) - {p.name for p in pairs} - {""}):
        t, s = name.split("->")
        pairs.append(PairInfo(t, s, params(t) / params(s)))
    methods = [m.label for m in suite.methods]
    methods += sorted(set(students.method) - set(methods))
    baselines = [m.label for m in suite.methods if m.method == "baseline"]
    baselines += sorted(set(students[students.method_name == "baseline"].method) - set(baselines))
    seeds = sorted(set(suite.seeds) | set(students.seed))
    kd = [m.label for m in suite.methods if m.method == "kd" and m.combine == "sum"]  # not kd+pcgrad: plain KD
    kd.sort(key=lambda label: bool(next(m for m in suite.methods if m.label == label).params))  # defaults first
    display = suite.display
    names = {**display.models, **display.methods}
    return Layout(suite.name, tuple(pairs), tuple(methods), baselines[0] if baselines else None, tuple(seeds),
                  kd[0] if kd else None, display.dataset or DATASET_NAMES.get(suite.data.dataset, suite.data.dataset),
                  tuple(sorted(names.items())), display.title)


# ---------------------------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """One table cell: the last-epoch test accuracy per seed, and why the other asked-for seeds have none."""
    values: dict[int, float]  # seed -> number, finished runs only
    missing: dict[int, str]  # seed -> not run, failed, diverged, teacher failed, killed, running
    protocol: str = ""  # a protocol note from the runs' method (e.g. "protocol assumed")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values.values()) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        return sample_std(list(self.values.values()))

    @property
    def ci(self) -> tuple[float, float]:
        """The 95 % t interval of the mean over seeds."""
        return mean_ci(list(self.values.values()))

    @property
    def reason(self) -> str:
        """Why the cell has no number (empty when it has one)."""
        return "" if self.n else ", ".join(dict.fromkeys(self.missing.values())) or "not run"

    @property
    def note(self) -> str:
        """What is missing from a cell that has a number: '1 diverged, 1 not run'."""
        if not self.n:
            return ""
        counts: dict[str, int] = {}
        for why in self.missing.values():
            counts[why] = counts.get(why, 0) + 1
        return ", ".join(f"{k} {why}" for why, k in counts.items())

    def map(self, fn) -> "Cell":
        return Cell({s: fn(v) for s, v in self.values.items()}, self.missing, self.protocol)


def sample_std(values: list[float]) -> float:
    """Standard deviation over seeds with Bessel's correction (n - 1); undefined for one seed."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def pick(runs: pd.DataFrame, seeds: Iterable[int]) -> Cell:
    """Per seed, the latest finished run; a seed without one says why (its latest run's status, or not run).

    A cell never mixes method code: only runs with the method_hash of its latest finished run count; a seed
    finished only by other code shows as "other method code" (rerun the suite to retrain it).
    """
    values, missing = {}, {}
    if "method_hash" not in runs:
        runs = runs.assign(method_hash="")
    finished = runs[(runs.status == "FINISHED") & runs.test_acc.notna()]
    code = finished.sort_values("start_time", kind="stable").iloc[-1].method_hash if len(finished) else None
    for seed in sorted(set(seeds) | set(runs.seed)):
        mine = runs[runs.seed == seed]
        done = mine[(mine.status == "FINISHED") & mine.test_acc.notna()]
        if len(done) and not len(done[done.method_hash == code]):
            missing[seed] = "other method code"
            continue
        done = done[done.method_hash == code]
        if len(done):
            values[seed] = float(done.iloc[-1].test_acc)
        elif len(mine):
            missing[seed] = mine.sort_values("start_time", kind="stable").iloc[-1].reason or "no test_acc"
        else:
            missing[seed] = "not run"
    protocol = "; ".join(sorted(set(runs.protocol) - {""}))
    return Cell(values, missing, protocol)


def teacher_cell(runs: pd.DataFrame, teacher: str) -> Cell:
    mine = runs[(runs.role == "teacher") & (runs.teacher == teacher)].sort_values("start_time", kind="stable")
    return pick(mine, [])


def student_cell(runs: pd.DataFrame, label: str, teacher: str, student: str, seeds: Iterable[int]) -> Cell:
    """A method's cell for a pair: its distilled runs, or the student-alone runs shared by every pair."""
    mine = runs[(runs.role == "student") & (runs.method == label) & (runs.student == student)
                & runs.pair.isin([f"{teacher}->{student}", ""])].sort_values("start_time", kind="stable")
    return pick(mine, seeds)


COMPARISON_COLUMNS = ["row", "method", "role", "teacher", "student", "gap", "n", "mean", "std", "ci_low", "ci_high",
                      "seeds", "values", "delta_n", "delta_mean", "delta_std", "delta_ci_low", "delta_ci_high",
                      "delta_p", "delta_p_holm", "delta_significant", "kd_n", "kd_mean", "kd_std", "kd_ci_low",
                      "kd_ci_high", "kd_p", "kd_p_holm", "kd_significant", "best", "status", "note", "protocol",
                      "teacher_acc", "teacher_ci_low", "teacher_ci_high"]
# Paired comparisons: each method against the student alone ("delta") and against vanilla KD ("kd").
REFERENCES = ("delta", "kd")


def comparison_frame(runs: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """The comparison table in long form: one row per (row of the table, pair).

    Every paired test of the table (both references, every method and pair) is one family for Holm's correction:
    a difference is marked significant when its Holm-adjusted p-value is below 0.05.
    """
    records = []

    def add(row: str, role: str, pair: PairInfo, cell: Cell, refs: dict[str, Paired], teacher: Cell):
        record = {"row": row, "method": row if role == "student" else "", "role": role, "teacher": pair.teacher,
                  "student": pair.student, "gap": pair.gap, "n": cell.n, "mean": cell.mean, "std": cell.std,
                  "ci_low": cell.ci[0], "ci_high": cell.ci[1], "seeds": " ".join(map(str, sorted(cell.values))),
                  "values": " ".join(f"{cell.values[s]:.4f}" for s in sorted(cell.values)), "best": False,
                  "status": "ok" if cell.n else cell.reason, "note": cell.note, "protocol": cell.protocol,
                  "teacher_acc": teacher.mean, "teacher_ci_low": teacher.ci[0], "teacher_ci_high": teacher.ci[1]}
        for ref in REFERENCES:
            d = refs.get(ref, NO_TEST)
            record.update({f"{ref}_n": d.n, f"{ref}_mean": d.mean, f"{ref}_std": d.std, f"{ref}_ci_low": d.ci_low,
                           f"{ref}_ci_high": d.ci_high, f"{ref}_p": d.p})
        records.append(record)

    for pair in layout.pairs:
        teacher = teacher_cell(runs, pair.teacher)
        add(TEACHER, "teacher", pair, teacher, {}, teacher)
        base = (student_cell(runs, layout.baseline, pair.teacher, pair.student, layout.seeds) if layout.baseline
                else None)
        kd = student_cell(runs, layout.kd, pair.teacher, pair.student, layout.seeds) if layout.kd else None
        for label in layout.methods:
            cell = student_cell(runs, label, pair.teacher, pair.student, layout.seeds)
            refs = {}
            if base is not None and label != layout.baseline:
                refs["delta"] = Paired.of(cell.values, base.values)
            if kd is not None and label not in (layout.kd, layout.baseline):
                refs["kd"] = Paired.of(cell.values, kd.values)
            add(label, "student", pair, cell, refs, teacher)
    table = pd.DataFrame(records, columns=COMPARISON_COLUMNS)
    adjusted = holm(list(table.delta_p) + list(table.kd_p))
    table["delta_p_holm"], table["kd_p_holm"] = adjusted[:len(table)], adjusted[len(table):]
    for ref in REFERENCES:
        table[f"{ref}_significant"] = table[f"{ref}_p_holm"] < ALPHA
    students = table[(table.role == "student") & (table.n > 0)]
    best = students.groupby(["teacher", "student"], sort=False)["mean"].transform("max")
    table.loc[best.index[students["mean"] == best], "best"] = True
    return table


def cost_frame(runs: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """Per job kind (a teacher, a method on a pair, the student alone): runs, accuracy, time, speed, passes."""
    groups = [("teacher", TEACHER, t, "") for t in dict.fromkeys(p.teacher for p in layout.pairs)]
    for label in layout.methods:
        for pair in layout.pairs:
            alone = runs[(runs.role == "student") & (runs.method == label) & (runs.student == pair.student)
                         & (runs.pair == "")]
            key = ("student", label, "" if len(alone) or label == layout.baseline else pair.teacher, pair.student)
            if key not in groups:
                groups.append(key)
    others = runs[~runs.role.isin(["teacher", "student"])]  # e.g. assistants, where a method trains them
    groups += sorted(set(zip(others.role, others.method, others.teacher, others.student)))
    records = []
    for role, label, teacher, student in groups:
        if role not in ("teacher", "student"):
            mine = others[(others.role == role) & (others.method == label) & (others.teacher == teacher)
                          & (others.student == student)]
        elif role == "teacher":
            mine = runs[(runs.role == "teacher") & (runs.teacher == teacher)]
        else:
            pair = f"{teacher}->{student}" if teacher else ""
            mine = runs[(runs.role == "student") & (runs.method == label) & (runs.student == student)
                        & (runs.pair == pair)]
        done = mine[mine.status == "FINISHED"]
        timed = done[done.wall_time.notna()]
        status = "ok" if len(done) else (", ".join(dict.fromkeys(mine.reason)) if len(mine) else "not run")
        if len(done) and not len(timed):
            status = "reused" if done.reused.all() else "no wall time"
        passes = {p: timed[p].mean() if len(timed) else math.nan for p in PASSES}
        if role == "teacher":  # the engine calls the model it trains "student": here that model is the teacher
            passes = {p.replace("student", "teacher") if "student" in p else p.replace("teacher", "student"): v
                      for p, v in passes.items()}
        records.append({"role": role, "method": label, "teacher": teacher, "student": student, "runs": len(mine),
                        "finished": len(done), "test_acc": done.test_acc.mean() if len(done) else math.nan,
                        "wall_time": timed.wall_time.mean() if len(timed) else math.nan,
                        "images_per_sec": done.images_per_sec.mean() if len(done) else math.nan,
                        **{p: passes[p] for p in PASSES}, "status": status})
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------- formatting

DASH = "–"


def number(value: float, digits: int = 2, sign: bool = False) -> str:
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return text.replace("-", "−")  # a true minus: columns of signed numbers line up


def spread(mean: float, std: float, digits: int = 2, sign: bool = False, pm: str = " ± ") -> str:
    text = number(mean, digits, sign)
    return text if math.isnan(std) else f"{text}{pm}{number(std, digits)}"


def interval(low: float, high: float, digits: int = 2, sign: bool = False) -> str:
    """A confidence interval as "[a, b]"; empty when it is undefined (one seed)."""
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{number(low, digits, sign)}, {number(high, digits, sign)}]"


def p_value(p: float) -> str:
    if math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


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


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_markdown(table: pd.DataFrame, layout: Layout) -> str:
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    header = ["method"] + [pair_header(t, s) for t, s in pairs]
    gaps = table.drop_duplicates(["teacher", "student"]).gap
    rows = [["capacity gap (params)"] + [f"{g:.1f}×" for g in gaps]]
    for row in dict.fromkeys(table.row):
        cells = table[table.row == row]
        rows.append([row_title(row, layout.baseline)] + [md_cell(r, layout.baseline) for _, r in cells.iterrows()])
    text = markdown_table(header, rows, "l" + "r" * len(pairs))
    text += ("\nLast-epoch test accuracy (%), mean ± standard deviation over seeds [95 % confidence interval of the "
             "mean, t distribution] (n seeds); Δ: difference to the student alone, paired by seed, with its 95 % "
             "interval; *: significant after Holm's correction across the table (paired t-test, α = 0.05; see the "
             "differences table); **bold**: the best method of each pair.")
    protocols = sorted(set(table.protocol) - {""})
    if protocols:
        text += " †: " + "; ".join(protocols) + "."
    return text + "\n"


LATEX_SPECIALS = (("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"),
                  ("^", r"\^{}"), ("~", r"\textasciitilde{}"), ("→", r"$\to$"), ("−", "-"), ("Δ", r"$\Delta$"),
                  ("×", r"$\times$"), ("–", "--"), ("±", r"$\pm$"), ("†", r"$^\dagger$"))


def latex_escape(text: str) -> str:
    text = text.replace("\\", "\x00")  # backslashes first, restored last: their replacement has braces
    for special, escaped in LATEX_SPECIALS:
        text = text.replace(special, escaped)
    return text.replace("\x00", r"\textbackslash{}")


def latex_table(header: list[str], rows: list[list[str]], align: str, caption: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def tex_cell(r, baseline: str | None) -> str:
    if not r.n:
        return f"-- ({latex_escape(r.status)})"
    text = spread(r["mean"], r["std"], pm=r"$\pm$").replace("−", "-")
    text = rf"\textbf{{{text}}}" if r.best else text
    text += f" ({r.n})"
    if r.role == "student" and r.row != baseline and r.delta_n:
        text += rf" {{\scriptsize ${number(r.delta_mean, sign=True).replace('−', '-')}$}}"
    return text + (r"$^\dagger$" if r.protocol else "")


def comparison_latex(table: pd.DataFrame, layout: Layout) -> str:
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    header = ["method"] + [latex_escape(pair_header(t, s)) for t, s in pairs]
    rows = []
    for row in dict.fromkeys(table.row):
        cells = table[table.row == row]
        rows.append([latex_escape(row_title(row, layout.baseline))] + [tex_cell(r, layout.baseline)
                                                                        for _, r in cells.iterrows()])
    caption = (f"{latex_escape(layout.suite)}: last-epoch test accuracy (\\%), mean $\\pm$ standard deviation over "
               "seeds (number of seeds); small: difference to the student alone, paired by seed; bold: best.")
    return latex_table(header, rows, "l" + "r" * len(pairs), caption)


def difference_rows(table: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """The rows of the differences table: every method on every pair except the student alone."""
    return table[(table.role == "student") & (table.row != layout.baseline)]


def differences_caption(table: pd.DataFrame, layout: Layout) -> str:
    tests = int(table.delta_p.notna().sum() + table.kd_p.notna().sum())
    kd = f" and against vanilla KD (`{layout.kd}`)" if layout.kd else ""
    return (f"Each method against the student alone (`{layout.baseline}`){kd}: mean difference in last-epoch test "
            f"accuracy (percentage points), paired by seed, with its 95 % t interval; p: two-sided paired t-test "
            f"(scipy); p (Holm): adjusted for the {tests} tests of this table (Holm's step-down correction); *: "
            f"p (Holm) < 0.05. A dash: fewer than two paired seeds, or no spread to test.")


def differences_markdown(table: pd.DataFrame, layout: Layout) -> str:
    header = ["pair", "method", "n", "Δ vs student alone [95 % CI]", "p", "p (Holm)"]
    if layout.kd:
        header += ["Δ vs KD [95 % CI]", "p", "p (Holm)"]
    rows = []
    for _, r in difference_rows(table, layout).iterrows():
        row = [pair_header(r.teacher, r.student), r.row, str(r.delta_n or r.n)]
        for ref in ("delta", "kd") if layout.kd else ("delta",):
            if r[f"{ref}_n"]:
                row += [delta_text(r, ref), p_value(r[f"{ref}_p"]), p_value(r[f"{ref}_p_holm"])]
            else:
                row += [DASH, DASH, DASH]
        rows.append(row)
    text = markdown_table(header, rows, "llr" + "rrr" * (2 if layout.kd else 1))
    return text + "\n" + differences_caption(table, layout) + "\n"


def by_gap_markdown(table: pd.DataFrame, layout: Layout) -> str:
    """The differences table turned into the study's answer: a method per row, a pair per column (growing gap),
    each cell a method's paired difference to vanilla KD (and, in a second table, to the student alone)."""
    pairs = list(dict.fromkeys(zip(table.teacher, table.student)))
    gaps = table.drop_duplicates(["teacher", "student"]).gap.tolist()
    header = ["method"] + [f"{layout.name(t)} ({g:.1f}×)" for (t, _), g in zip(pairs, gaps)]
    rows = difference_rows(table, layout)
    parts = []
    for ref, against in (("kd", f"vanilla KD (`{layout.kd}`)"), ("delta", f"the student alone (`{layout.baseline}`)")):
        if ref == "kd" and not layout.kd:
            continue
        body = []
        for method in dict.fromkeys(rows.row):
            if ref == "kd" and method == layout.kd:
                continue
            cells = rows[rows.row == method]
            body.append([layout.name(method)] + [delta_text(r, ref) if r[f"{ref}_n"] else DASH
                                                 for _, r in cells.iterrows()])
        parts.append(f"Against {against}: percentage points, teacher (capacity gap) per column\n\n"
                     + markdown_table(header, body, "l" + "r" * len(pairs)))
    note = ("\nMean paired difference in last-epoch test accuracy [95 % t interval]; *: significant after Holm's "
            "correction across the differences table (p values there); a dash: fewer than two paired seeds or a "
            "collapsed run.\n")
    return "\n".join(parts) + note


def differences_latex(table: pd.DataFrame, layout: Layout) -> str:
    header = ["pair", "method", "$n$", r"$\Delta$ alone [95\% CI]", r"$p_\mathrm{Holm}$"]
    if layout.kd:
        header += [r"$\Delta$ KD [95\% CI]", r"$p_\mathrm{Holm}$"]
    rows = []
    for _, r in difference_rows(table, layout).iterrows():
        row = [latex_escape(pair_header(r.teacher, r.student)), latex_escape(r.row), str(r.delta_n or r.n)]
        for ref in ("delta", "kd") if layout.kd else ("delta",):
            if r[f"{ref}_n"]:
                row += [latex_escape(delta_text(r, ref)).replace("*", r"$^*$"), latex_escape(p_value(r[f"{ref}_p_holm"]))]
            else:
                row += ["--", "--"]
        rows.append(row)
    caption = latex_escape(differences_caption(table, layout).replace("`", ""))
    return latex_table(header, rows, "llr" + "rr" * (2 if layout.kd else 1), caption)


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


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_text(path, frame.to_csv(index=False, float_format="%.6f", lineterminator="\n"))


def write_text(path: Path, text: str) -> None:
    """Every report file is written atomically: a kill leaves the old file or the new one, never half of one."""
    atomic_write(path, text.encode())


# ---------------------------------------------------------------------------------------------- the report

def describe_parent(parent, runs: pd.DataFrame) -> str:
    import datetime

    tags = parent.data.tags
    start = datetime.datetime.fromtimestamp(parent.info.start_time / 1000, datetime.timezone.utc)
    code = tags.get(f"{TAG}git_commit", "")[:12] + (" (uncommitted changes)" if tags.get(f"{TAG}git_dirty") == "true"
                                                    else "")
    counts = runs.status.value_counts().sort_index()
    return (f"Parent run `{parent.info.run_id}` ({parent.info.status}, started {start:%Y-%m-%d %H:%M} UTC) on "
            f"{tags.get(f'{TAG}device', '?')}, kdbench {tags.get(f'{TAG}kdbench_version', '?')}"
            f"{', commit ' + code if code else ''}; {len(runs)} child runs: "
            + ", ".join(f"{k} {v.lower()}" for v, k in counts.items()) + ".\n")


def failures_markdown(runs: pd.DataFrame) -> str:
    bad = runs[runs.status != "FINISHED"]
    if not len(bad):
        return ""
    lines = ["| job | seed | status | reason |", "|:---|---:|:---|:---|"]
    for _, r in bad.iterrows():
        job = f"teacher {r.teacher}" if r.role == "teacher" else f"{r.method} {r.pair or r.student}"
        lines.append(f"| {job} | {r.seed} | {r.status} | {(r.failure or r.reason).replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def stale_methods(runs: pd.DataFrame) -> list[str]:
    """Methods whose finished runs were trained by other code than the registered method's now."""
    from kdbench.registry import method_hash, methods

    known = methods()
    done = runs[(runs.status == "FINISHED") & (runs.method_hash != "") & runs.method_name.isin(list(known))]
    return sorted({name for name, code in zip(done.method_name, done.method_hash) if code != method_hash(name)})


def write_report(suite_path: Path, out: Path = Path("results"), run_id: str | None = None, x: str = "gap",
                 uri: str | None = None, methods: list[str] | None = None, title: str | None = None,
                 notice=None) -> Path:
    """Read the suite's runs from MLflow and write its tables and figure into out/<suite>/; returns that folder."""
    from kdbench.curves import curves_figure, curves_frame
    from kdbench.paper import paper_frame, paper_latex, paper_markdown
    from kdbench.plan import make_plan
    from kdbench.suite import load_suite

    if x not in X_AXES:
        raise KdbenchError(f"--x: expected one of {', '.join(X_AXES)}, got '{x}'")
    suite = load_suite(suite_path)
    plan = make_plan(suite, suite_path)
    client = open_client(uri)
    parent = find_parent(client, suite.name, run_id, plan.data_free_hash, notice)
    runs = load_runs(client, parent)
    layout = layout_for(plan, runs)
    stale = stale_methods(runs)
    if stale and notice is not None:
        notice(f"runs of {', '.join(stale)} in this report were trained by other method code than today's "
             f"(param method_hash): run the suite again to retrain them")
    table = comparison_frame(runs, layout)
    cost = cost_frame(runs, layout)

    folder = out / suite.name
    folder.mkdir(parents=True, exist_ok=True)
    # method_hash stays out of runs.csv for now: the committed results' files keep their bytes (it is in MLflow).
    write_csv(runs.drop(columns=["start_time", "method_hash"]), folder / "runs.csv")
    write_csv(table, folder / "comparison.csv")
    write_text(folder / "comparison.md", comparison_markdown(table, layout))
    write_text(folder / "comparison.tex", comparison_latex(table, layout))
    write_text(folder / "differences.md", differences_markdown(table, layout))
    write_text(folder / "differences.tex", differences_latex(table, layout))
    write_text(folder / "by_gap.md", by_gap_markdown(table, layout))
    write_csv(cost, folder / "cost.csv")
    write_text(folder / "cost.md", cost_markdown(cost))
    write_text(folder / "cost.tex", cost_latex(cost, suite.name))
    figure = f"accuracy_vs_{x}"
    save_figure(accuracy_figure(table, layout, x, methods, title), folder / figure)
    curves = curves_frame(client, runs, layout.baseline)
    write_csv(curves, folder / "learning_curves.csv")
    if len(curves):
        save_figure(curves_figure(curves, layout), folder / "learning_curves")

    sections = [f"# {suite.name}\n", (suite.description + "\n") if suite.description else "",
                describe_parent(parent, runs), "\n## Accuracy\n\n", comparison_markdown(table, layout),
                "\n## Differences by gap\n\n", by_gap_markdown(table, layout),
                "\n## Differences\n\n", differences_markdown(table, layout),
                f"\n![student accuracy vs {x}]({figure}.png)\n"]
    if len(curves):
        sections.append("\n## Learning curves\n\nThe teachers and the student alone, per epoch "
                        "(`learning_curves.csv`):\n\n![learning curves](learning_curves.png)\n")
    sections += ["\n## Cost\n\n", cost_markdown(cost)]
    if suite.reference is not None:
        paper = paper_frame(suite, suite_path, runs, layout)
        write_csv(paper, folder / "paper_table.csv")
        write_text(folder / "paper_table.md", paper_markdown(paper, suite.reference))
        write_text(folder / "paper_table.tex", paper_latex(paper, suite.reference))
        sections += ["\n## Published numbers beside ours\n\n", paper_markdown(paper, suite.reference)]
    failures = failures_markdown(runs)
    if failures:
        sections += ["\n## Runs without a number\n\n", failures]
    sections.append(f"\nRegenerate: `kdbench report {suite_path.as_posix()} --run {parent.info.run_id}`\n")
    write_text(folder / "report.md", "".join(sections))
    return folder
