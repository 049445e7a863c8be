"""Architecture registry: every model the project can train, by name (torchvision's `models/_api.py` idiom).

It imports none of the models: the models import it and register themselves (`cifar_fastai.models` imports them all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torchvision import models as tvm

from ..errors import ArchError

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class Arch:
    """A registered architecture.

    kind 'torchvision': `builder` is the torchvision function itself, so fastai's `model_meta` finds its cut,
    splitter and ImageNet stats (a lambda or partial would silently lose them).
    kind 'timm': `builder` is the timm model name; fastai's `vision_learner` builds timm models from strings.
    kind 'cifar': `builder(n_out, width=, dropout=)` returns `Sequential(body, head)`; `splitter` (fastai's: model ->
    parameter groups) makes `freeze`, `freeze_to` and `slice` learning rates work; None means body / head.
    """

    name: str
    kind: str
    builder: Callable | str
    description: str = ""
    splitter: Callable | None = None


_REGISTRY: dict[str, Arch] = {}


def register_arch(
    name: str, kind: str, builder: Callable | str, description: str = "", splitter: Callable | None = None
) -> Arch:
    arch = Arch(name, kind, builder, description, splitter)
    _REGISTRY[name] = arch
    return arch


def register_cifar_model(
    name: str, description: str = "", splitter: Callable | None = None
) -> Callable[[Callable], Callable]:
    """Decorator for the project's own models: `@register_cifar_model("resnet20", splitter=cifar_split)`."""

    def wrap(fn: Callable) -> Callable:
        register_arch(name, "cifar", fn, description or (fn.__doc__ or "").strip().splitlines()[0], splitter)
        return fn

    return wrap


def list_archs(kind: str | None = None) -> list[str]:
    return sorted(n for n, a in _REGISTRY.items() if kind is None or a.kind == kind)


def get_arch(name: str) -> Arch:
    """Look up an architecture; any `timm/<model>` that timm knows is accepted too."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        import timm

        timm_name = name[len(TIMM_PREFIX) :]
        if timm_name in timm.list_models():
            return Arch(name, "timm", timm_name, f"timm model {timm_name}")
    raise ArchError(
        f"unknown architecture {name!r}. Choose one of: {', '.join(list_archs())}, or timm/<name> for any timm model"
    )


for _fn in (tvm.resnet18, tvm.resnet34, tvm.resnet50, tvm.resnet101, tvm.resnet152):
    register_arch(_fn.__name__, "torchvision", _fn, f"torchvision {_fn.__name__} (ImageNet stem)")


for _n in ("resnet18", "resnet26", "resnet34", "resnet50"):
    register_arch(f"{TIMM_PREFIX}{_n}", "timm", _n, f"timm {_n}")
