"""The report's figure: student accuracy and the paired improvement over the student alone, against the gap.

A pure function of the comparison table (kdbench.report.comparison_frame): every point is a cell's mean with
its 95 % confidence interval over seeds. One row of two panels per student: (a) accuracy of every method,
the student alone as a band, the teacher's accuracy under each pair's tick; (b) each method's improvement
over the student alone, paired by seed, filled where it survives Holm's correction across the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kdbench import KdbenchError
from kdbench.report.cells import ReportScope
from kdbench.storage.files import atomic_write

X_AXES = {"gap": "capacity gap: teacher / student parameters (log scale)\nT: the teacher's test accuracy",
          "teacher_acc": "teacher test accuracy (%)"}
DODGE = 0.3  # the methods at one x spread over this fraction of the distance to the nearest other x


def shown_methods(scope, methods: list[str] | None) -> list[str]:
    """The methods to plot: the suite's order, or the ones asked for (--methods), never the student alone."""
    if methods:
        unknown = [m for m in methods if m not in scope.methods]
        if unknown:
            raise KdbenchError(f"--methods: no method labelled '{unknown[0]}' in this suite "
                               f"(labels: {', '.join(scope.methods)})")
        return [m for m in methods if m != scope.baseline]
    return [m for m in scope.methods if m != scope.baseline]


def dodge_offsets(xs: list[float], count: int, log: bool) -> list[float]:
    """Multipliers (log axis) or shifts (linear axis) that set `count` methods side by side at each x."""
    points = sorted(set(math.log10(x) if log else x for x in xs))
    spacing = min((b - a for a, b in zip(points, points[1:])), default=1.0 if log else 2.0)
    step = DODGE * spacing / max(count, 1)
    centre = (count - 1) / 2
    return [10 ** (step * (i - centre)) if log else step * (i - centre) for i in range(count)]


def _errors(points: pd.DataFrame, mean: str, low: str, high: str):
    """Asymmetric error bars from an interval; none (zero) where it is undefined (a single seed)."""
    lower = (points[mean] - points[low]).fillna(0).to_numpy()
    upper = (points[high] - points[mean]).fillna(0).to_numpy()
    return [lower, upper]


@dataclass(frozen=True)
class _Methods:
    """What every panel of the accuracy figure shares: the x axis, the methods shown, their colours and dodges."""
    scope: ReportScope
    x: str
    shown: list[str]
    colors: dict[str, object]
    offsets: dict[str, float]  # per method: a multiplier (log axis) or a shift (linear axis) of its x

    @property
    def log(self) -> bool:
        return self.x == "gap"

    def place(self, values, label: str):
        return values * self.offsets[label] if self.log else values + self.offsets[label]


def method_colors(scope: ReportScope, shown: list[str]) -> dict[str, object]:
    """A method's colour, the same in every figure of a report: matplotlib's default cycle for ten methods or
    fewer; more: tab20, so no two methods share a colour."""
    import matplotlib

    palette = [f"C{i}" for i in range(10)] if len(scope.methods) <= 10 else \
        [matplotlib.colormaps["tab20"](i / 20) for i in range(20)]
    return {label: palette[scope.methods.index(label) % len(palette)] for label in shown}


def _methods(table: pd.DataFrame, scope: ReportScope, x: str, methods: list[str] | None) -> _Methods:
    shown = shown_methods(scope, methods)
    colors = method_colors(scope, shown)
    xs = list(table.loc[(table.role == "student") & (table.n > 0), x].dropna())
    offsets = dict(zip(shown, dodge_offsets(xs or [1.0], len(shown), x == "gap")))
    return _Methods(scope, x, shown, colors, offsets)


def accuracy_figure(table: pd.DataFrame, scope: ReportScope, x: str = "gap", methods: list[str] | None = None,
                    title: str | None = None):
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise KdbenchError(f"--x: expected one of {', '.join(X_AXES)}, got '{x}'")
    plot = _methods(table, scope, x, methods)
    students = scope.students
    fig = Figure(figsize=(11, 4.3 * len(students) + 0.9), layout="constrained")
    grid = fig.subplots(len(students), 2, squeeze=False)
    handles: dict[str, object] = {}
    drawn: list[tuple] = []  # (axes, xs, ys, colour): to mark the points that fall below the fitted axes
    for (acc_ax, gain_ax), student in zip(grid, students):
        mine = table[(table.student == student) & (table.role == "student")]
        _draw_methods(plot, acc_ax, gain_ax, mine, handles, drawn)
        alone = _draw_student_alone(scope, acc_ax, mine, handles)
        gain_ax.axhline(0, color="0.35", linestyle="--", linewidth=1)
        cells = _fit_axes(plot, acc_ax, gain_ax, mine, alone)
        _label_panels(plot, acc_ax, gain_ax, cells.drop_duplicates("teacher"), student)  # the pairs with points
    for ax, xv, yv, colour in drawn:
        _mark_off_scale(ax, xv, yv, colour)
    _legend(fig, grid, handles, plot.shown)
    what = "capacity gap" if plot.log else "teacher accuracy"
    fig.suptitle(title or scope.title
                 or f"{scope.dataset}: student accuracy vs {what} (mean and 95 % CI over seeds, last epoch)")
    return fig


