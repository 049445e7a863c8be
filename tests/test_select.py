"""Data selection (`--select`): the net trains on the highest-loss images of each batch under a small proxy net."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from cifar_fastai import TrainConfig
from cifar_fastai.errors import ConfigError


class Spy(Callback):
    """Records each training batch as it reaches `order`, the proxy as it was then, and the size of the prediction."""

    def __init__(self, order: float, select=None):
        self.order, self.select = order, select
        self.batches, self.proxies, self.pred_sizes = [], [], []

    def before_batch(self):
        if self.training:
            self.batches.append(tuple(t.as_subclass(torch.Tensor).clone() for t in (self.xb[0], self.yb[0])))
            if self.select is not None:
                self.proxies.append(copy.deepcopy(self.select.proxy))

    def after_pred(self):
        if self.training:
            self.pred_sizes.append(len(self.pred))


def test_the_net_trains_on_exactly_the_highest_proxy_loss_images(tiny_data):
    from cifar_fastai.callbacks.select import LABEL_SMOOTHING, SelectHard
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats

    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=20, lr=1e-2, train_per_class=10)
    data = get_data(cfg, norm_stats(cfg), verbose=False)
    learn = create_learner(cfg, data)
    select = SelectHard(0.25)
    before, after = Spy(select.order - 0.1, select), Spy(select.order + 0.1)
    learn.fit(1, 1e-2, cbs=[select, before, after])

    assert select.proxy is None, "nothing of the proxy stays on the learner"
    assert len(before.batches) == len(after.batches) >= 3 and select.proxy_steps >= 1
    for (x, y), proxy, (x_kept, y_kept), n_pred in zip(before.batches, before.proxies, after.batches, after.pred_sizes):
        with torch.no_grad():  # the proxy's losses, computed here from its weights at that batch
            losses = F.cross_entropy(proxy(x), y, label_smoothing=LABEL_SMOOTHING, reduction="none")
        k = len(y) // 4
        chosen = losses.topk(k).indices.sort().values
        assert torch.equal(x_kept, x[chosen]) and torch.equal(y_kept, y[chosen])
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[chosen] = False
        assert losses[chosen].min() >= losses[rest].max()
        assert n_pred == k, "the net's forward pass and loss see the kept images only"
    assert select.summary()["images_trained"] == sum(len(y) // 4 for _, y in before.batches)
    # the proxy learns from its own steps: its weights move between the first and the last batch
    first, last = before.proxies[0].state_dict(), before.proxies[-1].state_dict()
    assert any(not torch.equal(first[k], last[k]) for k in first if first[k].is_floating_point())


def test_a_run_with_select_trains_on_half_of_each_batch(tiny_data, tmp_path):
    from cifar_fastai.training.run import train

    cfg = TrainConfig(
        data=str(tiny_data), arch="airbench_resnet", width=0.25, optimizer="muon", schedule="linear", lr=0.12,
        epochs=1, bs=32, out=str(tmp_path), name="sel", select=0.5,
    )  # fmt: skip
    res = train(cfg, verbose=False)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    sel, n_train = metrics["select"], json.loads((res.run_dir / "config.json").read_text())["resolved"]["n_train"]
    assert sel["fraction"] == 0.5 and sel["proxy_steps"] >= 1
    assert sel["images_ranked"] in (n_train, n_train // 32 * 32)  # every training batch of the epoch was ranked
    assert sel["images_trained"] == sel["images_ranked"] // 2
    assert (res.run_dir / "model.safetensors").exists()


def test_select_out_of_range_is_one_clear_error():
    with pytest.raises(ConfigError, match="--select"):
        TrainConfig(select=0)
