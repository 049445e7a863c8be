"""Training throughput in one invocation: the fastai-docs recipe, the bare training step, and our `train()` path.

    python bench/train_speed.py                                   # full-size comparison, ~10 minutes on 2 cores
    python bench/train_speed.py --train-per-class 100 --steps 4   # quick smoke run

Each variant `arch:precision[+cl]` (cl: channels_last) is measured twice at the same batch size: the bare training
step (forward + backward + optimizer step on one fixed random batch: the compute ceiling) and one epoch of our
`train()` path (the flow of scripts/train.py: data, augmentation, fastai loop and callbacks). The fastai-docs recipe
runs once. Writes JSON (default bench/out/train_speed.json) with images/s, wall time, accuracy and the ratios the
project targets: ours >= 85% of the bare step (same model, batch size, dtype) and >= 3x the fastai-docs recipe.

The docs recipe and a first bare step of every variant run with glibc's default allocator; then the process keeps
freed memory (`hardware.keep_freed_memory`, our path's default `--keep-memory`) and the bare steps run again beside
our path, so the ceiling and the path it bounds share the allocator; the JSON gives the bare step's gain from it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from cifar_fastai import TrainConfig
from cifar_fastai.data.sources import resolve_data
from cifar_fastai.training import hardware
from cifar_fastai.training.run import train
from cifar_fastai.utils import write_bench_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench/out/train_speed.json"


def docs_recipe(root: Path, per_class: int, bs: int = 64, epochs: int = 1, cbs: list | None = None) -> dict:
    """The recipe people copy from the fastai docs: folders + aug_transforms + vision_learner(resnet18) + fit_one_cycle
    (`epochs` of it; `cbs`: callbacks for the fit, e.g. a clock per epoch)."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        IndexSplitter,
        accuracy,
        aug_transforms,
        parent_label,
        resnet18,
        vision_learner,
    )

    train_files = [f for c in sorted((root / "train").iterdir()) for f in sorted(c.iterdir())[:per_class]]
    test_files = [f for c in sorted((root / "test").iterdir()) for f in sorted(c.iterdir())[: max(1, per_class // 5)]]
    items = train_files + test_files
    dblock = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: items,  # the docs use get_image_files(path); here the same files, a subset of them
        splitter=IndexSplitter(range(len(train_files), len(items))),
        get_y=parent_label,
        batch_tfms=aug_transforms(),
    )
    dls = dblock.dataloaders(root, bs=bs)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 1e-3, cbs=cbs)
    wall = time.perf_counter() - t0
    return {
        "what": "fastai docs recipe: DataBlock from files + aug_transforms + vision_learner(resnet18) + fit_one_cycle",
        "bs": bs,
        "n_train": len(train_files),
        "n_valid": len(test_files),
        "epochs": epochs,
        "epoch_images_per_s": epochs * (len(train_files) + len(test_files)) / wall,
        "wall_seconds": wall,
        "accuracy": float(learn.recorder.values[-1][-1]),
    }


def bare_step(arch: str, bs: int, steps: int, channels_last: bool, bf16: bool) -> dict:
    """The ceiling: forward + backward + optimizer step of the same model on a fixed random batch, nothing else."""
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import Adam

    from cifar_fastai.models import get_arch

    a = get_arch(arch)
    if a.kind == "cifar":
        model = a.builder(n_out=10)
    else:
        from fastai.vision.learner import create_vision_model

        model = create_vision_model(a.builder, 10, pretrained=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = Adam(list(model.parameters()), lr=1e-3, wd=0.05)
    loss_func = CrossEntropyLossFlat()
    x = torch.randn(bs, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,))
    times = []
    for i in range(steps + 2):  # 2 warm-up steps
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_func(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"images_per_s": bs * len(times) / sum(times), "steps": len(times)}


def ours(data: str, arch: str, bs: int, per_class: int, out: Path, **extra) -> dict:
    # validation on 2% of the training images = 1,000 on CIFAR-10, a fifth of the training subset at the default
    # 500 per class, the same share as the docs recipe's validation (per_class // 5 test images per class)
    cfg = TrainConfig(
        data=data, arch=arch, bs=bs, epochs=1, train_per_class=per_class, valid_pct=0.02, checkpoint=False,
        out=str(out), **extra,
    )  # fmt: skip
    res = train(cfg, verbose=False)
    m = res.metrics
    keys = ("train_images_per_s", "epoch_images_per_s", "train_seconds", "valid_seconds", "valid_accuracy", "wall_seconds")
    return {"what": "scripts/train.py path: train(TrainConfig(...))", "config": extra, "bs": bs, **{k: m[k] for k in keys}}


def main(
    data: str = typer.Option(str(REPO.parent / "shared/data/cifar10-jpeg75.tgz"), help="CIFAR-layout folder or .tgz"),
    variants: str = typer.Option(
        "resnet18:fp32,resnet18:bf16+cl,airbench_resnet:bf16+cl",
        help="arch:precision[+cl] pairs, comma-separated; each is also compared with the docs recipe",
    ),
    bs: int = typer.Option(256, help="batch size for the bare step and our path"),
    train_per_class: int = typer.Option(500, help="training images per class for the epoch runs"),
    steps: int = typer.Option(10, help="timed bare steps"),
    out: Annotated[Path, typer.Option(help="JSON result file")] = DEFAULT_OUT,
) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    root = resolve_data(data)
    runs = out.parent / "runs"
    load_before = round(os.getloadavg()[0], 2)
    result = {"bs": bs, "cpus": os.cpu_count(), "variants": {}}
    parsed = {}
    for v in variants.split(","):
        arch, _, prec = v.partition(":")
        precision, _, cl = (prec or "fp32").partition("+")
        parsed[v] = (arch, precision, precision == "bf16", cl == "cl")
    # first, with glibc's default allocator, as people run them: the docs recipe and every bare step
    result["docs_recipe"] = docs_recipe(root, train_per_class)
    default_bare = {
        v: bare_step(arch, bs, steps, channels_last=cl, bf16=bf16) for v, (arch, _, bf16, cl) in parsed.items()
    }
    # then the bare steps again and our path, both keeping freed memory (our path's default, `--keep-memory`;
    # process-wide, so the ceiling is measured with the same allocator as the path it bounds)
    result["memory_kept"] = hardware.keep_freed_memory()
    for v, (arch, precision, bf16, cl) in parsed.items():
        bare = bare_step(arch, bs, steps, channels_last=cl, bf16=bf16)
        mine = ours(data, arch, bs, train_per_class, runs, precision=precision, channels_last=cl)
        result["variants"][v] = {
            "bare_step_default_allocator": default_bare[v],
            "bare_step": bare,
            "ours": mine,
            "ours_train_vs_bare_step": mine["train_images_per_s"] / bare["images_per_s"],
            "bare_step_memory_kept_vs_default": bare["images_per_s"] / default_bare[v]["images_per_s"],
        }
    docs_speed = result["docs_recipe"]["epoch_images_per_s"]
    result["ratios"] = {
        **{f"{v}: ours_train_vs_bare_step": r["ours_train_vs_bare_step"] for v, r in result["variants"].items()},
        **{
            f"{v}: bare_step_memory_kept_vs_default": r["bare_step_memory_kept_vs_default"]
            for v, r in result["variants"].items()
        },
        **{
            f"{v}: ours_epoch_vs_docs_recipe": r["ours"]["epoch_images_per_s"] / docs_speed
            for v, r in result["variants"].items()
        },
    }
    print(json.dumps(result["ratios"], indent=2))
    write_bench_json(
        out, "python bench/train_speed.py " + shlex.join(sys.argv[1:]),
        "the fastai-docs recipe, the bare training step and our path, images/s and their ratios", load_before, **result,
    )  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
