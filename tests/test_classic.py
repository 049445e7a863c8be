"""The classic recipe: fastai's SGD with momentum and L2 weight decay, cosine and step schedules, `--recipe he2015`,
and training again from a run's config.json (`--config`)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_learner
from cifar_fastai.cli import train_app
from cifar_fastai.errors import ConfigError
from cifar_fastai.training.resolve import resolve
from cifar_fastai.training.run import fit


def test_sgd_steps_as_torch_sgd_with_momentum_and_l2_weight_decay(tiny_data):
    learn = get_learner(str(tiny_data), "tiny", optimizer="sgd", momentum=0.8, wd=1e-2, schedule="cosine")
    learn.create_opt()
    assert [(h["mom"], h["wd"]) for h in learn.opt.hypers] == [(0.8, 1e-2)] * len(learn.opt.hypers)
    assert not any(state.get("do_wd") is False for _, _, state, _ in learn.opt.all_params()), "BatchNorm decays too"
    # the tutorials' optimizer, step for step: the decay goes through the momentum (L2), on every parameter
    model, ref = learn.model, copy.deepcopy(learn.model)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.8, weight_decay=1e-2)
    learn.opt.set_hyper("lr", 0.1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        for net, opt in ((model, learn.opt), (ref, torch_opt)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def recorded_lrs(tiny_data, **settings) -> tuple[list[float], object]:
    cfg = resolve(TrainConfig(data=str(tiny_data), arch="tiny", optimizer="sgd", lr=0.1, bs=64, **settings)).cfg
    learn = get_learner(str(tiny_data), "tiny", **{k: getattr(cfg, k) for k in ("optimizer", "lr", "bs", *settings)})
    with learn.no_bar(), learn.no_logging():
        fit(learn, cfg, [])
    return learn.recorder.lrs, learn


def test_step_schedule_divides_the_rate_by_10_at_each_step_and_keeps_the_momentum(tiny_data):
    lrs, learn = recorded_lrs(tiny_data, schedule="step", lr_steps="0.25,0.75", epochs=4)
    n_iter = len(lrs) // 4
    assert len(lrs) == 4 * n_iter > 0
    per_epoch = [lrs[e * n_iter : (e + 1) * n_iter] for e in range(4)]
    assert per_epoch == [[0.1] * n_iter, [0.01] * n_iter, [0.01] * n_iter, [0.1 / 100] * n_iter]
    assert learn.opt.hypers[-1]["mom"] == 0.9, "no one-cycle momentum: SGD's own"


def test_cosine_schedule_anneals_from_the_full_rate_to_near_0(tiny_data):
    lrs, learn = recorded_lrs(tiny_data, schedule="cosine", momentum=0.8, epochs=2)
    n = len(lrs)
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * j / n)) for j in range(n)], rel=1e-4, abs=1e-9)
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.005
    assert learn.opt.hypers[-1]["mom"] == 0.8


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"optimizer": "sgd", "momentum": 0.8}, "--momentum is for --optimizer sgd with --schedule linear"),
        ({"optimizer": "adam", "momentum": 0.8, "schedule": "cosine"}, "--momentum is for --optimizer sgd"),
        ({"schedule": "cosine", "lr_steps": "0.3"}, "--lr-steps 0.3 is for --schedule step"),
        ({"schedule": "step", "pretrained": True}, "--schedule step is for training from scratch"),
        ({"schedule": "step", "lr_steps": "0.75,0.5"}, "--lr-steps 0.75,0.5: give increasing fractions"),
    ],
)
def test_sgd_and_schedule_settings_that_would_be_ignored_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)
    TrainConfig(optimizer="sgd")  # with one-cycle, SGD keeps fastai's momentum cycle


def test_he2015_recipe_resolves_to_the_papers_settings():
    cfg = resolve(TrainConfig(recipe="he2015")).cfg
    got = {k: getattr(cfg, k) for k in ("arch", "optimizer", "lr", "momentum", "wd", "bs", "schedule", "steps")}
    assert got == {"arch": "resnet20", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "wd": 1e-4, "bs": 128,
                   "schedule": "step", "steps": (0.5, 0.75)}  # fmt: skip
    assert (cfg.epochs, cfg.crop_pad, cfg.label_smoothing, cfg.precision) == (164, 4, 0.0, "auto")
    assert not (cfg.tta or cfg.alt_flip or cfg.progressive or cfg.mixup), "plain pad-crop-flip"
    assert resolve(TrainConfig(recipe="he2015", epochs=3)).cfg.epochs == 3, "users shorten it with --epochs"


def test_he2015_runs_and_config_trains_the_same_settings_again(tiny_data, tmp_path):
    runner = CliRunner()
    # --wd 0.05 given at its default value: the recipe leaves it, and a rerun must not apply the recipe's 1e-4 again
    first = runner.invoke(train_app, ["--data", str(tiny_data), "--recipe", "he2015", "--epochs", "1", "--wd", "0.05",
                                      "--out", str(tmp_path), "--name", "first"])  # fmt: skip
    assert first.exit_code == 0, first.output
    saved = json.loads((tmp_path / "first" / "config.json").read_text())
    assert (saved["config"]["arch"], saved["config"]["schedule"], saved["config"]["wd"]) == ("resnet20", "step", 0.05)
    assert (tmp_path / "first" / "metrics.json").is_file() and (tmp_path / "first" / "model.safetensors").is_file()

    saved["versions"]["torch"] = "0.0.1-fake"  # as if the run was made with another torch
    (tmp_path / "first" / "config.json").write_text(json.dumps(saved))
    where = tmp_path / "first" / "config.json"
    again = runner.invoke(train_app, ["--config", str(where), "--seed", "1"])
    assert again.exit_code == 0, again.output
    notes = [line for line in again.output.splitlines() if "was made with" in line]
    assert notes == [f"note: {where} was made with torch 0.0.1-fake; installed: {torch.__version__}"]
    (second,) = [p for p in tmp_path.iterdir() if p.name != "first"]
    rerun = json.loads((second / "config.json").read_text())["config"]
    assert (rerun["seed"], rerun["name"]) == (1, None)
    kept = [k for k in saved["config"] if k not in ("seed", "name")]
    assert [rerun[k] for k in kept] == [saved["config"][k] for k in kept] and rerun.keys() == saved["config"].keys()


def test_config_refuses_a_missing_or_garbled_file_and_resume(tmp_path):
    garbled = tmp_path / "config.json"
    garbled.write_text("{not json")
    for args, message in (
        (["--config", str(tmp_path / "nope.json")], "not a readable config file (FileNotFoundError)"),
        (["--config", str(garbled)], "not a readable config file (JSONDecodeError)"),
        (["--config", str(garbled), "--resume", str(tmp_path)], "--resume continues a run: pass one of them"),
        (["--config", str(garbled), "--recipe", "he2015"], "drop --recipe"),
    ):
        res = CliRunner().invoke(train_app, args)
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
