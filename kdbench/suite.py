"""Suite files: YAML in, a validated `Suite` out, or one line naming the file, the field and what was expected.

Validation is complete before anything is written anywhere (MLflow, the model store): a suite that
does not validate leaves no trace.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from kdbench import KdbenchError
from kdbench.data import DataSpec


class SuiteError(KdbenchError):
    """A suite that cannot run. Always one line: a newline in a quoted value cannot split it."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).splitlines()))


class Strict(BaseModel):
    # allow_inf_nan: a NaN or infinite float would pass `gt=0` checks that it cannot satisfy (lr: .inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A suite name becomes a folder (results/<name>/) and an MLflow experiment: one safe path component,
# refused rather than sanitised (two names sanitised alike would share a report folder).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
SAFE_NAME_TEXT = "1 to 100 letters, digits and _ . + -, starting with a letter or digit"
# Published split sizes of the fixed datasets: train_size/test_size above them are refused at validation.
SPLIT_SIZES = {"cifar100": (50000, 10000), "cifar10": (50000, 10000), "mnist": (60000, 10000),
               "fashion_mnist": (60000, 10000)}


class DataConfig(Strict):
    dataset: Literal["cifar100", "cifar10", "mnist", "fashion_mnist", "imagefolder", "synthetic"]
    path: str | None = None
    train_size: PositiveInt | None = None
    test_size: PositiveInt | None = None
    num_classes: PositiveInt | None = None
    image_size: PositiveInt | None = None
    download: bool = False
    val_size: NonNegativeInt = 0  # held out of the training images for choices; train_size counts them too

    def spec(self) -> DataSpec:
        return DataSpec(**self.model_dump())


class AugmentConfig(Strict):
    crop_padding: NonNegativeInt = 0  # random crop of the original size from the zero-padded image
    flip: bool = False  # random horizontal flip


class TrainConfig(Strict):
    epochs: NonNegativeInt  # 0 only makes sense for a teacher used as loaded (checkpoint, pretrained)
    batch_size: PositiveInt = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[PositiveInt] = []  # epochs at which a step schedule multiplies the rate by gamma
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: NonNegativeInt = 0
    lr_by_model: dict[str, PositiveFloat] = {}  # model-name pattern -> lr (CRD: 0.01 for MobileNetV2, ShuffleNets)

    @model_validator(mode="after")
    def _milestones_inside(self):
        if any(m > self.epochs for m in self.milestones):
            raise ValueError(f"milestones: expected epochs at most {self.epochs} (train.epochs)")
        return self

    def for_model(self, model: str) -> "TrainConfig":
        """This schedule as it applies to one model: the lr override resolved, the override table dropped."""
        lr = next((v for pat, v in self.lr_by_model.items() if fnmatch.fnmatchcase(model, pat)), self.lr)
        return self.model_copy(update={"lr": lr, "lr_by_model": {}})

    def scaled_to(self, epochs: int) -> "TrainConfig":
        """The same schedule shrunk to `epochs` (for --epochs): milestones scale proportionally."""
        ms = sorted({max(1, round(m * epochs / self.epochs)) for m in self.milestones if m * epochs / self.epochs < epochs})
        return self.model_copy(update={"epochs": epochs, "milestones": ms,
                                       "warmup_epochs": min(self.warmup_epochs, epochs - 1)})


class TeacherConfig(Strict):
    source: Literal["train", "checkpoint", "pretrained"] = "train"
    train: dict[str, Any] = {}  # overrides of the suite's `train` for teachers (e.g. more epochs)
    seed: NonNegativeInt = 0  # teachers are shared by every student seed of a pair
    checkpoints: dict[str, str] = {}  # source checkpoint: model name -> state_dict file
    augment: AugmentConfig | None = None  # teachers' own augmentation (Hinton: jittered teacher); default: the suite's
    route_every: PositiveInt | None = None  # keep a route checkpoint every N epochs (default: about 10 along the run)
    model_kwargs: dict[str, dict[str, Any]] = {}  # teacher-only model kwargs (e.g. dropout), by model name


class MethodEntry(Strict):
    method: str
    label: str
    params: dict[str, Any] = {}
    # How the method's named loss terms make the student's update: summed, or PCGrad (kdbench.combine).
    combine: Literal["sum", "pcgrad"] = "sum"

    @field_validator("method", "label")
    @classmethod
    def _visible(cls, value: str) -> str:
        if not value.strip() or value != value.strip() or not value.isprintable():
            raise ValueError(f"expected a non-empty name without surrounding spaces or control characters, "
                             f"got {value!r}")
        return value


