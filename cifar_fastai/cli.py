"""Typer command lines; `scripts/*.py` only call these. Options are generated from `TrainConfig` (one source)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable

import typer

from .archs import get_arch, list_archs
from .config import TrainConfig
from .errors import CifarFastaiError
from .recipes import apply_recipe


def _check_arch(value: str) -> str:
    try:
        get_arch(value)
    except CifarFastaiError as e:
        raise typer.BadParameter(str(e)) from None
    return value


def _list_archs(value: bool) -> None:
    if value:
        from .archs import _REGISTRY

        for name in list_archs():
            typer.echo(f"{name:24s} {_REGISTRY[name].description}")
        typer.echo(f"{'timm/<name>':24s} any model in timm.list_models()")
        raise typer.Exit()


def config_parameters(cls=TrainConfig, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per config field: its default, help, range and choices come from the dataclass."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta = dict(f.metadata)
        kw: dict = {"help": meta.get("help", ""), "show_default": True}
        for key in ("min", "max", "parser"):
            if key in meta:
                kw[key] = meta[key]
        if "show" in meta:  # e.g. eps shows 8/255, not 0.03137254901960784
            kw["show_default"] = meta["show"]
        annotation = hints[f.name]
        if "choices" in meta:
            annotation = typing.Literal[tuple(meta["choices"])]  # typer shows and checks Literal choices
        if f.name == "arch":
            kw["callback"] = _check_arch
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


def train_command(ctx: typer.Context | None = None, list_archs_: bool = False, **kwargs) -> None:
    """Train a ResNet on CIFAR-10 from scratch, or fine-tune a pretrained one, into runs/<name>/.

    Examples:

      python scripts/train.py --data sample --arch resnet18 --epochs 1

      python scripts/train.py --arch resnet50 --epochs 20

      python scripts/train.py --data sample --lr-find
    """
    from .distributed import launch
    from .train import lr_find, train

    cfg = run_or_exit(lambda: apply_recipe(TrainConfig(**kwargs), explicit_options(ctx)))  # issue 10: --recipe
    run_or_exit(lambda: launch(lambda: lr_find(cfg) if cfg.lr_find else train(cfg)))  # launch: rank-aware (issue 8)


train_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
train_app.command(context_settings={"help_option_names": ["-h", "--help"]})(with_config_options(train_command, [_CTX, _LIST_ARCHS]))
