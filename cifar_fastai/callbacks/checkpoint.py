"""Checkpoints of a run (best by the validation metric, last every epoch, written atomically) and `--resume`."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import CancelEpochException, CancelFitException, TrainEvalCallback
from fastai.callback.tracker import EarlyStoppingCallback, TrackerCallback
from fastai.learner import SkipToEpoch
from fastai.torch_core import get_model
from fastcore.foundation import L

from ..errors import ConfigError
from ..utils import write_json

LAST, BEST = "last.pth", "best.pth"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def save_atomic(obj, path: Path) -> None:
    """`torch.save` to a temp file in the same folder, fsync, then `os.replace`: a crash leaves the old file or the
    new one, never half of one (rename is atomic within a file system, POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a `last.pth` with `weights_only=True` (no code runs on load), allowing what fastai's own `load_model`
    allows: its `L` and numpy scalars (the optimizer hypers hold both)."""
    np_scalar = np.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar, wherever this numpy keeps it
    allowed = [L, np.dtype, *[getattr(np.dtypes, dt) for dt in np.dtypes.__all__], np_scalar]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to read the file means it cannot be resumed from
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from e


def base_dl(dl):
    """The loader that owns the shuffle RNG: under torchrun fastai wraps ours in a `DistributedDL` (`.dl`)."""
    return getattr(dl, "dl", dl)


def random_states(learn) -> dict:
    """Every random stream a fit draws from: python, numpy, torch (augmentation) and the DataLoaders' shuffles."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "dl_train": base_dl(learn.dls.train).rng.getstate(),
        "dl_valid": base_dl(learn.dls.valid).rng.getstate(),
    }


def run_records(learn) -> dict:
    """What the run's records need to go on after `--resume`: the Recorder's smoothed train loss (history.csv's
    `train_loss`) and the state of every callback that keeps some (`resume_state()`: the run's clock, the throughput
    counters, the weight average ...), by callback name."""
    smooth = learn.recorder.smooth_loss
    # a plain tensor: fastai's TensorBase is not among what a weights-only load may read
    records = {"smooth_loss": {"val": smooth.val.detach().cpu().as_subclass(torch.Tensor), "count": smooth.count}}
    records.update({cb.name: cb.resume_state() for cb in learn.cbs if hasattr(cb, "resume_state")})
    return records


def set_run_records(learn, records: dict) -> None:
    """The inverse of `run_records`, into the callbacks of this fit (`load_resume_state(state)`)."""
    if "smooth_loss" in records:  # fastai's AvgSmoothLoss restarts at every fit: go on from the saved average
        learn.recorder.smooth_loss.val = records["smooth_loss"]["val"]
        learn.recorder.smooth_loss.count = records["smooth_loss"]["count"]
    for cb in learn.cbs:
        if hasattr(cb, "load_resume_state") and cb.name in records:
            cb.load_resume_state(records[cb.name])


