"""How the plan turns method declarations into jobs: assistant chains, the "auto" rule, fresh teachers,
and the suite-time checks of method params. No training here."""

from pathlib import Path

import pytest

from kdbench import KdbenchError
from kdbench.plan import make_plan
from kdbench.config.schema import SuiteError
from kdbench.config.load import load_suite

GAP = {"teachers": ["cifar_resnet56", "cifar_resnet32", "cifar_resnet20", "cifar_resnet14"],
       "students": ["cifar_resnet8"], "pairs": [["cifar_resnet56", "cifar_resnet8"]], "seeds": [0, 1],
       "data": {"dataset": "synthetic", "train_size": 256, "val_size": 32, "test_size": 128, "num_classes": 4,
                "image_size": 32}}  # val_size: takd's "auto" chooses on it


@pytest.fixture
def plan_for(write_suite):
    def make(methods, **overrides):
        path = write_suite({**GAP, "methods": methods, **overrides})
        return make_plan(load_suite(path), Path(path))
    return make


def jobs(plan, role, label=None):
    return [j for j in plan.jobs if j.role == role and (label is None or j.method.label == label)]


def test_named_chain_becomes_assistant_jobs_shared_across_cells_and_chains(plan_for):
    plan = plan_for([{"method": "takd", "label": "two", "params": {"assistants": ["cifar_resnet32", "cifar_resnet14"]}},
                     {"method": "takd", "label": "one", "params": {"assistants": "cifar_resnet32"}}])
    teacher, = jobs(plan, "teacher")
    assistants = jobs(plan, "assistant")
    assert [(a.model, a.teacher) for a in assistants] == [("cifar_resnet32", teacher.key),
                                                          ("cifar_resnet14", assistants[0].key)]
    two, one = jobs(plan, "student", "two"), jobs(plan, "student", "one")
    assert {j.teacher for j in two} == {assistants[1].key}  # both seeds: taught by the end of the chain
    assert {j.teacher for j in one} == {assistants[0].key}  # the shorter chain reuses the first assistant
    assert all(j.teacher_model == "cifar_resnet56" and j.pair == "cifar_resnet56->cifar_resnet8" for j in two + one)
    assert plan.root_teacher(two[0]) == teacher
    assert max(plan.jobs.index(a) for a in assistants) < min(plan.jobs.index(s) for s in two + one)


def test_auto_assistant_is_chosen_by_accuracy_closest_to_the_mean_once_references_exist(plan_for):
    plan = plan_for(["takd"])
    refs = {j.model: j.key for j in plan.jobs if j.role in ("teacher", "reference")}
    assert sorted(refs) == ["cifar_resnet14", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet8"]
    assert not jobs(plan, "assistant") and all(j.pending for j in jobs(plan, "student"))
    acc = {"cifar_resnet56": 70.0, "cifar_resnet8": 50.0, "cifar_resnet32": 65.0, "cifar_resnet20": 61.0,
           "cifar_resnet14": 55.0}  # mean of teacher and student: 60 -> resnet20
    resolved, failed = plan.resolve_assistants(lambda key: acc[next(m for m, k in refs.items() if k == key)])
    assert not failed
    assistant, = jobs(resolved, "assistant")
    assert assistant.model == "cifar_resnet20" and assistant.teacher == refs["cifar_resnet56"]
    students = jobs(resolved, "student")
    assert {s.teacher for s in students} == {assistant.key} and {s.assistants for s in students} == {("cifar_resnet20",)}
    assert [s.key for s in students] == [s.key for s in jobs(plan, "student")]  # cells keep their jobs
    assert "auto: cifar_resnet20" in students[0].assistant_choice and "61.00" in students[0].assistant_choice
    _, failed = plan.resolve_assistants(lambda key: None if key == refs["cifar_resnet14"] else 60.0)
    assert len(failed) == 2 and "cifar_resnet14" in next(iter(failed.values()))


def test_auto_without_a_model_in_between_is_plain_kd_and_says_so(plan_for):
    plan = plan_for(["takd"], pairs=[["cifar_resnet14", "cifar_resnet8"]])
    student = jobs(plan, "student")[0]
    assert not student.pending and student.assistants == () and "no suite model" in student.assistant_choice
    assert not jobs(plan, "reference")


def test_prokt_gets_a_fresh_teacher_and_no_teacher_job_unless_from_a_checkpoint(plan_for):
    plan = plan_for(["prokt"])
    student = jobs(plan, "student")[0]
    assert student.teacher is None and student.teacher_init == "random" and student.teacher_model == "cifar_resnet56"
    assert student.config["teacher_model"] == "cifar_resnet56"  # the architecture is part of its hash
    plan = plan_for([{"prokt": {"teacher_init": "checkpoint", "teacher_epoch": 1}}])
    student = jobs(plan, "student")[0]
    assert student.teacher == jobs(plan, "teacher")[0].key and student.teacher_epoch == 1


@pytest.mark.parametrize("methods,field,expected", [
    ([{"rco": {"choice": "greedyy"}}], "methods.0", "choice must be 'equal' or 'greedy'"),
    ([{"rco": {"split": [1, 2]}}], "methods.0", "split must list 4 positive numbers"),
    ([{"takd": {"assistants": "cifar_resnet999"}}], "methods.0", "unknown model 'cifar_resnet999'"),
    ([{"takd": {"assistants": 3}}], "methods.0.assistants", "expected str or list"),
    ([{"fitnets": {"two_stage": True}}], "methods.0", "stage 2 is KD"),
    ([{"prokt": {"teacher_init": "pretrained"}}], "methods.0", "teacher_init must be"),
])
def test_method_params_are_checked_when_the_suite_loads(write_suite, methods, field, expected):
    with pytest.raises(SuiteError) as info:
        load_suite(write_suite({**GAP, "methods": methods}))
    assert f"'{field}'" in str(info.value) and expected in str(info.value)


def test_layer_and_split_params_take_their_declared_types_and_chains_must_shrink(plan_for):
    plan = plan_for([{"fitnets": {"hint_layer": "layer3", "guided_layer": 1}}, {"rco": {"split": [2, 1, 1, 1]}}])
    assert len(jobs(plan, "student")) == 4
    with pytest.raises(KdbenchError, match="must shrink from teacher cifar_resnet56 to student cifar_resnet8"):
        plan_for([{"takd": {"assistants": "cifar_resnet8"}}])  # not between teacher and student