def _draw_methods(plot: _Methods, acc_ax, gain_ax, mine: pd.DataFrame, handles: dict, drawn: list) -> None:
    """One student's methods: (a) accuracy with its interval, (b) the paired gain, filled where significant."""
    x, colors = plot.x, plot.colors
    for label in plot.shown:
        points = mine[(mine.row == label) & (mine.n > 0)]
        points = points[points[x].notna()].sort_values([x, "teacher"], kind="stable")
        if not len(points):
            continue
        xv = plot.place(points[x].to_numpy(), label)
        handles[label] = acc_ax.errorbar(xv, points["mean"].to_numpy(),
                                         yerr=_errors(points, "mean", "ci_low", "ci_high"),
                                         label=plot.scope.name(label), color=colors[label], marker="o", markersize=5,
                                         capsize=3, linewidth=1.4)
        drawn.append((acc_ax, xv, points["mean"].to_numpy(), colors[label]))
        paired = points[points.delta_n > 0]
        if len(paired):
            px = plot.place(paired[x].to_numpy(), label)
            gain_ax.errorbar(px, paired.delta_mean.to_numpy(),
                             yerr=_errors(paired, "delta_mean", "delta_ci_low", "delta_ci_high"),
                             color=colors[label], marker="none", capsize=3, linewidth=1.4)
            drawn.append((gain_ax, px, paired.delta_mean.to_numpy(), colors[label]))
            significant = paired.delta_significant.to_numpy(dtype=bool)
            gain_ax.scatter(px, paired.delta_mean.to_numpy(), s=30, zorder=3, color=colors[label],
                            facecolors=[colors[label] if sig else "white" for sig in significant])


def _draw_student_alone(scope: ReportScope, acc_ax, mine: pd.DataFrame, handles: dict):
    """The student alone as a band (its interval) and a line (its mean): (mean, low, high), or None without it."""
    base = mine[(mine.row == scope.baseline) & (mine.n > 0)] if scope.baseline else mine.iloc[:0]
    if not len(base):
        return None
    b = base.iloc[0]  # one student: the same runs in every pair, so one band
    low, high = (b.ci_low, b.ci_high) if not math.isnan(b.ci_low) else (b["mean"], b["mean"])
    handles["band"] = acc_ax.axhspan(low, high, color="0.5", alpha=0.2, linewidth=0,
                                     label=f"{scope.name(scope.baseline)} (student alone): 95 % CI")
    handles["alone"] = acc_ax.axhline(b["mean"], color="0.35", linestyle="--", linewidth=1,
                                      label=f"{scope.name(scope.baseline)} (student alone): mean")
    return b["mean"], low, high


def _fit_axes(plot: _Methods, acc_ax, gain_ax, mine: pd.DataFrame, alone) -> pd.DataFrame:
    """Fit both panels' y ranges to one student's cells (returned: those with a number).

    Axes fit the means (and the student-alone band), and the intervals' ends within NEAR of the student alone
    (or of no gain): one cell's huge interval (two seeds far apart) would flatten every other method into a line,
    so only such bars run off the axes. A method far below the rest (a collapse) would flatten them all: it is
    drawn as an arrow at the bottom."""
    cells = mine[(mine.n > 0) & mine.row.isin(plot.shown)]
    means = list(cells["mean"])
    _fit_means(acc_ax, means + (list(alone[1:]) if alone else []),
               alone[0] if alone else (float(pd.Series(means).median()) if means else math.nan),
               list(cells.ci_low) + list(cells.ci_high))
    gains = mine[(mine.delta_n > 0) & mine.row.isin(plot.shown)]
    _fit_means(gain_ax, list(gains.delta_mean) + [0.0], 0.0, list(gains.delta_ci_low) + list(gains.delta_ci_high))
    return cells


def _label_panels(plot: _Methods, acc_ax, gain_ax, pairs: pd.DataFrame, student: str) -> None:
    from matplotlib.ticker import NullFormatter

    for ax in (acc_ax, gain_ax):
        ax.set_xscale("log" if plot.log else "linear")
        _pair_ticks(ax, pairs, plot.x, plot.scope, NullFormatter, list(plot.offsets.values()))
        ax.set_xlabel(X_AXES[plot.x])
        ax.grid(True, which="major", alpha=0.3)
    name = plot.scope.name(student)
    acc_ax.set_ylabel("student test accuracy (%), last epoch")
    acc_ax.set_title(f"(a) student {name}: test accuracy", loc="left", fontsize="medium")
    gain_ax.set_ylabel("improvement over the student alone (pp)")
    gain_ax.set_title(f"(b) student {name}: gain over the student alone", loc="left", fontsize="medium")


