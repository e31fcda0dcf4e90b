"""Learning curves of the runs a study's claims rest on: each teacher and the student trained alone.

A reader checks here that those runs converged (their validation accuracy and training loss flatten before the
last epoch); a study whose teachers were still climbing says nothing about the capacity gap. The data come
from MLflow's per-epoch metric history; `learning_curves.csv` keeps every point of the figure.
"""

from __future__ import annotations

import pandas as pd

from kdbench.tracking import RunStatus

CURVE_METRICS = {"val_acc": "validation accuracy (%)", "test_acc": "test accuracy (%)",
                 "train_loss": "training loss (log scale)"}
CURVE_COLUMNS = ["role", "model", "seed", "run_id", "metric", "epoch", "value"]


def curves_frame(client, runs: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Per-epoch history of every finished teacher run and every run of the student alone (all seeds)."""
    alone = (runs.role == "student") & (runs.method == baseline)  # not the reference run: it is their seed 0
    chosen = runs[runs.status.isin([RunStatus.FINISHED, RunStatus.COLLAPSED]) & ((runs.role == "teacher") | alone)]
    rows = []
    for _, run in chosen.iterrows():
        model = run.teacher if run.role == "teacher" else run.student
        role = "teacher" if run.role == "teacher" else "student alone"
        for metric in CURVE_METRICS:
            for m in sorted(client.get_metric_history(run.run_id, metric), key=lambda m: (m.step, m.timestamp)):
                rows.append((role, model, int(run.seed), run.run_id, metric, int(m.step), float(m.value)))
    frame = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    # A resumed run may log an epoch's metric twice; its last value is the one that stands.
    frame = frame.drop_duplicates(["run_id", "metric", "epoch"], keep="last")
    return frame.sort_values(["role", "model", "seed", "run_id", "metric", "epoch"], kind="stable") \
                .reset_index(drop=True)


def curves_figure(curves: pd.DataFrame, scope):
    """One panel per metric; a line per teacher and per seed of the student alone, the student's dashed."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = {m: label for m, label in CURVE_METRICS.items() if m in set(curves.metric)}  # no split, no val_acc
    fig = Figure(figsize=(4 * len(metrics), 3.9), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    teachers = set(curves[curves.role == "teacher"].model)
    in_suite = [p.teacher for p in sorted(scope.pairs, key=lambda p: p.gap)]  # growing capacity
    models = [t for t in dict.fromkeys(in_suite) if t in teachers] + sorted(teachers - set(in_suite)) + \
        list(dict.fromkeys(curves[curves.role != "teacher"].model))
    colours = matplotlib.colormaps["viridis"]
    for ax, (metric, label) in zip(axes, metrics.items()):
        points = curves[curves.metric == metric]
        for i, model in enumerate(models):
            student = model not in teachers
            colour = "black" if student else colours(i / max(len(models) - 1, 1) * 0.85)
            for j, (_, run) in enumerate(points[points.model == model].groupby("run_id", sort=False)):
                name = scope.name(model) + (" (student alone, each seed)" if student else " (teacher)")
                ax.plot(run.epoch, run.value, color=colour, linestyle="--" if student else "-",
                        linewidth=1.0 if student else 1.6, marker="." if len(run) < 30 else None,
                        label=name if j == 0 else None)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if metric == "train_loss":
            ax.set_yscale("log")
        elif len(points):
            last = points.groupby("run_id").value.last()
            ax.set_ylim(max(last.min() - 6, points.value.min()), min(100, points.value.max() + 0.5))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize="small",
               frameon=False)
    fig.suptitle(f"{scope.dataset}: learning curves of the teachers and of the student trained alone")
    return fig
