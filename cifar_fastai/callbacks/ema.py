"""Model EMA (`--ema DECAY`): a moving average of the weights beside the trained ones, validated every epoch."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import ValueMetric
from fastai.metrics import accuracy
from fastai.torch_core import get_model
from timm.utils import ModelEmaV3


class ModelEma(Callback):
    """`--ema DECAY`: after every optimizer step timm's `ModelEmaV3` moves its copy of the model towards the trained
    weights. It averages the whole state dict, so BatchNorm's running statistics are averaged along with the weights
    they belong to (what timm trains with) rather than estimated again for the average. The decay warms up (timm's
    `use_warmup`: 1 - (1 + step)^(-2/3), at most DECAY), so a short run's average is not held back by its first,
    untrained weights.

    Every epoch the average is validated too, as the trained weights are (`ema_valid_loss`, `ema_accuracy` in the
    Recorder, the log lines and history.csv). After the fit `keep_better` puts it into the model when it validates
    better by `--monitor`, so the test pass and the export use it. `--resume` restores it (`resume_state`).
    """

    # before the Recorder (50), which reads the EMA's metrics in its after_validate; and before the timers'
    # after_validate (TimeBudget -20, Throughput 0), so an epoch's validation time includes the EMA's pass
    order = -25

    def __init__(self, decay: float):
        self.decay, self.ema, self.updates = decay, None, 0
        self.valid: tuple[float, float] | None = None  # the average's validation loss and accuracy, last epoch
        self.raw: tuple[float, float] | None = None  # the trained weights' that `keep_better` compared with
        self.kept = "raw"

    def before_fit(self):
        self.metrics_before = self.learn.metrics
        self.learn.metrics = [
            *self.metrics_before,
            ValueMetric(lambda: self.valid and self.valid[0], "ema_valid_loss"),
            ValueMetric(lambda: self.valid and self.valid[1], "ema_accuracy"),
        ]

    def after_fit(self):
        self.learn.metrics = self.metrics_before  # the exported learner refers to nothing of this callback

    def after_batch(self):
        if not self.training:
            return
        model = get_model(self.model)
        if self.ema is None:  # made here, after every before_fit: DDP wrapping, memory layout, the whitening stem
            self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True)
        # own count, not fastai's train_iter: that restarts at fine_tune's second fit, and the warm-up with it
        self.updates += 1
        self.ema.update(model, step=self.updates)

    def after_validate(self):
        if self.ema is None:
            return
        learn, model = self.learn, self.learn.model
        # fastai's FetchPredsCallback way of predicting inside a fit: without the callbacks that record or time the
        # fit's own passes (the Recorder, trackers, timers: `remove_on_fetch`), the progress bars, and this one
        watchers = [cb for cb in learn.cbs if cb is self or getattr(cb, "remove_on_fetch", False)]
        watchers += [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)]
        learn.model = self.ema.module  # precision, memory layout and sharding callbacks still apply, as in validation
        try:
            # torch's DataLoader draws a seed from the global RNG at every pass: forked, so the next epochs'
            # augmentations, and the trained weights, are those of the same run without --ema
            with learn.removed_cbs(watchers), torch.random.fork_rng(devices=[]):
                preds, targs, losses = learn.get_preds(dl=learn.dls.valid, with_loss=True, inner=True, reorder=False)
        finally:
            learn.model = model
        self.valid = (losses.mean().item(), accuracy(preds, targs).item())

    def keep_better(self, learn, raw: tuple[float, float], monitor: str) -> str:
        """After the fit: load the average into `learn.model` when it validated better by `monitor` than the
        trained weights the run keeps (`raw`: their validation loss and accuracy); return "ema" or "raw".

        Equal accuracies (common on a small validation set) are decided by the loss; a full tie keeps the trained
        weights."""
        self.raw = raw
        if self.valid is None:
            better = False
        elif monitor == "accuracy":
            better = (self.valid[1], -self.valid[0]) > (raw[1], -raw[0])
        else:
            better = self.valid[0] < raw[0]
        if better:
            get_model(learn.model).load_state_dict(self.ema.module.state_dict())
        self.kept = "ema" if better else "raw"
        return self.kept

    def summary(self) -> dict:
        """metrics.json's `ema` entry: the decay, which weights were kept and both validations."""
        ema = self.valid or (None, None)
        raw = self.raw or (None, None)
        return {
            "decay": self.decay,
            "updates": self.updates,
            "kept": self.kept,
            "valid_accuracy_raw": raw[1],
            "valid_accuracy_ema": ema[1],
            "valid_loss_raw": raw[0],
            "valid_loss_ema": ema[0],
        }

    def resume_state(self) -> dict:
        module = None if self.ema is None else self.ema.module.state_dict()
        return {"module": module, "updates": self.updates, "valid": self.valid}

    def load_resume_state(self, state: dict) -> None:
        # the last validation too: a run resumed after its last epoch compares the average without validating it
        self.updates, self.valid = state["updates"], state.get("valid")
        if state["module"] is not None:
            self.ema = ModelEmaV3(get_model(self.model), decay=self.decay, use_warmup=True)
            self.ema.module.load_state_dict(state["module"])
