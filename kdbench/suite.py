"""Suite files: YAML in, a validated `Suite` out, or one line naming the file, the field and what was expected.

Validation is complete before anything is written anywhere (MLflow, the model store): a suite that
does not validate leaves no trace.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from kdbench import KdbenchError
from kdbench.data import DataSpec


class SuiteError(KdbenchError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        """Accept `kd`, `{kd: {T: 8}}` or `{method: kd, label: kd_T8, params: {T: 8}}`."""
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
                out.append({"label": item["method"], **item})
            else:
                out.append(item)
        return out

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

def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
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
    return f"field '{loc}': {msg}, got {got!r}"


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


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file: structure, types and ranges, model names, method names and parameters."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read suite file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SuiteError(f"{path}: YAML syntax error at {where}{problem}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: expected a mapping of suite fields at the top level, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        line = _describe(err)
        if err["type"] == "extra_forbidden":
            line += _suggest_key(err["loc"], _model_fields_at(err["loc"]))
        raise SuiteError(f"{path}: {line}") from None
    _check_names(path, suite)
    return suite


def suggested_val_size(suite: Suite) -> int:
    """A tenth of the training images, for error messages (5000 for CIFAR)."""
    from kdbench.data import training_pool

    return max(1, (training_pool(suite.data.spec()) or 10000) // 10)


def _check_names(path: Path, suite: Suite) -> None:
    from kdbench.zoo import known_models
    from kdbench.registry import methods

    from kdbench.data import DataError, dataset_info

    try:
        dataset_info(suite.data.spec())  # what models are built for: classes and input shape, known without data
    except DataError as exc:
        raise SuiteError(f"{path}: field 'data': {exc}") from None
    names = known_models()
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
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(registry)})"
            raise SuiteError(f"{path}: field 'methods.{i}': unknown method '{entry.method}'{hint}")
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
    if suite.teacher.source == "checkpoint":
        for t in suite.teachers:
            for name in fnmatch.filter(names, t):
                if name not in suite.teacher.checkpoints:
                    raise SuiteError(f"{path}: field 'teacher.checkpoints': no checkpoint file for teacher '{name}'")
