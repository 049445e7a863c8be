"""`--augment`: torchvision's v2 augmentation policies (TrivialAugmentWide, RandAugment, AugMix) per training image."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from fastai.torch_core import TensorImage
from fasttransform import Transform
from torchvision.transforms import v2

# torchvision's own defaults for each policy (those of its papers and of its classification references)
POLICIES = {"trivial": v2.TrivialAugmentWide, "rand": v2.RandAugment, "augmix": v2.AugMix}


def augment_policy(name: str) -> v2.Transform | None:
    """The v2 transform `--augment NAME` names; None for 'none'."""
    return None if name == "none" else POLICIES[name]()


@contextmanager
def one_thread():
    """Intra-op threads down to one for a block: an op on one small image is too short to split, and splitting it
    makes every call wait on the other cores (measured: many times slower on a busy 2-core CPU)."""
    threads = torch.get_num_threads()
    if threads == 1:  # already (DataLoader workers, or the DataBlock path's item after item): nothing to switch
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def apply_per_image(policy: v2.Transform, x: torch.Tensor) -> torch.Tensor:
    """The policy on each image of a uint8 (N, C, H, W) batch. A policy draws its op and magnitude once per call:
    called on the batch it would give every image the same op, so it is called image by image. It draws from the
    global torch RNG, which `set_seed` seeds (and fastai's workers seed from it): the draws are reproducible."""
    with one_thread():
        return torch.stack([policy(img) for img in x.as_subclass(torch.Tensor)])


class PolicyAugment(Transform):
    """The policy as an item transform of the DataBlock path, on the uint8 CHW tensor `ToTensor` makes (as the
    tensor loader's cache holds it, so both loaders augment the same pixels the same way)."""

    split_idx, order = 0, 6  # training items only; after ToTensor (5), before the batch's IntToFloatTensor

    def __init__(self, name: str):
        super().__init__()
        self.policy_name, self.policy = name, augment_policy(name)  # Transform.name is fastai's own property

    def encodes(self, x: TensorImage) -> TensorImage:
        with one_thread():
            return TensorImage(self.policy(x.as_subclass(torch.Tensor)))
