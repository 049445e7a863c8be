"""A fastai DataLoader that makes each batch with one index into a uint8 image tensor (no per-item Python work)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import Category, CategoryMap
from fastai.torch_core import TensorCategory, TensorImage
from fastcore.foundation import L

from .augment import apply_per_image


class TensorImageSet:
    """The dataset of a `TensorDL`: positions into a shared image tensor, plus the fastai attributes it needs.

    `files` (optional): the file of each position of the tensor, so `items` names the files as a DataBlock's do."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        idx: np.ndarray,
        vocab: list[str],
        split_idx: int,
        files: list[Path] | None = None,
    ):
        self.images, self.labels = images, labels
        self.idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        self.vocab, self.split_idx, self.files = vocab, split_idx, files

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> int:
        return i

    @property
    def items(self) -> L:
        """The set's items as fastai's `Interpretation` reads them back through `dls.test_dl(items, with_labels=True)`
        (`plot_top_losses`, `top_losses(items=True)`): the image files when known, else positions into the tensor."""
        pos = self.idx.tolist()
        return L(pos) if self.files is None else L(self.files[i] for i in pos)

    def at(self, positions, split_idx: int = 1) -> TensorImageSet:
        """The same tensor, other positions into it (`TensorDataLoaders.test_dl` of positions)."""
        return TensorImageSet(self.images, self.labels, np.asarray(positions), self.vocab, split_idx, self.files)

    def new_empty(self) -> TensorImageSet:
        """No images, same classes: what `learn.export()` keeps of the data (fastai's `Datasets.new_empty`)."""
        return TensorImageSet(self.images[:0].clone(), self.labels[:0].clone(), np.zeros(0), self.vocab, self.split_idx)

    def decode(self, o: tuple, full: bool = True) -> tuple:
        """A decoded sample -> (image, label), as a DataBlock's `Datasets.decode`: fastai's batch pipeline has already
        undone `Normalize` and `IntToFloatTensor` (an un-normalized RGB `TensorImage`, 0-255, CHW); every element
        after the image is a class index (target or prediction) and becomes its `Category`, which shows as a title."""
        x, *ys = o
        return (x, *(Category(self.vocab[int(y)]) for y in ys))

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

    def __init__(self, dataset: TensorImageSet, alt_flip_seed: int | None = None, policy=None, **kwargs):
        # fastai's own type, as a DataBlock's `dls.vocab`: `ClassificationInterpretation` takes a plain list for the
        # vocab of several targets and would keep only its last class
        self.vocab = CategoryMap(list(dataset.vocab), sort=False)
        # alternating flip (airbench94, Jordan 2024 sec. 3.6): a seeded half of the images is mirrored in
        # even epochs and the other half in odd ones (`flip_phase`, set each epoch by recipes.AlternateFlip), so every
        # image is seen both ways within two epochs instead of at random
        self.flip_bits, self.alt_flip_seed = None, alt_flip_seed
        if alt_flip_seed is not None:
            gen = torch.Generator().manual_seed(alt_flip_seed)
            self.flip_bits = torch.randint(0, 2, (len(dataset.images),), generator=gen).bool()
        self.flip_phase = 0
        self.policy = policy  # `--augment`: a torchvision v2 policy, applied per image to training batches
        super().__init__(dataset, **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):
        """fastai's `new` (same transforms and settings), keeping the alternating flip unless told otherwise."""
        if cls is None or issubclass(cls, TensorDL):
            kwargs.setdefault("alt_flip_seed", self.alt_flip_seed)
            kwargs.setdefault("policy", self.policy)
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
        # the policy runs here, not as a batch transform: create_batch runs on the CPU (in the workers, when there are
        # any) before the batch moves to the device, where per-image calls on tiny images would each be a kernel
        # launch; and on uint8, before IntToFloatTensor, as the policies expect. Training split only, as PadCropFlip
        if self.policy is not None and getattr(self.dataset, "split_idx", None) == 0:
            x = apply_per_image(self.policy, x)
        return TensorImage(x), TensorCategory(self.dataset.labels[pos])

    def retain(self, res, b):
        return res

    @property
    def c(self) -> int:
        return len(self.vocab)


class TensorDataLoaders(DataLoaders):
    """`DataLoaders` of `TensorDL`s whose `test_dl` takes what a DataBlock's takes: files (or PIL images, bytes)
    go through the inference DataBlock (`CifarImage`, as `learn.predict(path)` and the demo prepare an upload) with
    these loaders' normalization and size, on their device; positions into the image tensor give a `TensorDL`."""

    def test_dl(self, test_items, rm_type_tfms=None, with_labels: bool = False, **kwargs):
        items = list(test_items)
        kwargs.setdefault("bs", self.valid.bs)
        ds = self.valid.dataset
        if items and isinstance(ds, TensorImageSet) and all(isinstance(o, (int, np.integer)) for o in items):
            kwargs.pop("process", None)  # `Interpretation` passes it, for tabular data
            return self.valid.new(ds.at(items), shuffle=False, drop_last=False, **kwargs)
        dl = self.inference_dls().test_dl(items, rm_type_tfms=rm_type_tfms, with_labels=with_labels, **kwargs)
        dl.to(self.valid.device or torch.device("cpu"))  # TfmdDL.to returns None
        return dl

    def inference_dls(self) -> DataLoaders:
        """The DataBlock inference pipeline for these loaders' classes, normalization and current input size."""
        from .loaders import blank_inference_dls
        from .transforms import input_spec

        spec = input_spec(self)
        key = (tuple(spec["vocab"]), spec["input_size"], tuple(spec["mean"]), tuple(spec["std"]))
        cache = self.__dict__.setdefault("_inference", {})
        if key not in cache:
            cache.clear()
            cache[key] = blank_inference_dls(spec["vocab"], spec["input_size"], (spec["mean"], spec["std"]))
        return cache[key]
