"""Adversarial examples in pixel space (FGSM, PGD) and robust accuracy under them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.data.transforms import Normalize
from torch import Tensor, nn

from ..utils import eval_mode

ATTACKS = ("fgsm", "pgd")


def normalize_stats(dl) -> tuple[Tensor, Tensor]:
    """The (mean, std) of the `Normalize` in a DataLoader's batch pipeline, shaped (1, C, 1, 1).

    Our batches arrive normalized; an eps of 8/255 only means something for pixels in [0, 1], so every attack
    un-normalizes with these, perturbs, clamps and normalizes again.
    """
    for tfm in dl.after_batch.fs:
        if isinstance(tfm, Normalize):
            return tfm.mean.reshape(1, -1, 1, 1).float(), tfm.std.reshape(1, -1, 1, 1).float()
    return torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)  # no Normalize: batches are pixels already


def to_pixels(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x * std + mean).clamp(0, 1)  # clamp: float error only, the loader's pixels are in [0, 1]


def from_pixels(p: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (p - mean) / std


def _input_grad(model: nn.Module, pixels: Tensor, y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """d loss / d pixels, without touching the parameters' `.grad` (autograd.grad, not backward)."""
    pixels = pixels.detach().requires_grad_(True)
    # plain cross-entropy on the true labels: the attack's objective, whatever loss (smoothing, mixup) trains the model
    loss = F.cross_entropy(model(from_pixels(pixels, mean, std)).float(), y)
    (grad,) = torch.autograd.grad(loss, pixels)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, mean: Tensor, std: Tensor) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one signed gradient step of size eps, in pixel space.

    `x` is a normalized batch; the result is normalized too, and its pixels lie within eps of x's and in [0, 1].
    """
    mean, std = mean.to(x.device), std.to(x.device)
    pixels = to_pixels(x.detach().float(), mean, std)
    with torch.enable_grad():
        grad = _input_grad(model, pixels, y, mean, std)
    return from_pixels((pixels + eps * grad.sign()).clamp(0, 1), mean, std).to(x.dtype)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    mean: Tensor,
    std: Tensor,
    random_start: bool = True,
) -> Tensor:
    """Projected Gradient Descent (Madry et al. 2018): a uniform random start in the eps-ball, then `steps` signed
    steps of `alpha`, each projected back onto the L-inf eps-ball around the clean pixels and onto [0, 1]."""
    mean, std = mean.to(x.device), std.to(x.device)
    clean = to_pixels(x.detach().float(), mean, std)
    adv = clean
    if random_start:
        adv = (clean + torch.empty_like(clean).uniform_(-eps, eps)).clamp(0, 1)
    with torch.enable_grad():
        for _ in range(steps):
            adv = adv + alpha * _input_grad(model, adv, y, mean, std).sign()
            adv = torch.min(torch.max(adv, clean - eps), clean + eps).clamp(
                0, 1
            )  # project: eps-ball, then the image box
    return from_pixels(adv.detach(), mean, std).to(x.dtype)


def attack_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str,
    eps: float,
    mean: Tensor,
    std: Tensor,
    alpha: float = 2 / 255,
    steps: int = 7,
) -> Tensor:
    """Adversarial version of a normalized batch, with the model in eval mode (see `AdversarialTraining`)."""
    x, y = x.as_subclass(Tensor), y.as_subclass(Tensor).long()  # fastai's TensorImage/TensorCategory -> plain tensors
    if attack == "fgsm":
        return fgsm(model, x, y, eps, mean, std)
    if attack == "pgd":
        return pgd(model, x, y, eps, alpha, steps, mean, std)
    raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")


def robust_accuracy(
    model: nn.Module, dl, attack: str, eps: float, alpha: float = 2 / 255, steps: int = 7, limit: int | None = None
) -> dict[str, float]:
    """Clean and adversarial accuracy over a labelled DataLoader (white-box attack, model in eval mode), on its
    first `limit` images when given (PGD costs `steps` forward+backward passes per image)."""
    mean, std = normalize_stats(dl)
    device = next(model.parameters()).device
    clean = robust = n = 0
    with eval_mode(model):
        for xb, yb in dl:
            if limit is not None and n >= limit:
                break
            if limit is not None:
                xb, yb = xb[: limit - n], yb[: limit - n]
            x, y = torch.as_tensor(xb).to(device), torch.as_tensor(yb).to(device).long()
            with torch.no_grad():
                clean += (model(x).argmax(1) == y).sum().item()
            adv = attack_batch(model, x, y, attack, eps, mean, std, alpha, steps)
            with torch.no_grad():
                robust += (model(adv).argmax(1) == y).sum().item()
            n += len(y)
    return {"clean_accuracy": clean / max(n, 1), "robust_accuracy": robust / max(n, 1), "n": n}
