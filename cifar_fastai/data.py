"""CIFAR-layout data: find it, check it, split it honestly, and build fastai DataLoaders (DataBlock or tensor cache)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import IndexSplitter, RandomSplitter, image_extensions, parent_label
from fastai.vision.augment import Resize
from fastai.vision.data import ImageBlock
from PIL import Image

from .config import TrainConfig
from .errors import ConfigError, DataError
from .tensor_loader import TensorDL, TensorImageSet
from .transforms import batch_tfms_for, cifar_stats

SAMPLE_DIR = Path(__file__).parent / "sample" / "cifar10_sample"
NATIVE_SIZE = 32  # CIFAR images are 32x32; the DataBlock path resizes anything else to this first
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def cache_dir() -> Path:
    """Where unpacked archives and decoded image caches live (override with CIFAR_FASTAI_CACHE)."""
    root = os.environ.get("CIFAR_FASTAI_CACHE") or Path.home() / ".cache" / "cifar_fastai"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------- finding the data
def resolve_data(spec: str) -> Path:
    """Turn `--data` into a folder holding `train/<class>/*` and `test/<class>/*`."""
    if spec == "sample":
        return SAMPLE_DIR
    if spec == "cifar10":
        return download_cifar10()
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"--data {spec}: no such file or folder. Expected 'sample', 'cifar10', a CIFAR-layout folder "
            "(train/<class>/*.jpg, test/<class>/*.jpg) or a .tgz of one"
        )
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"--data {spec}: a file, but not an archive ({', '.join(ARCHIVE_SUFFIXES)}) of a CIFAR-layout folder")
        path = unpack_archive(path)
    return find_root(path, spec)


def find_root(path: Path, spec: str) -> Path:
    """The folder itself, or the single subfolder (e.g. `cifar10/`) that holds `train/` and `test/`."""
    candidates = [path] + sorted(p for p in path.iterdir() if p.is_dir())
    for cand in candidates:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise DataError(
        f"--data {spec}: expected a CIFAR-layout folder with train/<class>/*.jpg and test/<class>/*.jpg "
        f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'})"
    )


def unpack_archive(archive: Path) -> Path:
    """Unpack once into the cache (keyed by path, size and mtime) and reuse; a temp dir + rename keeps it atomic."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / "unpacked" / f"{archive.name.split('.')[0]}-{key}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpacking-"))
    print(f"unpacking {archive} into {dest} (once)", flush=True)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")  # 'data' filter: no absolute paths or links out of the folder
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # not another process that unpacked the same archive first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"--data {archive}: cannot unpack the archive ({e})") from e
    return dest


def download_cifar10() -> Path:
    """fastai's `untar_data(URLs.CIFAR)`; offline it fails fast (3 s) with one line naming `--data PATH`."""
    from fastai.data.external import URLs, fastai_path, untar_data

    cached = fastai_path("data") / "cifar10"
    if (cached / "train").is_dir():
        return cached
    try:
        socket.create_connection(("s3.amazonaws.com", 443), timeout=3).close()
    except OSError as e:
        raise DataError(
            "cannot download CIFAR-10 (no network?): pass --data PATH with a local CIFAR-layout folder or .tgz, "
            "or --data sample for the shipped sample"
        ) from e
    return Path(untar_data(URLs.CIFAR))


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


def split_indices(index: ImageIndex, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) positions into `index.files`; the hold-out is seeded and drawn from training images only."""
    train_pool, test = index.split(False), index.split(True)
    if cfg.valid == "test":
        train, valid = train_pool, test
    elif cfg.folds:  # k-fold cross-validation (issue 7): seeded folds of the training images, fold `cfg.fold` held out
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
    from . import hardware

    return hardware.default_workers(loader, hardware.resolve_device(cfg.device if cfg else "cpu").type)


def _tensor_dls(index, train, valid, test, cfg, stats):
    images = torch.from_numpy(index.images).permute(0, 3, 1, 2)  # NCHW view of the NHWC cache, no copy
    labels = torch.from_numpy(index.labels.astype(np.int64))
    workers = cfg.workers if cfg.workers is not None else default_workers("tensor", cfg)

    def dl(idx, split_idx, train_mode):
        ds = TensorImageSet(images, labels, idx, index.vocab, split_idx)
        alternate = cfg.alt_flip and train_mode  # the loader mirrors, PadCropFlip only crops
        return TensorDL(
            ds,
            alt_flip_seed=cfg.seed if alternate else None,
            bs=cfg.bs,
            shuffle=train_mode,
            drop_last=train_mode,
            after_batch=batch_tfms_for(cfg.size, stats, pad=cfg.crop_pad, flip=not alternate),
            num_workers=workers,
        )

    dls = DataLoaders(dl(train, 0, True), dl(valid, 1, False))
    return dls, dl(test, 1, False)


def datablock(vocab: list[str], valid_idx, size: int, stats, pad: int = 4) -> DataBlock:
    """The general fastai path: any folder of images, resized to 32 px per item, then the same batch transforms."""
    return DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=vocab)),
        get_y=parent_label,
        splitter=IndexSplitter(valid_idx),
        item_tfms=Resize(NATIVE_SIZE),
        batch_tfms=batch_tfms_for(size, stats, pad=pad),
    )


def _datablock_dls(index, train, valid, test, cfg, stats):
    items = [index.files[i] for i in np.concatenate([train, valid])]
    valid_pos = list(range(len(train), len(train) + len(valid)))
    workers = cfg.workers if cfg.workers is not None else default_workers("datablock", cfg)
    dls = datablock(index.vocab, valid_pos, cfg.size, stats, cfg.crop_pad).dataloaders(
        items, bs=cfg.bs, num_workers=workers
    )
    test_dl = dls.test_dl([index.files[i] for i in test], with_labels=True)
    return dls, test_dl


def inference_dls(vocab: list[str], size: int, stats, example: Path) -> DataLoaders:
    """DataBlock DataLoaders carrying only the inference pipeline: what `export.pkl` ships for `learn.predict(path)`."""
    return datablock(vocab, [], size, stats).dataloaders([example, example], bs=2, num_workers=0)
