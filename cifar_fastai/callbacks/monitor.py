"""Watching a run: TensorBoard logs, checkpoints (and resuming from them), early stopping on the validation metric."""

from __future__ import annotations

from pathlib import Path

from fastai.callback.core import Callback
from fastai.callback.tracker import EarlyStoppingCallback

from ..config import TrainConfig
from ..training import distributed
from .checkpoint import Checkpoint, RestoreBest, ResumeFrom, checkpoint_dir


def monitor_callbacks(cfg: TrainConfig, run_dir: Path) -> list[Callback]:
    """The watching callbacks a config asks for; all of them watch the validation set, never the test set."""
    cbs: list[Callback] = []
    main = distributed.is_main()  # only rank 0 writes logs and checkpoints
    if cfg.tensorboard and main:
        from .tensorboard import TensorBoardLogger  # imports tensorboard (~1 s): only when asked for

        cbs.append(TensorBoardLogger(run_dir.resolve() / "tensorboard"))
    if cfg.checkpoint and main:
        cbs.append(Checkpoint(checkpoint_dir(run_dir), monitor=cfg.monitor))
    if cfg.patience:
        # reset_on_fit=False: fine_tune's second fit keeps counting from the first fit's best
        cbs.append(EarlyStoppingCallback(monitor=cfg.monitor, patience=cfg.patience, reset_on_fit=False))
        cbs.append(RestoreBest(monitor=cfg.monitor))  # the run ends with its best epoch's weights
    if cfg.resume:
        cbs.append(ResumeFrom(checkpoint_dir(run_dir) / "last.pth", patience=cfg.patience))
    return cbs
