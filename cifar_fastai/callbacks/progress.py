"""Side behaviour of a run as fastai callbacks: plain log lines, throughput timing, NaN stop, CSV history."""

from __future__ import annotations

import math
import os
import time

from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import CSVLogger
from fastai.learner import Recorder


class PlainProgress(Callback):
    """One readable line per epoch, for CI logs and pipes where fastai's progress bars would be noise."""

    order = Recorder.order + 1

    def after_epoch(self):
        names, log = self.recorder.metric_names, self.recorder.log
        parts = [f"epoch {log[0] + 1}/{self.learn.n_epoch}"]  # the plan now: a time budget may have shortened it
        for name, value in zip(names[1:], log[1:]):
            parts.append(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")
        print("  ".join(parts), flush=True)


class Throughput(Callback):
    """Training images/s (forward+backward+step, data included) and images/s through training plus validation.
    After `--resume` the counters go on from the checkpoint's, so the figures cover the whole run."""

    order = 0
    # predictions fetched inside the fit (the EMA's validation) are timed by the pass around them
    remove_on_fetch = True

    def before_fit(self):
        self.train_s = self.valid_s = 0.0
        self.train_n = self.valid_n = 0

    def before_train(self):
        self._t = time.perf_counter()

    def after_train(self):
        self.train_s += time.perf_counter() - self._t

    def before_validate(self):
        self._t = time.perf_counter()

    def after_validate(self):
        self.valid_s += time.perf_counter() - self._t

    def after_batch(self):
        n = self.learn.xb[0].shape[0]
        if self.training:
            self.train_n += n
        else:
            self.valid_n += n

    def resume_state(self) -> dict:
        return {"train_s": self.train_s, "valid_s": self.valid_s, "train_n": self.train_n, "valid_n": self.valid_n}

    def load_resume_state(self, state: dict) -> None:
        self.train_s, self.valid_s = state["train_s"], state["valid_s"]
        self.train_n, self.valid_n = state["train_n"], state["valid_n"]

    def stats(self) -> dict[str, float]:
        total_s = self.train_s + self.valid_s
        return {
            "train_images_per_s": self.train_n / self.train_s if self.train_s else 0.0,
            "epoch_images_per_s": (self.train_n + self.valid_n) / total_s if total_s else 0.0,
            "train_seconds": self.train_s,
            "valid_seconds": self.valid_s,
        }


class StopOnNaN(Callback):
    """Stop at the first NaN/inf loss and remember it, so the run can exit non-zero with a clear message.

    fastai's `TerminateOnNaNCallback` ends `fit` normally, which would export a broken model.
    """

    order = -9

    def before_fit(self):
        self.bad_epoch = None

    def after_batch(self):
        if self.training and not math.isfinite(self.loss.detach().item()):
            self.bad_epoch = self.epoch
            raise CancelFitException()


class HistoryLogger(CSVLogger):
    """fastai's `CSVLogger` that appends across `fine_tune`'s two fits with one header and a `phase` column, and an
    `elapsed_s` column: wall seconds from `start` (the run's start, data loading included) to the end of the epoch,
    the x axis of a time-to-accuracy curve (bench/time_to_accuracy.py).

    After `--resume` the clock goes on from the checkpoint's (`offset`; the work lost to the interruption, after the
    checkpoint, is not counted) and `resumed` says where each resume started."""

    def __init__(self, fname, start: float | None = None):
        super().__init__(fname, append=True)
        self.start = time.perf_counter() if start is None else start
        self.offset, self.resumed = 0.0, []

    def elapsed(self) -> float:
        """Wall seconds of the run so far: this process's since `start`, plus those before a `--resume`."""
        return self.offset + time.perf_counter() - self.start

    def resume_state(self) -> dict:
        return {"elapsed_s": self.elapsed(), "resumed": self.resumed}

    def load_resume_state(self, state: dict) -> None:
        self.offset = state["elapsed_s"]
        self.resumed = [*state["resumed"], {"at_epoch": self.epoch + 1, "elapsed_s": round(self.offset, 1)}]

    def before_fit(self):
        if hasattr(self, "gather_preds"):
            return
        path = self.path / self.fname
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        self.phase = "frozen" if getattr(self.opt, "frozen_idx", 0) else "train"
        self.file = path.open("a")
        if fresh:
            self.file.write(",".join(["phase", *self.recorder.metric_names, "elapsed_s"]) + "\n")
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        elapsed = f"{self.elapsed():.1f}"
        self.file.write(",".join([self.phase, *[str(t) for t in log], elapsed]) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.old_logger(log)
