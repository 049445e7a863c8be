"""FGSM/PGD in pixel space, adversarial training as a callback and a train.py flag, robust accuracy."""

from __future__ import annotations

import json

import torch
from fastai.callback.core import Callback, CancelTrainException
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_data, load_model
from cifar_fastai.callbacks.adversarial import AdversarialTraining
from cifar_fastai.cli import train_app
from cifar_fastai.data.transforms import cifar_stats
from cifar_fastai.evaluation.attacks import fgsm, normalize_stats, pgd, robust_accuracy, to_pixels
from cifar_fastai.models import get_arch
from cifar_fastai.training.learner import create_learner
from cifar_fastai.training.run import train


def test_pgd_and_fgsm_stay_in_eps_ball_and_pixel_range():
    torch.manual_seed(0)
    model = get_arch("tiny").builder(n_out=10).eval()
    mean, std = (torch.tensor(s).reshape(1, 3, 1, 1) for s in cifar_stats)
    pixels = torch.rand(8, 3, 32, 32)
    pixels[:, :, :4] = 0.0  # saturated pixels: the [0, 1] clamp must hold there too
    pixels[:, :, -4:] = 1.0
    x, y = (pixels - mean) / std, torch.randint(0, 10, (8,))
    eps = 8 / 255
    for adv in (pgd(model, x, y, eps, 2 / 255, 5, mean, std), fgsm(model, x, y, eps, mean, std)):
        adv_pixels = adv * std + mean
        assert (adv_pixels - pixels).abs().max() <= eps + 1e-5, "L-inf radius measured in pixels, not normalized units"
        assert adv_pixels.min() >= -1e-5 and adv_pixels.max() <= 1 + 1e-5
        assert (adv_pixels - pixels).abs().max() > eps / 2, "the attack actually moved the pixels"


def test_attack_lowers_accuracy_of_undefended_model(tiny_run):
    learn = load_model(tiny_run)  # the safe model.json + safetensors of the run
    data = get_data(TrainConfig.from_json(tiny_run / "config.json"), verbose=False)
    # tiny's classes are 10 far-apart colours: it takes a large radius (32/255) to cross between them
    fgsm_res = robust_accuracy(learn.model, data.test_dl, "fgsm", 32 / 255)
    pgd_res = robust_accuracy(learn.model, data.test_dl, "pgd", 32 / 255, alpha=8 / 255, steps=5)
    assert fgsm_res["clean_accuracy"] > 0.5
    assert pgd_res["robust_accuracy"] < pgd_res["clean_accuracy"] - 0.15, pgd_res
    assert fgsm_res["robust_accuracy"] < fgsm_res["clean_accuracy"], fgsm_res


def test_callback_perturbs_training_batches_only(tiny_data):
    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=16)
    data = get_data(cfg, verbose=False)
    learn = create_learner(cfg, data)
    mean, std = normalize_stats(data.dls.train)
    seen = {}

    class Probe(Callback):
        order = 50  # after the attack

        def before_batch(self):
            if self.training:
                seen.setdefault("train", []).append((self.xb[0].clone(), self.model.training))
                if len(seen["train"]) == 2:
                    raise CancelTrainException()  # two attacked batches are enough; go on to validation
            else:
                seen.setdefault("valid", []).append(self.xb[0].clone())

    adv = AdversarialTraining("pgd", eps=8 / 255, alpha=2 / 255, steps=2, ratio=0.5)
    clean_first = {}

    class Clean(Callback):
        order = -5  # before the attack: the clean batch

        def before_batch(self):
            clean_first.setdefault(self.training, self.xb[0].clone())

    learn.fit(1, 1e-3, cbs=[Clean(), adv, Probe()])
    x_adv, model_mode = seen["train"][0]
    diff = (to_pixels(x_adv, mean, std) - to_pixels(clean_first[True], mean, std)).abs().flatten(1).amax(1)
    assert model_mode, "the training step itself runs in train mode (the attack's eval mode is restored)"
    assert (diff[:8] > 1 / 255).all() and (diff[:8] <= 8 / 255 + 1e-5).all(), "half the batch (ratio 0.5) attacked"
    assert (diff[8:] < 1e-6).all(), "the other half stays clean"
    assert torch.equal(seen["valid"][0], clean_first[False]), "validation batches are never attacked"
    assert adv.n_adversarial == 8 * 2


def test_adversarial_training_end_to_end(tiny_data, tmp_path, monkeypatch):
    used = []  # the attack callbacks the run really fitted with
    before_fit = AdversarialTraining.before_fit
    monkeypatch.setattr(AdversarialTraining, "before_fit", lambda self: used.append(self) or before_fit(self))
    cfg = TrainConfig(
        data=str(tiny_data), arch="tiny", epochs=1, bs=16, lr=1e-2, adv="pgd", adv_steps=2, adv_alpha=4 / 255,
        adv_ratio=0.5, out=str(tmp_path), name="adv",
    )  # fmt: skip
    run_dir = train(cfg, verbose=False).run_dir
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert saved["adv"] == "pgd" and saved["eps"] == 8 / 255 and saved["adv_ratio"] == 0.5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3, "the adversarially trained model still learns the colours"
    assert (run_dir / "export.pkl").exists()
    (adv,) = used
    n_batches = json.loads((run_dir / "config.json").read_text())["resolved"]["n_train"] // 16
    assert adv.n_adversarial >= 8 * n_batches, "half of every training batch (--adv-ratio 0.5) was attacked"


def test_adversarial_options_accept_fractions(monkeypatch):
    seen = {}
    monkeypatch.setattr("cifar_fastai.training.run.train", lambda plan: seen.setdefault("cfg", plan.cfg))
    res = CliRunner().invoke(
        train_app, ["--adv", "fgsm", "--eps", "4/255", "--adv-alpha", "0.01", "--adv-ratio", "0.5"]
    )
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.adv == "fgsm" and cfg.eps == 4 / 255 and cfg.adv_alpha == 0.01 and cfg.adv_ratio == 0.5
    assert "8/255" in CliRunner().invoke(train_app, ["--help"]).output


def test_eps_outside_pixel_range_is_rejected():
    res = CliRunner().invoke(train_app, ["--adv", "pgd", "--eps", "300/255"])
    assert res.exit_code == 2 and "outside [0, 1]" in res.output
