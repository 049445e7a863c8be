"""Evaluate a trained learner on a labelled DataLoader: accuracy, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

import math
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
        # fastai's plot lays itself out (tight_layout) and then adds the axis titles; room for those is made here,
        # not with bbox_inches="tight", which draws the 100+ labels once more (about twice the time: most of a short
        # run's export)
        fig = plt.gcf()
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.035, left=fig.subplotpars.left + 0.03)
        fig.savefig(path)
        plt.close("all")
        return path

    def save_top_losses_cam(self, path: Path, k: int = 9, title: str = "Top losses", cols: int = 3) -> Path:
        """The `k` images with the highest loss, each beside its Grad-CAM map for the class the model predicted
        (fastai's `plot_top_losses` with where the model looked); the images are read back from `dl.items`."""
        from .cam import heatmaps, overlay

        losses, idx, items = self.top_losses(min(k, len(self.losses)), items=True)
        predicted = self.decoded[idx].tolist()
        maps, classes, seen = heatmaps(self.learn, list(items), predicted)
        rows = -(-len(idx) // cols)
        fig, axes = plt.subplots(rows, 2 * cols, figsize=(4 * cols, 2.4 * rows), dpi=100, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for j, (i, loss) in enumerate(zip(idx.tolist(), losses.tolist())):
            left, right = axes[j // cols, 2 * (j % cols)], axes[j // cols, 2 * (j % cols) + 1]
            left.imshow(seen[j], interpolation="nearest")
            left.set_title(f"actual {self.vocab[int(self.targs[i])]}", fontsize=9)
            right.imshow(overlay(seen[j], maps[j], size=4 * maps[j].shape[0]), interpolation="nearest")
            right.set_title(f"{classes[j]} {float(self.preds[i, predicted[j]]):.2f}, loss {loss:.2f}", fontsize=9)
        fig.suptitle(f"{title}: predicted class and its Grad-CAM map")
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
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


def uncertain(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Positions (ascending) of the `fraction * n` (rounded up) images whose prediction is least certain: the smallest
    margin between the top two softmax probabilities."""
    n = len(logits)
    k = min(n, math.ceil(fraction * n - 1e-9))  # the float error of e.g. 0.3 * 10 does not add an image
    if k == 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    probs = logits.float().softmax(1)
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    return margin.argsort()[:k].sort().values


def selective_tta_preds(
    learn,
    dl,
    fraction: float,
    cbs: list | None = None,
    plain: torch.Tensor | None = None,
    targs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selective TTA: the plain pass for every image, the other `TTA_VIEWS` only for the `uncertain` `fraction`
    of them (their weighted mean as in `tta_preds`); the rest keep their plain logits. Returns the logits, the
    targets and the positions that got the extra views. A confident prediction rarely changes under a 1-px shift
    or a mirror, so the views are spent where they can still flip the argmax; the test pass then costs
    1 + 5 * `fraction` passes instead of 6. `plain`/`targs`: the plain pass if already predicted
    (`Interpretation.logits`, `.targs`)."""
    if plain is None or targs is None:
        plain, targs = learn.get_preds(dl=dl, cbs=cbs, act=noop)
    marked = uncertain(plain, fraction)
    preds = plain.float().clone()
    if len(marked):
        # the marked images alone, in their order: fastai's own way of re-indexing a loader (`get_preds(reorder=)`)
        idxs = marked.tolist()
        sub = dl.new(shuffle=False, drop_last=False, n=len(idxs), get_idxs=lambda: idxs)
        preds[marked], _ = tta_preds(learn, sub, cbs, plain=plain[marked])
    return preds, targs, marked


def tta_result(
    learn,
    dl,
    fraction: float = 1.0,
    cbs: list | None = None,
    plain: torch.Tensor | None = None,
    targs: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Test accuracy with `selective_tta_preds` and how many images got the extra views (all of them at 1)."""
    preds, targs, marked = selective_tta_preds(learn, dl, fraction, cbs, plain, targs)
    return float((preds.argmax(1) == targs).float().mean()), len(marked)
