"""On a CUDA GPU: the `record` and `fast` recipes, and fine-tuning resnet50 at 224 px, in fp16 and bf16; writes JSON.

    python bench/gpu_check.py --data ../shared/data/cifar10-jpeg75.tgz --weights path/to/resnet50.pth
    python bench/gpu_check.py --data sample --epochs 1 --train-per-class 100     # a short check

Each (job, precision) is one `train()` of our path (the flow of scripts/train.py) and a bare training step of the
same learner's model, optimizer and loss on one fixed random batch on the GPU (forward + backward + step under the
same autocast, nothing else: the compute ceiling; bench/train_speed.py's `bare_step` is the CPU version). The JSON
(default bench/out/gpu_check.json) holds training images/s, the ratio ours / bare step, test accuracy (with TTA
where the recipe reports it), wall time and the peak GPU memory (`torch.cuda.max_memory_allocated`) of each.

The fine-tuning job is `--arch resnet50 --weights FILE --size 224`, one epoch with the body unfrozen
(`--freeze-epochs 0`). Without `--weights` it writes a randomly initialised torchvision resnet50 to a weights file
and fine-tunes from that: the speed and memory hold, the accuracy means nothing (the JSON says so). Without CUDA the
script refuses in one line and exits 1.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench/out/gpu_check.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def bare_step_gpu(settings: dict, steps: int, warmup: int = 3) -> dict:
    """The ceiling on the GPU: forward + backward + optimizer step of the run's own model, optimizer and loss (a
    learner built from the same settings, unfrozen) on one fixed random batch under the run's autocast and loss
    scaling, timed between CUDA synchronizations."""
    from cifar_fastai.training.run import get_learner

    learn = get_learner(**settings)
    learn.unfreeze()
    cfg_bs, size, precision = settings["bs"], settings["size"], settings["precision"]
    fmt = torch.channels_last if settings.get("channels_last") else torch.contiguous_format
    model = learn.model.cuda().to(memory_format=fmt).train()
    learn.create_opt()
    x = torch.randn(cfg_bs, 3, size, size, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, len(learn.dls.vocab), (cfg_bs,), device="cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # fp16 needs loss scaling, as fastai's
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=DTYPES[precision]):
            loss = learn.loss_func(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(learn.opt)
        scaler.update()
        learn.opt.zero_grad()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images_per_s": cfg_bs * steps / seconds, "steps": steps, "bs": cfg_bs, "size": size}


def one_job(name: str, cfg, steps: int) -> dict:
    """Our `train()` path on the GPU for one config, its peak GPU memory, and the bare step of its settings."""
    from cifar_fastai.training.resolve import resolve
    from cifar_fastai.training.run import train

    settings = resolve(cfg).cfg.to_dict()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = train(cfg, verbose=True)
    peak = torch.cuda.max_memory_allocated()
    m = res.metrics
    bare = bare_step_gpu(settings, steps)
    return {
        "job": name,
        "run_dir": str(res.run_dir),
        "config": {k: settings[k] for k in ("arch", "width", "bs", "epochs", "size", "precision", "channels_last")},
        "train_images_per_s": m["train_images_per_s"],
        "epoch_images_per_s": m.get("epoch_images_per_s"),
        "test_accuracy": m["test_accuracy"],
        "test_accuracy_tta": m.get("test_accuracy_tta"),
        "wall_seconds": m["wall_seconds"],
        "peak_gpu_memory_mib": peak / 2**20,
        "bare_step": bare,
        "ours_train_vs_bare_step": m["train_images_per_s"] / bare["images_per_s"],
        **(
            {"note": "progressive resizing: images/s counts the early epochs' smaller images"}
            if settings["progressive"]
            else {}
        ),
    }


def random_resnet50(folder: Path) -> Path:
    """A torchvision resnet50 state dict of random weights: fine-tuning's speed and memory without a download."""
    from torchvision.models import resnet50

    path = folder / "resnet50-random.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    return path


@app.command()
def main(
    data: Annotated[str, typer.Option(help="CIFAR-layout folder or .tgz")] = str(
        REPO.parent / "shared/data/cifar10-jpeg75.tgz"
    ),
    recipes: Annotated[str, typer.Option(help="named recipes, comma-separated")] = "record,fast",
    precisions: Annotated[str, typer.Option(help="comma-separated: fp16, bf16")] = "fp16,bf16",
    weights: Annotated[
        Path | None, typer.Option(help="local resnet50 weights to fine-tune from; none: random weights (speed only)")
    ] = None,
    finetune_arch: Annotated[str, typer.Option(help="the fine-tuning job's architecture")] = "resnet50",
    size: Annotated[int, typer.Option(min=32, help="the fine-tuning job's input size")] = 224,
    finetune_bs: Annotated[int, typer.Option(min=1, help="the fine-tuning job's batch size")] = 128,
    epochs: Annotated[int | None, typer.Option(min=1, help="override the recipes' epochs (short checks)")] = None,
    train_per_class: Annotated[int | None, typer.Option(min=1, help="training images per class (short checks)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="timed bare steps per job")] = 20,
    out: Annotated[Path, typer.Option(help="JSON result file")] = DEFAULT_OUT,
) -> None:
    """Run the recipes and the fine-tuning job on the GPU in each precision and write the JSON."""
    if not torch.cuda.is_available():
        typer.echo(
            "bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here): nothing run", err=True
        )
        raise typer.Exit(1)
    from cifar_fastai import TrainConfig
    from cifar_fastai.errors import CifarFastaiError

    runs = out.parent / "gpu_runs"
    common = {"data": data, "device": "cuda", "out": str(runs), "checkpoint": False}
    if train_per_class:
        common["train_per_class"] = train_per_class
    result = {
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
        "machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda},
        "jobs": {},
    }
    bad = [p for p in precisions.split(",") if p not in DTYPES]
    if bad:  # before any job: a typo in the last entry must not cost the hours of the first ones
        typer.echo(f"--precisions {bad[0]}: choose fp16 or bf16", err=True)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        ft_weights = weights or random_resnet50(Path(tmp))
        for precision in precisions.split(","):
            jobs = {r: {"recipe": r, **({"epochs": epochs} if epochs else {})} for r in recipes.split(",") if r}
            jobs[f"finetune-{finetune_arch}-{size}px"] = {
                "arch": finetune_arch, "weights": str(ft_weights), "size": size, "bs": finetune_bs, "epochs": 1,
                "freeze_epochs": 0, "channels_last": True,
            }  # fmt: skip
            for name, extra in jobs.items():
                key = f"{name}:{precision}"
                try:
                    cfg = TrainConfig(**common, **extra, precision=precision, name=key.replace(":", "-"))
                    result["jobs"][key] = one_job(name, cfg, steps)
                except CifarFastaiError as e:  # a job the GPU cannot run (bf16 on a pre-Ampere card): said, not fatal
                    result["jobs"][key] = {"job": name, "error": str(e)}
                if name.startswith("finetune") and weights is None:
                    result["jobs"][key]["weights"] = "random (speed and memory only; accuracy not meaningful)"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2))  # after every job: a stopped check keeps what it has
    print(json.dumps({k: {f: v.get(f) for f in ("train_images_per_s", "ours_train_vs_bare_step", "test_accuracy",
                                                 "peak_gpu_memory_mib", "error")} for k, v in result["jobs"].items()},
                     indent=2))  # fmt: skip
    print(f"written {out}")


if __name__ == "__main__":
    app()
