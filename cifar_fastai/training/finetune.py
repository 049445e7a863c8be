"""Fine-tuning: weights from our own runs, the freezing choices, fastai's fine_tune with them, and its report."""

from __future__ import annotations

from fastai.callback.training import BnFreeze
from fastai.learner import Learner

from ..config import TrainConfig
from ..errors import TrainingError


# ---------------------------------------------------------------------------------------------- fine-tuning
def freeze(learn: Learner, mode: str, trainable_groups: int = 1) -> None:
    """Freeze all but the last `trainable_groups` layer groups; 'bn' keeps every BatchNorm training, 'head' does not."""
    n_groups = len(learn.splitter(learn.model))
    if trainable_groups >= n_groups:
        raise TrainingError(
            f"--trainable-groups {trainable_groups}: this model has {n_groups} layer groups, so nothing would be "
            f"frozen; use at most {n_groups - 1}, or --freeze none"
        )
    # fastai marks BatchNorm parameters `force_train` when the optimizer is created (Learner.create_opt), so the
    # choice has to be made before a fresh optimizer is built.
    learn.train_bn = mode == "bn"
    learn.create_opt()
    learn.freeze_to(-trainable_groups)


def fine_tune(learn: Learner, cfg: TrainConfig, cbs: list) -> None:
    """fastai's `Learner.fine_tune` (fastai/callback/schedule.py, same rates and schedules) with the config's
    freezing choice: a frozen phase (`freeze_epochs`), then all groups with `slice(lr/2/lr_mult, lr/2)`."""
    lr = cfg.base_lr
    if cfg.freeze != "none" and cfg.freeze_epochs:
        freeze(learn, cfg.freeze, cfg.trainable_groups)
        # BnFreeze keeps the running statistics of frozen BatchNorm layers too: 'head' then means head only.
        frozen_cbs = [*cbs, BnFreeze()] if cfg.freeze == "head" else cbs
        learn.fit_one_cycle(cfg.freeze_epochs, slice(lr), pct_start=0.99, cbs=frozen_cbs)
    lr /= 2
    learn.unfreeze()
    learn.fit_one_cycle(cfg.epochs, slice(lr / cfg.lr_mult, lr), pct_start=0.3, div=5.0, cbs=cbs)
