"""Transfer study: from scratch vs fine-tuned from our own pretrained run, at equal training time, per data size."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from ..data.index import index_images, keep_classes, split_indices
from ..data.sources import resolve_data
from ..training.run import RunResult, train

# A split of CIFAR-10 into two halves that each mix vehicles and animals, so neither half is "the easy one".
SOURCE_CLASSES = "airplane,automobile,bird,cat,deer"


TARGET_CLASSES = "dog,frog,horse,ship,truck"


@dataclass(frozen=True)
class Cell:
    per_class: int | None  # None: every training image of the target classes
    n_train: int
    epochs: int
    scratch: dict
    finetuned: dict


def epochs_for(n_images: int, budget_images: int, max_epochs: int) -> int:
    """Epochs that process about `budget_images` training images (at least 2: fine-tuning needs a frozen + a free one)."""
    return max(2, min(max_epochs, round(budget_images / max(n_images, 1))))


def batch_size_for(n_images: int, bs: int) -> int:
    # >= 8 steps per epoch even for 50 images per class: the train loader drops the last partial batch
    return max(8, min(bs, n_images // 8))


def count_train(cfg: TrainConfig) -> int:
    """Training images the config will use (after --classes, the hold-out and --train-per-class)."""
    index = index_images(resolve_data(cfg.data), verbose=False)
    if cfg.classes:
        index = keep_classes(index, cfg.classes)
    return len(split_indices(index, cfg)[0])


def summary(res) -> dict:
    m = res.metrics
    return {
        "run": str(res.run_dir),
        "test_accuracy": m["test_accuracy"],
        "valid_accuracy": m["valid_accuracy"],
        "fit_seconds": m["train_seconds"] + m["valid_seconds"],  # the fit itself: equal-time comparisons use this
        "wall_seconds": m["wall_seconds"],
    }


def transfer_study(
    data: str,
    arch: str = "tiny",
    width: float = 2.0,
    source: str = SOURCE_CLASSES,
    target: str = TARGET_CLASSES,
    per_class: tuple[int | None, ...] = (50, 500, None),
    pretrain_epochs: int = 6,
    budget_images: int = 60_000,
    max_epochs: int = 40,
    lr: float = 1e-2,
    bs: int = 128,
    out: str = "runs",
    name: str | None = None,
    pretrained_run: str | None = None,
    verbose: bool = True,
) -> Path:
    """Pretrain on `source` classes, then for each data size train on `target` classes twice for the same epochs:
    from scratch (`fit_one_cycle`) and fine-tuned from the pretrained run (`--init-from`: 1 frozen epoch + the rest
    unfrozen). The frozen epoch is cheaper, so fine-tuning gets at most the from-scratch wall time; both are measured."""
    log = print if verbose else (lambda *a, **k: None)
    study_dir = Path(out) / (name or f"transfer-{time.strftime('%Y%m%d-%H%M%S')}")
    study_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = TrainConfig(data=data, arch=arch, width=width, lr=lr, bs=bs, out=str(study_dir))
    if pretrained_run:  # reuse a finished pretraining run (its own config says what it learned)
        pre = RunResult(Path(pretrained_run), json.loads((Path(pretrained_run) / "metrics.json").read_text()))
        pre_cfg = TrainConfig.from_json(pre.run_dir / "config.json")
        arch, width, source, pretrain_epochs = pre_cfg.arch, pre_cfg.width, pre_cfg.classes, pre_cfg.epochs
        base = base.replace(arch=arch, width=width)
    else:
        log(f"pretraining {arch} on {source} for {pretrain_epochs} epochs")
        pre = train(base.replace(classes=source, epochs=pretrain_epochs, name="pretrain"), verbose=False)
    log(f"  test accuracy {pre.metrics['test_accuracy']:.4f} ({pre.metrics['wall_seconds']:.0f} s)")
    cells = []
    for n in per_class:
        tag = "all" if n is None else str(n)
        cfg = base.replace(classes=target, train_per_class=n)
        n_train = count_train(cfg)
        epochs = epochs_for(n_train, budget_images, max_epochs)
        cfg = cfg.replace(bs=batch_size_for(n_train, bs))
        scratch = train(cfg.replace(epochs=epochs, name=f"scratch-{tag}"), verbose=False)
        finetuned = train(
            cfg.replace(init_from=str(pre.run_dir), freeze_epochs=1, epochs=epochs - 1, name=f"finetune-{tag}"),
            verbose=False,
        )
        cell = Cell(n, n_train, epochs, summary(scratch), summary(finetuned))
        cells.append(cell)
        log(
            f"  {tag:>4} per class: scratch {cell.scratch['test_accuracy']:.4f} ({cell.scratch['fit_seconds']:.0f} s)"
            f"  fine-tuned {cell.finetuned['test_accuracy']:.4f} ({cell.finetuned['fit_seconds']:.0f} s)"
        )
    result = {
        "command": " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0].endswith(".py") else None,
        "arch": arch,
        "width": width,
        "source_classes": source,
        "target_classes": target,
        "pretrain": {**summary(pre), "epochs": pretrain_epochs},
        "cells": [cell.__dict__ for cell in cells],
        "total_seconds": time.perf_counter() - t0,
    }
    (study_dir / "study.json").write_text(json.dumps(result, indent=2))
    (study_dir / "study.md").write_text(table(result))
    log(table(result))
    log(f"study folder: {study_dir}")
    return study_dir


def table(result: dict) -> str:
    pre = result["pretrain"]
    lines = [
        (
            f"Pretrained: {result['arch']} (width {result['width']}) on {result['source_classes']}, {pre['epochs']} epochs, "
            f"test accuracy {pre['test_accuracy']:.4f}, {pre['wall_seconds']:.0f} s (paid once). "
            f"Target task: {result['target_classes']}; accuracy on the test images of those classes."
        ),
        "",
        (
            "| images per class | train images | epochs | from scratch: test acc | fine-tuned: test acc | gain | "
            "fit time scratch / fine-tuned |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        s, f = c["scratch"], c["finetuned"]
        tag = "all" if c["per_class"] is None else f"{c['per_class']:,}"
        lines.append(
            f"| {tag} | {c['n_train']:,} | {c['epochs']} | {s['test_accuracy']:.4f} | {f['test_accuracy']:.4f} | "
            f"{f['test_accuracy'] - s['test_accuracy']:+.4f} | {s['fit_seconds']:.0f} s / {f['fit_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"
