"""The one source of defaults: a frozen, self-validating dataclass whose fields are also the CLI options.

`TrainConfig(...)` refuses a typo or an out-of-range value with the same one-line `ConfigError` that the command
line prints, so the Python API, the CLI, config files, sweeps and studies accept exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArchError, ConfigError


def fraction(text: str | float) -> float:
    """A pixel-space amount in [0, 1] written as a number or a fraction: '8/255', '0.03'."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        num, _, den = str(text).partition("/")
        try:
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{text!r} is not a number or a fraction: write e.g. 8/255") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text} is outside [0, 1] (pixel space): write e.g. 8/255")
    return value


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its CLI help and its rules in the metadata: `choices=`, `min=`, `max=`, `gt=` (above,
    exclusive), `parser=` (text -> value), `show=` (the default as --help shows it)."""
    return field(default=default, metadata={"help": help, **extra})


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def progressive_stages(start: int, full: int, step: int = 4) -> list[int]:
    """The training sizes of progressive resizing from `start`: start, start+step, ..., full."""
    return [*range(start, full, step), full]


def parse_shares(text: str, start: int, full: int) -> tuple[float, ...]:
    """`--progressive-shares '7,5,3,2'`: the relative number of epochs of each stage, smallest size first; '' is equal
    shares. A clear error for a count that is not the number of stages or a share that is not positive."""
    if not text:
        return ()
    stages = progressive_stages(start, full) if start else []
    try:
        shares = tuple(float(v) for v in text.split(","))
    except ValueError:
        shares = ()
    if not stages or len(shares) != len(stages) or not all(math.isfinite(v) and v > 0 for v in shares):
        raise ConfigError(
            f"--progressive-shares {text}: give one positive number per stage of --progressive ("
            + (f"{len(stages)}: {', '.join(map(str, stages))} px)" if stages else "it is off)")
        )
    return shares


def parse_steps(text: str) -> tuple[float, ...]:
    """`--lr-steps '0.5,0.75'`: increasing fractions of training, each strictly between 0 and 1."""
    try:
        steps = tuple(float(v) for v in text.split(","))
    except ValueError:
        steps = ()
    if not steps or not all(0 < v < 1 for v in steps) or list(steps) != sorted(set(steps)):
        raise ConfigError(f"--lr-steps {text}: give increasing fractions of training between 0 and 1, e.g. 0.5,0.75")
    return steps


# Architectures whose optimizer rates Muon's groups were set for (airbench94_muon's bias-free head, logits / width).
MUON_ARCHS = ("airbench_resnet", "airbench94", "airbench95", "airbench96")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. `scripts/train.py` builds its options from these fields."""

    # data
    data: str = opt(
        "cifar10",
        "'sample' (the shipped sample of real CIFAR-10 images), 'cifar10' (fastai download), a CIFAR-layout folder "
        "(train/<class>/*, test/<class>/*) or a .tgz of one",
    )
    valid: str = opt(
        "holdout",
        "'holdout': seeded hold-out from the training images; 'test': use the test set as validation (fastai convention)",
        choices=("holdout", "test"),
    )
    valid_pct: float = opt(0.1, "fraction of training images held out for validation", min=0.01, max=0.9)
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
    lr: float | None = opt(None, "max learning rate (default: 1e-3 from scratch, 2e-3 base lr when fine-tuning)", gt=0.0)
    wd: float = opt(0.05, "weight decay (decoupled, AdamW)", min=0.0)
    freeze_epochs: int = opt(1, "epochs with the pretrained body frozen before unfreezing", min=0)
    seed: int = opt(42, "random seed, set before the DataLoaders are built")
    # runtime
    workers: int | None = opt(None, "DataLoader worker processes (default: 0 for the tensor loader, 1 for datablock)", min=0)
    threads: int | None = opt(None, "torch intra-op threads (default: all cores)", min=1)
    keep_memory: bool = opt(
        True,
        "keep freed memory in the process (glibc mallopt) instead of handing it back to the OS and page-faulting it "
        "in again at every training step (docs/speed.md)",
    )
    out: str = opt("runs", "folder that holds the run folders")
    name: str | None = opt(None, "run folder name (default: <arch>-<timestamp>)")
    lr_find: bool = opt(False, "run learn.lr_find(), save lr_find.png, print the suggestions and stop")
    # training from scratch
    zero_init_residual: bool = opt(
        False,
        "from scratch: zero the last BN gamma of each residual branch so blocks start as identity "
        "(Goyal et al. 2017, 'Accurate, Large Minibatch SGD')",
    )
    # fine-tuning and transfer
    train_per_class: int | None = opt(None, "keep at most N training images per class (seeded): low-data runs and quick budgets", min=1)
    classes: str | None = opt(
        None, "comma-separated class names to keep in train, valid and test (e.g. 'cat,dog,horse'): a relabelled subset"
    )
    init_from: str | None = opt(
        None,
        "a run folder (runs/<name>) to fine-tune from: its arch, width, normalization and body weights; the head is new, "
        "sized for this run's classes",
    )
    freeze: str = opt(
        "bn",
        "what trains during the frozen epochs: 'bn' the head + every BatchNorm layer (fastai's freeze, train_bn=True); "
        "'head' only the head (BatchNorm weights and running statistics frozen too); 'none' no frozen phase",
        choices=("bn", "head", "none"),
    )
    trainable_groups: int = opt(
        1, "layer groups trained during the frozen epochs, counted from the head: learn.freeze_to(-n); 1 = the head", min=1
    )
    lr_mult: float = opt(
        100.0, "discriminative rates after unfreezing: slice(lr/2/lr_mult, lr/2) across the layer groups (fastai fine_tune)", min=1.0
    )
    # logging, checkpoints, regularization, adversarial training
    # adversarial training (Goodfellow et al. 2015 FGSM; Madry et al. 2018 PGD): perturbations in pixel space [0, 1]
    adv: str = opt(
        "none", "adversarial training: replace training batches by FGSM or PGD attacks", choices=("none", "fgsm", "pgd")
    )
    eps: float = opt(
        8 / 255,
        "attack radius (L-inf, pixel space [0,1]); fractions accepted: 8/255 (Madry et al.)",
        parser=fraction,
        show="8/255",
    )
    adv_steps: int = opt(7, "PGD steps (7: Madry et al.'s CIFAR-10 training attack)", min=1)
    adv_alpha: float = opt(2 / 255, "PGD step size in pixel space (2/255: Madry et al.)", parser=fraction, show="2/255")
    adv_ratio: float = opt(
        1.0, "fraction of each training batch made adversarial (0.5: Goodfellow et al.'s mix)", min=0.0, max=1.0
    )
    # augmentation strength and cross-validation folds (used by scripts/sweep.py)
    crop_pad: int = opt(
        4, "reflect-pad before the random 32x32 crop (augmentation strength; 0: no crop)", min=0, max=16
    )
    flip: bool = opt(True, "mirror a random half of the training images (He et al. 2015); --no-flip: never")
    folds: int = opt(
        0, "k-fold cross-validation of the training images: seeded folds, one held out (0: --valid-pct hold-out)", min=0
    )
    fold: int = opt(0, "which of the --folds is the validation fold (0 ... folds-1)", min=0)
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
    # device and precision
    device: str = opt(
        "auto", "'auto': fastai's default_device() (CUDA GPU, else Apple MPS, else CPU); or force cpu, cuda or mps",
        choices=("auto", "cpu", "cuda", "mps"),
    )
    precision: str = opt(
        "auto",
        "'fp16' (CUDA, fastai to_fp16), 'bf16' (Ampere+ GPUs; CPU autocast), 'fp32'; 'auto': bf16 on GPUs that have "
        "it, else fp16 on CUDA; on CPUs bf16 where the CPU's bf16 instructions pay, else fp32 (docs/hardware.md)",
        choices=("auto", "fp32", "fp16", "bf16"),
    )
    channels_last: bool = opt(False, "NHWC memory layout for model and batches (pays on GPUs with mixed precision)")
    # the fast CPU recipes
    recipe: str | None = opt(
        None,
        "named recipe: 'quick' (the first model on the sample), 'fast' (10-minute budget), 'long' (30 minutes), or "
        "'record' (the CIFAR-10 speed record's own settings, their baseline), or 'he2015' (He et al. 2015's CIFAR "
        "ResNet settings: SGD 0.1, momentum 0.9, wd 1e-4, batch 128, rate /10 at 50% and 75%); sets the options the "
        "command line leaves at their defaults (docs/speed.md)",
        choices=("quick", "fast", "long", "record", "he2015"),
    )
    optimizer: str = opt(
        "adam",
        "from scratch: 'adam' (fastai's AdamW, --wd decoupled) or 'muon' (Muon on conv filters + Nesterov SGD on biases "
        "and head, airbench94_muon's rates, for airbench_resnet with --schedule linear; --lr is Muon's step; "
        "--wd is not used: the groups carry airbench's weight decay); 'sgd' (fastai's SGD with --momentum and "
        "L2 weight decay --wd, the CIFAR ResNet tutorials' optimizer)",
        choices=("adam", "muon", "sgd"),
    )
    momentum: float = opt(0.9, "--optimizer sgd: momentum (0.9: He et al. 2015)", min=0.0, max=0.999)
    schedule: str = opt(
        "one_cycle",
        "from scratch: 'one_cycle' (fastai fit_one_cycle), 'linear' (full --lr decaying linearly to 0, airbench94_muon), "
        "'cosine' (full --lr, cosine-annealed to 0) or 'step' (full --lr, divided by 10 at each of --lr-steps)",
        choices=("one_cycle", "linear", "cosine", "step"),
    )
    lr_steps: str = opt(
        "0.5,0.75", "--schedule step: the fractions of training at which the rate is divided by 10 (He et al. 2015: "
        "at 50% and 75%)",
    )
    ema: float = opt(
        0.0, "model EMA: keep an exponential moving average of the weights with this decay (e.g. 0.999), validate it "
        "each epoch beside the trained weights and keep the better; the decay warms up so short runs are not "
        "dominated by the first weights; 0: off", min=0.0, max=0.99999,
    )
    augment: str = opt(
        "none", "augmentation policy on top of crop/flip: 'trivial' (TrivialAugmentWide), 'rand' (RandAugment) or "
        "'augmix' (AugMix), torchvision's v2 transforms per image on uint8; 'none': off",
        choices=("none", "trivial", "rand", "augmix"),
    )
    alt_flip: bool = opt(
        False, "alternating flip (airbench94): a seeded half of the training images mirrored in even epochs, the rest "
        "in odd ones, instead of random flips (tensor loader)",
    )
    progressive: int = opt(
        0, "progressive resizing: train the first epochs on batches downscaled to this many px, growing by 4 px per "
        "stage to --size (equal shares of the epochs; the last at full size); 0: off", min=0,
    )
    progressive_shares: str = opt(
        "", "with --progressive: the relative number of epochs of each stage, smallest size first ('7,5,3,2': of 17 "
        "epochs, 7 at 20 px, 5 at 24, 3 at 28, 2 at 32); '': equal shares",
    )
    lookahead: bool = opt(
        False, "airbench94's weight averaging: from 30% of training on, an EMA of the weights (decay warming up to "
        "0.77 per 5,120 images) that the net is reset to, and takes at each epoch's end",
    )
    time_budget: float = opt(
        0, "wall-clock budget in seconds for the whole run (imports to export): after each epoch, if the remaining "
        "epochs would not end in time, train fewer (--epochs is then the most; the rate schedule and progressive "
        "resizing still finish); 0: off", min=0,
    )
    tta: bool = opt(
        False, "also report test accuracy with test-time augmentation (airbench's 6 views: mirror x {none, +1px, -1px} shift)"
    )
    tta_select: float = opt(
        1.0, "with --tta: the fraction of test images (the lowest margin between their top two softmax probabilities "
        "in the plain pass) that get the 5 extra views; the rest keep their plain prediction; 1: all", min=0.0, max=1.0,
    )
    select: float = opt(
        1.0, "fraction of each training batch the net trains on: its highest-loss images by a small proxy net "
        "trained alongside (airbench96_faster's data selection; callbacks/select.py); 1: all", gt=0, max=1,
    )
    # multi-process training under torchrun / accelerate launch
    dist_timeout: int = opt(
        600,
        "seconds a rank waits in a collective (all-reduce, broadcast) for the others before the job fails instead of hanging",
        min=10,
    )


    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, checked_value(f, getattr(self, f.name)))
        self._check_rules()

    def _check_rules(self) -> None:
        """The rules between fields, all here: a config that passes them can be trained as it says."""
        from .models import get_arch  # the registry imports nothing from here; deferred so config stays light

        try:
            get_arch(self.arch)
        except ArchError as e:  # same message, one error type for every bad setting
            raise ConfigError(str(e)) from None
        if self.progressive and not 8 <= self.progressive < self.size:
            raise ConfigError(f"--progressive {self.progressive}: the start size must be at least 8 and below --size {self.size}")
        object.__setattr__(self, "_shares", parse_shares(self.progressive_shares, self.progressive, self.size))
        object.__setattr__(self, "_steps", parse_steps(self.lr_steps))
        if self.time_budget and self.fine_tuning:  # fine_tune is two fits (frozen, then unfrozen); the budget plans one
            raise ConfigError("--time-budget plans a from-scratch run; fine-tuning (--pretrained/--weights) runs two fits: drop one")
        if self.fine_tuning and self.schedule != "one_cycle":
            raise ConfigError(f"--schedule {self.schedule} is for training from scratch; fine-tuning runs fastai's fine_tune schedule")
        if self.optimizer == "muon":
            if self.fine_tuning:
                raise ConfigError("--optimizer muon trains from scratch; fine-tuning uses fastai's AdamW (drop --optimizer)")
            if self.arch not in MUON_ARCHS:
                raise ConfigError(f"--optimizer muon is for the airbench nets ({', '.join(MUON_ARCHS)}; got {self.arch}): use adam")
            if self.schedule != "linear":
                # fit_one_cycle also cycles momentum (0.95-0.85-0.95) in every group, overriding Muon's 0.6 and SGD's 0.85
                raise ConfigError("--optimizer muon needs --schedule linear (fastai's one-cycle would override its momentum)")
        # SGD with one-cycle keeps fastai's momentum cycle (0.95-0.85-0.95): the one-cycle policy was made for SGD with
        # cycled momentum (Smith 2018), and it overrides --momentum, so a --momentum of one's own is refused there
        if self.momentum != TrainConfig.momentum and (self.optimizer != "sgd" or self.schedule == "one_cycle"):
            raise ConfigError(
                "--momentum is for --optimizer sgd with --schedule linear, cosine or step (one_cycle cycles momentum)"
            )
        if self.steps != parse_steps(TrainConfig.lr_steps) and self.schedule != "step":
            raise ConfigError(f"--lr-steps {self.lr_steps} is for --schedule step (got --schedule {self.schedule})")
        if self.alt_flip and self.loader == "datablock":
            raise ConfigError("--alt-flip needs the tensor loader (images of one size, --loader tensor or auto)")
        if self.alt_flip and not self.flip:  # both say how training images are mirrored
            raise ConfigError("--alt-flip mirrors half of the images each epoch; --no-flip mirrors none: pick one")
        if self.ema and self.lookahead:  # the net would be reset to one average while the other follows it
            raise ConfigError("--ema and --lookahead both average the weights: pick one")
        if self.mixup > 0 and self.cutmix > 0:
            # both would wrap the loss function in turn and mix already-mixed targets; fastai applies one at a time
            raise ConfigError("--mixup and --cutmix cannot be used together: pick one")
        if self.folds == 1:
            raise ConfigError("--folds 1 leaves nothing to validate on: use --folds 0 (hold-out) or 2 or more")
        if self.folds and self.fold >= self.folds:
            raise ConfigError(f"--fold {self.fold}: choose one of 0 ... {self.folds - 1} (--folds {self.folds})")
        if self.init_from and self.pretrained:
            raise ConfigError("--init-from already says where the weights come from: drop --pretrained")

    def replace(self, **changes: Any) -> TrainConfig:
        unknown = sorted(set(changes) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}{_did_you_mean(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fine_tuning(self) -> bool:
        return self.pretrained or self.weights is not None or self.init_from is not None

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-3 if self.fine_tuning else 1e-3

    @property
    def shares(self) -> tuple[float, ...]:
        """`progressive_shares` parsed (once, when the config was made)."""
        return self._shares

    @property
    def steps(self) -> tuple[float, ...]:
        """`lr_steps` parsed (once, when the config was made)."""
        return self._steps

    @classmethod
    def from_dict(cls, settings: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from a dict (a config.json's `config` part); unknown keys are an error that names them."""
        unknown = sorted(set(settings) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}{_did_you_mean(unknown)}")
        return cls(**settings)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """The config of a run folder's config.json (or of a JSON file holding the settings themselves)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable config file ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config file holds a JSON object of settings")
        return cls.from_dict(raw.get("config", raw), source=str(path))


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))
_HINTS = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> type:
    """The field's value type, without `None` (`int | None` -> int)."""
    args = [a for a in typing.get_args(_HINTS[name]) if a is not type(None)]
    return args[0] if args else _HINTS[name]


def _did_you_mean(names: list[str]) -> str:
    import difflib

    close = [m for n in names for m in difflib.get_close_matches(n, sorted(FIELD_NAMES), n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def checked_value(f: dataclasses.Field, value: Any) -> Any:
    """One field's value, checked against its type and the rules in its metadata; a `parser` field may be text."""
    meta, name = f.metadata, f.name
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{option(name)}: a value is required (default {f.default!r})")
    kind = field_type(name)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{option(name)} {value!r}: expected {'text' if kind is str else 'a number'}")
    if "parser" in meta:
        try:
            value = meta["parser"](value)
        except ValueError as e:
            raise ConfigError(f"{option(name)}: {e}") from None
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{option(name)} {value!r}: expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{option(name)} {value!r}: expected a whole number")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{option(name)} {value!r}: expected a finite number")
        value = float(value)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{option(name)} {value!r}: expected text")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{option(name)} {value!r}: choose one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{option(name)} {value:g}: must be at least {meta['min']:g}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{option(name)} {value:g}: must be at most {meta['max']:g}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{option(name)} {value:g}: must be above {meta['gt']:g}")
    return value


DEFAULTS = TrainConfig()


def train_command(cfg: TrainConfig) -> str:
    """`python scripts/train.py ...` with every option that differs from the defaults (folds dropped: train on all):
    the command a sweep's best setting, a model card and a rerun print."""
    args = ["python", "scripts/train.py"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("folds", "fold", "name", "out", "lr_find") or value == getattr(DEFAULTS, f.name) or value is None:
            continue
        opt = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(opt if value else "--no-" + f.name.replace("_", "-"))
        else:
            text = short(value) if isinstance(value, float) else str(value)
            if "parser" in f.metadata and float(round(value * 255)) / 255 == value:
                text = f"{round(value * 255)}/255"  # pixel amounts as written: --eps 4/255
            args += [opt, text]
    return " ".join(shlex.quote(a) for a in args)


def short(value: float) -> str:
    """3e-3 as '0.003', yet 8/255 exactly: `train.py` must get the very value that was searched."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)
