"""Evaluate a finished run: accuracy, loss, per-class precision/recall/F1, confusion matrix, TTA, robust accuracy.

python scripts/evaluate.py runs/resnet18-20250101-120000
python scripts/evaluate.py runs/<name> --attack pgd --eps 8/255 --attack-n 500
python scripts/evaluate.py runs/<name> --data path/to/folder_of_class_folders
"""

from pathlib import Path
from typing import Literal

import typer

from cifar_fastai.cli import run_or_exit
from cifar_fastai.config import DEFAULTS, fraction

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(
    run: Path = typer.Argument(..., help="run folder (runs/<name>) with export.pkl and config.json"),
    data: str | None = typer.Option(
        None,
        help="evaluate on this instead of the run's test set: a CIFAR-layout folder/.tgz (its test/) or a folder of class folders",
    ),
    attack: Literal["none", "fgsm", "pgd"] = typer.Option(
        "none", help="also report accuracy under this white-box attack"
    ),
    eps: float = typer.Option(
        DEFAULTS.eps, parser=fraction, show_default="8/255", help="attack radius, pixel space [0,1]"
    ),
    adv_steps: int = typer.Option(DEFAULTS.adv_steps, min=1, help="PGD steps"),
    adv_alpha: float = typer.Option(
        DEFAULTS.adv_alpha, parser=fraction, show_default="2/255", help="PGD step size, pixel space"
    ),
    attack_n: int = typer.Option(1000, min=0, help="attack a seeded random subset of this many images (0 = all)"),
    tta: bool = typer.Option(True, help="also report test-time-augmentation accuracy (fastai learn.tta)"),
    bs: int = typer.Option(256, min=1, help="batch size"),
) -> None:
    """Evaluate runs/<name>; writes evaluation.json, evaluation.md and evaluation_confusion_matrix.png into it."""
    from cifar_fastai.evaluate import evaluate

    run_or_exit(lambda: evaluate(run, data, attack, eps, adv_alpha, adv_steps, attack_n or None, tta, bs))


if __name__ == "__main__":
    app()
