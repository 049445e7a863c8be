"""Build a fastai `Learner` for any registered architecture, with pretrained or local weights and matching stats."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import fastai.callback.schedule  # noqa: F401 - patches fit_one_cycle, fine_tune, lr_find onto Learner
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy, error_rate
from fastai.vision.learner import create_body, default_split, model_meta, vision_learner

from .archs import Arch, get_arch
from .config import TrainConfig
from .data import CifarData, get_data
from .errors import ConfigError, WeightsError
from .finetune import run_stats, source_run, weights_cache_hint, weights_file
from .models.cifar_resnet import PatchWhiten, zero_init_residual
from .optim import muon_opt
from .recipes import WhitenInit
from .regularize import loss_func_for
from .transforms import cifar_stats, imagenet_stats


def norm_stats(cfg: TrainConfig, arch: Arch | None = None) -> tuple[list[float], list[float]]:
    """CIFAR statistics from scratch; the pretrained model's own (ImageNet, or timm's cfg) when fine-tuning."""
    if not cfg.fine_tuning:
        return cifar_stats
    run = source_run(cfg)
    if run is not None:  # our own run: the stats it trained with (issue 5)
        return run_stats(run)
    arch = arch or get_arch(cfg.arch)
    if arch.kind == "timm":
        import timm

        pcfg = timm.get_pretrained_cfg(arch.builder)
        if pcfg is not None and getattr(pcfg, "mean", None):
            return list(pcfg.mean), list(pcfg.std)
    if arch.kind == "torchvision":
        return model_meta[arch.builder]["stats"]
    return imagenet_stats


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a torchvision `.pth`, a timm/safetensors file, or a checkpoint dict that nests them."""
    path = weights_file(path)  # a run folder -> its weights file; never unpickles export.pkl (issue 5)
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


MUON_ARCHS = ("airbench_resnet", "airbench94")


def opt_settings(cfg: TrainConfig) -> dict:
    """fastai's AdamW with `--wd`, or (issue 10) Muon + Nesterov SGD, whose groups carry their own weight decay."""
    if cfg.fine_tuning and cfg.schedule != "one_cycle":
        raise ConfigError("--schedule linear is for training from scratch; fine-tuning runs fastai's fine_tune schedule")
    if cfg.optimizer == "muon":
        if cfg.fine_tuning:
            raise ConfigError("--optimizer muon trains from scratch; fine-tuning uses fastai's AdamW (drop --optimizer)")
        if cfg.arch not in MUON_ARCHS:
            # its SGD rates are airbench94_muon's, set for that net's bias-free head with logits / width
            raise ConfigError(
                f"--optimizer muon is tuned for --arch {' or '.join(MUON_ARCHS)} only (got {cfg.arch}): use adam"
            )
        if cfg.schedule != "linear":
            # fit_one_cycle also cycles momentum (0.95-0.85-0.95) in every group, overriding Muon's 0.6 and SGD's 0.85
            raise ConfigError("--optimizer muon needs --schedule linear (fastai's one-cycle would override its momentum)")
        return {"opt_func": muon_opt(cfg.bs, cfg.base_lr), "wd": None}  # its groups carry their own weight decay
    return {"wd": cfg.wd}


def create_learner(cfg: TrainConfig, data: CifarData, path: str | Path = ".", cbs=None) -> Learner:
    """A `Learner` for `cfg.arch` on `data`: `vision_learner` for torchvision/timm, `Learner` + splitter for ours."""
    arch = get_arch(cfg.arch)
    n_out = len(data.vocab)
    common = dict(
        loss_func=loss_func_for(cfg),  # cross-entropy, or label smoothing (issue 7)
        metrics=[accuracy, error_rate],
        **opt_settings(cfg),
        path=Path(path),
        cbs=cbs,
    )
    if arch.kind in ("torchvision", "timm"):
        try:
            # normalize=False: the DataLoaders already carry the stats chosen by `norm_stats` (same ones fastai picks)
            head = {} if cfg.dropout is None else {"ps": cfg.dropout}
            learn = vision_learner(
                data.dls, arch.builder, n_out=n_out, pretrained=cfg.pretrained, normalize=False, **head, **common
            )
        except (URLError, OSError, RuntimeError) as e:
            if not cfg.pretrained:
                raise
            raise WeightsError(
                f"could not download ImageNet weights for {arch.name} ({type(e).__name__}): offline? "
                f"pass --weights PATH to a local weights file, or place it at {weights_cache_hint(arch)}"
            ) from e
    else:
        model = arch.builder(n_out=n_out, width=cfg.width, dropout=cfg.dropout or 0.0)
        learn = Learner(data.dls, model, splitter=arch.splitter or default_split, **common)
    if any(isinstance(m, PatchWhiten) for m in learn.model.modules()) and not cfg.fine_tuning:
        learn.add_cb(WhitenInit())  # issue 10: the whitening stem is set from the training images at the first fit
    # issue 4; pretrained gammas are never zeroed (airbench_resnet's BatchNorm scales are frozen at 1: nothing to zero)
    if cfg.zero_init_residual and not cfg.fine_tuning and zero_init_residual(learn.model) == 0:
        print(f"note: --zero-init-residual: {cfg.arch} has no residual branch to zero (ignored)")
    if cfg.weights:
        load_body_weights(learn, arch, cfg.weights)
        learn.freeze()
    return learn


def get_learner(data: str = "sample", arch: str = "resnet18", **overrides) -> Learner:
    """A ready `Learner` in one call, for notebooks: `learn = get_learner('sample', 'resnet18'); learn.lr_find()`."""
    cfg = TrainConfig(data=data, arch=arch, **overrides)
    return create_learner(cfg, get_data(cfg, norm_stats(cfg)))
