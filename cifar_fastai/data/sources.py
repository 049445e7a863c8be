"""Where the data comes from: the shipped sample, fastai's CIFAR-10 download, a CIFAR-layout folder or an archive."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..errors import DataError

SAMPLE_DIR = Path(__file__).parents[1] / "sample" / "cifar10_sample"


ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")


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
