"""The fast recipes' callbacks: whitening stem, alternating flip, progressive resizing, lookahead weight averaging."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

from ..training import distributed
from ..training.recipes import progressive_size


class WhitenInit(Callback):
    """When training starts, set every not yet whitened `PatchWhiten` layer from up to `n` training images (frozen);
    after `bias_epochs` epochs freeze its bias too.

    airbench94 (Jordan 2024) computes its first layer from 5,000 training images the same way; Page 2018 ("How to
    train your ResNet 8") reports the whitened stem as a few tenths of a percent at short budgets. airbench94_muon
    trains the whitening bias for its first 3 epochs only: once the stem is frozen whole, backpropagation stops at
    the first conv group and skips the gradient of its input (the largest feature map), so the epochs after it
    run faster. A research variant in the airbench repository that
    never freezes the bias scores the same (94.01%), so this is for speed. Under torchrun the bias keeps training
    (DDP expects the same parameters to get gradients at every step)."""

    order = -10  # before the first training batch; prediction (get_preds) never triggers it

    def __init__(self, n: int = 5000, bias_epochs: int = 3):
        self.n, self.bias_epochs = n, bias_epochs

    def _layers(self):
        from ..models.cifar_resnet import PatchWhiten

        return [m for m in self.learn.model.modules() if isinstance(m, PatchWhiten)]

    def before_epoch(self):  # also right for a resumed run: epoch parity with the uninterrupted one
        train_bias = self.epoch < self.bias_epochs or distributed.is_distributed()
        for layer in self._layers():
            if layer.bias is not None and layer.bias.requires_grad != train_bias:
                layer.bias.requires_grad_(train_bias)
                layer.bias.grad = None  # the optimizer skips a parameter without a gradient

    def after_fit(self):  # the model leaves the fit (export, a later fit) with its bias trainable, as it came
        for layer in self._layers():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)

    def before_train(self):
        # a layer loaded from a checkpoint, a run folder or an earlier fit carries whitened=True
        layers = [m for m in self._layers() if not m.whitened]
        if not layers:
            return
        images = whitening_images(self.learn.dls.train, self.n)
        if images is None:  # no training images at all: the layer stays an ordinary trainable conv
            return
        for layer in layers:
            layer.whiten(images.to(layer.weight.device))


@torch.no_grad()
def whitening_images(dl, n: int) -> torch.Tensor | None:
    """Up to `n` training images (normalized, on the CPU) to whiten a `PatchWhiten` from: unshuffled and never
    mirrored (airbench whitens the plain images), even if fewer than a batch; None if there are none."""
    xs, count = [], 0
    plain = {"alt_flip_seed": None} if getattr(dl, "flip_bits", None) is not None else {}
    if getattr(dl, "policy", None) is not None:  # nor --augment's policy: it would also draw from the run's RNG
        plain["policy"] = None
    for xb, *_ in dl.new(shuffle=False, drop_last=False, **plain):
        xs.append(torch.as_tensor(xb).float().cpu())
        count += len(xs[-1])
        if count >= n:
            break
    return torch.cat(xs)[:n] if xs else None


class AlternateFlip(Callback):
    """Before each epoch, tell the tensor loader which half of the images to mirror: epoch parity, so a resumed run
    flips as the uninterrupted one would (`--alt-flip`; airbench94's alternating flip, Jordan 2024 sec. 3.6)."""

    def before_epoch(self):
        dl = self.dls.train
        dl = getattr(dl, "dl", dl)  # under torchrun fastai wraps the loader in a DistributedDL
        if getattr(dl, "flip_bits", None) is not None:
            dl.flip_phase = self.epoch % 2


class ProgressiveResize(Callback):
    """`--progressive N`: train the early epochs on batches downscaled to N px, growing by 4 px per stage to the full
    size (the last stage, and validation, test and export, stay at full size); `shares`: the stages' relative
    lengths (`progressive_size`; `--progressive-shares`), equal by default.

    Progressive resizing: fast.ai's DAWNBench ImageNet entry (Howard et al. 2018, "Now anyone can train Imagenet in
    18 minutes") and EfficientNetV2's progressive learning (Tan & Le 2021, sec. 4). On this CPU an epoch of
    `airbench_resnet` at 20 px takes about 40% of one at 32 px (module docstring), so a budget buys more epochs. The
    resize is one antialiased bilinear `F.interpolate` of the whole augmented batch (its memory layout kept).
    """

    order = -2  # after the loader's batch transforms; before attacks, random erasing and MixUp/CutMix (orders -1, 0)

    def __init__(self, start: int, full: int, shares: tuple[float, ...] = ()):
        self.start, self.full, self.shares = start, full, shares

    def before_train(self):  # once per epoch, not per batch
        # a time budget that ends the run with part of an epoch spreads the stages over the whole ones
        # (training/budget.py); the part, like every epoch past them, trains at full size
        n = getattr(self.learn, "size_epochs", None) or self.n_epoch
        self.size = progressive_size(self.epoch, n, self.start, self.full, shares=self.shares)

    def before_batch(self):
        if not self.training:
            return
        size, x = self.size, self.learn.xb[0]
        if size >= x.shape[-1]:
            return
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        small = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        self.learn.xb = (small.contiguous(memory_format=fmt), *self.learn.xb[1:])


class Lookahead(Callback):
    """`--lookahead`: airbench94's weight averaging (Jordan 2024, airbench94.py `LookaheadState`): from 30% of the
    training on, every ~5,120 images an exponential moving average of the weights and BatchNorm statistics takes a
    step towards the net, and the net is set to the average (as the Lookahead optimizer does: Zhang et al. 2019); at
    the end of each training epoch the net takes the average, so validation, checkpoints and export see it.

    The decay warms up as in airbench94: 0.95 ** 5 * (progress ** 3), so early updates follow the net and late ones
    average strongly. airbench94 steps every 5 batches of 1,024 images from epoch 3 of 9.9; here the interval is
    in images, so it does not depend on the batch size.
    """

    order = 1  # after the optimizer step and fastai's iteration count (TrainEvalCallback.after_batch, order -10)

    def __init__(self, every_images: int = 5 * 1024, start: float = 3 / 9.9, base: float = 0.95**5, power: float = 3.0):
        self.every_images, self.start, self.base, self.power = every_images, start, base, power

    def before_fit(self):
        self.ema, self.seen = None, 0

    def _pairs(self):
        for k, v in self.learn.model.state_dict().items():
            if v.is_floating_point():
                yield k, v

    @torch.no_grad()
    def after_batch(self):
        if not self.training or self.learn.pct_train < self.start:
            return
        self.seen += len(self.learn.yb[0])
        if self.seen < self.every_images:
            return
        self.seen = 0
        if self.ema is None:  # airbench94: the first update only takes a copy
            self.ema = {k: v.detach().clone() for k, v in self._pairs()}
            return
        self._update(self.base * self.learn.pct_train**self.power)

    def _update(self, decay: float) -> None:
        for k, v in self._pairs():
            self.ema[k].lerp_(v, 1 - decay)
            v.copy_(self.ema[k])

    @torch.no_grad()
    def after_train(self):  # before validation and the epoch's checkpoint
        if self.ema is not None:
            self._update(1.0)
