"""Small helpers every layer uses: library versions, the CPU, atomic JSON writes, eval mode for a block."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn


def versions() -> dict[str, str]:
    import fastai
    import timm
    import torchvision

    from . import __version__

    return {
        "cifar_fastai": __version__,
        "fastai": fastai.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
    }


def cpu_info() -> dict:
    """The CPU's model name and x86 feature flags from /proc/cpuinfo (elsewhere: platform's name, no flags)."""
    info: dict = {"model": "", "flags": set()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not info["model"]:
                info["model"] = value.strip()
            elif key.strip() == "flags" and not info["flags"]:
                info["flags"] = set(value.split())
    except OSError:
        pass
    if not info["model"]:
        import platform

        info["model"] = platform.processor() or platform.machine()
    return info


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: readers never see half a file


class eval_mode:
    """Put a model in eval mode for a block and restore its previous mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
