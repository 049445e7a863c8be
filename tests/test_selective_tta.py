"""Selective TTA (`--tta-select`): the extra views only for the least certain test images, plain logits for the rest."""

from __future__ import annotations

import json

import pytest
import torch

from cifar_fastai import TrainConfig
from cifar_fastai.errors import ConfigError


@pytest.fixture(scope="module", params=["tensor", "datablock"])
def learner(request, tiny_data):
    """An untrained tiny model, the tiny test set (100 images) through either loader, its plain pass and full TTA."""
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.evaluation.report import Interpretation, tta_preds
    from cifar_fastai.training.learner import create_learner, norm_stats

    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=16, loader=request.param)
    data = get_data(cfg, norm_stats(cfg), verbose=False)
    learn = create_learner(cfg, data)
    interp = Interpretation.from_dl(learn, data.test_dl, data.vocab)
    full, targs = tta_preds(learn, data.test_dl, plain=interp.logits)
    assert targs.equal(interp.targs)
    return learn, data.test_dl, interp, full


def margins(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.softmax(1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def test_all_marked_is_full_tta_and_none_marked_is_the_plain_pass(learner):
    from cifar_fastai.evaluation.report import selective_tta_preds

    learn, dl, interp, full = learner
    targs = interp.targs
    every, targs1, marked = selective_tta_preds(learn, dl, 1.0, plain=interp.logits, targs=interp.targs)
    assert marked.tolist() == list(range(len(dl.dataset)))
    assert torch.allclose(every, full, atol=1e-5) and targs1.equal(targs)
    plain, targs0, none = selective_tta_preds(learn, dl, 0.0, plain=interp.logits, targs=interp.targs)
    assert len(none) == 0 and torch.equal(plain, interp.logits.float()) and targs0.equal(targs)
    assert not torch.allclose(full, interp.logits.float(), atol=1e-4), "the views change the logits"


def test_the_marked_images_are_the_lowest_margin_ones_and_only_they_change(learner):
    from cifar_fastai.evaluation.report import selective_tta_preds

    learn, dl, interp, full = learner
    preds, _, marked = selective_tta_preds(learn, dl, 0.25, plain=interp.logits, targs=interp.targs)
    n = len(dl.dataset)
    m = margins(interp.logits.float())
    assert len(marked) == n // 4
    assert set(marked.tolist()) == set(m.argsort()[: n // 4].tolist())
    rest = torch.ones(n, dtype=torch.bool)
    rest[marked] = False
    assert m[marked].max() <= m[rest].min()
    # the marked ones get exactly what full TTA gives them (their views on a loader of them alone), the rest keep
    # their plain logits
    assert torch.allclose(preds[marked], full[marked], atol=1e-5)
    assert torch.equal(preds[rest], interp.logits.float()[rest])


def test_a_run_records_how_many_images_got_the_extra_views(tiny_data, tmp_path):
    from cifar_fastai.evaluation.evaluate import evaluate
    from cifar_fastai.training.run import train

    cfg = TrainConfig(
        data=str(tiny_data), arch="tiny", epochs=1, bs=16, out=str(tmp_path), name="sel", tta=True, tta_select=0.3
    )
    res = train(cfg, verbose=False)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["n_test"] == 100 and metrics["test_tta_extra_view_images"] == 30
    # evaluate.py: with none marked, TTA accuracy is the plain accuracy
    none = evaluate(res.run_dir, tta_select=0.0, verbose=False)
    assert none["tta_extra_view_images"] == 0 and none["tta_accuracy"] == none["accuracy"]
    with pytest.raises(ConfigError, match="tta-select"):
        evaluate(res.run_dir, tta_select=1.5, verbose=False)


def test_the_fraction_is_checked_like_every_setting():
    with pytest.raises(ConfigError, match="--tta-select"):
        TrainConfig(tta_select=1.5)


def test_the_benchmark_reports_each_fraction_against_full_tta(tiny_run, tmp_path):
    from tests.test_deploy import invoke, script_app

    out = tmp_path / "selective.json"
    invoke(script_app("bench/selective_tta.py", "main"), str(tiny_run), "--fractions", "0.5,0", "--bs", "32",
           "--out", str(out))  # fmt: skip
    (run,) = json.loads(out.read_text())["runs"]
    rows = run["fractions"]
    assert list(rows) == ["1", "0.5", "0"], "full TTA always measured, as the baseline of the ratios"
    assert rows["1"]["extra_view_images"] == run["n"] and rows["0.5"]["extra_view_images"] == run["n"] // 2
    assert rows["0"]["extra_view_images"] == 0 and rows["0"]["accuracy"] == run["plain_accuracy"]
    assert rows["1"]["seconds_vs_full_tta"] == 1.0 and rows["0"]["seconds_vs_full_tta"] < 1.0
