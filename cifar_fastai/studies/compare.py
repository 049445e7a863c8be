"""The depth/width study: train a grid of architectures x widths under one budget; write a CSV, a Markdown table, a plot.

Each row runs `train(cfg)` (the one flow) in a fresh Python process, so its peak memory and wall time are its own
and a crashed row does not end the grid. Rows already in the CSV are skipped: rerun the same command to resume.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import CifarFastaiError, ConfigError, TrainingError
from ..models import get_arch
from ..training.resolve import Resolved, resolve
from ..utils import eval_mode

COLUMNS = ["arch", "width", "params_m", "mflops", "train_img_s", "peak_mem_mb", "wall_s", "valid_acc", "test_acc", "run"]


# The settings that differ between rows; everything else is the budget every row shares.
ROW_FIELDS = ("arch", "width", "name", "out")


class CompareError(CifarFastaiError):
    """A grid spec that cannot be run, or a resumed study whose budget differs from the first run."""


def parse_grid(grid: str, widths: str = "1") -> list[tuple[str, float]]:
    """`"resnet20,resnet20:2,cifar_resnet18"` -> (arch, width) pairs; a name without `:w` takes every `widths` value.

    Widths only exist for the project's own models: torchvision/timm rows are trained once, at width 1.
    """
    try:
        default_widths = [float(w) for w in widths.split(",") if w.strip()]
    except ValueError:
        raise CompareError(f"--widths {widths}: comma-separated numbers, e.g. 1,2,4") from None
    rows: list[tuple[str, float]] = []
    for spec in (s.strip() for s in grid.split(",")):
        if not spec:
            continue
        name, _, w = spec.partition(":")
        kind = get_arch(name).kind  # unknown names fail here, before anything trains
        try:
            ws = [float(w)] if w else default_widths
        except ValueError:
            raise CompareError(f"--grid {spec}: the width after ':' must be a number, e.g. {name}:2") from None
        if kind != "cifar":
            if any(x != 1.0 for x in ws) and w:
                raise CompareError(f"--grid {spec}: width multipliers apply only to the project's own models")
            ws = [1.0]
        rows += [(name, x) for x in ws if (name, x) not in rows]
    if not rows:
        raise CompareError("--grid is empty: name at least one architecture, e.g. --grid resnet20,resnet56")
    return rows


def count_model(model: torch.nn.Module, size: int = 32) -> dict[str, float]:
    """Parameters, and forward FLOPs for one image counted by `FlopCounterMode` (convs and matmuls; 1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    return {"params": sum(x.numel() for x in model.parameters()), "flops": counter.get_total_flops()}


def rss_mb() -> float:
    """Resident memory now (Linux /proc); elsewhere the peak so far, which is what it equals before training."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # kB on Linux, bytes on macOS


def run_row(plan: Resolved) -> dict:
    """Inside the row's own process: train, then measure the exported model and this process's peak memory."""
    cfg = plan.cfg
    from fastai.learner import load_learner

    from ..training.run import train

    before = rss_mb()  # after imports, before data: the baseline every row shares
    result = train(plan)
    peak = peak_rss_mb() - before
    model = load_learner(result.run_dir / "export.pkl", cpu=True).model  # our own file, just written: trusted
    counts = count_model(model, cfg.size)
    m = result.metrics
    return {
        "arch": cfg.arch,
        "width": cfg.width,
        "params_m": round(counts["params"] / 1e6, 3),
        "mflops": round(counts["flops"] / 1e6, 1),
        "train_img_s": round(m["train_images_per_s"], 1),
        "peak_mem_mb": round(peak),
        "wall_s": round(m["wall_seconds"], 1),
        "valid_acc": round(m["valid_accuracy"], 4),
        "test_acc": round(m["test_accuracy"], 4),
        "run": str(result.run_dir),
    }


def _row_main(cfg_path: str, out_path: str) -> None:
    """`python -m cifar_fastai.studies.compare ROW.json OUT.json`: one grid row in a fresh process."""
    spec = json.loads(Path(cfg_path).read_text())
    try:
        row = run_row(resolve(TrainConfig.from_dict(spec["config"]), spec["explicit"]))
    except CifarFastaiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    Path(out_path).write_text(json.dumps(row))


def spawn_row(cfg: TrainConfig, explicit: Collection[str]) -> dict | None:
    """Run one row in a child process (its output goes to ours); None when it failed."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps({"config": cfg.to_dict(), "explicit": sorted(explicit)}))
        proc = subprocess.run([sys.executable, "-m", "cifar_fastai.studies.compare", str(cfg_path), str(out_path)], env=env, check=False)
        if proc.returncode != 0 or not out_path.exists():
            return None
        return json.loads(out_path.read_text())


def budget_of(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in ROW_FIELDS}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_outputs(study: Path, rows: list[dict], budget: dict) -> None:
    """compare.csv, compare.md (table + budget) and compare.png, rewritten after every row."""
    with (study / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    (study / "compare.md").write_text(markdown_table(rows, budget))
    plot(rows, study / "compare.png", budget)


MD_HEADER = (
    "| arch | width | params (M) | MFLOPs/image | train img/s | peak mem (MB) | wall (s) | valid acc | test acc |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
)


def markdown_table(rows: list[dict], budget: dict) -> str:
    lines = list(MD_HEADER)
    for r in rows:
        lines.append(
            f"| {r['arch']} | {float(r['width']):g} | {float(r['params_m']):.2f} | {float(r['mflops']):,.0f} | "
            f"{float(r['train_img_s']):.0f} | {float(r['peak_mem_mb']):.0f} | {float(r['wall_s']):.0f} | "
            f"{float(r['valid_acc']):.3f} | {float(r['test_acc']):.3f} |"
        )
    keys = ("data", "epochs", "bs", "lr", "wd", "train_per_class", "valid", "valid_pct", "seed", "zero_init_residual")
    lines += [
        "",
        "Budget: " + ", ".join(f"{k}={budget.get(k)}" for k in keys) + " (fit_one_cycle, standard pad-crop-flip).",
        ("MFLOPs: forward FLOPs per 32x32 image counted by torch's FlopCounterMode (convs + linear, 1 MAC = 2 FLOPs). "
        "Peak mem: peak resident memory of the row's own process above its memory after imports "
        "(data + model + activations + optimizer state). Wall: the whole `train()` run including the test evaluation."),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, budget: dict) -> None:
    """Test accuracy against MFLOPs and against wall time, one labelled point per model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "mflops", "MFLOPs per image (forward)"), (axes[1], "wall_s", "wall time (s)")):
        for r in rows:
            x, y = float(r[key]), float(r["test_acc"])
            ax.scatter(x, y)
            ax.annotate(f"{r['arch']} x{float(r['width']):g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{budget.get('epochs')} epoch(s), train_per_class={budget.get('train_per_class')}, seed {budget.get('seed')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    base: TrainConfig, grid: list[tuple[str, float]], study: str = "compare", explicit: Collection[str] = ()
) -> Path:
    """Train every (arch, width) of `grid` with `base`'s budget into `<base.out>/<study>/`; returns that folder.

    Each row is resolved as `scripts/train.py` resolves a run (`explicit`: the options the user gave; a row's arch
    and width count as given), and every row's settings are checked before the first one trains."""
    folder = Path(base.out) / study
    folder.mkdir(parents=True, exist_ok=True)
    budget = budget_of(base)
    budget_file = folder / "budget.json"
    if budget_file.exists():
        # options added to the project since (absent from the old file) count as their defaults
        defaults = budget_of(TrainConfig())
        old = {**{k: v for k, v in defaults.items() if k not in json.loads(budget_file.read_text())},
               **json.loads(budget_file.read_text())}
        changed = sorted(k for k in set(old) | set(budget) if old.get(k) != budget.get(k))
        if changed:
            raise CompareError(
                f"{folder} was run with another budget ({', '.join(f'{k}: {old.get(k)} -> {budget.get(k)}' for k in changed)}): "
                "use another --study name, or the same settings to resume"
            )
    budget_file.write_text(json.dumps(budget, indent=2))
    given = {*explicit, "arch", "width", "out", "name"}
    row_cfgs = {}
    for arch, width in grid:
        try:
            cfg = base.replace(arch=arch, width=width, out=str(folder), name=f"{arch.replace('/', '-')}-w{width:g}")
            resolve(cfg, given)
        except ConfigError as e:
            raise CompareError(f"--grid {arch}:{width:g} cannot be trained with these options: {e}") from None
        row_cfgs[(arch, width)] = cfg
    rows = read_rows(folder / "compare.csv")
    done = {(r["arch"], float(r["width"])) for r in rows}
    failed = []
    for arch, width in grid:
        if (arch, width) in done:
            print(f"{arch} x{width:g}: already in {folder / 'compare.csv'}, skipped", flush=True)
            continue
        print(f"=== {arch} x{width:g} ===", flush=True)
        row = spawn_row(row_cfgs[(arch, width)], given)
        if row is None:
            failed.append(f"{arch} x{width:g}")
            continue
        rows.append(row)
        write_outputs(folder, rows, budget)
    if rows:
        write_outputs(folder, rows, budget)
    print(f"table: {folder / 'compare.md'}\nplot: {folder / 'compare.png'}", flush=True)
    if failed:
        raise TrainingError(f"{len(failed)} row(s) failed: {', '.join(failed)} (rerun the command to retry them)")
    return folder


if __name__ == "__main__":
    _row_main(*sys.argv[1:3])
