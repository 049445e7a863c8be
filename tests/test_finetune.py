"""Fine-tuning as a user meets it: weights from files and caches, freezing, discriminative rates, --init-from, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file
from torchvision.models import resnet18
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_data
from cifar_fastai.callbacks.finetune_report import FineTuneReport
from cifar_fastai.cli import train_app
from cifar_fastai.data.transforms import cifar_stats
from cifar_fastai.errors import DataError, WeightsError
from cifar_fastai.models.tiny import tiny
from cifar_fastai.training.finetune import fine_tune
from cifar_fastai.training.learner import create_learner, norm_stats
from cifar_fastai.training.resolve import resolve_init_from
from cifar_fastai.training.run import train
from tests.conftest import REPO


def learner_for(cfg: TrainConfig):
    cfg = resolve_init_from(cfg)
    data = get_data(cfg, norm_stats(cfg), verbose=False)
    return cfg, data, create_learner(cfg, data)


def batch(data) -> torch.Tensor:
    return data.dls.valid.one_batch()[0]


class Snapshots(Callback):
    """The model's full state (parameters and BatchNorm running statistics) before and after every fit, and the
    learning rates the optimizer's parameter groups held at every training batch."""

    order = 61  # after fastai's ParamScheduler (60) has set this batch's rates

    def __init__(self):
        self.states, self.batch_lrs = [], []

    def _state(self):
        return {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}

    def before_fit(self):
        self.states.append(self._state())
        self.batch_lrs.append([])

    def before_batch(self):
        if self.training:
            self.batch_lrs[-1].append([h["lr"] for h in self.opt.hypers])

    def after_fit(self):
        self.states.append(self._state())


# ------------------------------------------------------------------------------------------ weights from files
def test_our_run_weights_reproduce_the_saved_model(tiny_data, tiny_run):
    """--weights RUN, RUN/model.safetensors and --init-from RUN all load the body the run saved: same features, same stats."""
    ref = tiny()
    ref.load_state_dict(load_file(str(tiny_run / "model.safetensors")))
    ref.eval()
    for kw in (
        {"weights": str(tiny_run)},
        {"weights": str(tiny_run / "model.safetensors")},
        {"init_from": str(tiny_run)},
    ):
        _cfg, data, learn = learner_for(TrainConfig(data=str(tiny_data), arch="tiny", bs=8, **kw))
        assert data.stats == cifar_stats, "the run's own normalization, not ImageNet's"
        x = batch(data)
        with torch.no_grad():
            assert torch.allclose(learn.model.eval()[0](x), ref[0](x), atol=1e-6), kw
            # same classes and a head of the same shape: copying the old head back gives the saved model's outputs
            learn.model[1].load_state_dict(ref[1].state_dict())
            assert torch.allclose(learn.model(x), ref(x), atol=1e-6)


