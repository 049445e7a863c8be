"""Evaluate a trained learner on a labelled DataLoader: accuracy, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, never windows: runs happen on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch
from fastai.interpret import ClassificationInterpretation


class Interpretation(ClassificationInterpretation):
    """fastai's `ClassificationInterpretation` over predictions computed once (fastai re-predicts on every call)."""

    def __init__(self, learn, dl, vocab: list[str], preds: torch.Tensor, targs: torch.Tensor, losses: torch.Tensor):
        super().__init__(learn, dl, losses)
        self.vocab, self.preds, self.targs = list(vocab), preds, targs
        self.decoded = preds.argmax(dim=1)

    @classmethod
    def from_dl(cls, learn, dl, vocab: list[str]) -> Interpretation:
        preds, targs, losses = learn.get_preds(dl=dl, with_loss=True)
        return cls(learn, dl, vocab, preds, targs, losses)

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


def tta_accuracy(learn, dl) -> float:
    """Accuracy of fastai's `learn.tta` on `dl`: the mean of 4 passes with the training augmentation (pad-crop +
    flip), lerped 0.25 with the plain pass."""
    preds, targs = learn.tta(dl=dl)
    return float((preds.argmax(1) == targs).float().mean())
