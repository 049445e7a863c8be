"""Evaluate a finished run: accuracy, loss, per-class precision/recall/F1, confusion matrix, TTA, robust accuracy.

    python scripts/evaluate.py runs/resnet18-20250101-120000
    python scripts/evaluate.py runs/<name> --attack pgd --eps 8/255 --attack-n 500
    python scripts/evaluate.py runs/<name> --data path/to/folder_of_class_folders
"""

from pathlib import Path
from typing import Annotated, Literal

import typer

from cifar_fastai.cli import new_app, run_or_exit
from cifar_fastai.config import DEFAULTS, fraction

app = new_app()
Opt = typer.Option


@app.command()
def main(
    run: Annotated[Path, typer.Argument(help="run folder (runs/<name>) with model.json + model.safetensors")],
    data: Annotated[
        str | None,
        Opt(help="evaluate on this instead of the run's test set: a CIFAR-layout folder/.tgz (its test/) or class folders"),
    ] = None,
    attack: Annotated[Literal["none", "fgsm", "pgd"], Opt(help="also report accuracy under this white-box attack")] = "none",
    eps: Annotated[float, Opt(parser=fraction, show_default="8/255", help="attack radius, pixel space [0,1]")] = DEFAULTS.eps,
    adv_steps: Annotated[int, Opt(min=1, help="PGD steps")] = DEFAULTS.adv_steps,
    adv_alpha: Annotated[
        float, Opt(parser=fraction, show_default="2/255", help="PGD step size, pixel space")
    ] = DEFAULTS.adv_alpha,
    attack_n: Annotated[int, Opt(min=0, help="attack a seeded random subset of this many images (0 = all)")] = 1000,
    tta: Annotated[bool, Opt(help="also report test-time-augmentation accuracy (fastai learn.tta)")] = True,
    tta_select: Annotated[
        float, Opt(help="fraction of the images (least certain first) that get the extra TTA views; 1: all")
    ] = DEFAULTS.tta_select,
    bs: Annotated[int, Opt(min=1, help="batch size")] = 256,
    trust_pickle: Annotated[
        bool, Opt(help="allow a run that has only export.pkl (unpickling runs its code: only runs you made)")
    ] = False,
) -> None:
    """Evaluate runs/<name>; writes evaluation.json, evaluation.md, evaluation_confusion_matrix.png and
    evaluation_top_losses.png (the worst-predicted test images with Grad-CAM heat maps) into it."""
    from cifar_fastai.evaluation.evaluate import evaluate

    run_or_exit(
        lambda: evaluate(
            run, data, attack, eps, adv_alpha, adv_steps, attack_n or None, tta, bs, trust_pickle, tta_select=tta_select
        )
    )


if __name__ == "__main__":
    app()
