"""cifar_fastai: train, evaluate, fine-tune and deploy ResNets on CIFAR-10 with fastai."""

import warnings

# fastai imports torch.jit.script helpers that warn on every start; the warning is not the user's to act on.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from .archs import get_arch, list_archs, register_arch, register_cifar_model
from .config import DEFAULTS, TrainConfig
from .data import CifarData, get_data, resolve_data
from .errors import CifarFastaiError, DataError, ModelFileError
from .safe import load, load_model, save_model

__version__ = "0.1.0"
__all__ = [
    "DEFAULTS",
    "CifarData",
    "CifarFastaiError",
    "DataError",
    "ModelFileError",
    "TrainConfig",
    "get_arch",
    "get_data",
    "list_archs",
    "load",
    "load_model",
    "register_arch",
    "register_cifar_model",
    "resolve_data",
    "save_model",
]
