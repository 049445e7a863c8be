"""Adversarial examples in pixel space (FGSM, PGD), a fastai callback for adversarial training, robust accuracy."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

from ..config import TrainConfig
from ..evaluation.attacks import ATTACKS, attack_batch, normalize_stats
from ..utils import eval_mode


class AdversarialTraining(Callback):
    """Replace (a fraction `ratio` of) every training batch by its FGSM or PGD version before the forward pass.

    The attack runs with the model in **eval mode** (as TRADES, Zhang et al. 2019, does): BatchNorm then uses its
    running statistics, so the attack's extra forward passes (7 for PGD) neither update those statistics with
    half-made adversarial batches nor make the perturbation depend on which images share the batch, and dropout does
    not randomize the gradient. The training step itself then runs in train mode on the adversarial batch.
    Validation batches are never touched (`run_valid = False`): the validation metric stays clean accuracy.
    """

    run_valid = False
    order = -1  # before MixUp/CutMix (order 0): attack the real images and labels, then let them mix

    def __init__(
        self, attack: str = "pgd", eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7, ratio: float = 1.0
    ):
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
        self.attack, self.eps, self.alpha, self.steps, self.ratio = attack, eps, alpha, steps, ratio

    def before_fit(self):
        self.mean, self.std = normalize_stats(self.dls.train)
        self.n_adversarial = 0

    def before_batch(self):
        x, y = self.xb[0], self.yb[0]
        n = round(self.ratio * len(x))  # the batch is shuffled: its first n images are a random subset
        if n == 0:
            return
        with eval_mode(self.model):
            adv = attack_batch(
                self.model, x[:n], y[:n], self.attack, self.eps, self.mean, self.std, self.alpha, self.steps
            )
        self.learn.xb = (torch.cat([adv, x[n:]]).as_subclass(type(x)), *self.xb[1:])
        self.n_adversarial += n


def adversarial_callback(cfg: TrainConfig) -> AdversarialTraining | None:
    """The callback `--adv fgsm|pgd` asks for, or None."""
    if cfg.adv == "none":
        return None
    return AdversarialTraining(cfg.adv, cfg.eps, cfg.adv_alpha, cfg.adv_steps, cfg.adv_ratio)
