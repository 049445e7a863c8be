"""What selective TTA keeps of full TTA's gain, and what it costs, on finished runs, as JSON.

    flock /tmp/cifar_cpu.lock python bench/selective_tta.py runs/fast-s0 runs/fast-s1 --fractions 1,0.5,0.25,0.1

For each run folder: the test set's plain pass (timed once, its logits kept), then for each fraction F the extra
TTA views on the F least certain test images (`--tta-select F` in training and evaluation; `selective_tta_preds`),
timed, and the test accuracy. A fraction's cost is the plain pass plus its views, reported as a ratio to full TTA
(F = 1) in the same process; its gain as the share of full TTA's gain over the plain pass that it keeps. The model
runs as `scripts/evaluate.py` runs it (model.safetensors, fp32, the run's test split and normalization), so the
times are evaluation's, not a bf16 training run's; the ratios are what a recipe's test pass would save.

Timed figures: run it alone on the CPU, under `flock /tmp/cifar_cpu.lock` as above (the lock the other benchmarks
take). Writes bench/out/selective_tta.json (or --out).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from fastai.torch_core import noop

from cifar_fastai.evaluation.evaluate import evaluation_dl, load_run_learner
from cifar_fastai.evaluation.report import selective_tta_preds
from cifar_fastai.utils import write_bench_json

REPO = Path(__file__).resolve().parents[1]


def fractions_of(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text}: comma-separated fractions between 0 and 1") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise typer.BadParameter(f"{text}: comma-separated fractions between 0 and 1")
    return sorted(set(values) | {1.0}, reverse=True)  # full TTA: the baseline of every ratio


def measure(run_dir: Path, fractions: list[float], bs: int) -> dict:
    if not (run_dir / "model.safetensors").is_file():
        raise typer.BadParameter(f"{run_dir}: not a finished run folder (no model.safetensors)")
    learn = load_run_learner(run_dir)
    dl, source, _ = evaluation_dl(learn, run_dir, None, bs)
    learn.get_preds(dl=dl.new(n=bs), act=noop)  # first-call costs (kernel choice, allocator) are not the pass's
    t0 = time.perf_counter()
    plain, targs = learn.get_preds(dl=dl, act=noop)
    plain_s = time.perf_counter() - t0
    plain_acc = float((plain.argmax(1) == targs).float().mean())
    rows = {}
    for f in fractions:
        t0 = time.perf_counter()
        preds, _, marked = selective_tta_preds(learn, dl, f, plain=plain, targs=targs)
        rows[f] = {"accuracy": round(float((preds.argmax(1) == targs).float().mean()), 4),
                   "extra_view_images": len(marked), "seconds": round(plain_s + time.perf_counter() - t0, 2)}  # fmt: skip
    full = rows[1.0]
    gain = full["accuracy"] - plain_acc
    for r in rows.values():
        r["seconds_vs_full_tta"] = round(r["seconds"] / full["seconds"], 3)
        r["gain_kept"] = round((r["accuracy"] - plain_acc) / gain, 3) if gain > 0 else None
    return {"run": str(run_dir), "test": source, "n": len(targs), "plain_accuracy": round(plain_acc, 4),
            "plain_seconds": round(plain_s, 2), "fractions": {f"{f:g}": r for f, r in rows.items()}}  # fmt: skip


def main(
    runs: Annotated[list[Path], typer.Argument(help="finished run folders (model.safetensors + config.json)")],
    fractions: str = typer.Option("1,0.5,0.25,0.1", help="--tta-select fractions, comma-separated (1 is always in)"),
    bs: int = typer.Option(500, help="test batch size"),
    out: str = typer.Option(str(REPO / "bench/out/selective_tta.json"), help="JSON result file"),
) -> None:
    picked = fractions_of(fractions)
    load_before = round(os.getloadavg()[0], 2)
    results = []
    for run_dir in runs:
        r = measure(run_dir, picked, bs)
        results.append(r)
        for f, row in r["fractions"].items():
            print(f"{run_dir.name}: F={f:4s} {100 * row['accuracy']:.2f}% ({row['extra_view_images']:,} images with "
                  f"views) in {row['seconds']:.1f} s = {row['seconds_vs_full_tta']:.2f}x full TTA; gain kept "
                  f"{row['gain_kept']}", flush=True)  # fmt: skip
    write_bench_json(
        out,
        "python bench/selective_tta.py " + " ".join(map(str, runs)) + f" --fractions {fractions} --bs {bs}",
        "test accuracy and time of TTA on the least certain fraction F of the test images, per finished run",
        load_before,
        runs=results,
    )


if __name__ == "__main__":
    typer.run(main)
