"""Evaluate a trained learner on a labelled DataLoader: accuracy, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.interpret import ClassificationInterpretation
from fastai.torch_core import TensorImage
from fastcore.basics import getcallable, noop


class Interpretation(ClassificationInterpretation):
    """fastai's `ClassificationInterpretation` over predictions computed once (fastai re-predicts on every call)."""

    def __init__(self, learn, dl, vocab: list[str], preds: torch.Tensor, targs: torch.Tensor, losses: torch.Tensor):
        super().__init__(learn, dl, losses)
        self.vocab, self.preds, self.targs = list(vocab), preds, targs
        self.decoded = preds.argmax(dim=1)

    @classmethod
    def from_dl(cls, learn, dl, vocab: list[str], cbs: list | None = None) -> Interpretation:
        """Predict `dl` once; `cbs`: callbacks for the pass (a run's precision and memory layout). The raw logits
        stay on the result as `logits` (the plain view of `tta_preds`)."""
        logits, targs, losses = learn.get_preds(dl=dl, with_loss=True, cbs=cbs, act=noop)
        interp = cls(learn, dl, vocab, getcallable(learn.loss_func, "activation")(logits), targs, losses)
        interp.logits = logits
        return interp

    def confusion_matrix(self) -> np.ndarray:
        n = len(self.vocab)
        idx = self.targs.long() * n + self.decoded.long()
        return torch.bincount(idx, minlength=n * n).reshape(n, n).numpy()

    def summary(self) -> dict:
        cm = self.confusion_matrix()
        per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
        return {
            "accuracy": float((self.decoded == self.targs).float().mean()),
            "loss": float(self.losses.mean()),
            "n": len(self.targs),
            "per_class_accuracy": {c: round(float(a), 4) for c, a in zip(self.vocab, per_class)},
            "most_confused": [[a, b, int(k)] for a, b, k in self.most_confused(min_val=1)[:10]],
        }

    def save_confusion_matrix(self, path: Path, title: str = "Confusion matrix") -> Path:
        self.plot_confusion_matrix(figsize=(7, 7), dpi=100, title=title)
        plt.savefig(path, bbox_inches="tight")
        plt.close("all")
        return path


class View(Callback):
    """Show the model a mirrored and/or shifted copy of each batch (normalized images): one test-time view."""

    order = -5  # before `ChannelsLastInputs` (-1) re-lays the batch out and autocast (10) wraps the forward pass

    def __init__(self, flip: bool, shift: int):
        self.flip, self.shift = flip, shift

    def before_batch(self):
        x = self.xb[0]
        if self.shift:  # reflect-pad 1 px, then crop one corner: the image moves 1 px diagonally (airbench94)
            h, w = x.shape[-2:]
            start = 1 + self.shift  # shift -1: content moves down-right, +1: up-left
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")[..., start : start + h, start : start + w]
        if self.flip:
            x = x.flip(-1)
        self.learn.xb = (TensorImage(x), *self.xb[1:])


# airbench94's TTA (Keller Jordan 2024, github.com/KellerJordan/cifar10-airbench, `infer_mirror_translate`): the image
# and its mirror weigh 1/2, the four 1-px diagonal shifts of both 1/2 together; the logits are averaged
TTA_VIEWS = [
    (False, 0, 0.25),
    (True, 0, 0.25),
    (False, -1, 0.125),
    (True, -1, 0.125),
    (False, 1, 0.125),
    (True, 1, 0.125),
]


def tta_preds(
    learn, dl, cbs: list | None = None, plain: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean logits over `TTA_VIEWS` (deterministic, unlike fastai's random-augmentation `learn.tta`), and
    the targets. Each view is one `learn.get_preds` pass with a `View` callback (plus `cbs`: a run's precision and
    memory layout); `plain`: the logits of the unchanged view if already predicted (`Interpretation.logits`)."""
    total, targs = None, None
    for flip, shift, weight in TTA_VIEWS:
        if plain is not None and not flip and not shift:
            logits = plain  # the targets come with the other views
        else:
            logits, targs = learn.get_preds(dl=dl, cbs=[View(flip, shift), *(cbs or [])], act=noop)
        total = logits.float() * weight if total is None else total + logits.float() * weight
    return total, targs


def tta_accuracy(learn, dl, cbs: list | None = None, plain: torch.Tensor | None = None) -> float:
    """Test accuracy with `tta_preds` (6 views)."""
    preds, targs = tta_preds(learn, dl, cbs, plain)
    return float((preds.argmax(1) == targs).float().mean())
