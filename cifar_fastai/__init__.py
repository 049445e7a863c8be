"""cifar_fastai: train, evaluate, fine-tune and deploy ResNets on CIFAR-10 with fastai."""

import warnings

# fastai imports torch.jit.script helpers that warn on every start; the warning is not the user's to act on.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from .config import DEFAULTS, TrainConfig
from .data.loaders import CifarData, get_data
from .data.sources import resolve_data
from .deploy.safe import load, load_model, save_model
from .errors import CifarFastaiError, ConfigError, DataError, ModelFileError
from .evaluation.cam import heatmap, heatmaps, overlay
from .models import get_arch, list_archs, register_arch, register_cifar_model
from .training.resolve import resolve
from .training.run import RunResult, get_learner, lr_find, train

__version__ = "0.1.0"
__all__ = [
    "DEFAULTS",
    "CifarData",
    "CifarFastaiError",
    "ConfigError",
    "DataError",
    "ModelFileError",
    "RunResult",
    "TrainConfig",
    "get_arch",
    "get_data",
    "get_learner",
    "heatmap",
    "heatmaps",
    "list_archs",
    "load",
    "load_model",
    "lr_find",
    "overlay",
    "register_arch",
    "register_cifar_model",
    "resolve",
    "resolve_data",
    "save_model",
    "train",
]
