"""Scan and decode a CIFAR-layout folder once (a uint8 cache), and split it honestly: train, hold-out or folds, test."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastai.data.transforms import RandomSplitter, image_extensions
from PIL import Image

from ..config import TrainConfig
from ..errors import DataError
from .sources import cache_dir

NATIVE_SIZE = 32  # CIFAR images are 32x32; the DataBlock path resizes anything else to this first


READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------ scanning and decoding
@dataclass
class ImageIndex:
    """Every readable image under train/ and test/, its label index, and the files that could not be read."""

    root: Path
    vocab: list[str]
    files: list[Path]
    labels: np.ndarray
    is_test: np.ndarray
    images: np.ndarray | None  # uint8 (N, H, W, 3) when all images share one size, else None
    bad: list[tuple[str, str]] = field(default_factory=list)

    def split(self, test: bool) -> np.ndarray:
        return np.flatnonzero(self.is_test == test)


def list_images(root: Path) -> tuple[list[str], list[Path], list[int], list[bool]]:
    train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not train_classes:
        raise DataError(f"{root}/train has no class folders: expected train/<class>/*.jpg")
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    if set(test_classes) - set(train_classes):
        raise DataError(f"{root}/test has classes not in train/: {sorted(set(test_classes) - set(train_classes))}")
    files, labels, is_test = [], [], []
    exts = {e.lower() for e in image_extensions}
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for cls in classes:
            found = sorted(p for p in (root / split / cls).iterdir() if p.suffix.lower() in exts)
            files += found
            labels += [train_classes.index(cls)] * len(found)
            is_test += [split == "test"] * len(found)
    if not any(not t for t in is_test):
        raise DataError(f"{root}/train/<class>/ holds no images ({', '.join(sorted(exts)[:6])}, ...)")
    if not any(is_test):
        raise DataError(f"{root}/test/<class>/ holds no images: the test set is needed for the final evaluation")
    return train_classes, files, labels, is_test


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def index_images(root: Path, verbose: bool = True) -> ImageIndex:
    """Decode every image once (finding the corrupt ones) into a uint8 array cached beside the other caches."""
    vocab, files, labels, is_test = list_images(root)
    stamp = f"{root.resolve()}:{len(files)}:{max(f.stat().st_mtime_ns for f in files)}"
    key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    cache = cache_dir() / "decoded" / f"{key}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                keep = z["keep"]
                images = z["images"] if z["images"].ndim == 4 else None
                bad = [tuple(b.split("\t", 1)) for b in z["bad"].tolist()]
            return _index(root, vocab, files, labels, is_test, keep, images, bad)
        except (OSError, KeyError, ValueError):
            cache.unlink(missing_ok=True)  # a broken cache is rebuilt, never trusted
    if verbose and len(files) > 5000:
        print(f"decoding {len(files):,} images once into {cache} ...", flush=True)
    arrays, keep, bad = [], [], []
    for i, f in enumerate(files):
        try:
            arrays.append(read_rgb(f))
            keep.append(i)
        except READ_ERRORS as e:
            bad.append((str(f), f"{type(e).__name__}: {e}"))
    shapes = {a.shape for a in arrays}
    images = np.stack(arrays) if len(shapes) == 1 else None
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: two runs may decode the same data at once
    np.savez(
        tmp,
        keep=np.array(keep, dtype=np.int64),
        images=images if images is not None else np.zeros(0, np.uint8),
        bad=np.array(["\t".join(b) for b in bad], dtype=str),
    )
    tmp.replace(cache)  # atomic: an interrupted decode leaves no half-written cache
    return _index(root, vocab, files, labels, is_test, np.array(keep, dtype=np.int64), images, bad)


def _index(root, vocab, files, labels, is_test, keep, images, bad) -> ImageIndex:
    return ImageIndex(
        root=root,
        vocab=vocab,
        files=[files[i] for i in keep],
        labels=np.asarray(labels)[keep],
        is_test=np.asarray(is_test)[keep],
        images=images,
        bad=[tuple(b) for b in bad],
    )


def split_indices(index: ImageIndex, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) positions into `index.files`; the hold-out is seeded and drawn from training images only."""
    train_pool, test = index.split(False), index.split(True)
    if cfg.valid == "test":
        train, valid = train_pool, test
    elif cfg.folds:  # k-fold cross-validation: seeded folds of the training images, fold `cfg.fold` held out
        if cfg.folds < 2 or not 0 <= cfg.fold < cfg.folds or cfg.folds > len(train_pool):
            raise DataError(
                f"--folds {cfg.folds} --fold {cfg.fold}: need 2 <= folds <= {len(train_pool)} and 0 <= fold < folds"
            )
        va = np.array_split(np.random.default_rng(cfg.seed).permutation(len(train_pool)), cfg.folds)[cfg.fold]
        train, valid = np.delete(train_pool, va), train_pool[np.sort(va)]
    else:
        tr, va = RandomSplitter(valid_pct=cfg.valid_pct, seed=cfg.seed)(train_pool)
        train, valid = train_pool[np.sort(np.asarray(tr))], train_pool[np.sort(np.asarray(va))]
    if cfg.train_per_class:
        train = per_class_subset(train, index.labels, cfg.train_per_class, cfg.seed)
    return train, valid, test


def per_class_subset(positions: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most `n` positions per class, drawn with `seed` (after the hold-out, so validation is unchanged)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(positions[labels[positions] == c])[:n] for c in np.unique(labels[positions])]
    return np.sort(np.concatenate(keep))


def keep_classes(index: ImageIndex, classes: str) -> ImageIndex:
    """Only the named classes (`--classes cat,dog`), in train and test, labels re-indexed in the dataset's order."""
    wanted = {c.strip() for c in classes.split(",") if c.strip()}
    unknown = sorted(wanted - set(index.vocab))
    if unknown:
        raise DataError(f"--classes: {', '.join(unknown)} not in the data; its classes are {', '.join(index.vocab)}")
    if len(wanted) < 2:
        raise DataError("--classes: name at least 2 classes (a classifier needs two)")
    vocab = [c for c in index.vocab if c in wanted]  # dataset order: the same vocab however the list is typed
    old = np.array([index.vocab.index(c) for c in vocab])
    keep = np.flatnonzero(np.isin(index.labels, old))
    relabel = np.full(len(index.vocab), -1)
    relabel[old] = np.arange(len(vocab))
    return dataclasses.replace(
        index,
        vocab=vocab,
        files=[index.files[i] for i in keep],
        labels=relabel[index.labels[keep]],
        is_test=index.is_test[keep],
        images=None if index.images is None else index.images[keep],
    )
