"""Data: resolving --data, honest splits, corrupt files, transforms, and the two loaders agreeing."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from fastai.torch_core import TensorImage

from cifar_fastai import ConfigError, DataError, TrainConfig, get_data, resolve_data
from cifar_fastai.data.index import index_images, split_indices
from cifar_fastai.data.sources import SAMPLE_DIR
from cifar_fastai.data.transforms import PadCropFlip, cifar_stats


def test_sample_is_shipped_in_cifar_layout():
    root = resolve_data("sample")
    assert root == SAMPLE_DIR
    for split, n in (("train", 900), ("test", 100)):  # bench/make_sample.py --train-per-class 900 --test-per-class 100
        classes = sorted(p.name for p in (root / split).iterdir())
        assert len(classes) == 10
        assert all(len(list((root / split / c).glob("*.jpg"))) == n for c in classes)


def test_splits_sizes_and_disjointness(tiny_data):
    cfg = TrainConfig(data=str(tiny_data), valid_pct=0.2)
    index = index_images(tiny_data)
    train, valid, test = split_indices(index, cfg)
    assert len(train) + len(valid) == 300  # 301 files, one corrupt skipped
    assert len(valid) == 60 and len(test) == 100
    assert not set(train) & set(valid) and not set(valid) & set(test)
    assert not index.is_test[valid].any(), "the hold-out must come from the training images only"
    # seeded: same seed, same split; another seed, another split
    assert np.array_equal(valid, split_indices(index, cfg)[1])
    assert not np.array_equal(valid, split_indices(index, cfg.replace(seed=1))[1])


def test_train_per_class_keeps_validation(tiny_data):
    cfg = TrainConfig(data=str(tiny_data), valid_pct=0.2)
    index = index_images(tiny_data)
    full = split_indices(index, cfg)
    train, valid, test = split_indices(index, cfg.replace(train_per_class=5))
    assert np.array_equal(valid, full[1]) and np.array_equal(test, full[2])
    assert set(train) <= set(full[0]) and np.bincount(index.labels[train]).tolist() == [5] * 10


def test_valid_test_convention(tiny_data):
    d = get_data(TrainConfig(data=str(tiny_data), valid="test", bs=16), verbose=False)
    assert d.valid_is_test and d.n_valid == d.n_test == 100 and d.n_train == 300


def test_corrupt_file_reported_and_skipped(tiny_data, capsys):
    d = get_data(TrainConfig(data=str(tiny_data), bs=16))
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image file" in out and "9999.jpg" in out
    assert [p for p, _ in d.bad] == [str(tiny_data / "train" / "cat" / "9999.jpg")]


def test_tgz_is_unpacked_once_and_reused(tiny_data, tmp_path):
    archive = tmp_path / "tiny.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tiny_data, arcname="cifar_tiny")
    first = resolve_data(str(archive))
    assert (first / "train" / "cat").is_dir()
    assert resolve_data(str(archive)) == first


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/folder", "no such file or folder"),
        ("{tmp}", "expected a CIFAR-layout folder"),
        ("{tmp}/x.txt", "not an archive"),
    ],
)
def test_bad_data_paths_fail_clearly(tmp_path, spec, message):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=message):
        resolve_data(spec.format(tmp=tmp_path))


def test_offline_cifar10_download_fails_fast_naming_data_path(monkeypatch, tmp_path):
    import socket

    monkeypatch.setenv("FASTAI_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DataError, match="--data PATH"):
        resolve_data("cifar10")


def test_augmentation_on_train_batches_only(tiny_data):
    d = get_data(TrainConfig(data=str(tiny_data), bs=16, seed=0), verbose=False)
    train_tfms = [type(t).__name__ for t in d.dls.train.after_batch.fs]
    assert "PadCropFlip" in train_tfms
    assert d.dls.train.dataset.split_idx == 0, "the training set runs the split_idx=0 (augmenting) transforms"
    dl = d.dls.train.new(shuffle=False)  # the same images every draw: only the augmentation can change them
    first, second = dl.one_batch()[0], dl.one_batch()[0]
    assert not torch.equal(first, second), "each draw of a training batch is augmented afresh"
    with dl.dataset.set_split_idx(1):
        plain = dl.one_batch()[0]
    assert not torch.equal(first, plain), "the augmentation is what changed the training batch"
    # the same pipeline object runs on valid batches, but PadCropFlip has split_idx=0: valid batches are untouched
    x = d.dls.valid.one_batch()[0]
    y = d.dls.valid.one_batch()[0]
    assert torch.equal(x, y), "validation batches must be deterministic"


def test_pad_crop_flip_statistics():
    torch.manual_seed(0)
    n, size = 2000, 32
    # each image's pixel value encodes its column: the crop offset and the flip can be read back
    cols = torch.arange(size, dtype=torch.uint8).view(1, 1, 1, size).expand(n, 3, size, size)
    out = PadCropFlip(pad=4)(TensorImage(cols.clone()), split_idx=0)
    assert out.shape == cols.shape and out.dtype == torch.uint8
    centre = out[:, 0, 0, 16].float()
    flipped = out[:, 0, 0, 17] < out[:, 0, 0, 16]  # centre columns: no reflection there
    assert 0.4 < flipped.float().mean() < 0.6, "about half the images are flipped"
    offsets = torch.where(flipped, centre - 15, centre - 16)  # source column of output column 16
    assert offsets.min() >= -4 and offsets.max() <= 4, "crop offsets stay within the 4-pixel padding"
    assert len(offsets.unique()) == 9, "all nine offsets -4..4 occur"


@pytest.mark.parametrize("loader", ["tensor", "datablock"])
def test_crop_and_flip_switch_off_one_at_a_time_on_both_loaders(tiny_data, loader):
    """--crop-pad 0 --no-flip: training batches are the plain images; each option alone brings back its own change."""
    cfg = TrainConfig(data=str(tiny_data), bs=16, seed=0, loader=loader)

    def batches(**kw):
        dl = get_data(cfg.replace(**kw), verbose=False).dls.train.new(shuffle=False)
        with dl.dataset.set_split_idx(1):
            plain = dl.one_batch()[0]
        return plain, [dl.one_batch()[0] for _ in range(4)]

    plain, drawn = batches(crop_pad=0, flip=False)
    assert all(torch.equal(x, plain) for x in drawn), "no crop and no flip: nothing changes a training image"
    plain, drawn = batches(crop_pad=0, flip=True)
    mirrored = [torch.equal(x[i], plain[i].flip(-1)) for x in drawn for i in range(len(x))]
    same = [torch.equal(x[i], plain[i]) for x in drawn for i in range(len(x))]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored), "flip alone: each image mirrored or not"
    plain, drawn = batches(crop_pad=4, flip=False)
    assert not all(torch.equal(x, plain) for x in drawn), "crop alone still moves the images"
    assert not any(torch.equal(x[i], plain[i].flip(-1)) for x in drawn for i in range(len(x)) if not torch.equal(plain[i], plain[i].flip(-1)))


def test_no_flip_and_alternating_flip_are_refused_together():
    with pytest.raises(ConfigError, match="pick one"):
        TrainConfig(alt_flip=True, flip=False)


def test_tensor_and_datablock_loaders_agree(tiny_data):
    """The fast path gives the same split membership, labels and normalization as the DataBlock path."""
    cfg = TrainConfig(data=str(tiny_data), bs=400, seed=3)
    fast = get_data(cfg.replace(loader="tensor"), verbose=False)
    slow = get_data(cfg.replace(loader="datablock"), verbose=False)
    assert fast.loader == "tensor" and slow.loader == "datablock"
    assert (fast.n_train, fast.n_valid, fast.n_test) == (slow.n_train, slow.n_valid, slow.n_test)
    assert fast.vocab == list(slow.dls.vocab)
    # validation sets: same images in the same order, same labels, same normalized pixels (JPEG decode is the same PIL)
    (xf, yf), (xs, ys) = fast.dls.valid.one_batch(), slow.dls.valid.one_batch()
    assert torch.equal(yf, ys)
    assert torch.allclose(xf, xs, atol=1e-5)
    (tf, tyf), (ts, tys) = fast.test_dl.one_batch(), slow.test_dl.one_batch()
    assert torch.equal(tyf, tys) and torch.allclose(tf, ts, atol=1e-5)
    # normalized with the CIFAR statistics: undoing them gives the cached pixels of those validation images
    valid = fast.dls.valid.dataset
    raw = valid.images[valid.idx[: len(xf)]].float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in cifar_stats)
    assert torch.allclose(xf.as_subclass(torch.Tensor) * std + mean, raw, atol=1e-5)
