"""Weights files: from our own run folders, torchvision/timm/safetensors files, into a learner's body."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.vision.learner import create_body, model_meta

from ..config import TrainConfig
from ..errors import WeightsError
from ..models import Arch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a torchvision `.pth`, a timm/safetensors file, or a checkpoint dict that nests them."""
    path = weights_file(path)  # a run folder -> its weights file; never unpickles export.pkl
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs on load
    except Exception as e:
        raise WeightsError(f"--weights {path}: not a readable weights file ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"--weights {path}: no state dict of tensors inside")
    return sd


def load_body_weights(learn: Learner, arch: Arch, path: str | Path) -> None:
    """Put pretrained weights into the learner's body (the head is new): ours, torchvision's or timm's layout."""
    sd = read_state_dict(path)
    body = learn.model[0]
    try:
        if any(k.startswith("0.") for k in sd) and any(k.startswith("1.") for k in sd):  # our own Sequential(body, head)
            body.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.")})
        elif arch.kind == "torchvision":
            raw = arch.builder(weights=None)
            missing, unexpected = raw.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or len(unexpected) > 0:
                raise WeightsError(
                    f"--weights {path} does not fit {arch.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            body.load_state_dict(create_body(raw, pretrained=False, cut=model_meta[arch.builder]["cut"]).state_dict())
        elif arch.kind == "timm":
            sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.", "classifier."))}
            body.model.load_state_dict(sd)
        else:
            body.load_state_dict(sd)
    except RuntimeError as e:  # size mismatch / missing keys from load_state_dict
        first = str(e).strip().splitlines()[:3]
        raise WeightsError(f"--weights {path} does not fit {arch.name}: {' '.join(first)}") from e


# A run folder's weights: the safetensors file (deploy/safe.py), or a plain state dict from older runs (read
# with torch.load(weights_only=True)). `export.pkl` is never read for weights: unpickling it runs code.
WEIGHTS_FILES = ("model.safetensors", "model.pth")


# ------------------------------------------------------------------------------------------ weights from our runs
def run_weights(run_dir: str | Path) -> Path:
    """The weights file of a finished run folder."""
    run_dir = Path(run_dir).expanduser()
    for name in WEIGHTS_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise WeightsError(
        f"{run_dir}: no weights file ({' or '.join(WEIGHTS_FILES)}) in this run folder; did the run finish?"
    )


def weights_file(path: str | Path) -> Path:
    """`--weights` as given, or the weights file of a run folder (or of the run an `export.pkl` belongs to)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return run_weights(path)
    if path.name == "model.json":  # the run's model description: the weights are beside it
        return run_weights(path.parent)
    if path.suffix == ".pkl":
        try:
            return run_weights(path.parent)
        except WeightsError:
            raise WeightsError(
                f"--weights {path}: a pickled Learner is never loaded for weights (unpickling runs code); pass a "
                f"run folder, or a {' / '.join(WEIGHTS_FILES)} file"
            ) from None
    return path


def weights_cache_hint(arch) -> str:
    """Where torchvision (TORCH_HOME) or timm (the Hugging Face cache) look for weights before downloading them."""
    if arch.kind == "torchvision":
        from torchvision.models import get_model_weights

        name = Path(get_model_weights(arch.builder).DEFAULT.url).name
        return (
            str(Path(torch.hub.get_dir()) / "checkpoints" / name)
            + " (torchvision's cache: $TORCH_HOME/hub/checkpoints)"
        )
    from huggingface_hub import constants

    return (
        f"{constants.HF_HUB_CACHE} (the Hugging Face cache timm reads: $HF_HOME/hub; HF_HUB_OFFLINE=1 to stay offline)"
    )


def source_run(cfg: TrainConfig) -> Path | None:
    """The run folder the starting weights come from (`--init-from`, or `--weights` inside a run folder), if any."""
    if cfg.init_from:
        return Path(cfg.init_from).expanduser()
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        run = path if path.is_dir() else path.parent
        if (run / "config.json").is_file() and path.name in (run.name, *WEIGHTS_FILES, "export.pkl", "model.json"):
            return run
    return None


def run_stats(run_dir: Path) -> tuple[list[float], list[float]]:
    """The normalization a run trained with: fine-tuning must feed the body inputs scaled the same way."""
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    return list(resolved["normalize_mean"]), list(resolved["normalize_std"])
