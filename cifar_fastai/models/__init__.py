"""The project's own architectures; importing this package registers them in `cifar_fastai.archs`."""

from . import tiny  # noqa: F401
