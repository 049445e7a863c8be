"""Transfer study: from scratch vs fine-tuned from our own pretrained run, at equal training time, per data size.

python scripts/transfer_study.py --data ../shared/data/cifar10-jpeg75.tgz
python scripts/transfer_study.py --data sample --per-class 20,all --pretrain-epochs 2
"""

import typer

from cifar_fastai.cli import run_or_exit
from cifar_fastai.transfer import SOURCE_CLASSES, TARGET_CLASSES, transfer_study

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(
    data: str = typer.Option("cifar10", help="as scripts/train.py --data"),
    arch: str = typer.Option("tiny", help="architecture of both arms (see scripts/train.py --list-archs)"),
    width: float = typer.Option(2.0, help="width multiplier for the project's own models"),
    source: str = typer.Option(SOURCE_CLASSES, help="classes the pretrained run learns"),
    target: str = typer.Option(TARGET_CLASSES, help="classes of the new task (from scratch vs fine-tuned)"),
    per_class: str = typer.Option("50,500,all", help="training images per class of the new task, comma-separated"),
    pretrain_epochs: int = typer.Option(6, min=1, help="epochs of the pretraining run"),
    budget_images: int = typer.Option(
        60_000, min=1, help="per cell: epochs ~ this many training images / train set size"
    ),
    max_epochs: int = typer.Option(40, min=2, help="epoch cap for the smallest data sizes"),
    lr: float = typer.Option(1e-2, min=0.0, help="max learning rate of both arms (fine-tuning: fastai's base lr)"),
    bs: int = typer.Option(128, min=1, help="batch size (smaller for tiny training sets: >= 8 steps per epoch)"),
    out: str = typer.Option("runs", help="folder for the study folder"),
    name: str = typer.Option(None, help="study folder name (default transfer-<timestamp>)"),
    pretrained_run: str = typer.Option(None, help="reuse this finished pretraining run (skips pretraining)"),
) -> None:
    """Pretrain on SOURCE, then train on TARGET from scratch and fine-tuned, at each data size, for equal epochs."""
    sizes = tuple(None if s.strip() == "all" else int(s) for s in per_class.split(","))
    run_or_exit(
        lambda: transfer_study(
            data,
            arch,
            width,
            source,
            target,
            sizes,
            pretrain_epochs,
            budget_images,
            max_epochs,
            lr,
            bs,
            out,
            name,
            pretrained_run,
        )
    )


if __name__ == "__main__":
    app()
