"""Suite files: YAML in, a validated `Suite` out, or one line naming the file, the field and what was expected.

Validation is complete before anything is written anywhere (MLflow, the model store): a suite that
does not validate leaves no trace.
"""

from __future__ import annotations
import math
import re
from pathlib import Path
from typing import Any
import yaml
from pydantic import BaseModel, ValidationError
from kdbench.config.checks import check_suite, did_you_mean
from kdbench.config.tuning import check_tune
from kdbench.config.schema import Suite, SuiteError, TrainConfig


# ---------------------------------------------------------------------------------------------- loading

def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _describe(err: dict, prefix: tuple = ()) -> str:
    loc = _loc(prefix + tuple(err["loc"]))
    msg = err["msg"]
    kind = err["type"]
    if kind == "missing":
        return f"field '{loc}': required field is missing"
    if kind == "extra_forbidden":
        parent, _, key = loc.rpartition(".")
        return f"field '{loc}': unknown key '{key}'"
    got = err.get("input")
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = msg.replace("input should be", "expected").replace("value error, ", "")
    if kind == "value_error" and re.match(r"^[\w.]+: ", msg):  # our validators name the field they check
        field, _, msg = msg.partition(": ")
        loc = f"{loc}.{field}" if loc and not field.startswith(loc) else field
        return f"field '{loc}': {msg}"
    if kind == "value_error":  # our validators' messages say what they got
        return f"field '{loc}': {msg}"
    return f"field '{loc}': {msg}, got {_short(got)}"


def _model_fields_at(loc: tuple) -> list[str]:
    model: Any = Suite
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     ann)
    return list(getattr(model, "model_fields", {}))


def _first_error(path: Path, exc: ValidationError, prefix: tuple = (), known: list[str] | None = None) -> SuiteError:
    err = exc.errors()[0]
    line = _describe(err, prefix)
    if err["type"] == "extra_forbidden":
        line += did_you_mean(str(err["loc"][-1]), known if known is not None else _model_fields_at(err["loc"]))
    return SuiteError(f"{path}: {line}")


# ------------------------------------------------------------------------------------- reading the file
# A suite is a few kB. The bounds refuse hostile files before they become objects: a "billion laughs"
# alias bomb is a few hundred bytes that PyYAML builds as shared references, cheaply, but that anything
# walking the result (pydantic, a hash, a JSON dump) expands exponentially.
MAX_SUITE_BYTES = 1 << 20  # 1 MiB
MAX_EXPANDED = 1_000_000  # YAML nodes plus scalar characters, with every alias expanded


class _Refused(Exception):
    pass


def _expanded_size(root: yaml.Node) -> int:
    """Nodes plus scalar characters of the document as if every alias were a copy; refuses a cycle."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise _Refused("an alias refers to a node that contains it (a recursive structure)")
        active.add(key)
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(n) for n in node.value)
        else:
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        memo[key] = total
        if total > MAX_EXPANDED:
            raise _Refused(f"aliases expand it beyond {MAX_EXPANDED:,} nodes and characters (a YAML bomb?)")
        return total

    return size(root)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (plain data only), reading 5e-4 as a number: YAML 1.1 wants a dot in a float, so PyYAML
    alone gives the string "5e-4", which the strict number fields would refuse; YAML 1.2 reads a float."""


EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def _bounded_load(text: str) -> Any:
    """Safe YAML: the document is composed into nodes (aliases are shared nodes there), measured with every
    alias expanded, and only then built into Python objects."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _not_finite(value: Any, loc: tuple = ()) -> tuple | None:
    """The path of the first NaN or infinite float anywhere in the document (method params included)."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _not_finite(item, loc + (key,))
        if found is not None:
            return found
    return None


def read_suite_yaml(path: Path) -> Any:
    """The suite file's YAML, bounded in size and alias expansion, UTF-8; a one-line SuiteError otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SUITE_BYTES + 1)
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read suite file: {exc.strerror}") from None
    if len(data) > MAX_SUITE_BYTES:
        raise SuiteError(f"{path}: suite file larger than {MAX_SUITE_BYTES // 1024} KiB; a suite is a few kB of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}; "
                         f"save the suite as UTF-8") from None
    try:
        return _bounded_load(text)
    except _Refused as exc:
        raise SuiteError(f"{path}: refused: {exc}") from None
    except RecursionError:
        raise SuiteError(f"{path}: refused: exceeded maximum nesting depth") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SuiteError(f"{path}: YAML syntax error at {where}{problem}") from None


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file: structure, types and ranges, model names, method names and parameters."""
    path = Path(path)
    raw = read_suite_yaml(path)
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: expected a mapping of suite fields at the top level, got {type(raw).__name__}")
    bad = _not_finite(raw)
    if bad is not None:
        raise SuiteError(f"{path}: field '{_loc(bad)}': expected a finite number, got {_short(_get(raw, bad))}")
    default_name = "name" not in raw
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        error = _first_error(path, exc)
        if default_name and exc.errors()[0]["loc"] == ("name",):
            error = SuiteError(f"{error} (the default is the file name: set `name:` in the suite)")
        raise error from None
    try:
        teacher_train = suite.teacher_train()
    except ValidationError as exc:  # teacher.train overrides the suite's train: the same fields and checks
        raise _first_error(path, exc, ("teacher", "train"), list(TrainConfig.model_fields)) from None
    if suite.teacher.source == "train" and teacher_train.epochs < 1:
        raise SuiteError(f"{path}: field 'teacher.train.epochs': expected at least 1 with teacher.source 'train' "
                         f"(0 epochs is a random teacher; 0 is for source checkpoint or pretrained)")
    check_suite(path, suite)
    check_tune(path, suite)
    return suite


def _get(raw: Any, loc: tuple) -> Any:
    for key in loc:
        raw = raw[key]
    return raw
