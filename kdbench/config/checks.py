"""Checks a suite needs beyond its schema: model names against the zoo, methods and their
params against the registry, data sizes against the dataset, teachers' sources.
"""

from __future__ import annotations
import difflib
import fnmatch
from pathlib import Path
from kdbench.config.schema import Suite, SuiteError
from kdbench.data.spec import DataError, dataset_info, split_sizes, training_pool
from kdbench.zoo import known_models
from kdbench.registry import methods, unknown_method
from kdbench.config.reference import check_reference


def suggested_val_size(suite: Suite) -> int:
    """A tenth of the training images, for error messages (5000 for CIFAR)."""
    return max(1, (training_pool(suite.data.spec()) or 10000) // 10)


def _check_names(path: Path, suite: Suite) -> None:

    try:
        dataset_info(suite.data.spec())  # what models are built for: classes and input shape, known without data
    except DataError as exc:
        raise SuiteError(f"{path}: field 'data': {exc}") from None
    sizes = split_sizes(suite.data.dataset)
    for i, split in enumerate(("train", "test")):
        asked = getattr(suite.data, f"{split}_size")
        if sizes and asked is not None and asked > sizes[i]:
            raise SuiteError(f"{path}: field 'data.{split}_size': expected at most {sizes[i]} (the {split} split of "
                             f"{suite.data.dataset}), got {asked}")
    names = known_models()

    def model_name(field: str, name: str) -> None:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SuiteError(f"{path}: field '{field}': expected a timm model name, '{name}' is none{hint}")

    # Keys that name models: a misspelt one would be silently ignored
    for field, table in (("model_kwargs", suite.model_kwargs), ("teacher.model_kwargs", suite.teacher.model_kwargs),
                         ("teacher.checkpoints", suite.teacher.checkpoints)):
        for name in table:
            model_name(f"{field}.{name}", name)
    for name in suite.display.models:
        model_name(f"display.models.{name}", name)
    for label in suite.display.methods:
        if label not in [m.label for m in suite.methods]:
            raise SuiteError(f"{path}: field 'display.methods.{label}': expected a method label of this suite "
                             f"({', '.join(m.label for m in suite.methods)}), got '{label}'")
    for field, table in (("train.lr_by_model", suite.train.lr_by_model),
                         ("teacher.train.lr_by_model", suite.teacher.train.get("lr_by_model", {}))):
        for pattern in table:
            if not fnmatch.filter(names, pattern):
                raise SuiteError(f"{path}: field '{field}.{pattern}': expected a model-name pattern, "
                                 f"'{pattern}' matches no model")
    for field in ("teachers", "students"):
        for i, pattern in enumerate(getattr(suite, field)):
            if not fnmatch.filter(names, pattern):
                close = difflib.get_close_matches(pattern, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise SuiteError(f"{path}: field '{field}.{i}': expected a timm model name or pattern, "
                                 f"'{pattern}' matches no model{hint}")
    if suite.pairs:
        for i, (t, s) in enumerate(suite.pairs):
            for name in (t, s):
                if name not in names:
                    raise SuiteError(f"{path}: field 'pairs.{i}': unknown model '{name}'")
    registry = methods()
    labels = set()
    for i, entry in enumerate(suite.methods):
        if entry.method not in registry:
            close = difflib.get_close_matches(entry.method, list(registry), n=1)
            why = unknown_method(entry.method)
            if close and why.startswith("unknown method"):
                why = f"unknown method '{entry.method}' (did you mean '{close[0]}'?)"
            raise SuiteError(f"{path}: field 'methods.{i}': {why}")
        method = registry[entry.method]
        defaults = method.defaults
        for key, value in entry.params.items():
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(defaults) or 'none'})"
                raise SuiteError(f"{path}: field 'methods.{i}.{key}': method '{entry.method}' has no parameter "
                                 f"'{key}'{hint}")
            expected = method.param_types.get(key, (type(defaults[key]),))
            ok = isinstance(value, expected) or (float in expected and isinstance(value, int)
                                                 and not isinstance(value, bool))
            if (defaults[key] is not None or key in method.param_types) and not ok and value is not defaults[key]:
                names = " or ".join(t.__name__ for t in expected)
                raise SuiteError(f"{path}: field 'methods.{i}.{key}': expected {names}, got {value!r}")
        if entry.combine != "sum" and not method.combinable:
            raise SuiteError(f"{path}: field 'methods.{i}.combine': method '{entry.method}' cannot use "
                             f"'{entry.combine}': its student update is a single loss term, so it would change nothing")
        problem = method.check_params({**defaults, **entry.params})
        if problem:
            raise SuiteError(f"{path}: field 'methods.{i}': method '{entry.method}': {problem}")
        choice = method.needs({**defaults, **entry.params}).choice
        if choice and not suite.data.val_size:
            raise SuiteError(f"{path}: field 'methods.{i}': {entry.method} {choice} chooses on a validation split: "
                             f"set data.val_size (e.g. {suggested_val_size(suite)})")
        if entry.label in labels:
            raise SuiteError(f"{path}: field 'methods.{i}': label '{entry.label}' is used twice; give each "
                             f"variant its own `label`")
        labels.add(entry.label)
    if suite.reference is not None:
        check_reference(path, suite)
    if suite.teacher.source == "pretrained":
        import timm

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
