"""Architectures: the registry and the project's own models, which register themselves when imported here."""

from . import cifar_resnet, tiny  # noqa: F401  (registration on import)
from ._registry import TIMM_PREFIX, Arch, get_arch, list_archs, register_arch, register_cifar_model

__all__ = ["TIMM_PREFIX", "Arch", "get_arch", "list_archs", "register_arch", "register_cifar_model"]
