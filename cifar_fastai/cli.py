"""Typer command lines; `scripts/*.py` only call these. Options are generated from `TrainConfig` (one source)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path

import typer

from .config import FIELD_NAMES, TrainConfig
from .errors import CifarFastaiError, ConfigError
from .models import get_arch, list_archs
from .training.resolve import rerun_config, resolve


def _list_archs(value: bool) -> None:
    if value:
        for name in list_archs():
            typer.echo(f"{name:24s} {get_arch(name).description}")
        typer.echo(f"{'timm/<name>':24s} any model in timm.list_models()")
        raise typer.Exit()


def rules_text(meta) -> str:
    """The field's choices and range as --help shows them; `TrainConfig` itself enforces them."""
    parts = []
    if "min" in meta and "max" in meta:
        parts.append(f"{meta['min']:g} ... {meta['max']:g}")
    elif "min" in meta:
        parts.append(f">= {meta['min']:g}")
    elif "max" in meta:
        parts.append(f"<= {meta['max']:g}")
    if "gt" in meta:
        parts.append(f"> {meta['gt']:g}")
    return f" [{', '.join(parts)}]" if parts else ""


def config_parameters(cls=TrainConfig, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per config field, with its default and help. Choices and ranges are not given to typer:
    `TrainConfig` checks them, so the command line and the Python API refuse a value with the same message."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta = dict(f.metadata)
        kw: dict = {"help": meta.get("help", "") + rules_text(meta), "show_default": True}
        annotation = hints[f.name]
        if "parser" in meta:  # e.g. eps: '8/255' is parsed by TrainConfig, shown as 8/255
            annotation = str
            kw["show_default"] = meta.get("show", True)
        if "choices" in meta:
            kw["metavar"] = "[" + "|".join(meta["choices"]) + "]"
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(f.default, **kw), annotation=annotation
            )
        )
    return params


def with_config_options(fn: Callable, extra: list[inspect.Parameter] = (), exclude: tuple[str, ...] = ()) -> Callable:
    """Give `fn(**kwargs)` a signature typer reads as the config's options (plus `extra` ones)."""
    params = [*extra, *config_parameters(exclude=exclude)]
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def explicit_options(ctx: typer.Context | None) -> set[str]:
    """Names of the options the command line gave (not typer's defaults), so a --recipe leaves them alone."""
    if ctx is None:
        return set()
    sources = {n: ctx.get_parameter_source(n) for n in ctx.params}
    return {n for n, src in sources.items() if src is not None and src.name != "DEFAULT"}


def run_or_exit(job: Callable[[], object]) -> object:
    """Run a job; a user-facing error becomes one line on stderr and a non-zero exit, never a traceback."""
    try:
        return job()
    except CifarFastaiError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


_CTX = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)  # which options were given


_LIST_ARCHS = inspect.Parameter(
    "list_archs_",
    inspect.Parameter.KEYWORD_ONLY,
    default=typer.Option(False, "--list-archs", help="list the registered architectures and exit", is_eager=True, callback=_list_archs),
    annotation=bool,
)


def train_command(
    ctx: typer.Context | None = None, list_archs_: bool = False, config: str | None = None, **kwargs
) -> None:
    """Train a ResNet on CIFAR-10 from scratch, or fine-tune a pretrained one, into runs/<name>/.

    Examples:

      python scripts/train.py --data sample --arch resnet18 --epochs 1

      python scripts/train.py --arch resnet50 --epochs 20

      python scripts/train.py --data sample --lr-find

      python scripts/train.py --config runs/<name>/config.json --seed 1
    """
    from .training.distributed import launch
    from .training.run import lr_find, train

    explicit = explicit_options(ctx)
    if config is not None:  # the saved settings are complete (resolved): every option counts as given
        plan = run_or_exit(lambda: resolve(rerun_config(config, kwargs, explicit), FIELD_NAMES))
    else:
        plan = run_or_exit(lambda: resolve(TrainConfig(**kwargs), explicit))
    run_or_exit(lambda: launch(lambda: lr_find(plan) if plan.cfg.lr_find else train(plan)))  # launch: rank-aware


def new_app(**kwargs) -> typer.Typer:
    """A Typer app as every script here uses it: plain help text, -h, and no rich tracebacks (errors are one line)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                       context_settings={"help_option_names": ["-h", "--help"]}, **kwargs)  # fmt: skip


def option(name: str, default, help: str, annotation=str, *flags: str, **extra) -> inspect.Parameter:
    """An extra keyword-only option for a command whose other options come from `TrainConfig`."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, *flags, help=help, **extra), annotation=annotation
    )


_CONFIG = option(
    "config", None, "train again with the settings of a run's config.json (runs/<name>/config.json); options given "
    "here win; a new run name unless --name; prints the library versions that differ from the run's", str | None,
)  # fmt: skip
train_app = new_app()
train_app.command()(with_config_options(train_command, [_CTX, _LIST_ARCHS, _CONFIG]))


# ------------------------------------------------------------------------------------------------ studies
def sweep_command(ctx: typer.Context | None = None, param: list[str] | None = None, random: int = 0,
                  sampler: str = "grid", trials: int = 0, storage: str | None = None, prune: bool = False,
                  **kwargs) -> None:  # fmt: skip
    """Grid, random or TPE search (optuna) over any scripts/train.py option, ranked by the mean validation --monitor
    over the folds (--folds K) or the hold-out; writes results.csv/.md, sweep.png and the best scripts/train.py
    command. Rerun the command to resume it; run it on several machines with one --storage to share the work."""
    from .studies.sweep import sweep

    given = explicit_options(ctx)
    explicit = given - {"param", "random", "sampler", "trials", "storage", "prune"}
    picked = None if random and sampler == "grid" and "sampler" not in given else sampler  # --random N alone
    settings = {"sampler": picked, "n_trials": trials, "storage": storage, "prune": prune}
    run_or_exit(lambda: sweep(TrainConfig(**kwargs), param or [], random, explicit=explicit, **settings))


