"""Training toolkit: TensorBoard logs, checkpoints, kill + resume, early stopping, NaN stop, regularization options."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from torch import nn
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_data
from cifar_fastai.callbacks.regularize import RandomErase, regularization_callbacks
from cifar_fastai.cli import train_app
from cifar_fastai.data.transforms import random_erase
from cifar_fastai.errors import ConfigError
from cifar_fastai.training.learner import create_learner, norm_stats
from cifar_fastai.training.run import train
from tests.conftest import REPO

TINY = {"arch": "tiny", "bs": 16, "lr": 1e-2, "threads": 1, "precision": "fp32"}  # auto would pick by host


def history_epochs(run_dir) -> list[int]:
    rows = list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))
    return [int(r["epoch"]) for r in rows]


# ------------------------------------------------------------------------------------------------ logging, checkpoints
class FitSpy(Callback):
    """What the fit that `train` starts really runs with: its callbacks and its loss function."""

    def __init__(self, seen: dict):
        self.seen = seen

    def before_fit(self):
        self.seen["cbs"] = [type(cb) for cb in self.learn.cbs]
        self.seen["loss_func"] = type(self.learn.loss_func)


@pytest.fixture(scope="module")
def toolkit_fit(tiny_data, tmp_path_factory):
    """Tensorboard on, early stopping on validation accuracy, and three regularizers at once; plus what the fit saw."""
    import cifar_fastai.training.run as train_module

    cfg = TrainConfig(
        data=str(tiny_data), epochs=8, patience=1, tensorboard=True, label_smoothing=0.1, mixup=0.2, cutout=0.5,
        out=str(tmp_path_factory.mktemp("toolkit")), name="tk", **TINY,
    )  # fmt: skip
    seen: dict = {}
    run_callbacks = train_module.run_callbacks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "run_callbacks", lambda *a, **k: [*run_callbacks(*a, **k), FitSpy(seen)])
        return train(cfg, verbose=False).run_dir, seen


@pytest.fixture(scope="module")
def toolkit_run(toolkit_fit):
    return toolkit_fit[0]


def test_tensorboard_event_file_has_scalars_and_sample_predictions(toolkit_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((toolkit_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "an event file in <run>/tensorboard"
    acc = EventAccumulator(str(toolkit_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train_loss", "lr_0", "valid_loss", "accuracy"} <= set(tags["scalars"])
    n_epochs = len(history_epochs(toolkit_run))
    assert len(acc.Scalars("accuracy")) == n_epochs
    lrs = [e.value for e in acc.Scalars("lr_0")]
    assert max(lrs) > 5 * lrs[0], "one-cycle warm-up visible in the lr curve"
    assert "valid_predictions" in tags["images"]


def test_best_and_last_checkpoints_by_validation_metric(toolkit_run):
    ckpt = toolkit_run / "checkpoints"
    assert {p.name for p in ckpt.iterdir()} == {"last.pth", "best.pth", "best.json"}, "no temp files left behind"
    best = json.loads((ckpt / "best.json").read_text())
    history = list(csv.DictReader((toolkit_run / "history.csv").read_text().splitlines()))
    assert best["accuracy"] == max(float(r["accuracy"]) for r in history), "best = highest validation accuracy"
    # best.pth is a plain state dict: fastai's learn.load / torch load_state_dict read it
    from cifar_fastai.models.tiny import tiny

    tiny(n_out=10).load_state_dict(torch.load(ckpt / "best.pth", weights_only=True))
    last = torch.load(ckpt / "last.pth", weights_only=False)
    assert last["meta"]["epochs_done"] == len(history) and last["meta"]["train_iter"] > 0
    assert last["opt"]["state"], "optimizer state saved for --resume"


def test_early_stopping_ends_before_the_epochs_run_out(toolkit_run):
    epochs = history_epochs(toolkit_run)
    assert epochs == list(range(len(epochs))) and len(epochs) < 8, "validation accuracy plateaus at 1.0: stopped early"
    assert (toolkit_run / "export.pkl").is_file(), "an early stop is a normal end: the model is exported"


def test_early_stopping_keeps_and_exports_the_best_epochs_weights(toolkit_run):
    from safetensors.torch import load_file

    history = list(csv.DictReader((toolkit_run / "history.csv").read_text().splitlines()))
    acc = [float(r["accuracy"]) for r in history]
    best = acc.index(max(acc))  # the first epoch with the best validation accuracy
    assert best < len(acc) - 1, "the run went on past its best epoch (patience 1), so the two differ"
    metrics = json.loads((toolkit_run / "metrics.json").read_text())
    assert metrics["early_stopping"] == {"epochs_run": len(acc), "kept_epoch": best + 1}
    assert metrics["valid_accuracy"] == pytest.approx(acc[best]), "the validation figures are the kept epoch's"
    exported = load_file(toolkit_run / "model.safetensors")
    best_pth = torch.load(toolkit_run / "checkpoints" / "best.pth", weights_only=True)
    assert exported.keys() <= best_pth.keys()
    assert all(torch.equal(exported[k], best_pth[k]) for k in exported), "the export is the best epoch's model"


def test_regularization_options_reach_the_fit_and_are_recorded_in_config_json(toolkit_fit):
    toolkit_run, seen = toolkit_fit
    assert MixUp in seen["cbs"] and RandomErase in seen["cbs"], "train() fits with the mixup and cutout callbacks"
    assert CutMix not in seen["cbs"]
    assert seen["loss_func"] is LabelSmoothingCrossEntropyFlat, "and with the label-smoothing loss"
    config = json.loads((toolkit_run / "config.json").read_text())["config"]
    assert (config["label_smoothing"], config["mixup"], config["cutout"], config["patience"]) == (0.1, 0.2, 0.5, 1)
    assert config["tensorboard"] is True and config["cutmix"] == 0.0


# ------------------------------------------------------------------------------------------------------------ resume
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    # precision pinned: in a fresh process --precision auto probes the CPU, and the two processes could choose apart
    args = ["--data", str(tiny_data), "--epochs", "3", "--bs", "16", "--lr", "1e-2", "--threads", "1", "--arch", "tiny",
            "--precision", "fp32"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "scripts/train.py", *args, "--out", str(tmp_path), "--name", "killed"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = tmp_path / "killed" / "checkpoints" / "last.pth"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "killed before it finished"
    run_dir = tmp_path / "killed"
    assert not (run_dir / "metrics.json").exists()

    # the resume needs no fresh process: in this one it reads the checkpoint as a new process would
    res = CliRunner().invoke(train_app, ["--resume", str(run_dir), "--epochs", "99"])
    assert res.exit_code == 0, res.output[-2000:]
    assert "ignoring --epochs" in res.output, "the saved config is used, and the user is told"
    assert history_epochs(run_dir) == [0, 1, 2], "every epoch once, the same total as asked for"
    resumed = json.loads((run_dir / "metrics.json").read_text())

    cfg = TrainConfig(data=str(tiny_data), epochs=3, out=str(tmp_path), name="whole", **TINY)
    whole = train(cfg, verbose=False).metrics
    # model, optimizer, schedule position and random states are restored: same numbers, not only "within noise"
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-4)
    assert resumed["valid_loss"] == pytest.approx(whole["valid_loss"], rel=1e-4)


def test_early_stopping_after_resume_keeps_the_best_epoch_from_before_the_interruption(
    tiny_data, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    import cifar_fastai.training.run as train_module
    from cifar_fastai.errors import TrainingError

    class InterruptAtPerfect(Callback):  # Ctrl-C right after the first epoch with perfect validation accuracy
        order = 99  # after Checkpoint wrote that epoch as best.pth and last.pth

        def after_epoch(self):
            if self.recorder.values[-1][2] >= 1.0:
                raise KeyboardInterrupt

    run_callbacks = train_module.run_callbacks
    monkeypatch.setattr(train_module, "run_callbacks", lambda *a, **k: [*run_callbacks(*a, **k), InterruptAtPerfect()])
    cfg = TrainConfig(data=str(tiny_data), epochs=6, patience=2, out=str(tmp_path), name="es", **TINY)
    with pytest.raises(TrainingError, match="interrupted"):
        train(cfg, verbose=False)
    best = json.loads((tmp_path / "es" / "checkpoints" / "best.json").read_text())["epoch"]
    monkeypatch.setattr(train_module, "run_callbacks", run_callbacks)

    metrics = train(TrainConfig(resume=str(tmp_path / "es")), verbose=False).metrics
    # nothing beats 1.0: two more epochs, then the weights from before the interruption come back from best.pth
    assert metrics["early_stopping"] == {"epochs_run": best + 2, "kept_epoch": best}
    assert metrics["valid_accuracy"] == 1.0, "the kept epoch's validation figures, read back from history.csv"
    exported = load_file(tmp_path / "es" / "model.safetensors")
    best_pth = torch.load(tmp_path / "es" / "checkpoints" / "best.pth", weights_only=True)
    assert all(torch.equal(exported[k], best_pth[k]) for k in exported)


def test_resume_refuses_run_without_checkpoint(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(TrainConfig(resume=str(run_dir)), verbose=False)
    with pytest.raises(ConfigError, match="not a run folder"):
        train(TrainConfig(resume=str(tmp_path)), verbose=False)


def test_resume_refuses_finished_run(tiny_run):
    with pytest.raises(ConfigError, match="the run finished after 2 epochs .metrics.json.; nothing to resume"):
        train(TrainConfig(resume=str(tiny_run)), verbose=False)


# ------------------------------------------------------------------------------------------------------- NaN stop
def test_diverging_run_exits_nonzero_with_message_and_exports_nothing(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--epochs", "1", "--lr", "1e6", "--out", str(tmp_path)]
    args += ["--arch", "tiny", "--bs", "16", "--threads", "1"]
    res = CliRunner().invoke(train_app, args)
    assert res.exit_code != 0
    assert "error: loss became NaN/inf" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("export.pkl")) and not list(tmp_path.rglob("metrics.json"))


# ----------------------------------------------------------------------------------------------------- regularization
class Capture(Callback):
    """Record the first training batch before (order -5) and after (order 5) the regularization callbacks."""

    def __init__(self, order, store, stop=False):
        self.order, self.store, self.stop = order, store, stop

    def before_batch(self):
        self.store.append((self.xb[0].clone(), self.yb[0].clone(), self.learn.loss_func))
        if self.stop:
            raise CancelFitException()


def first_batch(tiny_data, **options):
    cfg = TrainConfig(data=str(tiny_data), **{**TINY, **options})
    data = get_data(cfg, norm_stats(cfg), verbose=False)
    learn = create_learner(cfg, data)
    store: list = []
    learn.fit(1, cbs=[Capture(-5, store), *regularization_callbacks(cfg), Capture(5, store, stop=True)])
    return learn, store


@pytest.mark.parametrize("option,cb_type", [("mixup", MixUp), ("cutmix", CutMix), ("cutout", RandomErase)])
def test_batch_regularizers_change_the_training_batch(tiny_data, option, cb_type):
    value = 0.5 if option == "cutout" else 1.0
    learn, [(x0, y0, _), (x1, y1, lf1)] = first_batch(tiny_data, **{option: value})
    assert any(isinstance(cb, cb_type) for cb in regularization_callbacks(TrainConfig(**{option: value})))
    assert not torch.equal(x0, x1), f"--{option} changed the images"
    assert torch.equal(y0, y1), "integer targets kept; the mix lives in the loss"
    if option in ("mixup", "cutmix"):
        assert getattr(lf1, "__self__", None).__class__ is cb_type, "loss replaced by the mixing loss while training"
    assert isinstance(learn.loss_func, CrossEntropyLossFlat), "and put back after the fit"


def test_no_regularizer_leaves_batch_alone(tiny_data):
    _, [(x0, _, _), (x1, _, _)] = first_batch(tiny_data)
    assert torch.equal(x0, x1)


def test_mixup_and_cutmix_together_refused():
    with pytest.raises(ConfigError, match="cannot be used together"):
        regularization_callbacks(TrainConfig(mixup=0.4, cutmix=1.0))


def test_label_smoothing_is_the_loss_function(tiny_data):
    cfg = TrainConfig(data=str(tiny_data), label_smoothing=0.2, **TINY)
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg), verbose=False))
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.func.eps == 0.2


def test_random_erase_per_image_rectangles_within_size():
    torch.manual_seed(0)
    x = torch.zeros(64, 3, 32, 32)
    out = random_erase(x, p=1.0, max_area=0.25)
    changed = (out != 0).any(1)  # (B, H, W)
    areas = changed.flatten(1).float().mean(1)
    assert (areas > 0).all() and (areas <= 0.25 + 0.02).all(), "every image erased, never more than the max area"
    assert len({tuple(m.nonzero()[0].tolist()) for m in changed}) > 32, "a different rectangle per image"
    assert torch.equal(random_erase(x, p=0.0), x)


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_dropout_reaches_the_head(tiny_data, arch):
    cfg = TrainConfig(data=str(tiny_data), arch=arch, dropout=0.3, bs=8)
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg), verbose=False))
    ps = sorted(m.p for m in learn.model.modules() if isinstance(m, nn.Dropout))
    assert ps and ps[-1] == 0.3, ps  # fastai's head: ps/2 then ps
