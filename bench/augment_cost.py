"""What `--augment` costs the tensor loader: one epoch of training batches per policy, no model, as JSON.

    flock /tmp/cifar_cpu.lock python bench/augment_cost.py                       # sample, every policy
    flock /tmp/cifar_cpu.lock python bench/augment_cost.py --train-per-class 100 --policies none,trivial

Each policy builds the training loader of `--loader tensor` (the project's `get_data`, threads and memory set as a
run sets them) and times one full pass over its batches: the gather, the policy per image, crop/flip, float
conversion and normalization, all a training epoch asks of the loader. A cost probe, not a training study: the
ratio against 'none' is the loader time the policy adds per epoch, not its effect on accuracy.

Timed figures: run it alone on the CPU, under `flock /tmp/cifar_cpu.lock` as above (the lock the other benchmarks
take), or the figures measure the other jobs too. Writes bench/out/augment_cost.json (or --out).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from fastai.torch_core import set_seed

from cifar_fastai import TrainConfig, get_data
from cifar_fastai.training import hardware
from cifar_fastai.utils import write_bench_json

REPO = Path(__file__).resolve().parents[1]


def epoch_seconds(cfg: TrainConfig) -> tuple[float, int]:
    """Seconds for one pass over the training batches (after one warm-up batch), and the images it made."""
    set_seed(cfg.seed)
    dl = get_data(cfg, verbose=False).dls.train
    dl.one_batch()  # first-call costs (dispatch, allocator) are not the policy's
    n, t0 = 0, time.perf_counter()
    for xb, _ in dl:
        n += len(xb)
    return time.perf_counter() - t0, n


def main(
    data: str = typer.Option("sample", help="--data of the loaders"),
    policies: str = typer.Option("none,trivial,rand,augmix", help="--augment values, comma-separated; 'none' first"),
    bs: int = typer.Option(256, help="--bs"),
    workers: int = typer.Option(0, help="--workers (0: the tensor loader's CPU default)"),
    train_per_class: int = typer.Option(0, help="--train-per-class (0: every training image)"),
    out: str = typer.Option(str(REPO / "bench/out/augment_cost.json"), help="JSON result file"),
) -> None:
    base = TrainConfig(
        data=data, loader="tensor", bs=bs, workers=workers, device="cpu", train_per_class=train_per_class or None
    )
    hardware.setup(base)
    names = policies.split(",")
    results, load_before = {}, round(os.getloadavg()[0], 2)
    for name in names:
        seconds, n = epoch_seconds(base.replace(augment=name))
        results[name] = {"epoch_seconds": round(seconds, 3), "images": n, "images_per_s": round(n / seconds, 1)}
        print(f"{name:8s} {seconds:7.2f} s  {n / seconds:9.0f} images/s", flush=True)
    first = results[names[0]]["epoch_seconds"]
    for r in results.values():
        r[f"seconds_vs_{names[0]}"] = round(r["epoch_seconds"] / first, 2)
    write_bench_json(
        out,
        f"python bench/augment_cost.py --data {data} --policies {policies} --bs {bs} --workers {workers}"
        + (f" --train-per-class {train_per_class}" if train_per_class else ""),
        "one epoch of the tensor loader's training batches per --augment policy, no model",
        load_before,
        results=results,
    )


if __name__ == "__main__":
    typer.run(main)
