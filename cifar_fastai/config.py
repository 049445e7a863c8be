"""The one source of defaults: a frozen dataclass whose fields are also the CLI options of `scripts/train.py`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its CLI help (and typer extras such as `min=`, `choices=`) in the metadata."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. `scripts/train.py` builds its options from these fields."""

    # data
    data: str = opt(
        "cifar10",
        "'sample' (shipped 2,500-image sample), 'cifar10' (fastai download), a CIFAR-layout folder "
        "(train/<class>/*, test/<class>/*) or a .tgz of one",
    )
    valid: str = opt(
        "holdout",
        "'holdout': seeded hold-out from the training images; 'test': use the test set as validation (fastai convention)",
        choices=("holdout", "test"),
    )
    valid_pct: float = opt(0.1, "fraction of training images held out for validation (0.1 of 50,000 = 5,000)", min=0.01, max=0.9)
    size: int = opt(32, "input size fed to the model (e.g. 128 or 224 for ImageNet-pretrained models)", min=8)
    loader: str = opt(
        "auto",
        "'tensor': decode once into a uint8 cache and augment whole batches; 'datablock': fastai DataBlock from files; "
        "'auto': tensor when every image has the same size",
        choices=("auto", "tensor", "datablock"),
    )
    # model
    arch: str = opt("resnet18", "architecture name (see --list-archs); timm models as timm/<name>")
    pretrained: bool = opt(False, "start from ImageNet weights (downloaded by torchvision/timm) and fine-tune")
    weights: str | None = opt(None, "local weights file (.pth/.safetensors) to fine-tune from; the only way offline")
    width: float = opt(1.0, "width multiplier for the project's own models (0.5 ... 4)", min=0.125, max=8.0)
    dropout: float | None = opt(None, "dropout before the classifier (default: the arch's own; fastai heads use 0.5)", min=0.0, max=0.95)
    # optimisation
    epochs: int = opt(5, "epochs (after the frozen epochs when fine-tuning)", min=1)
    bs: int = opt(256, "batch size", min=1)
    lr: float | None = opt(None, "max learning rate (default: 1e-3 from scratch, 2e-3 base lr when fine-tuning)", min=0.0)
    wd: float = opt(0.05, "weight decay (decoupled, AdamW)", min=0.0)
    freeze_epochs: int = opt(1, "epochs with the pretrained body frozen before unfreezing", min=0)
    seed: int = opt(42, "random seed, set before the DataLoaders are built")
    # runtime
    workers: int | None = opt(None, "DataLoader worker processes (default: 0 for the tensor loader, 1 for datablock)", min=0)
    threads: int | None = opt(None, "torch intra-op threads (default: all cores)", min=1)
    out: str = opt("runs", "folder that holds the run folders")
    name: str | None = opt(None, "run folder name (default: <arch>-<timestamp>)")
    lr_find: bool = opt(False, "run learn.lr_find(), save lr_find.png, print the suggestions and stop")
    # --- fine-tuning and transfer (issue 5) ---
    # --- training toolkit: logging, checkpoints, regularization, adversarial (issue 7) ---
    tensorboard: bool = opt(False, "write TensorBoard logs (loss, metrics, lr, sample predictions) to <run>/tensorboard")
    checkpoint: bool = opt(True, "save <run>/checkpoints/last.pth every epoch and best.pth by --monitor (for --resume)")
    monitor: str = opt(
        "accuracy", "validation value that picks the best checkpoint and drives --patience", choices=("accuracy", "valid_loss")
    )
    patience: int = opt(0, "early stopping: stop after this many epochs without a better --monitor value (0: off)", min=0)
    resume: str | None = opt(
        None, "continue a killed run from its last checkpoint: runs/<name> (its saved config is used, other options ignored)"
    )
    label_smoothing: float = opt(0.0, "label smoothing eps (0: plain cross-entropy; airbench uses 0.2)", min=0.0, max=0.99)
    mixup: float = opt(0.0, "MixUp Beta(alpha, alpha) alpha (0: off; fastai's default 0.4)", min=0.0)
    cutmix: float = opt(0.0, "CutMix Beta(alpha, alpha) alpha (0: off; fastai's default 1.0)", min=0.0)
    cutout: float = opt(0.0, "random erasing: probability that a training image gets a noise rectangle (0: off)", min=0.0, max=1.0)
    cutout_size: float = opt(0.3, "random erasing: largest erased area as a fraction of the image (fastai RandomErasing sh=0.3)", min=0.01, max=1.0)
    # --- hardware: device and precision (issue 9) ---
    # --- fast CPU recipes (issue 10) ---

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fine_tuning(self) -> bool:
        return self.pretrained or self.weights is not None

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-3 if self.fine_tuning else 1e-3

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.get("config", raw).items() if k in known})


DEFAULTS = TrainConfig()
