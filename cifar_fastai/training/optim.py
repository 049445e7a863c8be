"""Optimizers fastai does not ship: Muon for conv filters with Nesterov SGD for the rest, as one fastai `opt_func`.

The CIFAR-10 speed record (airbench94_muon, Keller Jordan 2024, github.com/KellerJordan/cifar10-airbench) trains its
conv filters with Muon (momentum, then the update orthogonalized by a Newton-Schulz iteration; Jordan et al. 2024,
kellerjordan.github.io/posts/muon) and the BatchNorm biases, whitening bias and linear head with Nesterov SGD. It
reaches the same accuracy as its SGD recipe in 8 epochs instead of ~10. `torch.optim.Muon` takes 2-D parameters only,
so conv filters (4-D) need the small step below; fastai drives it through `OptimWrapper` like any torch optimizer
(`lr` is fastai's, so `ParamScheduler`, `lr_find` and checkpoints work unchanged).
"""

from __future__ import annotations

from functools import partial

import torch
from fastai.optimizer import OptimWrapper

__all__ = ["MuonSGD", "muon_opt", "newton_schulz"]


# airbench94_muon's rates are for a loss summed over a batch of 2,000; with fastai's mean loss the SGD groups take
# them times the batch size (same step per example), while Muon's step is scale-free and stays per step.
BIAS_LR, HEAD_LR, WD_PER_EXAMPLE = 0.053, 0.67, 2e-6


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalize a 2-D `g` (U S V^T -> U S' V^T, S' ~ 1): Muon's quintic Newton-Schulz iteration with
    airbench94_muon's coefficients and 3 steps, in bf16 by default (it tolerates the precision; Jordan 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x / (x.norm() + eps)  # top singular value <= 1
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


def iteration_dtype(device: torch.device) -> torch.dtype:
    """The Newton-Schulz iteration's precision on `device`: bf16 (the record's) on a GPU and on a CPU with bf16
    instructions, fp32 elsewhere: without them every bf16 matrix product is converted in software, many times slower
    than fp32 (bench/newton_schulz.py; docs/hardware.md), and the iteration became most of a training step."""
    if device.type != "cpu":
        return torch.bfloat16
    from .hardware import cpu_bf16_pays

    return torch.bfloat16 if cpu_bf16_pays() else torch.float32


class MuonSGD(torch.optim.Optimizer):
    """One torch optimizer for two kinds of group: `muon=True` (conv filters) and Nesterov SGD with coupled weight
    decay (everything else). A group's step size is `lr * lr_scale`, so fastai can schedule one `lr` for all groups."""

    def __init__(
        self, params, lr: float = 0.24, momentum: float = 0.6, nesterov: bool = True, weight_decay: float = 0.0
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"MuonSGD: lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "muon": False,
            "lr_scale": 1.0,
        }
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.iteration_dtype = iteration_dtype(first.device if first is not None else torch.device("cpu"))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, mom = group["lr"] * group["lr_scale"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:  # frozen (the whitening filters) or unused
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(g)
                buf.mul_(mom).add_(g)
                g = g.add(buf, alpha=mom) if group["nesterov"] else buf
                if group["muon"]:
                    # airbench94_muon: keep each filter bank at norm sqrt(out_channels), then step along the
                    # orthogonalized update of its (out, in*k*k) matrix
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    g = newton_schulz(g.reshape(len(g), -1), dtype=self.iteration_dtype).view_as(p)
                p.add_(g, alpha=-lr)
        return loss


def muon_groups(params, bs: int, lr: float) -> list[dict]:
    """airbench94_muon's grouping by shape: 4-D conv filters -> Muon; 1-D (biases) and 2-D (the linear head) -> SGD
    with the record's rates (mean-loss form: times `bs`, as a share of the Muon `lr`) and weight decay."""
    seen, filters, biases, head = set(), [], [], []
    for p in (q for group in params for q in (group if isinstance(group, (list, tuple)) else [group])):
        if id(p) in seen:
            continue
        seen.add(id(p))
        (filters if p.ndim == 4 else biases if p.ndim == 1 else head).append(p)
    groups = [{"params": filters, "muon": True, "momentum": 0.6, "lr_scale": 1.0}]
    for ps, rate in ((biases, BIAS_LR), (head, HEAD_LR)):
        if ps:
            # per-step decay WD_PER_EXAMPLE * bs, as in airbench (torch SGD multiplies weight_decay by the group's lr)
            groups.append(
                {"params": ps, "momentum": 0.85, "lr_scale": rate * bs / lr, "weight_decay": WD_PER_EXAMPLE / rate}
            )
    return groups


def _muon_opt(params, lr: float, bs: int, base_lr: float) -> OptimWrapper:
    # OptimWrapper(convert_groups=False) hands our groups to torch as they are; lr_scale is fixed against base_lr,
    # the recipe's peak, so fastai's schedule (and lr_find's sweep) moves every group together
    return OptimWrapper(muon_groups(params, bs, base_lr), partial(MuonSGD, lr=lr), convert_groups=False)


def muon_opt(bs: int, base_lr: float):
    """A fastai `opt_func` (called as `opt_func(splitter(model), lr=lr)`) building `MuonSGD` for a batch size."""
    return partial(_muon_opt, bs=bs, base_lr=base_lr)
