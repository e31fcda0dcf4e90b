"""Rankings across pairs and suites, on run frames written here (no MLflow): average ranks, Friedman and Nemenyi
against scipy, rliable's estimators against their definitions, and method labels that never mix other settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from kdbench import KdbenchError
from kdbench.config.load import load_suite
from kdbench.plan import make_plan
from kdbench.report.cells import report_scope
from kdbench.report.rank import Study, method_names, rank
from kdbench.report.robust import improvement_interval, iqm, iqm_interval
from kdbench.report.runs import RUN_COLUMNS

TEACHERS = ["mnist_mlp_100x2", "mnist_mlp_400x2"]


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.array([100.0, 1, 2, 3, 4, 5, 6, -50])) == pytest.approx(np.mean([2, 3, 4, 5]))


def test_probability_of_improvement_counts_ties_half_and_averages_tasks():
    point, _, _ = improvement_interval([np.array([2.0, 3.0]), np.array([1.0])], [np.array([1.0, 2.0]), np.array([1.0])])
    # task 1: pairs (2>1, 2=2, 3>1, 3>2) -> 3.5/4; task 2: a tie -> 0.5
    assert point == pytest.approx((3.5 / 4 + 0.5) / 2)


def test_the_bootstrap_resamples_within_each_task_and_is_seeded():
    # Two tasks, each with one value repeated: a resample within each task is always the same runs, so the
    # interval has no width; a bootstrap that mixed the tasks would move it.
    tasks = [np.zeros(4), np.full(4, 10.0)]
    assert iqm_interval(tasks) == (5.0, 5.0, 5.0)
    noisy = [np.array([0.0, 1.0, 5.0, 2.0]), np.array([3.0, 9.0, 4.0])]
    point, low, high = iqm_interval(noisy)
    assert low < point < high and iqm_interval(noisy) == (point, low, high)
    assert iqm_interval(noisy, seed=1) != (point, low, high)
    assert all(math.isnan(v) for v in iqm_interval([]))


def _study(tmp_path: Path, name: str, methods: list, accs: dict) -> Study:
    """A suite and the run frame of its finished students: accs[(label, teacher)] = {seed: accuracy}."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": {"dataset": "mnist"}, "teachers": TEACHERS,
                                    "students": ["mnist_mlp_30x2"], "methods": methods, "seeds": [0, 1, 2],
                                    "train": {"epochs": 1}}))
    suite = load_suite(path)
    rows = []
    for (label, teacher), values in accs.items():
        for seed, acc in values.items():
            row = dict.fromkeys(RUN_COLUMNS, math.nan)
            row.update({"run_id": f"{name}{label}{teacher}{seed}", "role": "student", "method": label,
                        "method_name": label.split("_")[0], "teacher": teacher or "", "student": "mnist_mlp_30x2",
                        "pair": f"{teacher}->mnist_mlp_30x2" if teacher else "", "seed": seed, "status": "FINISHED",
                        "reason": "", "protocol": "", "method_hash": "h-" + label.split("_")[0], "test_acc": acc,
                        "start_time": len(rows)})
            rows.append(row)
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return Study(name, path, "", suite, None, runs, report_scope(make_plan(suite, path), runs))


def _accs(shift: dict[str, float], teachers=TEACHERS, seeds=(0, 1, 2)) -> dict:
    out = {("baseline", None): {s: 90.0 + s * 0.1 for s in seeds}}
    for label, d in shift.items():
        for i, t in enumerate(teachers):
            out[(label, t)] = {s: 90.0 + d + i * 0.01 + s * 0.1 for s in seeds}
    return out


def test_average_ranks_and_tests_over_every_pair_of_every_suite(tmp_path):
    a = _study(tmp_path, "a", ["baseline", "kd", "dkd", "dist"], _accs({"kd": -0.5, "dkd": 1.0, "dist": 0.5}))
    b = _study(tmp_path, "b", ["baseline", "kd", "dkd", "dist"], _accs({"kd": -0.2, "dkd": 0.3, "dist": 0.8}))
    ranking = rank([a, b])
    assert len(ranking.tasks) == 4
    got = dict(zip(ranking.table.method, ranking.table.average_rank))
    # suite a: dkd 1, dist 2, baseline 3, kd 4; suite b: dist 1, dkd 2, baseline 3, kd 4 (two pairs each)
    assert got == {"dkd": 1.5, "dist": 1.5, "baseline": 3.0, "kd": 4.0}
    means = {m: [] for m in got}
    for study in (a, b):
        for t in TEACHERS:
            for m in got:
                cell = study.runs[(study.runs.method == m) & study.runs.pair.isin([f"{t}->mnist_mlp_30x2", ""])]
                means[m].append(cell.test_acc.mean())
    chi2, p = stats.friedmanchisquare(*means.values())
    assert ranking.friedman == pytest.approx((chi2, p))
    assert ranking.critical_difference == pytest.approx(2.569 * math.sqrt(4 * 5 / (6 * 4)), rel=1e-3)  # Demšar's q
    row = ranking.table.set_index("method").loc["dkd"]
    diffs = np.concatenate([np.full(6, 1.5), np.full(6, 0.5)])  # paired by seed: dkd minus kd, a's then b's
    assert row.iqm_gain == pytest.approx(iqm(diffs)) and row.paired_runs == 12 and row.p_improve > 0.8
    assert math.isnan(ranking.table.set_index("method").loc["kd"].iqm_gain)


def test_a_label_that_means_other_settings_elsewhere_is_another_method(tmp_path):
    a = _study(tmp_path, "a", ["baseline", "kd", "dkd"], _accs({"kd": 0.0, "dkd": 1.0}))
    b = _study(tmp_path, "b", ["baseline", "kd", {"dkd": {"T": 2.0}}], _accs({"kd": 0.0, "dkd": 1.0}))
    names, merged = method_names([a, b])
    assert names[("a", "dkd")] == "dkd (a)" and names[("b", "dkd")] == "dkd (b)" and names[("b", "kd")] == "kd"
    ranking = rank([a, b])
    assert set(ranking.table.method) == {"baseline", "kd"} and not merged and not ranking.merged
    assert ranking.left_out == {"dkd (a)": "no number in 2 of 4 tasks", "dkd (b)": "no number in 2 of 4 tasks"}
    assert math.isnan(ranking.friedman[0])  # two methods: no Friedman test
    # --by-label: one dkd, each suite's at its own setting, and the ranking says where it differs
    merged = rank([a, b], by_label=True)
    assert set(merged.table.method) == {"baseline", "kd", "dkd"} and not merged.left_out
    assert list(merged.merged) == ["dkd"] and "a: dkd" in merged.merged["dkd"] and "b: dkd T 2.0" in merged.merged["dkd"]


def test_methods_missing_somewhere_are_left_out_and_asked_ones_must_be_complete(tmp_path):
    accs = _accs({"kd": 0.0, "dkd": 1.0, "dist": 2.0})
    del accs[("dist", TEACHERS[1])]
    study = _study(tmp_path, "a", ["baseline", "kd", "dkd", "dist"], accs)
    assert rank([study]).left_out == {"dist": "no number in 1 of 2 tasks"}
    with pytest.raises(KdbenchError, match="'dist' has no number in 1 of 2 tasks"):
        rank([study], ["kd", "dist"])
    with pytest.raises(KdbenchError, match="no method 'fitnets'"):
        rank([study], ["fitnets"])
    assert list(rank([study], ["kd", "dkd"]).table.method) == ["dkd", "kd"]
