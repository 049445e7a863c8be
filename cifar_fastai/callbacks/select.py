"""Data selection (`--select F`): the net trains on the hardest images of each batch, ranked by a small proxy net.

airbench96_faster (Keller Jordan 2024, github.com/KellerJordan/cifar10-airbench, `airbench96_faster.py`), the
96% record, trains a small proxy net (`train_proxy`) over the same batches as the big one and keeps, of every batch
of 1,024, the 512 images with the highest proxy loss (label-smoothed cross-entropy); the big net trains on those
only. The proxy itself takes a training step on every 4th batch only, on its own 512 highest-loss images (summed
loss, its own Nesterov SGD); on the other batches it just ranks (a forward pass without gradients). It stays in
training mode throughout (BatchNorm on batch statistics), and its whitening stem is set from the training images
and frozen, bias included.

airbench96_faster trains the proxy first and stores its masks; the proxy never sees the big net, so computing each
mask when its batch comes, as here, gives the same masks on the same batches. Two choices differ:

- the proxy is this project's `airbench94` at a quarter width (conv groups of 16/64/64; airbench96_faster's proxy
  is 32/64/64, the same plain conv-pool-BN-GELU groups, two convs each, beside a 128/384/512 net). This net's head
  (logits / width) is tuned for Muon, so the proxy trains with the record recipe's Muon + Nesterov SGD at its rate
  0.24 (airbench94_muon; `training/optim.py`), decaying linearly to 0 over the fit, instead of airbench96's SGD.
- the net's loss is fastai's mean over the kept images (airbench96_faster sums them with a rate set per 1,024
  images, so its steps are half the size of full-batch ones at 0.5): the step keeps its size; `--lr` sets it.

The selection runs after progressive resizing (the proxy ranks the batch the net would see) and before random
erasing, adversarial attacks and MixUp/CutMix, which then work on the kept images only. Under torchrun each rank
ranks its own shard with its own proxy. The proxy and its optimizer are in the run's checkpoint, so `--resume`
ranks the next batches as the uninterrupted run would (on one process: the checkpoint is rank 0's, so under torchrun
every rank resumes with rank 0's proxy).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision

from ..models import get_arch
from ..models.cifar_resnet import PatchWhiten
from ..training.optim import MuonSGD, muon_groups
from .fast import whitening_images

PROXY_ARCH, PROXY_WIDTH = "airbench94", 0.25  # closest registered net to airbench96_faster's proxy (module docstring)
PROXY_LR = 0.24  # Muon's rate in the record recipe (airbench94_muon's), peak of a linear decay to 0
PROXY_EVERY = 4  # airbench96_faster: the proxy trains on every 4th batch and only ranks the others
LABEL_SMOOTHING = 0.2  # airbench96_faster's loss, the proxy's ranking included
WHITEN_IMAGES = 5000  # airbench: the whitening stem from 5,000 training images


class SelectHard(Callback):
    """Keep the `fraction` of each training batch with the highest loss under a small proxy net (airbench96_faster):
    `learn.xb`/`learn.yb` become those images (in batch order); the proxy trains alongside (module docstring)."""

    order = -1.5  # after ProgressiveResize (-2); before erasing, attacks, channels-last inputs (-1) and MixUp (0)

    def __init__(self, fraction: float, arch: str = PROXY_ARCH, width: float = PROXY_WIDTH, every: int = PROXY_EVERY):
        self.fraction, self.arch, self.width, self.every = fraction, arch, width, every
        self.proxy = None

    def before_fit(self):
        device = next(self.learn.model.parameters()).device
        # the proxy's random init must not move the run's random stream (its shuffles and augmentation)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            self.proxy = get_arch(self.arch).builder(n_out=len(self.dls.vocab), width=self.width).to(device).train()
        for m in self.proxy.modules():
            if isinstance(m, PatchWhiten) and m.bias is not None:
                m.bias.requires_grad_(False)  # airbench96_faster: the proxy's whitening bias never trains
        self.channels_last = any(isinstance(cb, ChannelsLast) for cb in self.learn.cbs)
        if self.channels_last:
            self.proxy.to(memory_format=torch.channels_last)
        bs = self.dls.train.bs
        self.proxy_opt = MuonSGD(muon_groups([list(self.proxy.parameters())], bs, PROXY_LR), lr=PROXY_LR)
        self.proxy_amp = self.proxy_scaler = None
        self.steps = self.proxy_steps = self.seen = self.kept = 0

    def before_train(self):
        # the run's autocast, made in MixedPrecision.before_fit (order 10: after this callback's before_fit)
        if self.proxy_scaler is None:
            mp = next((cb for cb in self.learn.cbs if isinstance(cb, MixedPrecision)), None)
            autocast = getattr(mp, "autocast", None) if mp is not None else None
            self.proxy_amp = None if autocast is None else (autocast.device, autocast.fast_dtype)
            # fp16 gradients need loss scaling, as the net's do (fastai's MixedPrecision); bf16 and fp32 do not
            fp16 = self.proxy_amp is not None and self.proxy_amp[1] == torch.float16
            self.proxy_scaler = torch.amp.GradScaler(self.proxy_amp[0] if self.proxy_amp else "cpu", enabled=fp16)
        layers = [m for m in self.proxy.modules() if isinstance(m, PatchWhiten) and not m.whitened]
        if not layers:
            return
        # the net's own whitened stem when it has one (WhitenInit ran first, order -10: the same 5,000 images)
        ref = next((m for m in self.learn.model.modules() if isinstance(m, PatchWhiten) and m.whitened), None)
        if ref is not None and all(layer.weight.shape == ref.weight.shape for layer in layers):
            with torch.no_grad():
                for layer in layers:
                    layer.weight.copy_(ref.weight)
                    layer.whitened.fill_(True)
                    layer.weight.requires_grad_(False)
        elif (images := whitening_images(self.dls.train, WHITEN_IMAGES)) is not None:
            for layer in layers:
                layer.whiten(images.to(layer.weight.device))

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(self.proxy_amp[0], dtype=self.proxy_amp[1]) if self.proxy_amp else contextlib.nullcontext()
        with amp:
            out = self.proxy(x)
        return F.cross_entropy(out.float(), y, label_smoothing=LABEL_SMOOTHING, reduction="none")

    def before_batch(self):
        if not self.training:
            return
        x, y = self.xb[0], self.yb[0]
        n = len(y)
        k = max(1, math.ceil(self.fraction * n - 1e-9))  # airbench96_faster: 512 of 1,024 at 0.5
        x_plain, y_plain = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)  # no fastai dispatch per op
        if self.steps % self.every == 0:  # a proxy step, on its own highest-loss images (airbench96_faster)
            losses = self._losses(x_plain, y_plain)
            keep = losses.detach().topk(k).indices
            for g in self.proxy_opt.param_groups:  # linear decay over the fit, as the record recipe's schedule
                g["lr"] = PROXY_LR * max(0.0, 1.0 - self.learn.pct_train)
            self.proxy_scaler.scale(losses[keep].sum() / n).backward()  # mean-loss rates (`muon_groups`): sum / batch
            self.proxy_scaler.step(self.proxy_opt)
            self.proxy_scaler.update()
            self.proxy_opt.zero_grad(set_to_none=True)
            self.proxy_steps += 1
        else:
            with torch.no_grad():
                keep = self._losses(x_plain, y_plain).topk(k).indices
        self.steps += 1
        keep = keep.sort().values  # batch order
        self.learn.xb = tuple(t[keep] for t in self.xb)
        self.learn.yb = tuple(t[keep] for t in self.yb)
        self.seen += n
        self.kept += k

    def resume_state(self) -> dict:  # checkpoint.run_records, after each epoch
        return {
            "proxy": {k: v.detach().cpu() for k, v in self.proxy.state_dict().items()},
            "opt": self.proxy_opt.state_dict(),
            "counts": [self.steps, self.proxy_steps, self.seen, self.kept],
        }

    def load_resume_state(self, state: dict) -> None:  # at the first resumed epoch, after before_fit built the proxy
        self.proxy.load_state_dict(state["proxy"])  # its whitened stem too: before_train leaves it as it is
        self.proxy_opt.load_state_dict(state["opt"])
        self.steps, self.proxy_steps, self.seen, self.kept = state["counts"]

    def after_fit(self):
        self.proxy = self.proxy_opt = None  # nothing of the proxy stays on the learner

    def summary(self) -> dict:
        """For metrics.json: how much of the training data the net trained on, and the proxy's share of the work."""
        return {
            "fraction": self.fraction,
            "proxy": f"{self.arch} at width {self.width:g}",
            "proxy_steps": self.proxy_steps,
            "images_ranked": self.seen,
            "images_trained": self.kept,
        }
