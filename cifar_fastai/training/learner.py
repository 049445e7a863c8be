"""Build a fastai `Learner` for any registered architecture, with pretrained or local weights and matching stats."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from urllib.error import URLError

import fastai.callback.schedule  # noqa: F401 - patches fit_one_cycle, fine_tune, lr_find onto Learner
from fastai.learner import Learner
from fastai.metrics import accuracy, error_rate
from fastai.optimizer import SGD
from fastai.vision.learner import default_split, model_meta, vision_learner

from ..callbacks.fast import WhitenInit
from ..callbacks.regularize import loss_func_for
from ..config import TrainConfig
from ..data.loaders import CifarData
from ..data.transforms import cifar_stats, imagenet_stats
from ..errors import WeightsError
from ..models import Arch, get_arch
from ..models.cifar_resnet import PatchWhiten, fold_head_scale, zero_init_residual
from .optim import muon_opt
from .weights import load_body_weights, run_stats, source_run, weights_cache_hint


def norm_stats(cfg: TrainConfig, arch: Arch | None = None) -> tuple[list[float], list[float]]:
    """CIFAR statistics from scratch; the pretrained model's own (ImageNet, or timm's cfg) when fine-tuning."""
    if not cfg.fine_tuning:
        return cifar_stats
    run = source_run(cfg)
    if run is not None:  # our own run: the stats it trained with
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




def opt_settings(cfg: TrainConfig) -> dict:
    """fastai's AdamW with `--wd`; Muon + Nesterov SGD, whose groups carry their own weight decay (`TrainConfig`
    has already refused Muon where it does not apply); or fastai's SGD with momentum and L2 weight decay."""
    if cfg.optimizer == "muon":
        return {"opt_func": muon_opt(cfg.bs, cfg.base_lr), "wd": None}
    if cfg.optimizer == "sgd":
        # what the CIFAR ResNet tutorials and He et al. 2015 run, torch's SGD(momentum=, weight_decay=): the decay is
        # L2 (added to the gradient, so it passes through the momentum) and applies to every parameter, BatchNorm
        # and biases included (fastai's default, wd_bn_bias=False, would skip them). wd in the partial too, so the
        # optimizer carries it from create_opt on, not only once `fit` sets it.
        sgd = partial(SGD, mom=cfg.momentum, wd=cfg.wd, decouple_wd=False)
        return {"opt_func": sgd, "wd": cfg.wd, "wd_bn_bias": True}
    return {"wd": cfg.wd}


def create_learner(cfg: TrainConfig, data: CifarData, path: str | Path = ".", cbs=None, arch: Arch | None = None) -> Learner:
    """A `Learner` for `cfg.arch` on `data`: `vision_learner` for torchvision/timm, `Learner` + splitter for ours."""
    arch = arch or get_arch(cfg.arch)
    n_out = len(data.vocab)
    common = dict(
        loss_func=loss_func_for(cfg),  # cross-entropy, or label smoothing
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
        if cfg.optimizer == "adam":
            fold_head_scale(model)  # a constant after the head would hold Adam's head steps back (see there)
        learn = Learner(data.dls, model, splitter=arch.splitter or default_split, **common)
    if any(isinstance(m, PatchWhiten) for m in learn.model.modules()) and not cfg.fine_tuning:
        learn.add_cb(WhitenInit())  # the whitening stem is set from the training images at the first fit
    # pretrained gammas are never zeroed (airbench_resnet's BatchNorm scales are frozen at 1: nothing to zero)
    if cfg.zero_init_residual and not cfg.fine_tuning and zero_init_residual(learn.model) == 0:
        print(f"note: --zero-init-residual: {cfg.arch} has no residual branch to zero (ignored)")
    if cfg.weights:
        load_body_weights(learn, arch, cfg.weights)
        learn.freeze()
    return learn
