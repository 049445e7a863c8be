"""Issue 10: the named fast recipes, the whitening stem, and the time-to-accuracy benchmark (behaviour, not timings)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cifar_fastai import TrainConfig
from cifar_fastai.archs import get_arch
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.models.cifar_resnet import PatchWhiten
from cifar_fastai.recipes import RECIPES, apply_recipe

from .conftest import run_script


def test_recipe_fills_defaults_and_explicit_options_win():
    cfg = apply_recipe(TrainConfig(recipe="fast", epochs=2, data="sample"))
    fast = RECIPES["fast"].options
    assert cfg.arch == fast["arch"] and cfg.bs == fast["bs"] and cfg.precision == "bf16" and cfg.tta
    assert cfg.epochs == 2, "an option given with a non-default value is the user's"
    assert apply_recipe(TrainConfig()) == TrainConfig(), "no recipe: nothing changes"
    kept = apply_recipe(TrainConfig(recipe="fast"), explicit={"tta"})  # e.g. --recipe fast --no-tta
    assert not kept.tta and kept.arch == fast["arch"]
    assert apply_recipe(kept) is kept, "applying twice changes nothing"
    with pytest.raises(CifarFastaiError, match="fast, long"):
        apply_recipe(TrainConfig(recipe="warp"))


def test_whitening_stem_decorrelates_patches_and_is_frozen():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.3], [0.0, 0.0, 0.2]])  # strongly correlated channels
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))
    layer = PatchWhiten(24)
    layer.whiten(images)
    with torch.no_grad():
        out = layer(images)[:, :12] - layer.bias[:12, None, None]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    # the well-determined directions come out with unit variance and no correlation (eps damps the tiny ones)
    assert torch.allclose(cov[:6, :6], torch.eye(6), atol=0.1)
    assert not layer.weight.requires_grad and bool(layer.whitened)
    fresh = PatchWhiten(24)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.whitened) and not fresh.weight.requires_grad, "a reloaded stem stays whitened and frozen"


def test_airbench_resnet_is_a_resnet_with_fastai_groups():
    model = get_arch("airbench_resnet").builder(n_out=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert 1.9e6 < sum(p.numel() for p in model.parameters()) < 2.0e6  # airbench94's 1.97M


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_runs_end_to_end_on_tiny_data(recipe, tiny_data, tmp_path):
    """Through the time-to-accuracy benchmark, as a user runs it: train.py --recipe, JSON, curve and plot."""
    out = tmp_path / "tta.json"
    r = run_script(
        "bench/time_to_accuracy.py", "--data", str(tiny_data), "--recipes", recipe, "--seeds", "0",
        "--epochs", "2", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["config"]["arch"] == "airbench_resnet" and run["config"]["recipe"] == recipe
    assert 0.0 <= run["test_accuracy_tta"] <= 1.0 and 0.0 <= run["test_accuracy"] <= 1.0
    walls = [w for w, _ in run["curve_wall_s_valid_accuracy"]]
    assert len(walls) == 2 and walls == sorted(walls) and walls[-1] <= run["process_wall_s"]
    assert result["summary"][recipe]["target"]["test_accuracy"] in (0.91, 0.93)
    assert out.with_suffix(".png").stat().st_size > 0
    history = list(csv.DictReader((tmp_path / "tta_runs" / f"{recipe}-seed0" / "history.csv").open()))
    assert [float(h["elapsed_s"]) for h in history] == sorted(float(h["elapsed_s"]) for h in history)


def test_cli_options_given_with_a_recipe_win_even_at_their_default(monkeypatch):
    from typer.testing import CliRunner

    from cifar_fastai import cli, distributed

    seen = []
    monkeypatch.setattr(distributed, "launch", lambda job: seen.append(job))
    r = CliRunner().invoke(cli.train_app, ["--recipe", "fast", "--no-tta", "--bs", "256", "--epochs", "3"])
    assert r.exit_code == 0, r.output
    # the job closes over the config the command built; read it back from the closure
    cfg = next(c.cell_contents for c in seen[0].__closure__ if isinstance(c.cell_contents, TrainConfig))
    assert (cfg.recipe, cfg.arch, cfg.tta, cfg.bs, cfg.epochs) == ("fast", "airbench_resnet", False, 256, 3)