sweep_app = new_app()
sweep_app.command()(
    with_config_options(
        sweep_command,
        [
            _CTX,
            option("param", None, "a searched option: name=v1,v2 (grid) or name=low:high[:log] (random/tpe), e.g. "
                   "lr=1e-3,3e-3; repeat it", list[str] | None, "--param", "-p"),
            option("sampler", "grid", "optuna sampler: 'grid' (every combination of the value lists), 'random' or "
                   "'tpe' (--trials settings drawn from value lists and low:high ranges); seeded by --seed", str,
                   metavar="[grid|random|tpe]"),
            option("trials", 0, "--sampler random/tpe: how many settings the study tries, all workers together", int,
                   min=0),
            option("random", 0, "short for --sampler random --trials N", int, min=0),
            option("storage", None, "optuna storage URL (any database SQLAlchemy opens, e.g. "
                   "postgresql://host/db) that workers on several machines share; default: "
                   "sqlite:///<out>/<name>/study.db", str | None),
            option("prune", False, "stop unpromising trials early: optuna's median pruner on each epoch's validation "
                   "--monitor (fastai pruning callback)", bool),
            option("name", "sweep", "sweep folder under --out, and the optuna study's name; rerunning into it resumes "
                   "the study (finished trials are not trained again)"),
        ],
        exclude=("name", "fold", "lr_find"),
    )
)  # fmt: skip


def compare_command(ctx: typer.Context | None = None, grid: str = "", widths: str = "1", study: str = "compare", **kwargs) -> None:
    """Train a grid of architectures x widths under one budget; write a CSV, a Markdown table and a plot.

    Examples:

      python scripts/compare.py --data sample --grid tiny,resnet20 --epochs 1

      python scripts/compare.py --data path/to/cifar10.tgz --grid resnet20,resnet56 --widths 1,2 --epochs 10
    """
    from .studies.compare import compare, parse_grid

    explicit = explicit_options(ctx) - {"grid", "widths", "study"}
    run_or_exit(lambda: compare(TrainConfig(**kwargs), parse_grid(grid, widths), study, explicit))


compare_app = new_app()
compare_app.command()(
    with_config_options(
        compare_command,
        [
            _CTX,
            option("grid", ..., "comma-separated archs, each optionally ':width', e.g. resnet18,cifar_resnet18,resnet20:2"),
            option("widths", "1", "comma-separated width multipliers for grid names given without ':width'"),
            option("study", "compare", "study folder under --out; rerunning the same command resumes it"),
        ],
        exclude=("arch", "width", "name", "lr_find"),
    )
)  # fmt: skip


def _list_studies(value: bool) -> None:
    if value:
        from .studies.study import STUDIES

        for s in STUDIES.values():
            size = f"{len(s.rows)} rows x {len(s.seeds)} seed(s)" if s.rows else f"search over {' x '.join(s.search)}"
            typer.echo(f"{s.name:14s} {s.question} ({size})")
        raise typer.Exit()


def study_command(ctx: typer.Context | None = None, study: str = "", seeds: str = "", rows: str = "",
                  name: str | None = None, lock: str | None = None, list_studies: bool = False,
                  **kwargs) -> None:  # fmt: skip
    """Run a named study (scripts/study.py --list: the names) into <out>/<name>/: study.csv, study.md, study.png.

    Every row trains in its own process; rerun the same command to resume (finished rows are skipped). Options given
    here change the study's budget (a new --name keeps the old table apart).

    Examples:

      python scripts/study.py depth-width --data path/to/cifar10.tgz

      python scripts/study.py augment --data sample --epochs 1 --train-per-class 20 --name augment-smoke
    """
    from .studies.study import get_study, pick_rows, run_study

    explicit = explicit_options(ctx) - {"study", "seeds", "rows", "name", "lock", "list_studies"}

    def job():
        spec = get_study(study)
        if spec.search and (seeds.strip() or rows.strip()):
            raise ConfigError(f"--rows and --seeds pick rows; {spec.name} is one search ({' x '.join(spec.search)}) "
                              "and its --seed draws the folds")  # fmt: skip
        settings = {**kwargs, **{k: v for k, v in spec.base.items() if k not in explicit}}
        try:
            picked = tuple(int(x) for x in seeds.split(",")) if seeds.strip() else None
        except ValueError:
            raise ConfigError(f"--seeds {seeds}: comma-separated integers, e.g. 0,1") from None
        base = TrainConfig(**settings)
        folder = Path(base.out) / (name or spec.name)
        return run_study(spec, base, {*explicit, *spec.base}, folder, picked, pick_rows(spec, rows), lock)

    run_or_exit(job)


study_app = new_app()
study_app.command()(
    with_config_options(
        study_command,
        [
            _CTX,
            inspect.Parameter("study", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                              default=typer.Argument(..., help="the study's name (--list: every study)")),
            option("seeds", "", "comma-separated seeds of every row (default: the study's)"),
            option("rows", "", "comma-separated row labels: run only these (default: every row)"),
            option("name", None, "study folder under --out (default: the study's name); rerunning into it resumes",
                   str | None),
            option("lock", None, "a file each row holds an exclusive flock on while it trains: other timed work "
                   "that takes the same file (`flock FILE command`) never runs beside a row", str | None),
            option("list_studies", False, "list the studies and exit", bool, "--list", is_eager=True,
                   callback=_list_studies),
        ],
        exclude=("name", "seed", "lr_find", "resume", "fold"),
    )
)  # fmt: skip
