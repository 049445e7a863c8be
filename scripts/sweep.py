"""Hyperparameter search (grid or random) with k-fold cross-validation; resumable; the test set is never used.

python scripts/sweep.py --data sample --arch resnet18 --epochs 2 --folds 3 -p lr=1e-3,3e-3 -p wd=0.01,0.1
python scripts/sweep.py --data sample --random 8 -p lr=1e-4:1e-2:log -p crop-pad=0,2,4 -p arch=resnet18,resnet34
python scripts/sweep.py --data sample -p lr=1e-3,3e-3 --name my-sweep   # rerun the same command to resume
"""

import inspect

import typer

from cifar_fastai.cli import run_or_exit, with_config_options
from cifar_fastai.config import TrainConfig

EXTRA = [
    inspect.Parameter(
        "param",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            None, "--param", "-p",
            help="a searched option: name=v1,v2 (grid) or name=low:high[:log] (random), e.g. lr=1e-3,3e-3; repeat it",
        ),
        annotation=list[str] | None,
    ),
    inspect.Parameter(
        "random",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(0, "--random", min=0, help="random search: this many seeded draws (0 = full grid)"),
        annotation=int,
    ),
    inspect.Parameter(
        "name",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option("sweep", help="sweep folder under --out; rerunning into it skips finished trials"),
        annotation=str,
    ),
]  # fmt: skip


def sweep_command(param: list[str] | None = None, random: int = 0, **kwargs) -> None:
    """Grid or random search over any scripts/train.py option, ranked by mean validation accuracy over the folds
    (--folds K) or the hold-out; writes results.csv/.md, sweep.png and the best scripts/train.py command."""
    from cifar_fastai.sweep import sweep

    run_or_exit(lambda: sweep(TrainConfig(**kwargs), param or [], random))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command(context_settings={"help_option_names": ["-h", "--help"]})(
    with_config_options(sweep_command, EXTRA, exclude=("name", "fold", "lr_find"))
)

if __name__ == "__main__":
    app()
