"""Data-parallel training: per-rank shards, a 2-process gloo torchrun run, and a failing rank ending the job."""

from __future__ import annotations

import json
import os
import random
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from fastai.learner import load_learner

from cifar_fastai.data.tensor_loader import TensorDL, TensorImageSet
from cifar_fastai.training.distributed import DistributedDL, describe
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    *args: str, env: dict | None = None, timeout: int = 180, script: str = "scripts/train.py"
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 scripts/train.py ...` as a user runs it (gloo on this CPU-only machine)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return subprocess.run(
        [*cmd, script, *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rank_items(n: int, world_size: int, bs: int = 4) -> list[list[int]]:
    """The item ids each rank's `DistributedDL` yields from one shuffled epoch of a `TensorDL` over `n` items."""
    ids = torch.arange(n)
    ds = TensorImageSet(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), ids, np.arange(n), ["a"], 0)
    out = []
    for rank in range(world_size):
        dl = TensorDL(ds, bs=bs, shuffle=True, drop_last=False)
        dl.rng = random.Random(0)  # what the broadcast guarantees in a real job: every rank starts from rank 0's order
        ddl = DistributedDL(dl, rank=rank, world_size=world_size)
        out.append([int(y) for _, yb in ddl for y in yb])
    return out


def _shard_worker(rank: int, world_size: int, init: str, out: str) -> None:
    """One rank of a real gloo group: its loader starts from its own seed, so only the broadcast of rank 0's order
    (the project's CPU-safe `_broadcast`) makes the shards line up."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        n = 30
        ds = TensorImageSet(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n), np.arange(n), ["a"], 0)
        dl = TensorDL(ds, bs=4, shuffle=True, drop_last=False)
        dl.rng = random.Random(100 + rank)  # a different order on every rank
        ddl = DistributedDL(dl, rank=rank, world_size=world_size)
        with open(f"{out}.{rank}", "w") as f:
            json.dump([int(y) for _, yb in ddl for y in yb], f)
    finally:
        torch.distributed.destroy_process_group()


def test_shards_are_disjoint_and_cover_the_data_in_a_gloo_group(tmp_path):
    out = tmp_path / "shard"
    # forked, not spawned: a spawned child would import torch, fastai and this package again (most of the test's time)
    torch.multiprocessing.start_processes(
        _shard_worker, args=(2, f"file://{tmp_path / 'pg'}", str(out)), nprocs=2, join=True, start_method="fork"
    )
    shards = [json.loads((tmp_path / f"shard.{r}").read_text()) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 15
    assert not set(shards[0]) & set(shards[1]), "no image is trained twice in an epoch"
    assert sorted(shards[0] + shards[1]) == list(range(30)), "every image is trained once"
    assert shards[0] + shards[1] != list(range(30)), "the epoch is shuffled"


def test_uneven_shards_pad_with_repeats_but_cover_everything():
    shards = rank_items(31, 3)
    assert [len(s) for s in shards] == [11, 11, 11], "equal steps per rank, or DDP's all-reduce would wait forever"
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(31)) and len(flat) - len(set(flat)) == 2  # 33 slots for 31 images


def test_global_batch_and_lr_are_stated(monkeypatch):
    from cifar_fastai.training import distributed

    assert describe(bs=256, lr=1e-3)["backend"] is None, "one process: no process group"
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun sets; fastai and world_size() read it
    monkeypatch.setattr(distributed, "backend", lambda: "gloo")  # whatever this host has
    info = describe(bs=256, lr=1e-3)
    assert info["world_size"] == 4 and info["backend"] == "gloo" and info["bs_per_process"] == 256
    assert info["global_bs"] == 1024 and info["lr"] == 1e-3, "the global batch is bs x world size; --lr is not scaled"


def doc_command() -> list[str]:
    """The CPU torchrun command of docs/hardware.md, as its words: this test runs it (test_docs leaves it to us)."""
    from tests.test_docs import DOC_TORCHRUN

    return shlex.split(DOC_TORCHRUN)


def test_torchrun_two_processes_write_one_run_folder_that_predicts(tiny_data, tmp_path):
    """The documented command, on tiny data with a smaller batch (its --bs 128 would be one step of 100 images)."""
    words = doc_command()
    assert words[:3] == ["torchrun", "--nproc_per_node", "2"] and words[3] == "scripts/train.py"
    args = words[4:]
    args[args.index("--data") + 1] = str(tiny_data)
    args[args.index("--bs") + 1] = "8"
    out = tmp_path / "runs"
    res = torchrun(*args, "--lr", "1e-2", "--train-per-class", "10", "--out", str(out), "--dist-timeout", "60")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert res.stdout.count("run folder:") == 1, "only rank 0 prints"
    runs = list(out.iterdir())
    assert len(runs) == 1, f"one run folder, not one per rank: {runs}"
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == 100, "the whole test set (gathered from both ranks), not one shard"
    assert metrics["test_accuracy"] > 0.5 and metrics["valid_accuracy"] > 0.5
    resolved = json.loads((run / "config.json").read_text())["resolved"]["distributed"]
    assert resolved["world_size"] == 2 and resolved["backend"] == "gloo" and resolved["global_bs"] == 16
    assert len((run / "history.csv").read_text().splitlines()) == 2, "one header + 1 epoch, written once"
    learn = load_learner(run / "export.pkl")  # the fresh-process load is tested on the one-process run (test_train)
    label, _, probs = learn.predict(tiny_data / "test" / "ship" / "0001.jpg")
    assert label == "ship" and abs(float(probs.sum()) - 1) < 1e-4


def test_a_failing_rank_ends_the_job_naming_the_rank(tiny_data, tmp_path):
    # the collective timeout (600 s) is far above the subprocess timeout: the job ends because the rank died
    res = torchrun("1", "--data", str(tiny_data), "--arch", "tiny", "--epochs", "1", "--bs", "16", "--train-per-class", "5",
                   "--out", str(tmp_path / "runs"), "--dist-timeout", "600",
                   script="tests/fail_on_rank.py", timeout=150)  # fmt: skip
    assert res.returncode != 0
    assert "error: rank 1/2: RuntimeError" in res.stderr and "simulated failure" in res.stderr
    assert "rank      : 1" in res.stderr, "torchrun's summary names the failed rank"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_lr_find_refuses_torchrun(tiny_data, tmp_path, monkeypatch):
    from cifar_fastai import TrainConfig
    from cifar_fastai.errors import TrainingError
    from cifar_fastai.training.run import lr_find

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="one process"):
        lr_find(TrainConfig(data=str(tiny_data), arch="tiny", out=str(tmp_path)), verbose=False)


def test_a_failing_ranks_error_file_appears_whole_where_torchrun_reads_it(tmp_path, monkeypatch):
    """torchrun reads each failed rank's error file (TORCHELASTIC_ERROR_FILE) for its summary; a file read while
    being written crashes the launcher, so the file is moved into place only once complete."""
    from cifar_fastai.training.distributed import recorded

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    seen = []

    def fail():
        seen.append(os.environ["TORCHELASTIC_ERROR_FILE"])
        raise RuntimeError("simulated failure")

    with pytest.raises(RuntimeError, match="simulated failure"):
        recorded(fail)
    assert seen[0] != str(path), "written beside its path, not in place"
    assert "simulated failure" in json.loads(path.read_text())["message"]["message"]
    assert os.environ["TORCHELASTIC_ERROR_FILE"] == str(path) and list(tmp_path.iterdir()) == [path]
    path.unlink()
    assert recorded(lambda: 42) == 42 and not path.exists(), "a clean finish writes no error file"
