"""Small helpers every layer uses: library versions, the CPU, atomic JSON writes, eval mode for a block."""

from __future__ import annotations

import json
import os
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


def write_text_atomic(path: Path, text: str) -> None:
    """Whole or not at all: readers never see half a file, and two processes writing the same file at once (sweep
    workers, two runs sharing a cache) each rename their own temporary file over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_bench_json(out: str | Path, command: str, what: str, load_before: float, **results) -> Path:
    """A benchmark's JSON record: its command, what it measures, the machine (the CPU model: figures compare only
    within one kind of host), the versions and `results`. The 1-minute load average before and after says whether
    other jobs shared the CPU while it ran: above the core count, its times are upper bounds."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    load = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
    machine = {"cpu": cpu_info()["model"], "threads": torch.get_num_threads(), "load_average_1min": load}
    write_json(path, {"command": command, "what": what, "machine": machine, "versions": versions(), **results})
    print(f"wrote {path}")
    return path


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when the file is not there (a run folder's optional records)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


class eval_mode:
    """Put a model in eval mode for a block and restore its previous mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
