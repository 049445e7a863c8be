"""Regularization of a run: the loss function (label smoothing) and batch callbacks (MixUp, CutMix, random erasing)."""

from __future__ import annotations

from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.torch_core import TensorImage

from ..config import TrainConfig
from ..data.transforms import random_erase
from ..errors import ConfigError


def loss_func_for(cfg: TrainConfig):
    """Cross-entropy, or fastai's label-smoothing cross-entropy when `--label-smoothing` > 0."""
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropyFlat(eps=cfg.label_smoothing)
    return CrossEntropyLossFlat()


class RandomErase(Callback):
    """Random erasing / cutout on each training batch (after normalization, so the noise is N(0,1) like fastai's)."""

    run_valid = False
    order = MixUp.order - 1  # erase real images before MixUp/CutMix blend them

    def __init__(self, p: float, max_area: float):
        self.p, self.max_area = p, max_area

    def before_batch(self):
        self.learn.xb = (TensorImage(random_erase(self.xb[0], self.p, self.max_area)), *self.xb[1:])


def regularization_callbacks(cfg: TrainConfig) -> list[Callback]:
    """fastai's `MixUp`/`CutMix` callbacks (alpha = the option's value) and our per-image random erasing."""
    if cfg.mixup > 0 and cfg.cutmix > 0:
        # both would wrap the loss function in turn and mix already-mixed targets; fastai applies one at a time
        raise ConfigError("--mixup and --cutmix cannot be used together: pick one")
    cbs: list[Callback] = []
    if cfg.cutout > 0:
        cbs.append(RandomErase(cfg.cutout, cfg.cutout_size))
    if cfg.mixup > 0:
        cbs.append(MixUp(cfg.mixup))
    if cfg.cutmix > 0:
        cbs.append(CutMix(cfg.cutmix))
    return cbs
