"""Training images/s of `scripts/train.py` in 1 process vs `torchrun --nproc_per_node N` on this machine, same global batch.

    flock /tmp/cpu.lock python bench/distributed_speed.py --data ../shared/data/cifar10-jpeg75.tgz
    python bench/distributed_speed.py --data sample --train-per-class 50 --epochs 1     # quick smoke run

Each configuration is the user's own command (a fresh process or a torchrun job) on a per-class subset of the data;
the numbers come from the run's metrics.json (`train_images_per_s`: all ranks' images per second of training).
Writes JSON (default bench/out/distributed_speed.json) with the ratio N processes / 1 process. On a 2-core machine
expect little or no gain: the point of the multi-process path here is correctness, the gain comes with GPUs.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from cifar_fastai.data.sources import resolve_data

REPO = Path(__file__).resolve().parents[1]


def subset(root: Path, dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """A CIFAR-layout folder of symlinks to the first images of each class (so a benchmark takes minutes)."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (dest / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                (dest / split / cls.name / f.name).symlink_to(f.resolve())
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args: list[str], out: Path) -> dict:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd = [*launcher, "scripts/train.py", *args, "--out", str(out), "--name", f"nproc{nproc}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    metrics = json.loads((out / f"nproc{nproc}" / "metrics.json").read_text())
    resolved = json.loads((out / f"nproc{nproc}" / "config.json").read_text())["resolved"]
    return {
        "command": " ".join(["python" if c == sys.executable else c for c in cmd]),
        "processes": nproc,
        "threads_per_process": resolved["threads"],
        "global_bs": resolved["distributed"]["global_bs"],
        "train_images_per_s": round(metrics["train_images_per_s"], 1),
        "wall_seconds": round(metrics["wall_seconds"], 1),
        "valid_accuracy": round(metrics["valid_accuracy"], 4),
        "test_accuracy": round(metrics["test_accuracy"], 4),
    }


def main(
    data: Annotated[str, typer.Option(help="--data of scripts/train.py")] = "../shared/data/cifar10-jpeg75.tgz",
    arch: Annotated[str, typer.Option(help="architecture")] = "resnet18",
    train_per_class: Annotated[
        int, typer.Option(help="training images per class (a subset keeps the run short)")
    ] = 300,
    test_per_class: Annotated[int, typer.Option(help="test images per class")] = 100,
    epochs: Annotated[int, typer.Option(help="epochs per configuration")] = 1,
    global_bs: Annotated[int, typer.Option(help="global batch: bs per process = global_bs / processes")] = 256,
    nproc: Annotated[int, typer.Option(help="processes of the multi-process run")] = 2,
    out: Annotated[Path, typer.Option(help="JSON result")] = REPO / "bench" / "out" / "distributed_speed.json",
) -> None:
    """Images/s of 1 process vs `nproc` torchrun processes (gloo here, NCCL on GPUs), same data and global batch."""
    with tempfile.TemporaryDirectory(prefix="distributed_speed_") as tmp:
        root = subset(resolve_data(data), Path(tmp) / "data", train_per_class, test_per_class)
        common = ["--data", str(root), "--arch", arch, "--epochs", str(epochs), "--valid", "test"]
        results = [run(n, [*common, "--bs", str(global_bs // n)], Path(tmp) / "runs") for n in (1, nproc)]
    report = {
        "what": f"scripts/train.py, 1 process vs torchrun --nproc_per_node {nproc}, same global batch {global_bs}",
        "data": data,
        "arch": arch,
        "train_images_per_class": train_per_class,
        "epochs": epochs,
        "runs": results,
        "speedup": round(results[1]["train_images_per_s"] / results[0]["train_images_per_s"], 3),
        "machine": {
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
