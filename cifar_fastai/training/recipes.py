"""Named training recipes (`--recipe quick|fast|long|he2015`, and the baseline `record`): option values chosen together.

A recipe fills in every option the user did not set; options given on the command line win. Each choice below is
either measured (docs/speed.md has the runs and their commands) or a cited trick, most of them from the CIFAR-10
speed record, airbench94_muon (Keller Jordan 2024, github.com/KellerJordan/cifar10-airbench):

- `airbench_resnet`: airbench94's network made residual (models/cifar_resnet.py): a frozen 2x2 patch-whitening first
  layer (callbacks.fast.WhitenInit), BatchNorm with only its bias trained, Dirac-initialized convs, a unit-std head.
- `--optimizer muon --schedule linear`: Muon on the conv filters, Nesterov SGD on biases and head with the record's
  rates (training/optim.py); the rate decays linearly from its peak to 0, no warm-up (airbench94_muon).
- batch 250 and Muon lr 0.12 for the residual net (`quick`): chosen by a small grid of batch sizes and rates
  (docs/speed.md). `fast` trains the record's plain net at the record's batch 2,000 and lr 0.24: with progressive
  resizing and selective TTA it came closest to the record's accuracy in 0.75x its time. `long` trains airbench95's
  wider plain net at the same batch and rate.
- crop padding 2 and alternating flip (callbacks.fast.AlternateFlip): airbench's augmentation.
- `--precision auto` + channels_last: bf16 autocast where the CPU has bf16 instructions (AVX-512 BF16, AMX), where it
  is faster (bench/train_speed.py); fp32 elsewhere, since emulated bf16 is many times slower; fp32 master weights.
- label smoothing 0.2 (airbench94; Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7).
- test-time augmentation: airbench's 6 views (mirror x {none, 1-px shifts}; evaluation/report.py); in `fast` and
  `long` only on the quarter of the test images least certain in the plain pass (`--tta-select 0.25`, as the later
  CIFAR-10 speedrun records do): on the residual fast net after 8 epochs it kept all of full TTA's gain in 0.36x its time
  (bench/selective_tta.py, docs/speed.md); the saved seconds go to training under the time budget. `record` keeps
  full TTA, as airbench does.
- a 2% hold-out, so 49,000 images train (airbench trains on all 50,000).
- `time_budget` (training/budget.py): the recipes' wall-time targets, from process start to export; on a slow host
  the run trains fewer epochs rather than overrun.
- progressive resizing from 20 px (24 px in `fast` and `long`; callbacks.fast.ProgressiveResize; not in airbench): an epoch at
  20 px costs well under half of one at 32 px, so a budget buys more epochs; equal shares of the epochs per size.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

from ..config import DEFAULTS, TrainConfig, progressive_stages
from ..errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    options: dict[str, Any]


_COMMON: dict[str, Any] = {
    "arch": "airbench_resnet", "optimizer": "muon", "schedule": "linear", "bs": 250, "lr": 0.12,
    "label_smoothing": 0.2, "crop_pad": 2, "alt_flip": True, "precision": "auto", "channels_last": True,
    "valid_pct": 0.02, "tta": True,
}  # fmt: skip


RECIPES = {
    r.name: r
    for r in (
        # the first model a new user trains, on the shipped sample (9,000 train images): the fast net at half width,
        # 6 epochs growing from 20 to 32 px, chosen by a few trial runs on the sample (bench/first_run.py measures it)
        Recipe("quick", "airbench-shaped ResNet at half width, Muon, 6 epochs growing from 20 to 32 px: a first real model on the shipped sample",
               {**_COMMON, "width": 0.5, "epochs": 6, "progressive": 20}),
        # the record's net, batch and rate, 10 epochs growing 24 -> 28 -> 32 px, TTA on the least certain quarter:
        # closer to the record in less of its time than the residual net at batch 250 from 20 px (docs/speed.md)
        Recipe("fast", "the speed record's net and batch, Muon, 10 epochs growing from 24 to 32 px: the 10-minute budget",
               {**_COMMON, "arch": "airbench94", "width": 1.0, "bs": 2000, "lr": 0.24, "epochs": 10, "progressive": 24,
                "time_budget": 600, "tta_select": 0.25}),
        # airbench's next rung (airbench95, Jordan 2024: 94 -> 95% on the original images for about 4x the compute,
        # in 15 epochs): its 128/384/384 groups, under the record's batch and rate and `fast`'s sizes, 16 epochs.
        # One point over the record in about 3x its time, where 24 epochs of the residual net levelled off at +0.6
        # and a 1.5x-wider one did not pay (docs/speed.md)
        Recipe("long", "airbench95's wider net, Muon, 16 epochs growing from 24 to 32 px: the 30-minute budget",
               {**_COMMON, "arch": "airbench95", "width": 1.0, "bs": 2000, "lr": 0.24, "epochs": 16, "progressive": 24,
                "time_budget": 1800, "tta_select": 0.25}),
        # the baseline the others are measured against (bench/time_to_accuracy.py): airbench94_muon's own settings, its
        # plain (non-residual) net, batch 2,000, Muon lr 0.24, 8 epochs at 32 px; unlike the original, a 2% hold-out
        # and the whitening bias on the common schedule until it freezes
        Recipe("record", "the CIFAR-10 speed record's recipe (airbench94_muon: its net, batch 2,000, 8 epochs at 32 px): the baseline",
               {**_COMMON, "arch": "airbench94", "width": 1.0, "bs": 2000, "lr": 0.24, "epochs": 8}),
        # He et al. 2015, "Deep Residual Learning for Image Recognition", sec. 4.2: SGD lr 0.1, momentum 0.9, weight
        # decay 1e-4, batch 128, the rate /10 at 32k and 48k iterations, end at 64k; 4-px pad + 32x32 crop, flip;
        # no label smoothing, no TTA. 64k iterations at batch 128 are 164 epochs of all 50k training images, the set
        # the paper's test errors train on (182 epochs of its 45k/5k split, where it chose them); with our default
        # hold-out (45k) 164 epochs are ~58k iterations. Not included: resnet110's 0.01 warm-up for 400 iterations.
        Recipe("he2015", "He et al. 2015's CIFAR ResNet recipe: resnet20, SGD 0.1 momentum 0.9 wd 1e-4, batch 128, 164 epochs, rate /10 at 50% and 75%",
               {"arch": "resnet20", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "wd": 1e-4, "bs": 128,
                "schedule": "step", "lr_steps": "0.5,0.75", "epochs": 164, "crop_pad": 4, "label_smoothing": 0.0,
                "precision": "auto"}),
    )
}  # fmt: skip


def apply_recipe(cfg: TrainConfig, explicit: Collection[str] = ()) -> TrainConfig:
    """`cfg` with the recipe's value for every option the user did not set.

    `explicit`: option names given on the command line (the CLI knows them, so `--recipe fast --no-tta` keeps
    `tta=False`); without it (the Python API), an option still at its default counts as not set. Called once per
    run, by `training.resolve.resolve`.
    """
    if cfg.recipe is None:
        return cfg
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"--recipe {cfg.recipe}: choose one of {', '.join(RECIPES)}")
    known = {f.name for f in fields(TrainConfig)}
    if cfg.fine_tuning:  # Muon, its rate and the one-fit time budget are for training from scratch: fine-tuning
        known -= {"optimizer", "schedule", "lr", "time_budget"}  # keeps fastai's AdamW and its two fits
    changes = {
        k: v
        for k, v in RECIPES[cfg.recipe].options.items()
        if k in known and k not in explicit and getattr(cfg, k) == getattr(DEFAULTS, k)
    }
    return cfg.replace(**changes)


def progressive_size(
    epoch: int, n_epoch: int, start: int, full: int, step: int = 4, shares: tuple[float, ...] = ()
) -> int:
    """The training image size of `epoch` under progressive resizing: stages start, start+step, ..., full, each an
    equal share of the epochs, or one in proportion to `shares` (one per stage; with `n_epoch` their sum, exactly
    those epochs); the last stage always trains at `full`, the size the model is evaluated at. `start` 0: progressive
    resizing is off, every epoch trains at `full`."""
    if not start or epoch >= n_epoch - 1:  # with fewer epochs than stages, still end at full size
        return full
    sizes = progressive_stages(start, full, step)
    weights = shares or (1.0,) * len(sizes)
    if len(weights) != len(sizes):
        raise ConfigError(f"progressive shares {shares}: one per stage ({', '.join(map(str, sizes))} px)")
    # the last stage whose start (its cumulative share of the epochs) the epoch has reached; equal shares give
    # epoch * len(sizes) // n_epoch
    ends, total = 0.0, sum(weights)
    stage = 0
    for k, w in enumerate(weights[:-1]):
        ends += w
        if epoch * total >= ends * n_epoch - 1e-9:
            stage = k + 1
    return sizes[stage]
