"""Checks of a suite's `tune:` block beyond its schema: search spaces against the methods, the tuned pair
against the zoo. A bad block is one line at validation (exit 2), before anything is written.
"""

from __future__ import annotations
from pathlib import Path
from typing import Any
from kdbench.config.schema import MethodEntry, SearchRange, Suite, SuiteError
from kdbench.registry import get_method
from kdbench.zoo import known_models


def search_space(suite: Suite, entry: MethodEntry) -> dict[str, SearchRange]:
    """The ranges tuned for a method entry: the suite's own for its label, else the method's `search_space`
    (a plugin without one is tuned on nothing: every trial runs its setting as given)."""
    if suite.tune is not None and entry.label in suite.tune.search_space:
        return dict(suite.tune.search_space[entry.label])
    declared: dict[str, dict[str, Any]] = getattr(get_method(entry.method), "search_space", None) or {}
    return {name: SearchRange(**spec) for name, spec in declared.items()}


def check_tune(path: Path, suite: Suite) -> None:
    """Every range inside what the method accepts (both ends through its `check_params`), every label known."""
    if suite.tune is None:
        return
    labels = {m.label: m for m in suite.methods}
    for label in suite.tune.search_space:
        if label not in labels:
            raise SuiteError(f"{path}: field 'tune.search_space.{label}': expected a method label of this suite "
                             f"({', '.join(labels)}), got '{label}'")
    for entry in suite.methods:
        _check_ranges(path, suite, entry)
    if suite.tune.pairs != "each":
        names = known_models()
        for name in suite.tune.pairs:
            if name not in names:
                raise SuiteError(f"{path}: field 'tune.pairs': expected 'each' or a [teacher, student] pair of "
                                 f"this suite, '{name}' is no model")


def _check_ranges(path: Path, suite: Suite, entry: MethodEntry) -> None:
    method = get_method(entry.method)
    base = {**method.defaults, **entry.params}
    field = (f"tune.search_space.{entry.label}" if entry.label in suite.tune.search_space
             else f"methods.{suite.methods.index(entry)}")
    for name, bounds in search_space(suite, entry).items():
        if name not in method.defaults:
            raise SuiteError(f"{path}: field '{field}.{name}': method '{entry.method}' has no parameter '{name}' "
                             f"(known: {', '.join(method.defaults) or 'none'})")
        for end in (bounds.low, bounds.high):
            value = round(end) if bounds.integer else end
            problem = method.check_params({**base, name: value})
            if problem:
                raise SuiteError(f"{path}: field '{field}.{name}': the search range [{bounds.low}, {bounds.high}] "
                                 f"leaves what method '{entry.method}' accepts: {problem}")
