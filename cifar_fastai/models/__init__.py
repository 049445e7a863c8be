"""The project's own architectures; importing this package registers them in `cifar_fastai.archs`."""

from . import cifar_resnet, tiny  # noqa: F401
