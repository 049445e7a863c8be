"""--ema: timm's ModelEmaV3 beside the trained weights, validated each epoch, the better one kept, resumable."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from cifar_fastai import TrainConfig
from cifar_fastai.callbacks.ema import ModelEma
from cifar_fastai.errors import ConfigError, TrainingError
from cifar_fastai.training.run import train

# conftest's tiny_run, which trains without --ema; precision and device pinned as there (auto picks bf16 on CPUs with it)
TINY = {"arch": "tiny", "epochs": 2, "bs": 16, "lr": 1e-2, "device": "cpu", "precision": "fp32"}


def history(run_dir) -> list[dict]:
    return list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))


def last_checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pth", weights_only=False)


@pytest.fixture(scope="module")
def ema_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    return train(TrainConfig(data=str(tiny_data), out=str(out), name="ema", ema=0.9, **TINY), verbose=False)


# ------------------------------------------------------------------------------------------------ the average itself
def test_the_average_follows_the_warmed_up_decay_formula_buffers_included():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    cb = ModelEma(0.5)
    cb.learn = SimpleNamespace(model=model, training=True)
    expected = None
    for step in range(1, 6):
        with torch.no_grad():  # the "trained" weights after optimizer step `step`
            model[0].weight.fill_(float(step**2))
            model[1].running_mean.fill_(float(-step))
        model[1].num_batches_tracked.fill_(step)
        cb.after_batch()
        # timm's warm-up: the first update copies, then 1 - (1 + n)^(-2/3) after n more, never above the decay
        decay = 0.0 if step == 1 else min(0.5, 1 - step ** (-2 / 3))
        w = torch.tensor([float(step**2), float(-step)])
        expected = w if expected is None else decay * expected + (1 - decay) * w
        ema = cb.ema.module
        assert ema[0].weight[0, 0].item() == pytest.approx(expected[0].item())
        assert ema[1].running_mean[0].item() == pytest.approx(expected[1].item()), "BatchNorm statistics averaged too"
        assert ema[1].num_batches_tracked.item() == step, "integer buffers are copied"
    assert 0.37 < 1 - 2 ** (-2 / 3) < 0.5 < 1 - 3 ** (-2 / 3), "the sequence covers the warm-up and the cap"
    cb.learn.training = False
    cb.after_batch()
    assert cb.updates == 5, "no update on validation batches"


def test_keep_better_loads_the_average_only_when_it_validates_better():
    from timm.utils import ModelEmaV3

    def ema_of(value: float) -> ModelEma:
        cb = ModelEma(0.9)
        source = nn.Linear(2, 2)
        nn.init.constant_(source.weight, value)
        cb.ema = ModelEmaV3(source)
        return cb

    cases = [  # (average's loss, accuracy), trained's, monitor -> kept
        ((0.5, 0.9), (0.4, 0.8), "accuracy", "ema"),
        ((0.5, 0.8), (0.4, 0.9), "accuracy", "raw"),
        ((0.3, 0.9), (0.4, 0.9), "accuracy", "ema"),  # equal accuracies: the lower loss
        ((0.4, 0.9), (0.4, 0.9), "accuracy", "raw"),  # a full tie keeps the trained weights
        ((0.3, 0.5), (0.4, 0.9), "valid_loss", "ema"),
        ((0.5, 1.0), (0.4, 0.9), "valid_loss", "raw"),
    ]
    for ema_valid, raw_valid, monitor, kept in cases:
        cb, trained = ema_of(7.0), nn.Linear(2, 2)
        nn.init.constant_(trained.weight, 1.0)
        cb.valid = ema_valid
        assert cb.keep_better(SimpleNamespace(model=trained), raw_valid, monitor) == kept
        assert trained.weight.eq(7.0 if kept == "ema" else 1.0).all()
        assert cb.summary()["kept"] == kept and cb.summary()["valid_loss_raw"] == raw_valid[0]


def test_ema_with_lookahead_is_refused_in_one_line(tiny_data):
    from typer.testing import CliRunner

    from cifar_fastai.cli import train_app

    with pytest.raises(ConfigError, match="--ema and --lookahead both average the weights"):
        TrainConfig(ema=0.999, lookahead=True)
    res = CliRunner().invoke(train_app, ["--data", str(tiny_data), "--arch", "tiny", "--ema", "0.999", "--lookahead"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == ["error: --ema and --lookahead both average the weights: pick one"]


# ------------------------------------------------------------------------------------------------ in a run
def test_history_has_the_average_beside_the_unchanged_trained_weights(ema_run, tiny_run):
    rows, plain = history(ema_run.run_dir), history(tiny_run)
    assert {"ema_valid_loss", "ema_accuracy"} <= set(rows[0])
    raw = ("train_loss", "valid_loss", "accuracy")
    # the EMA's validation pass leaves the random streams alone: the trained weights are those of a run without it
    assert [[r[k] for k in raw] for r in rows] == [[r[k] for k in raw] for r in plain]
    assert any(r["ema_valid_loss"] != r["valid_loss"] for r in rows), "the average is validated, not the net"


def test_the_average_differs_and_the_kept_one_is_recorded_and_exported(ema_run):
    from safetensors.torch import load_file

    last = last_checkpoint(ema_run.run_dir)
    ema, trained = last["records"]["model_ema"]["module"], last["model"]
    floats = [k for k in trained if trained[k].is_floating_point()]
    assert any(not torch.allclose(ema[k], trained[k]) for k in floats), "the averaged weights are not the trained ones"
    metrics = ema_run.metrics
    assert json.loads((ema_run.run_dir / "metrics.json").read_text())["ema"] == metrics["ema"]
    summary, row = metrics["ema"], history(ema_run.run_dir)[-1]
    assert summary["decay"] == 0.9 and summary["updates"] == last["meta"]["train_iter"]
    assert summary["valid_accuracy_ema"] == pytest.approx(float(row["ema_accuracy"]))
    assert summary["valid_accuracy_raw"] == pytest.approx(float(row["accuracy"]))
    acc_ema, acc_raw = summary["valid_accuracy_ema"], summary["valid_accuracy_raw"]
    better = (acc_ema, -summary["valid_loss_ema"]) > (acc_raw, -summary["valid_loss_raw"])
    assert summary["kept"] == ("ema" if better else "raw")
    kept = ema if better else trained
    assert metrics["valid_loss"] == summary[f"valid_loss_{summary['kept']}"]
    exported = load_file(ema_run.run_dir / "model.safetensors")
    assert all(torch.equal(exported[k], kept[k]) for k in exported), "the export holds the kept weights"


def test_the_ema_pass_validates_the_average_as_validation_does(tiny_data, tmp_path):
    # a vanishing decay: the average is the net itself, so its validation must repeat the net's (eval-mode BatchNorm,
    # the same images and loss)
    res = train(TrainConfig(data=str(tiny_data), out=str(tmp_path), ema=1e-9, **{**TINY, "epochs": 1}), verbose=False)
    (row,) = history(res.run_dir)
    assert float(row["ema_valid_loss"]) == pytest.approx(float(row["valid_loss"]), rel=1e-4)
    assert float(row["ema_accuracy"]) == pytest.approx(float(row["accuracy"]))


class Interrupt(Callback):
    order = 99  # after Checkpoint wrote epoch 1

    def after_epoch(self):
        raise KeyboardInterrupt


def test_resume_restores_the_average(ema_run, tiny_data, tmp_path, monkeypatch):
    import cifar_fastai.training.run as train_module

    run_callbacks = train_module.run_callbacks
    monkeypatch.setattr(train_module, "run_callbacks", lambda *a, **k: [*run_callbacks(*a, **k), Interrupt()])
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path), name="cut", ema=0.9, **TINY)
    with pytest.raises(TrainingError, match="interrupted"):
        train(cfg, verbose=False)
    monkeypatch.setattr(train_module, "run_callbacks", run_callbacks)
    resumed = train(TrainConfig(resume=str(tmp_path / "cut")), verbose=False)

    got, want = last_checkpoint(resumed.run_dir)["records"], last_checkpoint(ema_run.run_dir)["records"]
    assert got["model_ema"]["updates"] == want["model_ema"]["updates"]
    for k, v in want["model_ema"]["module"].items():
        assert torch.allclose(got["model_ema"]["module"][k], v, rtol=1e-4, atol=1e-6), k
    rows, whole = history(resumed.run_dir), history(ema_run.run_dir)
    assert [float(r["ema_valid_loss"]) for r in rows] == pytest.approx(
        [float(r["ema_valid_loss"]) for r in whole], rel=1e-4
    )
    assert resumed.metrics["ema"]["kept"] == ema_run.metrics["ema"]["kept"]
