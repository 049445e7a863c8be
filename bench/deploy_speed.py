"""CPU deployment benchmark: test accuracy, batch-1 latency and batch-64 throughput of fp32 eager / fp32 ONNX / int8 ONNX.

    python scripts/export.py onnx runs/resnet18-cifar10 && python scripts/export.py int8 runs/resnet18-cifar10
    flock /tmp/cpu.lock python bench/deploy_speed.py runs/resnet18-cifar10      # -> bench/out/deploy_speed.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cifar_fastai.cli import run_or_exit


def main(
    run: Annotated[Path, typer.Argument(help="run folder holding model.json, model.onnx and model.int8.onnx")],
    data: Annotated[str | None, typer.Option(help="test data (default: the run's own --data, from config.json)")] = None,
    n_test: Annotated[int | None, typer.Option(min=1, help="evaluate on a seeded subset (default: the whole test set)")] = None,
    reps: Annotated[int, typer.Option(min=5, help="timed batch-1 calls per variant (median reported)")] = 200,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch and onnxruntime (default: all cores)")] = None,
    out: Annotated[Path, typer.Option(help="JSON written here")] = Path("bench/out/deploy_speed.json"),
) -> None:
    """Measure, print a table, write JSON."""
    from cifar_fastai.deploy.onnx import benchmark

    res = run_or_exit(lambda: benchmark(run, data, n_test, reps, threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    typer.echo(f"{res['n_test']} test images, {res['threads']} threads, {res['cpu']}")
    typer.echo(f"{'variant':12s} {'accuracy':>9s} {'batch-1 ms':>11s} {'x eager':>8s} {'batch-64 img/s':>15s} {'x eager':>8s}")
    for name, r in res["results"].items():
        typer.echo(
            f"{name:12s} {100 * r['test_accuracy']:8.2f}% {r['latency_ms_batch1']:11.2f} {r['speedup_batch1_vs_eager']:7.2f}x "
            f"{r['throughput_img_s_batch64']:15.0f} {r['speedup_batch64_vs_eager']:7.2f}x"
        )
    typer.echo(f"max abs logit diff fp32 ONNX vs eager: {res['max_abs_logit_diff_fp32_onnx']:.1e}; wrote {out}")


if __name__ == "__main__":
    typer.run(main)
