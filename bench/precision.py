"""Benchmark: the same short training run in fp32 and in CPU bf16 autocast (and NHWC), accuracy and speed as JSON.

    python bench/precision.py --data ../shared/data/cifar10-jpeg75.tgz --arch tiny --epochs 1
    python bench/precision.py --data sample --arch resnet18 --epochs 1 --variants fp32,fp32+cl

Each variant is one `cifar_fastai.train` run (the project's own flow); ratios are against the first variant,
measured on the same machine. Variants whose run folder already holds metrics.json are reused (resume after a
time limit). Writes bench/out/precision.json (or --out).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import typer

from cifar_fastai.config import TrainConfig
from cifar_fastai.training.hardware import cpu_flags
from cifar_fastai.training.run import train
from cifar_fastai.utils import write_bench_json


def main(
    data: str = typer.Option("sample", help="--data of the runs"),
    arch: str = typer.Option("tiny", help="--arch of the runs"),
    epochs: int = typer.Option(1, help="--epochs of each run"),
    bs: int = typer.Option(256, help="--bs of each run"),
    variants: str = typer.Option(
        "fp32,bf16,fp32+cl,bf16+cl", help="precision[+cl for --channels-last], comma-separated"
    ),
    device: str = typer.Option("cpu", help="--device of the runs"),
    out: str = typer.Option("bench/out/precision.json", help="JSON result file"),
) -> None:
    out, runs = Path(out), {}
    load_before = round(os.getloadavg()[0], 2)
    for variant in variants.split(","):
        precision, _, cl = variant.partition("+")
        cfg = TrainConfig(
            data=data, arch=arch, epochs=epochs, bs=bs, device=device, precision=precision, channels_last=cl == "cl",
            out=str(out.parent / "runs"), name=f"precision-{arch.replace('/', '-')}-{variant}",
        )  # fmt: skip
        done = out.parent / "runs" / cfg.name / "metrics.json"
        # a finished variant is reused: a bench stopped by its time limit resumes where it stopped
        m = json.loads(done.read_text()) if done.exists() else train(cfg, verbose=True).metrics
        runs[variant] = {k: m[k] for k in ("test_accuracy", "valid_accuracy", "train_images_per_s", "wall_seconds")}
    base = runs[variants.split(",")[0]]
    for r in runs.values():
        r["train_speed_vs_first"] = r["train_images_per_s"] / base["train_images_per_s"]
        r["test_accuracy_minus_first"] = r["test_accuracy"] - base["test_accuracy"]
    print(json.dumps(runs, indent=2))
    write_bench_json(
        out,
        f"python bench/precision.py --data {data} --arch {arch} --epochs {epochs} --bs {bs} --variants {variants} "
        f"--device {device}",
        "one short training run per precision and memory format, speed and accuracy against the first variant",
        load_before,
        # which instructions the CPU has decides whether bf16 runs in hardware or is emulated
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        bf16_flags=sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")),
        runs=runs,
    )


if __name__ == "__main__":
    typer.run(main)