def set_random_states(learn, states: dict) -> None:
    random.setstate(states["python"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    base_dl(learn.dls.train).rng.setstate(states["dl_train"])
    base_dl(learn.dls.valid).rng.setstate(states["dl_valid"])


class Checkpoint(TrackerCallback):
    """After every epoch: `last.pth` (model, optimizer, epoch and iteration, random states, the records' state:
    `run_records`; all `--resume` needs) and, when `monitor` improved on the validation set, `best.pth` (model
    weights only, fastai's `learn.load` format).

    Like fastai's `SaveModelCallback`, but atomic and with the position in the schedule; the test set is never seen.
    """

    # after the Recorder has the epoch's values, before EarlyStopping may stop the fit
    order = TrackerCallback.order + 1

    def __init__(self, folder: str | Path, monitor: str = "accuracy"):
        super().__init__(monitor=monitor, reset_on_fit=False)  # fine_tune: the best over both fits
        self.folder, self.best_epoch = Path(folder), None

    def before_fit(self):
        super().before_fit()
        self.phase = "frozen" if getattr(self.opt, "frozen_idx", 0) else "train"
        self.folder.mkdir(parents=True, exist_ok=True)

    def after_epoch(self):
        super().after_epoch()
        model = get_model(self.model).state_dict()
        if self.new_best:
            self.best_epoch = self.epoch
            save_atomic(model, self.folder / BEST)
            best = {"epoch": self.epoch + 1, "phase": self.phase, self.monitor: float(self.best)}
            write_json(self.folder / "best.json", best)
        meta = {
            "epochs_done": self.epoch + 1,
            "n_epoch": self.n_epoch,
            "train_iter": self.train_iter,
            "phase": self.phase,
            "monitor": self.monitor,
            "best": float(self.best),
            "best_epoch": self.best_epoch,
        }
        state = {"model": model, "opt": self.opt.state_dict(), "meta": meta, "random": random_states(self.learn),
                 "records": run_records(self.learn)}  # fmt: skip
        save_atomic(state, self.folder / LAST)


class RestoreBest(TrackerCallback):
    """With early stopping (`--patience`): end the fit with the weights of the best epoch by `monitor` on the
    validation set, so the test pass and the export use them (what fastai's `SaveModelCallback` does at the end of a
    fit, and Keras' `restore_best_weights`). The copy stays in memory on every process (torchrun ranks need no
    shared disk); `--resume` reloads it from `best.pth`. Epochs are counted over all fits of a run (fine_tune's
    frozen and unfrozen ones): `best_epoch` is the kept one, 1-based, `seen` how many ran."""

    order = TrackerCallback.order + 1  # after the Recorder (50); before EarlyStopping (63) may stop the fit

    def __init__(self, monitor: str = "accuracy"):
        super().__init__(monitor=monitor, reset_on_fit=False)  # fine_tune: the best over both fits
        self.weights, self.best_epoch, self.best_row, self.seen = None, None, None, 0

    def after_epoch(self):
        super().after_epoch()
        self.seen += 1
        if self.new_best:
            self.best_epoch, self.best_row = self.seen, list(self.recorder.values[-1])  # train loss, valid loss, metrics
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in get_model(self.model).state_dict().items()}

    def after_fit(self):
        if self.restored:
            get_model(self.model).load_state_dict(self.weights)

    @property
    def restored(self) -> bool:
        """Whether the fit ends on an earlier epoch's weights than its last."""
        return self.weights is not None and self.best_epoch != self.seen


class ResumeFrom(SkipToEpoch):
    """Continue a fit from `last.pth`: fastai's `SkipToEpoch` (what `fit_one_cycle(start_epoch=N)` adds), plus the
    model and optimizer state, the iteration count and random states, the trackers' best value, and the records'
    state (smoothed loss, the run's clock, throughput, weight average: `set_run_records`), so history.csv and
    metrics.json read as the uninterrupted run's would.

    Plain `start_epoch` still runs every callback's `after_epoch` on the skipped epochs (they only cancel): the
    Recorder logs empty rows, and `EarlyStoppingCallback`/`SaveModelCallback` fail on them (IndexError). So the other
    callbacks are paused while epochs are skipped. The one-cycle position needs nothing more: fastai's
    `TrainEvalCallback` sets `pct_train = epoch / n_epoch` at each epoch, and `ParamScheduler` reads it.
    """

    order = TrainEvalCallback.order + 1  # after TrainEvalCallback zeroed the counters; before every other before_epoch

    def __init__(self, path: str | Path, patience: int = 0):
        self.state, self.best_path = load_checkpoint(path), Path(path).with_name(BEST)
        meta = self.state["meta"]
        super().__init__(meta["epochs_done"])
        self.finished = plan_done(meta, patience)  # no epoch trains: on to the test pass and the export
        self.paused: dict | None = None

    def before_fit(self):
        get_model(self.model).load_state_dict(self.state["model"])
        self.opt.load_state_dict(self.state["opt"])  # Adam moments + step counts, and the last lr/mom
        self.paused = {}

    def before_epoch(self):
        if self.finished:
            # killed after its last checkpoint, in the test pass or the export: the records go back in as after a
            # resumed epoch (clock, throughput, best weights, weight average), with the epoch counter past the
            # end, and the fit ends here, so every callback's after_fit runs (the EMA's takes its metrics off the
            # learner before the export)
            self.learn.epoch = self._skip_to
            self.restore()
            raise CancelFitException()
        if self.epoch < self._skip_to:
            for cb in self.learn.cbs:
                if cb is not self and cb not in self.paused:
                    self.paused[cb] = cb.run
                    cb.run = False
            raise CancelEpochException()
        if self.paused is not None:
            early = [cb for cb in self.paused if cb.order < self.order]
            self.restore()
            for cb in early:  # their before_epoch came before this one's, while paused (the whitening bias freeze)
                cb("before_epoch")

    def restore(self):
        for cb, run in self.paused.items():
            cb.run = run
        self.paused = None
        meta = self.state["meta"]
        self.learn.train_iter = meta["train_iter"]  # TensorBoard steps continue where they stopped
        for cb in self.learn.cbs:
            if isinstance(cb, TrackerCallback) and cb.monitor == meta["monitor"]:
                cb.best = meta["best"]
                if isinstance(cb, Checkpoint):
                    cb.best_epoch = meta["best_epoch"]
                if isinstance(cb, RestoreBest):
                    cb.seen = meta["epochs_done"]
                    if meta["best_epoch"] is not None and self.best_path.is_file():
                        cb.best_epoch = meta["best_epoch"] + 1
                        cb.weights = torch.load(self.best_path, map_location="cpu", weights_only=True)
                if isinstance(cb, EarlyStoppingCallback) and meta["best_epoch"] is not None:
                    cb.wait = meta["epochs_done"] - 1 - meta["best_epoch"]  # epochs since the best, as fastai counts
        set_run_records(self.learn, self.state.get("records", {}))  # none in checkpoints written before they were kept
        # fastai computes `dls.n_inp` lazily by pushing one item through the batch transforms (random crops draw from
        # torch's RNG) at the first batch of a fit: do it now, as the uninterrupted run did in its first epoch
        _ = self.learn.dls.n_inp
        set_random_states(self.learn, self.state["random"])  # last: the resumed epochs draw what the lost ones would


def plan_done(meta: dict, patience: int = 0) -> bool:
    """Whether a checkpoint's run has trained all it will: every epoch of its plan (which a --time-budget may have
    cut below --epochs), or, with early stopping, `patience` epochs without a better value since its best one
    (fastai's EarlyStoppingCallback stops there; the checkpoint is written just before it does)."""
    if meta["epochs_done"] >= meta.get("n_epoch", meta["epochs_done"] + 1):
        return True
    return bool(patience) and meta.get("best_epoch") is not None and meta["epochs_done"] - 1 - meta["best_epoch"] >= patience


def trim_history(path: Path, epochs_done: int) -> None:
    """Drop rows of epochs after the checkpoint (written before a kill), so history.csv has each epoch once."""
    if not path.is_file():
        return
    rows = list(csv.reader(path.read_text().splitlines()))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if len(r) > 1 and r[1].isdigit() and int(r[1]) < epochs_done]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(keep)
    os.replace(tmp, path)