def _legend(fig, grid, handles: dict, shown: list[str]) -> None:
    if any(len(ax.collections) for ax in grid[:, 1]):  # what filled and open points mean in panel (b)
        from matplotlib.lines import Line2D

        handles["significant"] = Line2D([], [], color="0.2", marker="o", linestyle="none",
                                        label="(b) filled: paired t-test, Holm p < 0.05")
        handles["not significant"] = Line2D([], [], color="0.2", marker="o", markerfacecolor="white",
                                            linestyle="none", label="(b) open: not significant after Holm")
    ordered = [handles[k] for k in [*shown, "band", "alone", "significant", "not significant"] if k in handles]
    if ordered:
        fig.legend(handles=ordered, loc="outside lower center", ncol=min(len(ordered), 4), fontsize="small",
                   frameon=False)


OFF_SCALE = 10.0  # percentage points below the student alone (or no gain) past which a mean is off the axes
NEAR = 5.0  # percentage points either side of it within which an interval's end is kept on the axes


def _fit_means(ax, values: list[float], anchor: float, ends: list[float] = ()) -> None:
    values = [v for v in values if not math.isnan(v) and (math.isnan(anchor) or v >= anchor - OFF_SCALE)]
    if values and not math.isnan(anchor):
        values += [v for v in ends if not math.isnan(v) and abs(v - anchor) <= NEAR]
    if values:
        low, high = min(values), max(values)
        pad = max(0.15 * (high - low), 0.5)
        ax.set_ylim(low - pad, high + pad)


def _mark_off_scale(ax, xs, ys, colour) -> None:
    """A downward arrow at the bottom edge, with its value, for each mean below the axes."""
    bottom = ax.get_ylim()[0]
    for x, y in zip(xs, ys):
        if not math.isnan(y) and y < bottom:
            ax.plot([x], [bottom], marker="v", markersize=8, color=colour, clip_on=False, zorder=4)
            ax.annotate(f"{y:.1f}", (x, bottom), xytext=(0, 8), textcoords="offset points", ha="center",
                        va="bottom", rotation=90, fontsize="x-small", color=colour,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def _pair_ticks(ax, pairs: pd.DataFrame, x: str, scope, null_formatter, offsets: list[float]) -> None:
    """One tick per pair, naming the gap and the teacher's accuracy (or, on a teacher-accuracy axis, the gap);
    the x range leaves room for the outermost dodged points (`offsets`, as `dodge_offsets` gives them)."""
    pairs = pairs[pairs[x].notna()].sort_values(x)
    if not len(pairs):
        return
    labels = []
    for _, p in pairs.iterrows():
        teacher = "n/a" if math.isnan(p.teacher_acc) else f"{p.teacher_acc:.1f}%"
        labels.append(f"{p.gap:.1f}×\nT {teacher}" if x == "gap" else f"{p.teacher_acc:.2f}\ngap {p.gap:.1f}×")
    ticks = pairs[x].to_numpy()
    ax.set_xticks(ticks, labels, fontsize="small")
    ax.xaxis.set_minor_formatter(null_formatter())
    if len(ticks) == 1:  # one pair: centre its point instead of matplotlib's lopsided default
        ax.set_xlim(*((ticks[0] / 2, ticks[0] * 2) if x == "gap" else (ticks[0] - 1, ticks[0] + 1)))
    else:  # room for the dodged points at both ends
        if x == "gap":  # decades: past the widest dodge by a little, and never less than the old fixed 0.15
            pad = max(0.15, max(abs(math.log10(o)) for o in offsets) + 0.05)
            ax.set_xlim(ticks[0] / 10 ** pad, ticks[-1] * 10 ** pad)
        else:
            pad = max(0.1 * (ticks[-1] - ticks[0]), max(abs(o) for o in offsets) + 0.05 * (ticks[-1] - ticks[0]))
            ax.set_xlim(ticks[0] - pad, ticks[-1] + pad)


def save_figure(fig, stem: Path) -> list[Path]:
    """PNG, SVG and PDF with no date, software stamp or random ids in them: the same figure, the same bytes.

    Each is written under a temporary name and renamed (store.atomic_write): a killed report never leaves a
    truncated figure."""
    import io

    import matplotlib


    paths = []
    metadata = {".png": {"Software": None}, ".svg": {"Date": None, "Creator": None},
                ".pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}}
    with matplotlib.rc_context({"svg.hashsalt": "kdbench", "svg.fonttype": "path", "pdf.fonttype": 42}):
        for suffix, meta in metadata.items():
            path = stem.with_suffix(suffix)
            buffer = io.BytesIO()
            fig.savefig(buffer, dpi=150, metadata=meta, format=suffix[1:])
            atomic_write(path, buffer.getvalue())
            paths.append(path)
    return paths