class ReferenceConfig(Strict):
    """A published table a paper suite regenerates: its numbers (a CSV beside the suite) and how its names map to ours."""
    csv: str  # long-format CSV relative to the suite file: table,dataset,teacher,student,method,value,note
    table: str  # which table of the CSV
    title: str  # the paper and table, as the report's caption names them
    metric: Literal["top1", "test_errors"] = "top1"  # top-1 accuracy (%) or a count of test errors
    test_images: PositiveInt | None = None  # test set size, to turn accuracy into errors (metric test_errors)
    protocol: str = ""  # what had to be assumed or differs from the paper; printed under the table
    models: dict[str, str | None] = {}  # paper model name -> timm name (null: not in our zoo)
    methods: dict[str, str | None] = {}  # paper row -> our method label, or `teacher` (null: not implemented)

    @model_validator(mode="after")
    def _errors_need_size(self):
        if self.metric == "test_errors" and self.test_images is None:
            raise ValueError("metric test_errors needs test_images (the test set size)")
        return self


class DisplayConfig(Strict):
    """How reports name things for a reader: a figure title and readable names for the dataset, models, methods."""
    title: str | None = None  # the figure's title (default: the dataset's name and what is plotted)
    dataset: str | None = None  # e.g. "Fashion-MNIST"
    models: dict[str, str] = {}  # timm name -> display name (e.g. mnist_mlp_30x2: "MLP 30x2")
    methods: dict[str, str] = {}  # method label -> display name (e.g. kd: "KD (Hinton et al.)")


class Suite(Strict):
    name: str
    description: str = ""
    display: DisplayConfig = DisplayConfig()  # names in reports only: no number depends on it
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    teachers: list[str] = Field(min_length=1)
    students: list[str] = Field(min_length=1)
    pair_rule: Literal["teacher_larger", "all"] = "teacher_larger"
    pairs: list[tuple[str, str]] | None = None  # explicit (teacher, student) pairs instead of the rule
    model_kwargs: dict[str, dict[str, Any]] = {}  # extra kwargs for timm.create_model, by model name
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[NonNegativeInt] = Field(min_length=1)
    train: TrainConfig
    teacher: TeacherConfig = TeacherConfig()
    eval_batch_size: PositiveInt = 1000
    reference: ReferenceConfig | None = None  # paper suites (suites/papers/): the published table to compare with
    # Speed only, numbers unchanged (so in no job's hash): methods that read only the teacher's logits get
    # them from one cache per teacher, data and augmentation, shared across epochs, methods and seeds.
    teacher_cache: bool = False

    @field_validator("methods", mode="before")
    @classmethod
    def _method_forms(cls, value):
        """Accept `kd`, `{kd: {T: 8}}` or `{method: kd, label: kd_T8, params: {T: 8}, combine: pcgrad}`.

        Without a label, an entry is labelled by its method, plus `+pcgrad` when it combines its terms so.
        """
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                out.append({"method": item, "label": item})
            elif isinstance(item, dict) and "method" not in item and len(item) == 1:
                (name, params), = item.items()
                out.append({"method": name, "label": name, "params": params if params is not None else {}})
            elif isinstance(item, dict) and "method" in item:
                combine = item.get("combine", "sum")
                out.append({"label": f"{item['method']}+{combine}" if combine != "sum" else item["method"], **item})
            else:
                out.append(item)
        return out

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.fullmatch(value):
            raise ValueError(f"expected {SAFE_NAME_TEXT} (it names the report folder and the MLflow "
                             f"experiment), got {value!r}")
        return value

    @field_validator("pairs")
    @classmethod
    def _some_pairs(cls, value):
        if value is not None and not value:
            raise ValueError("expected at least one [teacher, student] pair (leave `pairs` out to use pair_rule)")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        return value

    @model_validator(mode="after")
    def _students_train(self):
        if self.train.epochs < 1:
            raise ValueError("train.epochs: expected at least 1 for students (0 is for teachers used as loaded)")
        return self

    def teacher_train(self) -> TrainConfig:
        return TrainConfig(**{**self.train.model_dump(), **self.teacher.train})


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


def _suggest_key(loc: tuple, known: list[str]) -> str:
    key = str(loc[-1])
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
        line += _suggest_key(err["loc"], known if known is not None else _model_fields_at(err["loc"]))
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


def _bounded_load(text: str) -> Any:
    """Safe YAML: the document is composed into nodes (aliases are shared nodes there), measured with every
    alias expanded, and only then built into Python objects."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
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
    _check_names(path, suite)
    return suite


def _get(raw: Any, loc: tuple) -> Any:
    for key in loc:
        raw = raw[key]
    return raw


def suggested_val_size(suite: Suite) -> int:
    """A tenth of the training images, for error messages (5000 for CIFAR)."""
    from kdbench.data import training_pool

    return max(1, (training_pool(suite.data.spec()) or 10000) // 10)


def _check_names(path: Path, suite: Suite) -> None:
    from kdbench.zoo import known_models
    from kdbench.registry import methods, unknown_method

    from kdbench.data import DataError, dataset_info

    try:
        dataset_info(suite.data.spec())  # what models are built for: classes and input shape, known without data
    except DataError as exc:
        raise SuiteError(f"{path}: field 'data': {exc}") from None
    sizes = SPLIT_SIZES.get(suite.data.dataset)
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
        from kdbench.paper import check_reference
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
