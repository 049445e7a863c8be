"""A grid of architectures x widths under one budget (`scripts/compare.py`), and the row process every study uses.

Each row runs `train(cfg)` (the one flow) in a fresh Python process, so its peak memory and wall time are its own
and a crashed row does not end the grid; studies/study.py keeps the rows (resumable CSV, table, plot).
"""

from __future__ import annotations

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
from ..errors import CifarFastaiError, StudyError
from ..models import get_arch
from ..training.resolve import Resolved, resolve
from ..utils import eval_mode

# a grid spec that cannot be run, or a resumed grid whose budget differs from the first run: a study's error
CompareError = StudyError


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


def run_row(plan: Resolved, measure: dict | None = None) -> dict:
    """Inside the row's own process: train, then measure the exported model and this process's peak memory (and with
    `measure`, the robust accuracy of the run's test images under that attack: `{attack, eps, alpha, steps, n}`)."""
    cfg = plan.cfg
    from fastai.learner import load_learner

    from ..training.run import train

    before = rss_mb()  # after imports, before data: the baseline every row shares
    result = train(plan)
    peak = peak_rss_mb() - before
    model = load_learner(result.run_dir / "export.pkl", cpu=True).model  # our own file, just written: trusted
    counts = count_model(model, cfg.size)
    m = result.metrics
    epochs = len((result.run_dir / "history.csv").read_text().splitlines()) - 1  # one line per epoch fit
    budget = m.get("time_budget", {})
    if "batches_run" in budget or "last_epoch_batches" in budget:  # a share of the one epoch, or of the last one
        epochs = budget["epochs_run"]
    return {
        **(robust_row(result.run_dir, measure) if measure else {}),
        "epochs": epochs,
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


def robust_row(run_dir: Path, measure: dict) -> dict:
    """Clean and attacked accuracy of the run's exported model on the first `n` images of its own test split."""
    from ..evaluation.attacks import robust_accuracy
    from ..evaluation.evaluate import evaluation_dl, load_run_learner

    learn = load_run_learner(run_dir)
    dl, _, _ = evaluation_dl(learn, run_dir, None, bs=250)
    r = robust_accuracy(learn.model, dl, measure["attack"], measure["eps"], measure["alpha"], measure["steps"],
                        limit=measure["n"])  # fmt: skip
    return {"robust_acc": round(r["robust_accuracy"], 4), "attack_n": r["n"]}


def _row_main(cfg_path: str, out_path: str) -> None:
    """`python -m cifar_fastai.studies.compare ROW.json OUT.json`: one grid row in a fresh process."""
    spec = json.loads(Path(cfg_path).read_text())
    try:
        row = run_row(resolve(TrainConfig.from_dict(spec["config"]), spec["explicit"]), spec.get("measure"))
    except CifarFastaiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    Path(out_path).write_text(json.dumps(row))


def spawn_row(cfg: TrainConfig, explicit: Collection[str], measure: dict | None = None) -> dict | None:
    """Run one row in a child process (its output goes to ours); None when it failed."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps({"config": cfg.to_dict(), "explicit": sorted(explicit), "measure": measure}))
        proc = subprocess.run([sys.executable, "-m", "cifar_fastai.studies.compare", str(cfg_path), str(out_path)], env=env, check=False)
        if proc.returncode != 0 or not out_path.exists():
            return None
        return json.loads(out_path.read_text())


def compare(
    base: TrainConfig, grid: list[tuple[str, float]], study: str = "compare", explicit: Collection[str] = ()
) -> Path:
    """Train every (arch, width) of `grid` with `base`'s budget into `<base.out>/<study>/`; returns that folder.

    A study of its own rows (studies/study.py runs it: resumable, the budget kept and checked); each row is resolved
    as `scripts/train.py` resolves a run (`explicit`: the options the user gave; a row's arch and width count as
    given), and every row's settings are checked before the first one trains."""
    from .study import Row, Study, run_study

    rows = tuple(Row(f"{arch}:{width:g}" if width != 1 else arch, {"arch": arch, "width": width}) for arch, width in grid)
    spec = Study(study, "accuracy and cost of each architecture x width under one budget", {}, rows, plot="cost")
    return run_study(spec, base, explicit, Path(base.out) / study, (base.seed,))


if __name__ == "__main__":
    _row_main(*sys.argv[1:3])
