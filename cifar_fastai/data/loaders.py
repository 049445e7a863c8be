"""fastai DataLoaders for a config: the tensor cache (one index per batch) or a DataBlock from the files."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import IndexSplitter, parent_label
from fastai.vision.augment import Resize
from fastai.vision.data import ImageBlock
from PIL import Image

from ..config import TrainConfig
from ..errors import ConfigError, DataError
from .augment import PolicyAugment, augment_policy
from .images import CifarImage
from .index import NATIVE_SIZE, index_images, keep_classes, split_indices
from .sources import resolve_data
from .tensor_loader import TensorDataLoaders, TensorDL, TensorImageSet
from .transforms import batch_tfms_for, cifar_stats


# ------------------------------------------------------------------------------------------------- DataLoaders
@dataclass
class CifarData:
    """DataLoaders for training/validation, a labelled test DataLoader, and what a report needs to say about them."""

    dls: DataLoaders
    test_dl: object
    vocab: list[str]
    stats: tuple[list[float], list[float]]
    loader: str
    valid_is_test: bool
    n_train: int
    n_valid: int
    n_test: int
    bad: list[tuple[str, str]]
    root: Path
    example: Path  # one readable test image: export needs an item to build its inference pipeline


def get_data(cfg: TrainConfig, stats: tuple[list[float], list[float]] = cifar_stats, verbose: bool = True) -> CifarData:
    """Resolve `cfg.data`, check it, split it and build the DataLoaders the config asks for."""
    root = resolve_data(cfg.data)
    index = index_images(root, verbose=verbose)
    if index.bad and verbose:
        shown = "\n".join(f"  {p} ({why})" for p, why in index.bad[:10])
        more = f"\n  ... and {len(index.bad) - 10} more" if len(index.bad) > 10 else ""
        print(f"skipped {len(index.bad)} unreadable image file(s):\n{shown}{more}", flush=True)
    if cfg.classes:
        index = keep_classes(index, cfg.classes)
    train, valid, test = split_indices(index, cfg)
    if 0 < len(train) < cfg.bs:  # the training loader drops the last partial batch: it would train on nothing
        if verbose:
            print(f"--bs {cfg.bs} is more than the {len(train)} training images: using batches of {len(train)}", flush=True)
        cfg = cfg.replace(bs=len(train))
    loader = cfg.loader
    if loader == "auto":
        loader = "tensor" if index.images is not None else "datablock"
    if loader == "tensor" and index.images is None:
        raise DataError(f"--loader tensor needs images of one size; {root} has several: use --loader datablock")
    if cfg.alt_flip and loader != "tensor":
        raise ConfigError("--alt-flip needs the tensor loader (images of one size, --loader tensor or auto)")
    build = _tensor_dls if loader == "tensor" else _datablock_dls
    dls, test_dl = build(index, train, valid, test, cfg, stats)
    return CifarData(
        dls, test_dl, index.vocab, stats, loader, cfg.valid == "test", len(train), len(valid), len(test), index.bad, root,
        index.files[test[0]],
    )


def default_workers(loader: str, cfg: TrainConfig | None = None) -> int:
    """Workers that suit the loader and the device `cfg` resolves to (see `hardware.default_workers`)."""
    from ..training import hardware

    return hardware.default_workers(loader, hardware.resolve_device(cfg.device if cfg else "cpu").type)


def _tensor_dls(index, train, valid, test, cfg, stats):
    images = torch.from_numpy(index.images).permute(0, 3, 1, 2)  # NCHW view of the NHWC cache, no copy
    labels = torch.from_numpy(index.labels.astype(np.int64))
    workers = cfg.workers if cfg.workers is not None else default_workers("tensor", cfg)
    policy = augment_policy(cfg.augment)  # every loader carries it; only the training split (split_idx 0) uses it

    def dl(idx, split_idx, train_mode):
        ds = TensorImageSet(images, labels, idx, index.vocab, split_idx, index.files)
        alternate = cfg.alt_flip and train_mode  # the loader mirrors, PadCropFlip only crops
        return TensorDL(
            ds,
            alt_flip_seed=cfg.seed if alternate else None,
            policy=policy,
            bs=cfg.bs,
            shuffle=train_mode,
            drop_last=train_mode,
            after_batch=batch_tfms_for(cfg.size, stats, pad=cfg.crop_pad, flip=cfg.flip and not alternate),
            num_workers=workers,
        )

    dls = TensorDataLoaders(dl(train, 0, True), dl(valid, 1, False))  # its test_dl takes files, as a DataBlock's
    return dls, dl(test, 1, False)


def datablock(vocab: list[str], valid_idx, size: int, stats, pad: int = 4, augment: str = "none", flip: bool = True) -> DataBlock:
    """The general fastai path: any folder of images, each prepared as the demo prepares an upload (`CifarImage`:
    RGB, centre square, 32 px), then the same batch transforms; `augment`: the `--augment` policy per training item."""
    return DataBlock(
        blocks=(ImageBlock(cls=CifarImage), CategoryBlock(vocab=vocab)),
        get_y=parent_label,
        splitter=IndexSplitter(valid_idx),
        item_tfms=[Resize(NATIVE_SIZE)] + ([PolicyAugment(augment)] if augment != "none" else []),
        batch_tfms=batch_tfms_for(size, stats, pad=pad, flip=flip),
    )


def _datablock_dls(index, train, valid, test, cfg, stats):
    items = [index.files[i] for i in np.concatenate([train, valid])]
    valid_pos = list(range(len(train), len(train) + len(valid)))
    workers = cfg.workers if cfg.workers is not None else default_workers("datablock", cfg)
    dls = datablock(index.vocab, valid_pos, cfg.size, stats, cfg.crop_pad, cfg.augment, cfg.flip).dataloaders(
        items, bs=cfg.bs, num_workers=workers
    )
    test_dl = dls.test_dl([index.files[i] for i in test], with_labels=True)
    return dls, test_dl


def inference_dls(vocab: list[str], size: int, stats, example: Path) -> DataLoaders:
    """DataBlock DataLoaders carrying only the inference pipeline: what `export.pkl` ships for `learn.predict(path)`."""
    return datablock(vocab, [], size, stats).dataloaders([example, example], bs=2, num_workers=0)


def blank_inference_dls(vocab: list[str], size: int, stats) -> DataLoaders:
    """`inference_dls` without a data set: the DataBlock reads one item while it sets itself up, and a blank image in
    a folder named after the first class does (nothing reads it again); for `TensorDataLoaders.test_dl`."""
    with tempfile.TemporaryDirectory(prefix="cifar_fastai_inference_") as tmp:
        example = Path(tmp) / str(vocab[0]) / "blank.png"
        example.parent.mkdir()
        Image.new("RGB", (NATIVE_SIZE, NATIVE_SIZE)).save(example)
        return inference_dls(list(vocab), size, stats, example)