def test_torchvision_pth_and_timm_safetensors_give_the_same_features(tiny_data, tmp_path):
    import timm
    from safetensors.torch import save_file

    tv = resnet18().eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    tm = timm.create_model("resnet18", num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    for arch, path, features in (
        ("resnet18", tmp_path / "resnet18.pth", lambda x: torch.nn.Sequential(*list(tv.children())[:-2])(x)),
        ("timm/resnet18", tmp_path / "resnet18.safetensors", tm.forward_features),
    ):
        _, data, learn = learner_for(TrainConfig(data=str(tiny_data), arch=arch, weights=str(path), bs=8))
        x = batch(data)
        with torch.no_grad():
            assert torch.allclose(learn.model.eval()[0](x), features(x), atol=1e-5), arch


def test_export_pkl_is_never_unpickled_for_weights(tiny_data, tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "export.pkl").write_bytes(b"not a pickle: reading it would fail")
    _, _data, learn = learner_for(TrainConfig(data=str(tiny_data), arch="tiny", weights=str(run / "export.pkl"), bs=8))
    saved = load_file(str(run / "model.safetensors"))
    assert torch.equal(learn.model[0][0][0].weight, saved["0.0.0.weight"]), "weights came from the file beside it"
    (run / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="never loaded for weights"):
        learner_for(TrainConfig(data=str(tiny_data), arch="tiny", weights=str(run / "export.pkl")))


OFFLINE_CACHES = textwrap.dedent(
    """
    import json, sys
    import torch
    from cifar_fastai import TrainConfig, get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    out = {}
    for arch in ("resnet18", "timm/resnet18"):
        cfg = TrainConfig(data=sys.argv[1], arch=arch, pretrained=True, bs=8, train_per_class=1)  # only the model counts
        learn = create_learner(cfg, get_data(cfg, norm_stats(cfg), verbose=False))
        body = learn.model[0]
        conv1 = body[0] if arch == "resnet18" else body.model.conv1
        out[arch] = float(conv1.weight.double().sum())
    print(json.dumps(out))
    """
)


def test_pretrained_works_offline_from_torch_home_and_hf_cache(tiny_data, tmp_path):
    """--pretrained finds weights placed where torchvision ($TORCH_HOME) and timm (the HF cache) look for them."""
    import timm
    from safetensors.torch import save_file

    tv = resnet18()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        tv.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    )  # torchvision's name
    tm = timm.create_model("resnet18")
    repo = "models--" + timm.get_pretrained_cfg("resnet18").hf_hub_id.replace("/", "--")
    snapshot = tmp_path / "hf" / "hub" / repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "hub" / repo / "refs").mkdir()
    (tmp_path / "hf" / "hub" / repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(snapshot / "model.safetensors"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "https_proxy": "http://127.0.0.1:9",  # no network even where there is some: the caches must be enough
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    res = subprocess.run(
        [sys.executable, "-c", OFFLINE_CACHES, str(tiny_data)], env=env, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    sums = json.loads(res.stdout.strip().splitlines()[-1])
    assert sums["resnet18"] == pytest.approx(float(tv.conv1.weight.double().sum()))
    assert sums["timm/resnet18"] == pytest.approx(float(tm.conv1.weight.double().sum()))


def test_unreachable_pretrained_weights_are_one_clear_line(tiny_data, tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.models._api

    def offline(url, *args, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # the download torchvision tries
    out = tmp_path / "runs"
    args = ["--data", str(tiny_data), "--arch", "resnet18", "--pretrained", "--out", str(out)]
    res = CliRunner().invoke(train_app, args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), "a clean exit, not an exception"
    assert "error: could not download ImageNet weights for resnet18" in res.stderr
    assert "--weights PATH" in res.stderr and str(tmp_path / "empty" / "hub" / "checkpoints") in res.stderr
    assert not any(out.glob("*")), "no run folder left behind"


def test_weights_that_do_not_fit_the_arch_exit_nonzero_without_traceback(tiny_data, tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "runs"
    args = ["--data", str(tiny_data), "--arch", "tiny", "--weights", str(tmp_path / "resnet18.pth"), "--out", str(out)]
    res = CliRunner().invoke(train_app, args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), "a clean exit, not an exception"
    assert "error: --weights" in res.stderr and "does not fit tiny" in res.stderr


def test_bad_init_from_and_freeze_choices_are_clear_errors(tiny_data, tiny_run, tmp_path):
    runner = CliRunner()
    base = ["--data", str(tiny_data), "--out", str(tmp_path), "--epochs", "1"]
    res = runner.invoke(train_app, [*base, "--init-from", str(tmp_path)])
    assert res.exit_code == 1 and "not a run folder" in res.output
    res = runner.invoke(train_app, [*base, "--init-from", str(tiny_run), "--arch", "resnet50"])
    assert res.exit_code == 1 and "conflicts with --init-from" in res.output
    res = runner.invoke(train_app, [*base, "--init-from", str(tiny_run), "--trainable-groups", "2"])
    assert res.exit_code == 1 and "has 2 layer groups" in res.output
    res = runner.invoke(train_app, [*base, "--init-from", str(tiny_run), "--freeze", "everything"])
    assert res.exit_code == 2 and "--freeze" in res.output


# ----------------------------------------------------------------------------------------------------- data
def test_classes_keeps_a_relabelled_subset_everywhere(tiny_data):
    data = get_data(TrainConfig(data=str(tiny_data), arch="tiny", classes="ship, cat", bs=8), verbose=False)
    assert data.vocab == ["cat", "ship"], "dataset order, however the list is typed"
    assert data.n_test == 20 and data.n_train + data.n_valid == 60, (
        "2 classes x 30 train + 10 test (the corrupt cat skipped)"
    )
    for dl in (data.dls.train, data.dls.valid, data.test_dl):
        assert set(torch.cat([y for _, y in dl]).tolist()) <= {0, 1}
    with pytest.raises(DataError, match="unicorn not in the data"):
        get_data(TrainConfig(data=str(tiny_data), classes="cat,unicorn"), verbose=False)


# -------------------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("mode", ["head", "bn"])
def test_frozen_body_does_not_change_then_unfreezing_moves_it(tiny_data, tiny_run, mode):
    cfg, _data, learn = learner_for(
        TrainConfig(
            data=str(tiny_data), init_from=str(tiny_run), freeze=mode, freeze_epochs=1, epochs=1, bs=16, lr=1e-2
        )
    )
    snap = Snapshots()
    fine_tune(learn, cfg, [snap])
    start, after_frozen, after_unfrozen = snap.states[0], snap.states[1], snap.states[3]
    body = [k for k in start if k.startswith("0.")]
    bn = [k for k in body if k.split(".")[-1] in ("weight", "bias") and start[k].ndim == 1]
    convs = [k for k in body if k.endswith("weight") and start[k].ndim == 4]
    assert convs and bn
    assert all(torch.equal(start[k], after_frozen[k]) for k in convs), "conv weights frozen in the frozen phase"
    assert not torch.equal(start["1.3.weight"], after_frozen["1.3.weight"]), "the head trains"
    if mode == "head":  # really head only: BatchNorm weights and running statistics untouched
        assert all(torch.equal(start[k], after_frozen[k]) for k in body)
    else:  # fastai's default (train_bn=True): BatchNorm layers keep training
        assert any(not torch.equal(start[k], after_frozen[k]) for k in bn)
    assert all(not torch.equal(after_frozen[k], after_unfrozen[k]) for k in convs), "unfrozen: the whole body moves"


def test_freeze_to_last_groups_and_discriminative_rates_in_the_optimizer(tiny_data, tmp_path):
    """resnet18 has 3 layer groups. --trainable-groups 2 trains groups 1-2 while frozen; after unfreezing each group
    gets its rate from slice(lr/2/lr_mult, lr/2), geometrically spaced, as fastai's fine_tune does."""
    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    lr, lr_mult = 1e-2, 10.0
    cfg, _data, learn = learner_for(
        TrainConfig(data=str(tiny_data), arch="resnet18", weights=str(tmp_path / "resnet18.pth"), freeze="head",
                    trainable_groups=2, lr_mult=lr_mult, lr=lr, freeze_epochs=1, epochs=1, bs=16, classes="cat,dog")
    )  # fmt: skip
    snap, report = Snapshots(), FineTuneReport(tmp_path)
    fine_tune(learn, cfg, [snap, report])
    frozen, unfrozen = report.phases
    assert frozen["weight_change"][0] == 0 and frozen["weight_change"][1] > 0 and frozen["weight_change"][2] > 0
    assert unfrozen["weight_change"][0] > 0
    assert frozen["peak_lr"] == pytest.approx([lr / 10, lr / 10, lr])  # fastai: slice(lr) -> lr/10 below the head
    expected = [lr / 2 / lr_mult, lr / 2 / np.sqrt(lr_mult), lr / 2]
    assert unfrozen["peak_lr"] == pytest.approx(expected)
    for lrs in snap.batch_lrs[1]:  # what the optimizer's parameter groups really held, batch by batch
        assert lrs[0] / lrs[2] == pytest.approx(1 / lr_mult) and lrs[1] / lrs[2] == pytest.approx(1 / np.sqrt(lr_mult))
        assert lrs[2] <= lr / 2 * (1 + 1e-9)
    assert max(lrs[2] for lrs in snap.batch_lrs[1]) > lr / 2 * 0.5, "the schedule rises towards its peak"


# --------------------------------------------------------------------------------------- transfer: --init-from
def test_init_from_a_run_on_other_classes(tiny_data, tiny_run, tmp_path):
    """Pretrained on 10 classes, fine-tuned on 3: new 3-way head, the run's body, and a report in the run folder."""
    saved = load_file(str(tiny_run / "model.safetensors"))
    cfg, _data, learn = learner_for(TrainConfig(data=str(tiny_data), init_from=str(tiny_run), classes="cat,dog,frog"))
    assert cfg.arch == "tiny" and learn.model[1][-1].out_features == 3
    assert all(torch.equal(v, saved["0." + k]) for k, v in learn.model[0].state_dict().items()), "body kept"

    res = train(
        TrainConfig(data=str(tiny_data), init_from=str(tiny_run), classes="cat,dog,frog", freeze="head",
                    epochs=1, bs=16, lr=1e-2, out=str(tmp_path), name="ft"),
        verbose=False,
    )  # fmt: skip
    assert set(res.metrics["per_class_test_accuracy"]) == {"cat", "dog", "frog"}
    config = json.loads((res.run_dir / "config.json").read_text())
    assert config["config"]["init_from"] == str(tiny_run) and config["resolved"]["vocab"] == ["cat", "dog", "frog"]
    report = json.loads((res.run_dir / "finetune.json").read_text())
    assert [p["name"] for p in report["phases"]] == ["frozen", "unfrozen"]
    assert "valid_accuracy" in report["before"] and report["phases"][-1]["valid_accuracy"] > 1 / 3
    body, head = report["groups"]
    assert report["phases"][0]["weight_change"][0] == 0 and body["total_change"] > 0 and head["total_change"] > 0
    md = (res.run_dir / "finetune.md").read_text()
    assert "before fine-tuning" in md and "after the frozen phase" in md and "after unfreezing" in md
    assert (res.run_dir / "finetune.png").stat().st_size > 0
