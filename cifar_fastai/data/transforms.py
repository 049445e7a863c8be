"""Batch transforms for CIFAR: reflect-pad random crop + flip on uint8 batches (train only), resize, normalize."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage
from fastai.vision.core import imagenet_stats
from fasttransform import Transform

# CIFAR-10 channel statistics, as fastai ships them (fastai.vision.data.cifar_stats).
cifar_stats = ([0.491, 0.482, 0.447], [0.247, 0.243, 0.261])


__all__ = ["BatchResize", "PadCropFlip", "batch_tfms_for", "cifar_stats", "imagenet_stats", "random_erase"]


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


def batch_tfms_for(size: int, stats, augment: bool = True, pad: int = 4, flip: bool = True) -> list[Transform]:
    """The batch pipeline shared by the DataBlock and the tensor loader, so both give the same inputs.
    `flip=False`: no random mirror (--no-flip, or the tensor loader mirrors images itself: its alternating flip)."""
    tfms: list[Transform] = [IntToFloatTensor(), Normalize.from_stats(*stats, cuda=False)]
    if augment:
        tfms.insert(0, PadCropFlip(pad=pad, flip=flip))
    if size != 32:
        tfms.append(BatchResize(size))
    return tfms


def random_erase(x: torch.Tensor, p: float = 0.5, max_area: float = 0.3, min_aspect: float = 0.3) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017) per image of a normalized float batch: a N(0,1) noise rectangle.

    fastai's `RandomErasing` erases one rectangle shared by the whole batch (and the whole batch or none of it), fine
    for item transforms but not for our whole-batch loaders; this draws `p`, area and position for each image.
    Area in [0.02, max_area] of the image (0.02: the paper's s_l), aspect in [min_aspect, 1/min_aspect] (paper: 0.3).
    """
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(min(0.02, max_area), max_area) * h * w
    log_r = torch.empty(b, device=dev).uniform_(math.log(min_aspect), -math.log(min_aspect))
    eh = (area * log_r.exp()).sqrt().round().clamp(1, h).long()
    ew = (area / log_r.exp()).sqrt().round().clamp(1, w).long()
    top = (torch.rand(b, device=dev) * (h - eh + 1)).long()
    left = (torch.rand(b, device=dev) * (w - ew + 1)).long()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + eh)[:, None])  # (B, H)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + ew)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & (torch.rand(b, 1, 1, device=dev) < p)  # (B, H, W)
    return torch.where(mask[:, None], torch.randn_like(x), x)


def input_spec(dls) -> dict:
    """Vocab, normalization and input size of a learner's DataLoaders, read back from their batch transforms: what
    a model expects, for export and deployment."""
    fs = dls.after_batch.fs
    norm = next(t for t in fs if isinstance(t, Normalize))
    return {
        "vocab": [str(v) for v in dls.vocab],
        "mean": norm.mean.flatten().tolist(),
        "std": norm.std.flatten().tolist(),
        "input_size": input_size(dls),
    }


def input_size(dls) -> int:
    """The size a learner's batches are resized to (`BatchResize`), or CIFAR's 32 px when they are not."""
    sizes = [t.size for t in dls.after_batch.fs if isinstance(t, BatchResize)]
    return sizes[0] if sizes else 32
