"""The suite format: pydantic models only. What a field accepts is said here, once.
"""

from __future__ import annotations
import fnmatch
import re
from typing import Any, Literal
from typing import Annotated
from pydantic import BaseModel, ConfigDict, Field, Strict as StrictType, field_validator, model_validator
from kdbench import KdbenchError
from kdbench.data.spec import DATASETS, MAX_CLASSES, MAX_IMAGE_SIDE, MAX_IMAGES, DataSpec
from kdbench.seeding import MAX_SEED


class SuiteError(KdbenchError):
    """A suite that cannot run. Always one line: a newline in a quoted value cannot split it."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# Every number that sizes work has a bound: generous for any real study, refused beyond it in one line at
# validation, so no typo (epochs: 999999937) sizes a loop, a list or an allocation before training starts.
MAX_EPOCHS = 100_000  # KD schedules run 240 epochs (CRD), MNIST studies a few thousand: 100,000 is far past them
MAX_BATCH = 65_536  # 2**16 images a step: above the largest batches of large-batch training
MAX_SEEDS = 10_000  # seeds in one suite (each is a student job per pair and method)
MAX_TRIALS = 10_000  # tuning trials per method and pair (each is a training job)


def _int(**bounds):
    """An integer the user typed as one (not a bool, a float or a string), within `bounds` (ge, gt, le)."""
    return Annotated[int, StrictType(), Field(**bounds)]


# A number is a number: strict types refuse `true` for 1 and "7" for 7 (pydantic's default would convert them).
Flag = Annotated[bool, StrictType()]
Epochs = _int(ge=0, le=MAX_EPOCHS)
PositiveEpochs = _int(gt=0, le=MAX_EPOCHS)
Images = _int(gt=0, le=MAX_IMAGES)
BatchSize = _int(gt=0, le=MAX_BATCH)
Seed = _int(ge=0, le=MAX_SEED)  # the range the seed streams take (kdbench.seeding)


def _float(**bounds):
    """A float the user typed as a number (an integer is one; a bool or a string is not)."""
    return Annotated[float, StrictType(), Field(**bounds)]


class Strict(BaseModel):
    # allow_inf_nan: a NaN or infinite float would pass `gt=0` checks that it cannot satisfy (lr: .inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A suite name becomes a folder (results/<name>/) and an MLflow experiment: one safe path component,
# refused rather than sanitised (two names sanitised alike would share a report folder).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
SAFE_NAME_TEXT = "1 to 100 letters, digits and _ . + -, starting with a letter or digit"


class DataConfig(Strict):
    dataset: Literal[DATASETS]  # the names of data/spec.py's table
    path: str | None = None
    train_size: Images | None = None
    test_size: Images | None = None
    num_classes: _int(gt=0, le=MAX_CLASSES) | None = None
    image_size: _int(gt=0, le=MAX_IMAGE_SIDE) | None = None
    download: Flag = False
    val_size: _int(ge=0, le=MAX_IMAGES) = 0  # held out of the training images for choices; train_size counts them too
    # device: the whole split on the training device (default); stream: decoded from disk every epoch by loader
    # processes, for image folders that do not fit on the device (imagenet must stream). kdbench.data.stream
    loader: Literal["device", "stream"] = "device"
    train_crop: Literal["exact", "random_resized"] = "exact"  # random_resized: ImageNet's RandomResizedCrop
    eval_resize: _int(gt=0, le=MAX_IMAGE_SIDE) | None = None  # evaluation: shorter side resized, centre crop

    def spec(self) -> DataSpec:
        return DataSpec(**self.model_dump())


class AugmentConfig(Strict):
    crop_padding: _int(ge=0, le=MAX_IMAGE_SIDE) = 0  # random crop of the original size from the zero-padded image
    flip: Flag = False  # random horizontal flip


class TrainConfig(Strict):
    epochs: Epochs  # 0 only makes sense for a teacher used as loaded (checkpoint, pretrained)
    batch_size: BatchSize = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: _float(gt=0) = 0.05
    momentum: _float(ge=0, lt=1) = 0.9
    nesterov: Flag = False
    weight_decay: _float(ge=0) = 5e-4
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[PositiveEpochs] = []  # epochs at which a step schedule multiplies the rate by gamma
    gamma: _float(gt=0, le=1) = 0.1
    warmup_epochs: Epochs = 0
    lr_by_model: dict[str, _float(gt=0)] = {}  # model-name pattern -> lr (CRD: 0.01 for MobileNetV2, ShuffleNets)

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
    seed: Seed = 0  # teachers are shared by every student seed of a pair
    checkpoints: dict[str, str] = {}  # source checkpoint: model name -> state_dict file
    augment: AugmentConfig | None = None  # teachers' own augmentation (Hinton: jittered teacher); default: the suite's
    route_every: PositiveEpochs | None = None  # keep a route checkpoint every N epochs (default: about 10 along the run)
    model_kwargs: dict[str, dict[str, Any]] = {}  # teacher-only model kwargs (e.g. dropout), by model name


class MethodEntry(Strict):
    method: str
    label: str
    params: dict[str, Any] = {}
    # How the method's named loss terms make the student's update: summed, or PCGrad (kdbench.combine).
    combine: Literal["sum", "pcgrad"] = "sum"
    # A modifier of the method's logit losses (kdbench.modifier: logit_std, ctkd), and its params.
    modify: str | None = None
    modify_params: dict[str, Any] = {}

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
    test_images: Images | None = None  # test set size, to turn accuracy into errors (metric test_errors)
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


class SearchRange(Strict):
    """One hyper-parameter's range in a method's `search_space` (kdbench.run.tune draws from it)."""
    low: _float()
    high: _float()
    log: Flag = False  # drawn uniformly in log space (a temperature, a loss weight spanning decades)
    integer: Flag = False  # drawn as an integer (an epoch count, a layer index)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"expected low < high, got low {self.low} and high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class TuneConfig(Strict):
    """An equal-budget search of every method's `search_space` on validation (kdbench.run.tune)."""
    trials: _int(gt=0, le=MAX_TRIALS)  # per method and tuned pair: the same for every method, the student alone included
    seeds: list[Seed] = Field(min_length=1, max_length=MAX_SEEDS)  # the tuning seeds: never reporting seeds
    # "each": every pair tuned on its own; [teacher, student]: tuned on that pair, its setting frozen for the rest
    pairs: Literal["each"] | tuple[str, str] = "each"
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: Seed = 0
    batch: _int(gt=0, le=MAX_TRIALS) = 4  # trials asked at once and run in parallel (then told): part of what is drawn
    search_space: dict[str, dict[str, SearchRange]] = {}  # by method label: replaces the method's own ranges

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("tuning seeds must be distinct")
        return value


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
    seeds: list[Seed] = Field(min_length=1, max_length=MAX_SEEDS)
    train: TrainConfig
    teacher: TeacherConfig = TeacherConfig()
    eval_batch_size: BatchSize = 1000
    reference: ReferenceConfig | None = None  # paper suites (suites/papers/): the published table to compare with
    # Speed only, numbers unchanged (so in no job's hash): methods that read only the teacher's logits get
    # them from one cache per teacher, data and augmentation, shared across epochs, methods and seeds.
    teacher_cache: Flag = False
    # The seeds of each (method, pair) cell train together as one stacked model where the method and the student
    # allow it (kdbench.stacking), else as separate jobs. In the stacked jobs' keys: the same numbers within
    # float32 round-off, not bit for bit.
    stack_seeds: Flag = False
    tune: TuneConfig | None = None  # `kdbench tune`: search each method's setting on validation first

    @field_validator("methods", mode="before")
    @classmethod
    def _method_forms(cls, value):
        """Accept `kd`, `{kd: {T: 8}}` or `{method: kd, label: kd_T8, params: {T: 8}, combine: pcgrad}`, and
        `modify: logit_std` or `modify: {ctkd: {curriculum_epochs: 20}}` in the last form.

        Without a label, an entry is labelled by its method, plus `+<modifier>` when it has one and `+pcgrad` when
        it combines its terms so (`kd+logit_std`, `dkd+ctkd+pcgrad`).
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
                item = dict(item)
                modify = item.get("modify")
                if isinstance(modify, dict) and len(modify) == 1:  # `modify: {ctkd: {curriculum_epochs: 20}}`
                    (item["modify"], params), = modify.items()
                    item["modify_params"] = params if params is not None else {}
                parts = [item["method"], item.get("modify"), item.get("combine", "sum")]
                out.append({"label": "+".join(str(p) for p in parts if p not in (None, "sum")), **item})
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
    def _tuning_apart(self):
        if self.tune is None:
            return self
        shared = sorted(set(self.tune.seeds) & set(self.seeds))
        if shared:
            raise ValueError(f"tune.seeds: expected seeds apart from the reporting seeds, {shared[0]} is both "
                             f"(a setting chosen on a seed would be reported on it)")
        if not self.data.val_size:
            raise ValueError("tune: the search chooses on validation accuracy: set data.val_size")
        return self

    @model_validator(mode="after")
    def _cache_needs_resident_data(self):
        if self.teacher_cache and self.data.loader == "stream":
            raise ValueError("teacher_cache: expected false with data.loader stream (the cache gathers from the "
                             "training split held on the device)")
        return self

    def teacher_train(self) -> TrainConfig:
        return TrainConfig(**{**self.train.model_dump(), **self.teacher.train})
