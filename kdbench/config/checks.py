"""Checks a suite needs beyond its schema, one function per concern: the dataset and its split sizes, model
names and patterns against the zoo, methods and their params against the registry, the paper reference,
the teachers' sources.
"""

from __future__ import annotations
import difflib
import fnmatch
from pathlib import Path
from typing import Iterable
from kdbench.config.schema import MethodEntry, Suite, SuiteError
from kdbench.data.spec import DataError, DatasetInfo, dataset_info, split_sizes, training_pool
from kdbench.zoo import known_models, meta_model
from kdbench.registry import get_method, methods, modifier_problem, unknown_method
from kdbench.config.reference import check_reference


# A method's integer params count things (epochs, anchors, assistants, images, channels): none can run above this.
MAX_PARAM_INT = 1_000_000


def did_you_mean(word: str, choices: Iterable[str], otherwise: str = "") -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a misspelt `word`; `otherwise` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else otherwise


def suggested_val_size(suite: Suite) -> int:
    """A tenth of the training images, for error messages (5000 for CIFAR)."""
    return max(1, (training_pool(suite.data.spec()) or 10000) // 10)


def check_suite(path: Path, suite: Suite) -> None:
    """Everything the schema cannot know: refused with a one-line SuiteError naming the file and field."""
    check_data(path, suite)
    names = known_models()
    check_model_names(path, suite, names)
    check_model_patterns(path, suite, names)
    check_methods(path, suite)
    if suite.reference is not None:
        check_reference(path, suite)
    check_teacher_source(path, suite, names)


def check_data(path: Path, suite: Suite) -> None:
    """The dataset is known (what models are built for: classes and input shape, known without data), the
    asked split sizes fit in its published splits, crops are padded by at most the image side."""
    try:
        info = dataset_info(suite.data.spec())
    except DataError as exc:
        raise SuiteError(f"{path}: field 'data': {exc}") from None
    side = info.input_shape[1]  # a crop's zero padding wider than the image pads with nothing but zeros
    for field, augment in (("augment", suite.augment), ("teacher.augment", suite.teacher.augment)):
        if augment is not None and augment.crop_padding > side:
            raise SuiteError(f"{path}: field '{field}.crop_padding': expected at most {side} (the image side), "
                             f"got {augment.crop_padding}")
    sizes = split_sizes(suite.data.dataset)
    for split, size in zip(("train", "test"), sizes or ()):
        asked = getattr(suite.data, f"{split}_size")
        if asked is not None and asked > size:
            raise SuiteError(f"{path}: field 'data.{split}_size': expected at most {size} (the {split} split of "
                             f"{suite.data.dataset}), got {asked}")


def _model_name(path: Path, field: str, name: str, names: list[str]) -> None:
    if name not in names:
        raise SuiteError(f"{path}: field '{field}': expected a timm model name, '{name}' is none"
                         f"{did_you_mean(name, names)}")


def check_model_names(path: Path, suite: Suite, names: list[str]) -> None:
    """Keys that name models (a misspelt one would be silently ignored) and explicit pairs name real models."""
    for field, table in (("model_kwargs", suite.model_kwargs), ("teacher.model_kwargs", suite.teacher.model_kwargs),
                         ("teacher.checkpoints", suite.teacher.checkpoints), ("display.models", suite.display.models)):
        for name in table:
            _model_name(path, f"{field}.{name}", name, names)
    for i, pair in enumerate(suite.pairs or ()):
        for name in pair:
            if name not in names:
                raise SuiteError(f"{path}: field 'pairs.{i}': unknown model '{name}'{did_you_mean(name, names)}")


def check_model_patterns(path: Path, suite: Suite, names: list[str]) -> None:
    """Teachers, students and lr overrides are patterns that must each match a model."""
    for field, table in (("train.lr_by_model", suite.train.lr_by_model),
                         ("teacher.train.lr_by_model", suite.teacher.train.get("lr_by_model", {}))):
        for pattern in table:
            if not fnmatch.filter(names, pattern):
                raise SuiteError(f"{path}: field '{field}.{pattern}': expected a model-name pattern, "
                                 f"'{pattern}' matches no model")
    for field in ("teachers", "students"):
        for i, pattern in enumerate(getattr(suite, field)):
            if not fnmatch.filter(names, pattern):
                raise SuiteError(f"{path}: field '{field}.{i}': expected a timm model name or pattern, "
                                 f"'{pattern}' matches no model{did_you_mean(pattern, names)}")


def check_methods(path: Path, suite: Suite) -> None:
    """Each entry names a registered method, with params it has, of its types and in its ranges; labels are
    unique, and display names refer to them."""
    labels: set[str] = set()
    for i, entry in enumerate(suite.methods):
        _check_method_entry(path, suite, i, entry)
        if entry.label in labels:
            raise SuiteError(f"{path}: field 'methods.{i}': label '{entry.label}' is used twice; give each "
                             f"variant its own `label`")
        labels.add(entry.label)
    for label in suite.display.methods:
        if label not in labels:
            raise SuiteError(f"{path}: field 'display.methods.{label}': expected a method label of this suite "
                             f"({', '.join(m.label for m in suite.methods)}), got '{label}'")


def _check_method_entry(path: Path, suite: Suite, i: int, entry) -> None:
    registry = methods()
    if entry.method not in registry:
        why = unknown_method(entry.method)
        hint = did_you_mean(entry.method, registry)
        if hint and why.startswith("unknown method"):  # a broken plugin's reason says more than a guess
            why = f"unknown method '{entry.method}'{hint}"
        raise SuiteError(f"{path}: field 'methods.{i}': {why}")
    method = registry[entry.method]
    for key, value in entry.params.items():
        _check_param(path, i, entry.method, method, key, value)
    if entry.combine != "sum" and not method.combinable:
        raise SuiteError(f"{path}: field 'methods.{i}.combine': method '{entry.method}' cannot use "
                         f"'{entry.combine}': its student update is a single loss term, so it would change nothing")
    params = {**method.defaults, **entry.params}
    problem = method.check_params(params)
    if problem:
        raise SuiteError(f"{path}: field 'methods.{i}': method '{entry.method}': {problem}")
    problem = entry.modify and modifier_problem(entry.modify, entry.modify_params, method, params)
    if problem:  # a modifier only for methods whose logit losses it can change (kdbench.modifier)
        raise SuiteError(f"{path}: field 'methods.{i}.modify': {problem}")
    choice = method.needs(params).choice
    if choice and not suite.data.val_size:
        raise SuiteError(f"{path}: field 'methods.{i}': {entry.method} {choice} chooses on a validation split: "
                         f"set data.val_size (e.g. {suggested_val_size(suite)})")


def _check_param(path: Path, i: int, name: str, method, key: str, value) -> None:
    """A param the method has, of its default's type (or its declared `param_types`): an int where a float is
    expected is a float, a bool is never a number; an integer is at most MAX_PARAM_INT in size."""
    defaults = method.defaults
    if key not in defaults:
        hint = did_you_mean(key, defaults, f" (known: {', '.join(defaults) or 'none'})")
        raise SuiteError(f"{path}: field 'methods.{i}.{key}': method '{name}' has no parameter '{key}'{hint}")
    expected = method.param_types.get(key, (type(defaults[key]),))
    if isinstance(value, bool):
        ok = bool in expected
    else:
        ok = isinstance(value, expected) or (float in expected and isinstance(value, int))
    if (defaults[key] is not None or key in method.param_types) and not ok and value is not defaults[key]:
        raise SuiteError(f"{path}: field 'methods.{i}.{key}': expected {' or '.join(t.__name__ for t in expected)}, "
                         f"got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_PARAM_INT:
        raise SuiteError(f"{path}: field 'methods.{i}.{key}': expected at most {MAX_PARAM_INT:,} in size (a count, "
                         f"an epoch or a width), got {value}")


def check_teacher_source(path: Path, suite: Suite, names: list[str]) -> None:
    """Pretrained teachers have timm weights; checkpoint teachers each have a file."""
    if suite.teacher.source == "pretrained":
        import timm  # heavy and not a kdbench module: only suites with pretrained teachers pay for it

        teachers = [n for t in suite.teachers for n in fnmatch.filter(names, t)]
        teachers += [t for t, _ in suite.pairs or ()]
        for name in dict.fromkeys(teachers):
            if not timm.is_model_pretrained(name):
                raise SuiteError(f"{path}: field 'teacher.source': 'pretrained', but timm has no pretrained weights "
                                 f"for teacher '{name}' (train it: source train, or give source checkpoint)")
    if suite.teacher.source == "checkpoint":
        for t in suite.teachers:
            for name in fnmatch.filter(names, t):
                if name not in suite.teacher.checkpoints:
                    raise SuiteError(f"{path}: field 'teacher.checkpoints': no checkpoint file for teacher '{name}'")


def check_method_models(suite_path: Path, suite: Suite, entries: list[MethodEntry],
                        pair_names: list[tuple[str, str]], info: DatasetInfo) -> None:
    """Each method's `check_models` for every pair, on models built on the meta device (no data, no memory):
    what a method can only check against the models (a FitNets hint_layer out of range) is refused now,
    not after the teacher has trained."""
    for entry in entries:
        method = get_method(entry.method)
        params = {**method.defaults, **entry.params}
        uses_teacher = method.needs(params).teacher != "none"
        for t, s in pair_names:
            student = meta_model(s, info.num_classes, info.input_shape[0], suite.model_kwargs.get(s, {}))
            teacher = meta_model(t, info.num_classes, info.input_shape[0],
                                 {**suite.model_kwargs.get(t, {}), **suite.teacher.model_kwargs.get(t, {})})
            problem = method.check_models(params, student, teacher if uses_teacher else None)
            if problem:
                raise SuiteError(f"{suite_path}: field 'methods.{suite.methods.index(entry)}': method "
                                 f"'{entry.label}' for the pair {t} -> {s}: {problem}")
