"""The training configuration: one frozen dataclass, the `train:` section of gradserve.yaml.

    train:
      name: shapes                       # runs/<name>/, model_store/<name>.mar, the served model name
      task: classification               # classification | regression
      data:
        kind: imagefolder                # digits | imagefolder | csv | npz | python
        path: data/shapes
        image: {size: [32, 32], mode: RGB}
      model:
        factory: shapenet:build          # "module:callable" returning an nn.Module
        args: {width: 16}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gradserve.config import path_field
from handlers.factory import BUILTIN
from handlers.preprocess import MODES
from training.model import NORMS
from training.selection import STRATEGIES, SelectionRule

SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
BALANCING = ("gradnorm", "equal")
TASKS = ("classification", "regression")
DATA_KINDS = ("digits", "imagefolder", "csv", "npz", "python")
# The targets a multi-task run can learn from the bundled digits; "class" is the main head (logits/label/...).
TASK_NAMES = ("class", "ink", "parity")


@dataclass(frozen=True)
class ImageSection:
    """How image files are read: every image is decoded, converted to `mode` and resized to `size`."""

    size: tuple[int, int] = (32, 32)  # (height, width)
    mode: str = "RGB"  # a Pillow mode: L (grey), RGB, RGBA, ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"data.image.size must be [height, width], got {list(self.size)}")
        if self.mode not in MODES:
            raise ValueError(f"data.image.mode must be one of {sorted(MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class DataSection:
    """Where the examples come from (training/datasets.py reads them)."""

    kind: str = "digits"  # digits | imagefolder | csv | npz | python
    path: str | None = path_field()  # imagefolder: a folder; csv, npz: a file
    image: ImageSection = field(default_factory=ImageSection)  # imagefolder
    label: str | tuple[str, ...] | None = None  # csv: the label column (regression: one or several)
    features: tuple[str, ...] | None = None  # csv: the feature columns, in order (default: every other column)
    factory: str | None = None  # python: "module:callable" returning (x, y) or (x, y, labels) NumPy arrays
    args: dict[str, Any] = field(default_factory=dict)  # python: keyword arguments of the factory
    standardize: bool | None = None  # inputs standardised with the training split's statistics; None: yes,
    #                                  but for the digits demo (its archive takes pixels in [0, 1] as they are)
    label_noise: float = 0.0  # classification: this share of the *training* labels is flipped to another class
    #                           (seeded by train.seed; validation and test keep their true labels). A stress test
    #                           of early stopping and checkpoint choice (`gradserve study`), not a regulariser

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            object.__setattr__(self, "image", ImageSection(**self.image))
        if isinstance(self.label, list):
            object.__setattr__(self, "label", tuple(self.label))
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind in ("imagefolder", "csv", "npz") and not self.path:
            what = "folder" if self.kind == "imagefolder" else "file"
            raise ValueError(f"data.kind {self.kind} needs data.path (the {what})")
        if self.kind == "csv" and not self.label:
            raise ValueError("data.kind csv needs data.label: the column (or columns, for regression) to predict")
        if self.kind == "python" and not self.factory:
            raise ValueError("data.kind python needs data.factory: 'module:callable' returning (x, y[, labels])")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"data.label_noise must be in [0, 1) (the share of training labels flipped), "
                             f"got {self.label_noise}")

    @property
    def standardized(self) -> bool:
        return self.kind != "digits" if self.standardize is None else self.standardize


@dataclass(frozen=True)
class ModelSection:
    """The model: a factory "module:callable" and its keyword arguments; input shape and output count come from
    the data. The default is the built-in ConvNet (args: channels, norm batch|group|layer, dropout)."""

    factory: str = BUILTIN
    args: dict[str, Any] = field(default_factory=lambda: {"channels": [32, 64], "norm": "batch", "dropout": 0.0})

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", dict(self.args))
        if self.builtin and self.args.get("norm", "batch") not in NORMS:
            raise ValueError(f"model.args.norm must be one of {NORMS}, got {self.args['norm']!r}")

    @property
    def builtin(self) -> bool:
        return self.factory == BUILTIN


@dataclass(frozen=True)
class MultitaskSection:
    """`multitask:` of the train section: several heads on one trunk, their losses balanced by `method`.

    gradnorm: task weights learned so each task's gradient norm on the last shared layer tracks the mean norm
    times its relative inverse training rate to the power alpha (Chen et al., 2018); equal: every weight 1.
    """

    method: str = "gradnorm"  # gradnorm | equal
    alpha: float = 1.5  # how hard slower tasks are pulled up (0: equal gradient norms)
    weight_lr: float = 0.025  # Adam learning rate of the task weights (their own optimizer)
    tasks: tuple[str, ...] = ("class", "ink")  # "class" first: the digit; then ink and/or parity

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        problems = []
        if self.method not in BALANCING:
            problems.append(f"multitask.method must be one of {BALANCING}, got {self.method!r}")
        if self.alpha < 0 or self.weight_lr <= 0:
            problems.append("multitask.alpha must be >= 0 and multitask.weight_lr > 0")
        if not self.tasks or self.tasks[0] != "class" or len(set(self.tasks)) != len(self.tasks):
            problems.append(f"multitask.tasks must start with 'class' and not repeat a task, got {list(self.tasks)}")
        if unknown := sorted(set(self.tasks) - set(TASK_NAMES)):
            problems.append(f"multitask.tasks {unknown} are unknown; the bundled ones are {list(TASK_NAMES)}")
        if len(self.tasks) < 2:
            problems.append("multitask.tasks needs at least two tasks (one is the single-task path: drop multitask)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class TrainConfig:
    name: str = "digits"  # runs/<name>/
    runs_dir: str = path_field("runs")  # relative in the config file: to the file's folder
    task: str = "classification"  # classification | regression
    data: DataSection = field(default_factory=DataSection)
    code_dir: str | None = path_field()  # first on sys.path for the factories; the command sets the config's folder
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    epochs: int = 50
    batch_size: int = 32  # per process
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    schedule: str = "cosine"  # after warmup: cosine | linear decay to min_lr_ratio * lr, or constant
    min_lr_ratio: float = 0.01
    max_grad_norm: float | None = None  # clip the global gradient norm to this value; None: no clipping
    eval_every: int | None = None  # iterations between evaluations; None: once per epoch
    patience: int | None = 8  # early stopping: evaluations without a val_loss improvement of min_delta
    min_delta: float = 5e-4
    max_nonfinite_in_row: int = 20  # stop with an error after this many non-finite iterations in a row
    explosion_factor: float = 10.0  # flag a norm above this many times the running median
    vanishing_floor: float = 1e-7  # flag a norm below this
    median_window: int = 100  # iterations in the running median
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # float16 autocast + GradScaler on CUDA; ignored (with a warning) on CPU
    sync_bn: bool = False  # SyncBatchNorm under DDP where the backend supports it (CUDA); see train.py
    threads: int | None = None  # torch intra-op threads per process; None: torch's default
    progress: bool = True  # tqdm progress bar
    model: ModelSection = field(default_factory=ModelSection)
    selection: SelectionRule = field(default_factory=SelectionRule)
    multitask: MultitaskSection | None = None  # None: the single-task classifier (training/train.py)

    def __post_init__(self) -> None:
        # gradserve.yaml hands the nested sections over as plain mappings.
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelSection(**self.model))
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataSection(**self.data))
        if isinstance(self.selection, dict):
            object.__setattr__(self, "selection", SelectionRule(**self.selection))
        if isinstance(self.multitask, dict):
            object.__setattr__(self, "multitask", MultitaskSection(**self.multitask))
        problems = []
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("epochs and batch_size must be >= 1")
        if not (
            0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            problems.append("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        if self.model.builtin and self.model.args.get("norm", "batch") == "batch" and self.batch_size < 2:
            problems.append(
                "batch_size 1 hands BatchNorm a single sample: use batch_size >= 2 or model.args.norm group/layer"
            )
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if self.data.label_noise and self.task != "classification":
            problems.append("data.label_noise flips class labels: it needs task classification")
        if self.multitask is not None and (self.task != "classification" or self.data.kind != "digits"
                                           or not self.model.builtin):
            problems.append("multitask trains the built-in ConvNet on the bundled digits (its tasks are derived "
                            "from them): drop multitask, or use task classification, data.kind digits and the "
                            "default model.factory")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {DEVICES}")
        if self.eval_every is not None and self.eval_every < 1:
            problems.append("eval_every must be >= 1 or null (once per epoch)")
        if self.selection.strategy not in STRATEGIES:
            problems.append(f"selection.strategy must be one of {STRATEGIES}")
        if self.max_nonfinite_in_row < 1:
            problems.append("max_nonfinite_in_row must be >= 1")
        if self.multitask is not None and self.amp:
            problems.append("amp is not supported with multitask (its per-task gradient norms run in float32)")
        if problems:
            raise ValueError("invalid train config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: what checkpoints and the archive's manifest record."""
        d = dataclasses.asdict(self)
        d["data"]["image"]["size"] = list(self.data.image.size)
        for key in ("label", "features"):
            if isinstance(d["data"][key], tuple):
                d["data"][key] = list(d["data"][key])
        if self.multitask is not None:
            d["multitask"]["tasks"] = list(self.multitask.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)
