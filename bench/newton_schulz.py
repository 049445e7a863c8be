"""Benchmark: Muon's Newton-Schulz iteration over a net's conv filters in bf16 and in fp32 on this CPU, as JSON.

    python bench/newton_schulz.py                      # the residual fast net (airbench_resnet, full width)
    python bench/newton_schulz.py --arch airbench94 --reps 5

One optimizer step orthogonalizes every filter bank once; this times that for both precisions on the same machine,
in one run, and states which one `MuonSGD` picks here (`iteration_dtype`). Writes bench/out/newton_schulz.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer

from cifar_fastai.models import get_arch
from cifar_fastai.training.hardware import cpu_flags
from cifar_fastai.training.optim import iteration_dtype, newton_schulz
from cifar_fastai.utils import cpu_info, versions


def step_ms(filters: list[torch.Tensor], dtype: torch.dtype, reps: int) -> float:
    """Median milliseconds of one step's iterations (every filter bank once), after one warm-up step."""
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        for g in filters:
            newton_schulz(g, dtype=dtype)
        if i:
            times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def main(
    arch: str = typer.Option("airbench_resnet", help="the net whose conv filters are orthogonalized"),
    reps: int = typer.Option(3, help="timed steps per precision (the median is reported)"),
    out: str = typer.Option("bench/out/newton_schulz.json", help="JSON result file"),
) -> None:
    torch.manual_seed(0)
    model = get_arch(arch).builder(10)  # one of the project's CIFAR nets (kind 'cifar')
    filters = [torch.randn(len(p), p[0].numel()) for p in model.parameters() if p.ndim == 4]
    ms = {str(d).removeprefix("torch."): step_ms(filters, d, reps) for d in (torch.float32, torch.bfloat16)}
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))
    result = {
        "command": f"python bench/newton_schulz.py --arch {arch} --reps {reps}",
        "machine": {"cpu": cpu_info()["model"], "threads": torch.get_num_threads(), "bf16_flags": flags},
        "versions": versions(),
        "filter_banks": len(filters),
        "step_ms": ms,
        "bf16_vs_fp32_time": ms["bfloat16"] / ms["float32"],
        "muon_picks": str(iteration_dtype(torch.device("cpu"))).removeprefix("torch."),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
