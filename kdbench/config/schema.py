"""The suite format: pydantic models only. What a field accepts is said here, once.
"""

from __future__ import annotations
import fnmatch
import re
from typing import Any, Literal
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator,
                      model_validator)
from kdbench import KdbenchError
from kdbench.data.spec import DataSpec


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
               "fashion_mnist": (60000, 10000), "imagenet": (1281167, 50000)}


class DataConfig(Strict):
    dataset: Literal["cifar100", "cifar10", "mnist", "fashion_mnist", "imagefolder", "imagenet", "synthetic"]
    path: str | None = None
    train_size: PositiveInt | None = None
    test_size: PositiveInt | None = None
    num_classes: PositiveInt | None = None
    image_size: PositiveInt | None = None
    download: bool = False
    val_size: NonNegativeInt = 0  # held out of the training images for choices; train_size counts them too
    # device: the whole split on the training device (default); stream: decoded from disk every epoch by loader
    # processes, for image folders that do not fit on the device (imagenet must stream). kdbench.data.stream
    loader: Literal["device", "stream"] = "device"
    train_crop: Literal["exact", "random_resized"] = "exact"  # random_resized: ImageNet's RandomResizedCrop
    eval_resize: PositiveInt | None = None  # evaluation: shorter side resized to this, centre crop of image_size

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

    @model_validator(mode="after")
    def _cache_needs_resident_data(self):
        if self.teacher_cache and self.data.loader == "stream":
            raise ValueError("teacher_cache: expected false with data.loader stream (the cache gathers from the "
                             "training split held on the device)")
        return self

    def teacher_train(self) -> TrainConfig:
        return TrainConfig(**{**self.train.model_dump(), **self.teacher.train})
