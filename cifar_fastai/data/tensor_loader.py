"""A fastai DataLoader that makes each batch with one index into a uint8 image tensor (no per-item Python work)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory, TensorImage


class TensorImageSet:
    """The dataset of a `TensorDL`: positions into a shared image tensor, plus the fastai attributes it needs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, vocab: list[str], split_idx: int):
        self.images, self.labels = images, labels
        self.idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        self.vocab, self.split_idx = vocab, split_idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> int:
        return i

    @contextmanager
    def set_split_idx(self, i: int):
        """Like fastai's `Datasets.set_split_idx`: `learn.tta` uses it to run the training augmentation on any set."""
        old, self.split_idx = self.split_idx, i
        try:
            yield self
        finally:
            self.split_idx = old


class TensorDL(TfmdDL):
    """`TfmdDL` whose items are indices and whose `create_batch` gathers them: batch transforms run as usual."""

    def __init__(self, dataset: TensorImageSet, alt_flip_seed: int | None = None, **kwargs):
        self.vocab = dataset.vocab
        # alternating flip (airbench94, Jordan 2024 sec. 3.6): a seeded half of the images is mirrored in
        # even epochs and the other half in odd ones (`flip_phase`, set each epoch by recipes.AlternateFlip), so every
        # image is seen both ways within two epochs instead of at random
        self.flip_bits, self.alt_flip_seed = None, alt_flip_seed
        if alt_flip_seed is not None:
            gen = torch.Generator().manual_seed(alt_flip_seed)
            self.flip_bits = torch.randint(0, 2, (len(dataset.images),), generator=gen).bool()
        self.flip_phase = 0
        super().__init__(dataset, **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):
        """fastai's `new` (same transforms and settings), keeping the alternating flip unless told otherwise."""
        if cls is None or issubclass(cls, TensorDL):
            kwargs.setdefault("alt_flip_seed", self.alt_flip_seed)
        res = super().new(dataset, cls, **kwargs)
        if getattr(res, "flip_bits", None) is not None:
            res.flip_phase = self.flip_phase
        return res

    def create_item(self, s):
        return 0 if s is None else s

    def create_batch(self, b):
        pos = self.dataset.idx[torch.as_tensor(b, dtype=torch.int64)]
        x = self.dataset.images[pos]
        if self.flip_bits is not None:
            mirror = self.flip_bits[pos] ^ bool(self.flip_phase)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return TensorImage(x), TensorCategory(self.dataset.labels[pos])

    def retain(self, res, b):
        return res

    @property
    def c(self) -> int:
        return len(self.vocab)
