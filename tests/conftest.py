"""Shared fixtures: a tiny CIFAR-layout dataset made on the fly (separable by colour, one corrupt file)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Every test run gets its own cache, so no test depends on (or pollutes) the user's ~/.cache. Made once, by the
# first process (pytest-xdist's workers inherit it), and removed when that process ends: decoded images of every
# test dataset would otherwise pile up in /tmp run after run.
if "CIFAR_FASTAI_CACHE" not in os.environ:
    os.environ["CIFAR_FASTAI_CACHE"] = tempfile.mkdtemp(prefix="cifar_fastai_cache_")
    atexit.register(shutil.rmtree, os.environ["CIFAR_FASTAI_CACHE"], ignore_errors=True)
os.environ.setdefault("MPLBACKEND", "Agg")



def _own_cores() -> None:
    """Under pytest-xdist, each worker gets its share of the cores: the project sizes torch's threads from the cores
    a process may use, so two workers on two cores run a thread each instead of four threads fighting."""
    worker, n = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and n > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= n:
            os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) :: n])


_own_cores()
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One distinct RGB colour per class: a tiny CNN separates them within an epoch.
COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]],
    dtype=np.float32,
)  # fmt: skip


def make_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    base = COLOURS[label] * rng.uniform(0.7, 1.0)
    noise = rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_dataset(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # mostly JPEG (like CIFAR-10 here), some PNG: both readers are exercised
                ext = "png" if i % 5 == 0 else "jpg"
                make_image(label, rng).save(folder / f"{i:04d}.{ext}")
    if corrupt:
        (root / "train" / "cat" / "9999.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


# On a CPU with bf16 instructions `--precision auto` times a few steps of fp32 against bf16 (hardware.probe_precision)
# and keeps the faster. Here the probe is a stand-in that finds bf16 faster, so on those hosts a test's `auto` run
# trains in bf16 as it would on most of them, without seconds of probing per model shape, and nothing is written to
# the user's cache; test_hardware checks the probe itself.
PROBE_RATES = {False: 100.0, True: 150.0}  # bf16 (True) faster


@pytest.fixture(autouse=True, scope="session")
def _precision_probe_stand_in(tmp_path_factory):
    from cifar_fastai.training import hardware

    table = tmp_path_factory.mktemp("probe") / "precision_probe.json"
    with pytest.MonkeyPatch.context() as m:  # session-wide: the shared runs of the fixtures get it too
        m.setattr(hardware, "step_rate", lambda model, x, y, bf16, steps=3: PROBE_RATES[bf16])
        m.setattr(hardware, "probe_file", lambda: table)
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x (30 train + 10 test) 32x32 images, plus one corrupt JPEG in train/cat."""
    return make_dataset(tmp_path_factory.mktemp("tiny") / "cifar_tiny")


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One short real training run of the tiny model, shared by the tests that only read its outputs."""
    from cifar_fastai import TrainConfig
    from cifar_fastai.training.run import train

    out = tmp_path_factory.mktemp("runs")
    # pinned: 'auto' would pick a GPU where there is one and bf16 from this CPU's flags, so the run would differ by host
    cfg = TrainConfig(data=str(tiny_data), arch="tiny", epochs=2, bs=16, lr=1e-2, out=str(out), name="tiny",
                      device="cpu", precision="fp32")  # fmt: skip
    return train(cfg, verbose=False).run_dir


def run_script(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script as a user would, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(  # the caller asserts on the return code, so no check=True
        [sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# The longest files first (measured, seconds on one core: docs 86, distributed 58, recipes 53, study 45, ...):
# pytest-xdist hands out whole files (--dist loadfile) in collection order (--no-loadscope-reorder: its own order
# is by test count), so a long file collected last would leave one worker running it alone while the other waits.
LONGEST_FIRST = ["test_docs.py", "test_distributed.py", "test_recipes.py", "test_study.py", "test_sweep.py",
                 "test_demo.py", "test_cifar_resnets.py", "test_finetune.py", "test_notebook.py", "test_train.py",
                 "test_toolkit.py", "test_layout.py", "test_cli.py", "test_hardware.py"]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
