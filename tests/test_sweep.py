"""scripts/sweep.py: k-fold search on tiny data, results table + plot + best command, restart skips finished trials."""

from __future__ import annotations

import csv
import shlex

import numpy as np
import pytest

from cifar_fastai import TrainConfig
from cifar_fastai.data.index import index_images, split_indices
from cifar_fastai.data.sources import resolve_data
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.studies.sweep import parse_param, plan, sweep


def test_folds_partition_the_training_images_and_never_touch_test(tiny_data):
    index = index_images(resolve_data(str(tiny_data)), verbose=False)
    cfg = TrainConfig(data=str(tiny_data), folds=3)
    splits = [split_indices(index, cfg.replace(fold=k)) for k in range(3)]
    valids = [v for _, v, _ in splits]
    assert sorted(np.concatenate(valids).tolist()) == index.split(False).tolist(), "each training image validates once"
    for train, valid, test in splits:
        assert not set(train) & set(valid) and not set(valid) & set(test.tolist())
        assert set(train) | set(valid) == set(index.split(False).tolist())
    again = split_indices(index, cfg.replace(fold=1))[1]
    assert np.array_equal(again, valids[1]), "seeded: the same folds on every run"


def test_sweep_two_configs_two_folds_then_restart_skips_finished(tiny_data, tmp_path):
    base = TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=32, folds=2, out=str(tmp_path), name="sw")
    res = sweep(base, ["lr=3e-3,1e-2"], verbose=False)
    assert (res.ran, res.skipped) == (4, 0)
    assert len(res.table) == 2 and all(r["folds"] == 2 and r["mean"] is not None for r in res.table)
    assert res.table[0]["mean"] >= res.table[1]["mean"]
    rows = list(csv.DictReader((res.sweep_dir / "results.csv").open()))
    assert [r["lr"] for r in rows] == [str(r["params"]["lr"]) for r in res.table]
    assert {"mean_valid_accuracy", "std_valid_accuracy"} <= set(rows[0])
    assert "+-" in (res.sweep_dir / "results.md").read_text()
    assert (res.sweep_dir / "sweep.png").stat().st_size > 1000
    best = shlex.split((res.sweep_dir / "best_command.txt").read_text())
    assert best[:2] == ["python", "scripts/train.py"] and "--folds" not in best
    assert float(best[best.index("--lr") + 1]) == res.table[0]["params"]["lr"]
    assert best[best.index("--arch") + 1] == "tiny"

    # a sweep killed during its last trial: that trial's line never got written
    trials = res.sweep_dir / "trials.jsonl"
    trials.write_text("".join(trials.read_text().splitlines(keepends=True)[:3]) + '{"key": "half-writ')
    again = sweep(base, ["lr=3e-3,1e-2"], verbose=False)
    assert (again.ran, again.skipped) == (1, 3)
    assert [r["mean"] for r in again.table] == pytest.approx([r["mean"] for r in res.table]), "seeded: same result"


def test_search_space_parsing_and_rejections(tiny_data):
    assert plan([parse_param("lr=1e-3,3e-3"), parse_param("arch=tiny,resnet18")]) == [
        {"lr": 1e-3, "arch": "tiny"}, {"lr": 1e-3, "arch": "resnet18"},
        {"lr": 3e-3, "arch": "tiny"}, {"lr": 3e-3, "arch": "resnet18"},
    ]  # fmt: skip
    draws = plan([parse_param("lr=1e-4:1e-2:log"), parse_param("crop-pad=0:4")], n_random=5, seed=1)
    assert draws == plan([parse_param("lr=1e-4:1e-2:log"), parse_param("crop-pad=0:4")], n_random=5, seed=1)
    assert all(1e-4 <= d["lr"] <= 1e-2 and d["crop_pad"] in range(5) for d in draws)
    for spec, message in [("lr=1e-3:1e-2", "random search"), ("arch=nope", "unknown architecture"),
                          ("fold=1", "not a searchable"), ("bs=abc", "not a valid int")]:  # fmt: skip
        with pytest.raises(CifarFastaiError, match=message):
            plan([parse_param(spec)])
    with pytest.raises(CifarFastaiError, match="test set"):
        sweep(TrainConfig(data=str(tiny_data), valid="test"), ["lr=1e-3"], verbose=False)


def test_sweep_trials_train_the_recipe_and_keep_no_checkpoints(tiny_data, tmp_path):
    # --recipe fast: every trial trains the recipe's net and optimizer, with only the searched option changed
    base = TrainConfig(data=str(tiny_data), recipe="fast", epochs=1, out=str(tmp_path), name="sw")
    res = sweep(base, ["lr=0.05,0.1"], verbose=False, explicit={"data", "recipe", "epochs", "out", "name"})
    trial_dirs = sorted((res.sweep_dir / "trials").iterdir())
    assert len(trial_dirs) == 2
    for trial in trial_dirs:
        cfg = TrainConfig.from_json(trial / "config.json")
        assert (cfg.arch, cfg.optimizer, cfg.schedule, cfg.label_smoothing) == ("airbench_resnet", "muon", "linear", 0.2)
        assert cfg.lr in (0.05, 0.1) and cfg.epochs == 1
        assert not (trial / "checkpoints").exists(), "no checkpoints unless --checkpoint is given"
    best = shlex.split((res.sweep_dir / "best_command.txt").read_text())
    assert best[best.index("--recipe") + 1] == "fast", "the best command trains what the trials trained"
