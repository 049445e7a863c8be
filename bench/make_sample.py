"""Build (or grow) the shipped CIFAR-10 sample from a CIFAR-layout .tgz, deterministically.

    python bench/make_sample.py --source ../shared/data/cifar10-jpeg75.tgz \
        --train-per-class 900 --test-per-class 100 --out cifar_fastai/sample/cifar10_sample

The archive holds `<top>/labels.txt`, `<top>/train/<class>/NNNN.jpg` and `<top>/test/<class>/NNNN.jpg` (the layout of
fastai's `untar_data(URLs.CIFAR)`). For every split and class the selection is class-balanced and seeded:

  * the first `--keep-train` / `--keep-test` files of the class in name order come first (0000-0199 train and
    0000-0049 test: the images of the original 2,500-image sample, so growing it only adds files);
  * the other files of the class follow in an order shuffled with `--seed` (and the split and class name);
  * the first `--train-per-class` / `--test-per-class` of that order are taken.

So a larger selection always contains a smaller one with the same seed. Files are copied byte for byte (no
re-encoding) under their names in the archive, so `sample/train/cat/1234.jpg` is `cifar10/train/cat/1234.jpg`.
The output folder is written next to `--out` and swapped in at the end; files already there with the same bytes are
left alone (their mtime too), so in a git checkout growing the sample shows up as added files only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

SPLITS = ("train", "test")


def read_archive(source: Path) -> tuple[bytes, dict[tuple[str, str], dict[str, bytes]]]:
    """labels.txt and {(split, class): {file name: bytes}} for every .jpg/.png in the archive."""
    labels, images = None, defaultdict(dict)
    with tarfile.open(source, "r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = PurePosixPath(m.name).parts
            if parts and parts[0] == ".":
                parts = parts[1:]
            if len(parts) == 2 and parts[1] == "labels.txt":
                labels = tar.extractfile(m).read()
            elif len(parts) == 4 and parts[1] in SPLITS and parts[3].lower().endswith((".jpg", ".jpeg", ".png")):
                images[(parts[1], parts[2])][parts[3]] = tar.extractfile(m).read()
    if labels is None:
        sys.exit(f"{source}: no <top>/labels.txt in the archive")
    if not images:
        sys.exit(f"{source}: no <top>/train|test/<class>/*.jpg in the archive")
    return labels, images


def select(names: list[str], n: int, keep: int, seed: int, split: str, cls: str) -> list[str]:
    """The first `keep` names in order, then the rest shuffled with a seed of (seed, split, class); the first n."""
    names = sorted(names)
    if n > len(names):
        sys.exit(f"{split}/{cls}: {n} images asked for, the archive has {len(names)}")
    head, rest = names[:keep], names[keep:]
    # random.Random seeded with an int is stable across Python versions and platforms
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{split}:{cls}".encode()).digest()[:8], "big"))
    rng.shuffle(rest)
    return sorted((head + rest)[:n])


def tree_bytes(root: Path) -> int:
    """What `du -sb` reports: apparent sizes of every file and folder, the root included."""
    total = root.lstat().st_size
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += (Path(dirpath) / name).lstat().st_size
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--source", type=Path, required=True, help="CIFAR-layout .tgz (e.g. ../shared/data/cifar10-jpeg75.tgz)"
    )
    p.add_argument("--train-per-class", type=int, default=900, help="training images per class (default 900)")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class (default 100)")
    p.add_argument("--out", type=Path, default=Path("cifar_fastai/sample/cifar10_sample"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection beyond the kept first files (default 0)")
    p.add_argument(
        "--keep-train",
        type=int,
        default=200,
        help="the first K training files of each class always come first (default 200: the original sample)",
    )
    p.add_argument(
        "--keep-test",
        type=int,
        default=50,
        help="the first K test files of each class always come first (default 50: the original sample)",
    )
    args = p.parse_args(argv)

    labels, images = read_archive(args.source)
    vocab = labels.decode().split()
    counts = {"train": args.train_per_class, "test": args.test_per_class}
    keeps = {"train": args.keep_train, "test": args.keep_test}
    for split in SPLITS:
        missing = [c for c in vocab if (split, c) not in images]
        if missing:
            sys.exit(f"{args.source}: no {split} images for class(es) {missing}")

    out = args.out
    tmp = out.with_name(out.name + ".tmp-make-sample")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "labels.txt").write_bytes(labels)
    added = kept = 0
    for split in SPLITS:
        for cls in vocab:
            files = images[(split, cls)]
            chosen = select(list(files), counts[split], min(keeps[split], counts[split]), args.seed, split, cls)
            folder = tmp / split / cls
            folder.mkdir(parents=True)
            for name in chosen:
                old = out / split / cls / name
                if old.is_file() and old.read_bytes() == files[name]:
                    shutil.copy2(old, folder / name)  # same bytes: keep the file (and its mtime) as it is
                    kept += 1
                else:
                    (folder / name).write_bytes(files[name])
                    added += 1
    if (out / "labels.txt").is_file() and (out / "labels.txt").read_bytes() == labels:
        shutil.copy2(out / "labels.txt", tmp / "labels.txt")
    if out.exists():
        old_dir = out.with_name(out.name + ".old-make-sample")
        if old_dir.exists():
            shutil.rmtree(old_dir)
        out.rename(old_dir)
        tmp.rename(out)
        shutil.rmtree(old_dir)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)

    n = {s: sum(len(list((out / s / c).iterdir())) for c in vocab) for s in SPLITS}
    print(
        f"{out}: {len(vocab)} classes, {n['train']:,} train ({args.train_per_class}/class) + "
        f"{n['test']:,} test ({args.test_per_class}/class) images; {kept:,} unchanged, {added:,} written; "
        f"{tree_bytes(out):,} bytes (du -sb)"
    )


if __name__ == "__main__":
    main()
