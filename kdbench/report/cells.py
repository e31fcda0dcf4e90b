"""What the suite asked for (`ReportScope`: its pairs, methods, seeds and names) and the cells that answer it
(`SeedValues`: last-epoch test accuracy per seed, its mean, spread and interval), paired differences; a missing
number says why.
"""

from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Iterable
import pandas as pd
from kdbench.report.stats import ALPHA, NO_TEST, Paired, holm, mean_ci, sample_std
from kdbench.report.runs import PASSES
from kdbench.data.spec import dataset_info
from kdbench.tracking import RunStatus
from kdbench.zoo import model_stats


TEACHER = "teacher"  # the row of teacher accuracies (teacher runs carry the method label "baseline")
DATASET_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST",
                 "synthetic": "synthetic data", "imagefolder": "image folder"}


# ---------------------------------------------------------------------------------------------- scope

@dataclass(frozen=True)
class PairInfo:
    teacher: str
    student: str
    gap: float  # teacher parameters over student parameters

    @property
    def name(self) -> str:
        return f"{self.teacher}->{self.student}"


@dataclass(frozen=True)
class ReportScope:
    """What a report covers, and how it names it: what the suite asked for (pairs, methods, seeds), plus anything
    its runs hold beyond that (a suite edited since its run)."""
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


def report_scope(plan, runs: pd.DataFrame) -> ReportScope:
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
    # plain KD: not kd+pcgrad, not kd+logit_std
    kd = [m.label for m in suite.methods if m.method == "kd" and m.combine == "sum" and m.modify is None]
    kd.sort(key=lambda label: bool(next(m for m in suite.methods if m.label == label).params))  # defaults first
    display = suite.display
    names = {**display.models, **display.methods}
    return ReportScope(suite.name, tuple(pairs), tuple(methods), baselines[0] if baselines else None,
                       tuple(seeds), kd[0] if kd else None,
                       display.dataset or DATASET_NAMES.get(suite.data.dataset, suite.data.dataset),
                       tuple(sorted(names.items())), display.title)


# ---------------------------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class SeedValues:
    """What one table cell holds: the last-epoch test accuracy per seed, and why the other asked-for seeds have none.
    (Not kdbench.plan.Cell, the job that a pair, method and seed plan.)"""
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

    def map(self, fn) -> "SeedValues":
        return SeedValues({s: fn(v) for s, v in self.values.items()}, self.missing, self.protocol)


def pick(runs: pd.DataFrame, seeds: Iterable[int], metric: str = "test_acc") -> SeedValues:
    """Per seed, the latest finished run; a seed without one says why (its latest run's status, or not run).

    A cell never mixes method code: only runs with the method_hash of its latest finished run count; a seed
    finished only by other code shows as "other method code" (rerun the suite to retrain it). `metric`: the
    run column to take from the runs so chosen (another measure than accuracy: "not logged" where it is nan).
    """
    values, missing = {}, {}
    if "method_hash" not in runs:
        runs = runs.assign(method_hash="")
    finished = runs[(runs.status == RunStatus.FINISHED) & runs.test_acc.notna()]
    code = finished.sort_values("start_time", kind="stable").iloc[-1].method_hash if len(finished) else None
    for seed in sorted(set(seeds) | set(runs.seed)):
        mine = runs[runs.seed == seed]
        done = mine[(mine.status == RunStatus.FINISHED) & mine.test_acc.notna()]
        if len(done) and not len(done[done.method_hash == code]):
            missing[seed] = "other method code"
            continue
        done = done[done.method_hash == code]
        if len(done) and math.isnan(done.iloc[-1][metric]):
            missing[seed] = "not logged"
        elif len(done):
            values[seed] = float(done.iloc[-1][metric])
        elif len(mine):
            missing[seed] = mine.sort_values("start_time", kind="stable").iloc[-1].reason or "no test_acc"
        else:
            missing[seed] = "not run"
    protocol = "; ".join(sorted(set(runs.protocol) - {""}))
    return SeedValues(values, missing, protocol)


def teacher_cell(runs: pd.DataFrame, teacher: str, metric: str = "test_acc") -> SeedValues:
    mine = runs[(runs.role == "teacher") & (runs.teacher == teacher)].sort_values("start_time", kind="stable")
    return pick(mine, [], metric)


def student_cell(runs: pd.DataFrame, label: str, teacher: str, student: str, seeds: Iterable[int],
                 metric: str = "test_acc") -> SeedValues:
    """A method's cell for a pair: its distilled runs, or the student-alone runs shared by every pair."""
    mine = runs[(runs.role == "student") & (runs.method == label) & (runs.student == student)
                & runs.pair.isin([f"{teacher}->{student}", ""])].sort_values("start_time", kind="stable")
    return pick(mine, seeds, metric)


COMPARISON_COLUMNS = ["row", "method", "role", "teacher", "student", "gap", "n", "mean", "std", "ci_low", "ci_high",
                      "seeds", "values", "delta_n", "delta_mean", "delta_std", "delta_ci_low", "delta_ci_high",
                      "delta_p", "delta_p_holm", "delta_significant", "kd_n", "kd_mean", "kd_std", "kd_ci_low",
                      "kd_ci_high", "kd_p", "kd_p_holm", "kd_significant", "best", "status", "note", "protocol",
                      "teacher_acc", "teacher_ci_low", "teacher_ci_high"]
# Paired comparisons: each method against the student alone ("delta") and against vanilla KD ("kd").
REFERENCES = ("delta", "kd")


def comparison_frame(runs: pd.DataFrame, scope: ReportScope) -> pd.DataFrame:
    """The comparison table in long form: one row per (row of the table, pair).

    Every paired test of the table (both references, every method and pair) is one family for Holm's correction:
    a difference is marked significant when its Holm-adjusted p-value is below 0.05.
    """
    records = []

    def add(row: str, role: str, pair: PairInfo, cell: SeedValues, refs: dict[str, Paired], teacher: SeedValues):
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

    for pair in scope.pairs:
        teacher = teacher_cell(runs, pair.teacher)
        add(TEACHER, "teacher", pair, teacher, {}, teacher)
        base = (student_cell(runs, scope.baseline, pair.teacher, pair.student, scope.seeds) if scope.baseline
                else None)
        kd = student_cell(runs, scope.kd, pair.teacher, pair.student, scope.seeds) if scope.kd else None
        for label in scope.methods:
            cell = student_cell(runs, label, pair.teacher, pair.student, scope.seeds)
            refs = {}
            if base is not None and label != scope.baseline:
                refs["delta"] = Paired.of(cell.values, base.values)
            if kd is not None and label not in (scope.kd, scope.baseline):
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


def cost_frame(runs: pd.DataFrame, scope: ReportScope) -> pd.DataFrame:
    """Per job kind (a teacher, a method on a pair, the student alone): runs, accuracy, time, speed, passes."""
    groups = [("teacher", TEACHER, t, "") for t in dict.fromkeys(p.teacher for p in scope.pairs)]
    for label in scope.methods:
        for pair in scope.pairs:
            alone = runs[(runs.role == "student") & (runs.method == label) & (runs.student == pair.student)
                         & (runs.pair == "")]
            key = ("student", label, "" if len(alone) or label == scope.baseline else pair.teacher, pair.student)
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
        done = mine[mine.status == RunStatus.FINISHED]
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
