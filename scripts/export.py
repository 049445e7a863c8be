"""Export a trained run: ONNX (preprocessing inside the graph), int8 ONNX, the safe format, or a Hub model folder.

    python scripts/export.py onnx runs/resnet18-cifar10
    python scripts/export.py int8 runs/resnet18-cifar10 --calib 512
    python scripts/export.py safe runs/old-run --trust-pickle     # an old run with only export.pkl -> model.json
    python scripts/export.py hub runs/resnet18-cifar10 --push your-name/cifar10-resnet18
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cifar_fastai.cli import new_app, run_or_exit

app = new_app(no_args_is_help=True)
Trust = Annotated[bool, typer.Option("--trust-pickle", help="read export.pkl when the run has no model.json (runs its code)")]
Run = Annotated[Path, typer.Argument(help="run folder")]


@app.command()
def onnx(run: Run, trust_pickle: Trust = False) -> None:
    """Write runs/<name>/model.onnx (input: float32 NCHW RGB in [0,1] at 32x32; normalization inside) + model.onnx.json."""
    import numpy as np

    from cifar_fastai.deploy.onnx import PARITY_ATOL, eager_logits, export_onnx, onnx_logits, ort_session, wrapped_model

    def job():
        out = export_onnx(run, trust_pickle=trust_pickle)
        model, _ = wrapped_model(run, trust_pickle)
        x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
        diff = float(np.abs(onnx_logits(ort_session(out), x) - eager_logits(model, x)).max())
        if diff > PARITY_ATOL:
            typer.echo(f"warning: ONNX logits differ from PyTorch by {diff:.2e} (> {PARITY_ATOL})", err=True)
        typer.echo(f"wrote {out} and {out.with_name('model.onnx.json')} (max abs logit diff vs PyTorch {diff:.1e})")

    run_or_exit(job)


@app.command()
def int8(
    run: Run,
    data: Annotated[str | None, typer.Option(help="calibration data (default: the run's own --data, from config.json)")] = None,
    calib: Annotated[int, typer.Option(min=1, help="training images used to calibrate activation ranges")] = 512,
    reduce_range: Annotated[bool, typer.Option(help="7-bit weights: onnxruntime's advice for x86 CPUs without VNNI")] = True,
    trust_pickle: Trust = False,
) -> None:
    """Write runs/<name>/model.int8.onnx: static int8 quantization (onnxruntime, QDQ) calibrated on training images."""
    from cifar_fastai.deploy.onnx import quantize_int8

    out = run_or_exit(lambda: quantize_int8(run, data, calib, reduce_range=reduce_range, trust_pickle=trust_pickle))
    typer.echo(f"wrote {out}")


@app.command()
def safe(run: Run, trust_pickle: Trust = False) -> None:
    """Write model.json + model.safetensors for a run that has only export.pkl (needs --trust-pickle)."""
    from cifar_fastai.deploy.safe import convert_pickle

    out = run_or_exit(lambda: convert_pickle(run, trust_pickle=trust_pickle))
    typer.echo(f"wrote {out} and {out.with_name('model.safetensors')}")


@app.command()
def hub(
    run: Run,
    out: Annotated[Path | None, typer.Option(help="folder to write (default: <run>/hub)")] = None,
    push: Annotated[
        str | None, typer.Option(help="then upload the folder to this Hub repo (owner/name; created if missing)")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Hub id of the model it was fine-tuned from (default: timm's, for timm weights)")
    ] = None,
    private: Annotated[bool, typer.Option(help="--push: create the repo private")] = False,
) -> None:
    """Write a Hugging Face Hub model folder: model.safetensors, model.json, timm-style config.json, README.md card."""
    from cifar_fastai.deploy.hub import check_repo_id, export_hub
    from cifar_fastai.deploy.hub import push as push_folder

    if push:
        run_or_exit(lambda: check_repo_id(push))  # a bad id is refused before any work
    folder = run_or_exit(lambda: export_hub(run, out, repo_id=push, base_model=base_model))
    typer.echo(f"wrote {folder}: model.safetensors, model.json, config.json, README.md")
    if push:
        url = run_or_exit(lambda: push_folder(folder, push, private=private))
        typer.echo(f"pushed to https://huggingface.co/{push} ({url})")


if __name__ == "__main__":
    app()
