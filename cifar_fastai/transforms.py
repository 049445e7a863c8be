"""Batch transforms for CIFAR: reflect-pad random crop + flip on uint8 batches (train only), resize, normalize."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage
from fastai.vision.core import imagenet_stats
from fasttransform import Transform

# CIFAR-10 channel statistics, as fastai ships them (fastai.vision.data.cifar_stats).
cifar_stats = ([0.491, 0.482, 0.447], [0.247, 0.243, 0.261])
__all__ = ["PadCropFlip", "BatchResize", "batch_tfms_for", "cifar_stats", "imagenet_stats"]


def reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect out-of-range indices back into [0, n): the index form of `F.pad(mode='reflect')`."""
    idx = idx.abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


class PadCropFlip(Transform):
    """CIFAR's standard augmentation (He et al. 2015): pad 4 (reflect), random 32x32 crop, horizontal flip.

    Done for the whole batch with one gather on the uint8 tensor, before `IntToFloatTensor` (order 10): no padded
    copy is made and the float conversion then touches each pixel once (airbench does the same on GPU).
    """

    split_idx, order = 0, 5  # training batches only

    def __init__(self, pad: int = 4, flip: bool = True):
        super().__init__()
        self.pad, self.flip = pad, flip

    def encodes(self, x: TensorImage) -> TensorImage:
        b, _, h, w = x.shape
        dev = x.device
        dy = torch.randint(-self.pad, self.pad + 1, (b, 1), device=dev)
        dx = torch.randint(-self.pad, self.pad + 1, (b, 1), device=dev)
        rows = reflect(torch.arange(h, device=dev) + dy, h)
        cols = reflect(torch.arange(w, device=dev) + dx, w)
        if self.flip:
            flipped = torch.rand(b, 1, device=dev) < 0.5
            cols = torch.where(flipped, cols.flip(-1), cols)
        out = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return TensorImage(out.permute(0, 3, 1, 2))


class BatchResize(Transform):
    """Resize float batches on the fly (bilinear), e.g. 32 -> 224 for ImageNet-pretrained models."""

    order = 15  # after IntToFloatTensor, before Normalize

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def encodes(self, x: TensorImage) -> TensorImage:
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        return TensorImage(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False))


def batch_tfms_for(size: int, stats, augment: bool = True, pad: int = 4) -> list[Transform]:
    """The batch pipeline shared by the DataBlock and the tensor loader, so both give the same inputs."""
    tfms: list[Transform] = [IntToFloatTensor(), Normalize.from_stats(*stats, cuda=False)]
    if augment:
        tfms.insert(0, PadCropFlip(pad=pad))
    if size != 32:
        tfms.append(BatchResize(size))
    return tfms
