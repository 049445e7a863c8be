"""scripts/sweep.py on optuna: k-fold trials on tiny data, table + plot + best command from the study, a killed sweep
resumes without retraining, two worker processes share one SQLite study without training a grid point twice."""

from __future__ import annotations

import csv
import shlex
import statistics
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from cifar_fastai import TrainConfig
from cifar_fastai.cli import sweep_app
from cifar_fastai.data.index import index_images, split_indices
from cifar_fastai.data.sources import resolve_data
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.studies import sweep as sweep_mod
from cifar_fastai.studies import sweep_study
from cifar_fastai.studies.sweep import FoldSteps, Param, TrialSeededSampler, parse_param, sweep
from tests.conftest import run_script


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


@pytest.fixture
def trainings(monkeypatch):
    """Every fold the sweep trains, as (lr, fold); `kill_at` makes that training stop the sweep as a kill would."""
    seen, real = [], sweep_mod.run_fold

    def run_fold(plan, trial_dir, cbs):
        seen.append((plan.cfg.lr, plan.cfg.fold))
        if len(seen) == run_fold.kill_at:
            raise run_fold.kill
        return real(plan, trial_dir, cbs)

    run_fold.kill_at, run_fold.kill, run_fold.seen = 0, None, seen
    monkeypatch.setattr(sweep_mod, "run_fold", run_fold)
    return run_fold


def test_grid_two_folds_table_plot_best_and_no_test_set(tiny_data, tmp_path, monkeypatch, trainings):
    import cifar_fastai.training.run as run_mod

    def no_test(*a, **k):
        raise AssertionError("a sweep must never evaluate the test set")

    monkeypatch.setattr(run_mod, "test_run", no_test)
    monkeypatch.setattr(run_mod.Interpretation, "from_dl", no_test)
    base = TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=32, folds=2, out=str(tmp_path), name="sw")
    res = sweep(base, ["lr=3e-3,1e-2"], verbose=False, prune=True)
    assert (res.ran, res.skipped) == (2, 0) and sorted(trainings.seen) == [(3e-3, 0), (3e-3, 1), (1e-2, 0), (1e-2, 1)]
    trials = res.study.get_trials(states=[TrialState.COMPLETE])
    assert len(trials) == 2 and (res.sweep_dir / "study.db").is_file()
    for t in trials:  # the objective: mean validation accuracy over the folds, each fold kept as a user attribute
        folds = t.user_attrs["fold_valid_accuracy"]
        assert len(folds) == 2 and t.value == pytest.approx(statistics.fmean(folds))
        n_train, n_valid = t.user_attrs["n_train"], t.user_attrs["n_valid"]
        assert n_train + n_valid == 300 and abs(n_train - n_valid) <= 10, "each fold validates on training images"
        assert sorted(t.intermediate_values) == [0, sweep_mod.FOLD_STEPS], "pruning steps: epoch 0 of fold 0 and 1"
        assert list(t.intermediate_values.values()) == pytest.approx(folds)
    rows = list(csv.DictReader((res.sweep_dir / "results.csv").open()))
    assert [float(r["lr"]) for r in rows] == [r["params"]["lr"] for r in res.table]
    assert float(rows[0]["mean_valid_accuracy"]) >= float(rows[1]["mean_valid_accuracy"])
    by_trial = {t.number: t.user_attrs["fold_valid_accuracy"] for t in trials}
    for r in rows:  # the fold spread: every fold's value and their sample standard deviation
        folds = [float(v) for v in r["fold_valid_accuracy"].split(";")]
        assert folds == pytest.approx(by_trial[int(r["trial"])], abs=1e-6)
        assert float(r["std_valid_accuracy"]) == pytest.approx(statistics.stdev(folds), abs=1e-5)
    assert "+-" in (res.sweep_dir / "results.md").read_text()
    assert (res.sweep_dir / "sweep.png").stat().st_size > 1000
    best = shlex.split((res.sweep_dir / "best_command.txt").read_text())
    assert best[:2] == ["python", "scripts/train.py"] and "--folds" not in best
    assert float(best[best.index("--lr") + 1]) == res.table[0]["params"]["lr"]
    assert best[best.index("--arch") + 1] == "tiny"

    again = sweep(base, ["lr=3e-3,1e-2"], verbose=False, prune=True)  # a finished study: nothing is trained again
    assert (again.ran, again.skipped, len(trainings.seen)) == (0, 2, 4)
    assert len(again.study.trials) == 2
    with pytest.raises(CifarFastaiError, match="other settings"):
        sweep(base, ["lr=1e-3,1e-2"], verbose=False)  # another space into the same study would mix them


class Killed(BaseException):
    """A kill as optuna sees it: the trial is never told, so it stays RUNNING with a heartbeat that stops."""


@pytest.mark.parametrize("kill", [KeyboardInterrupt, Killed], ids=["ctrl-c", "killed"])
def test_stopped_sweep_resumes_without_retraining(tiny_data, tmp_path, monkeypatch, trainings, kill):
    monkeypatch.setattr(sweep_study, "HEARTBEAT_S", 1)
    monkeypatch.setattr(sweep_study, "GRACE_S", 1)
    base = TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=32, out=str(tmp_path), name="sw")
    trainings.kill_at, trainings.kill = 2, kill
    with pytest.raises(kill):
        sweep(base, ["lr=3e-3,1e-2"], verbose=False)
    storage = f"sqlite:///{tmp_path / 'sw' / 'study.db'}"
    states = [t.state for t in optuna.load_study(study_name="sw", storage=storage).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL if kill is KeyboardInterrupt else TrialState.RUNNING]
    if kill is Killed:
        time.sleep(2.5)  # its heartbeat falls silent for longer than the grace period
    res = sweep(base, ["lr=3e-3,1e-2"], verbose=False)
    assert (res.ran, res.skipped) == (1, 1)
    assert trainings.seen[2:] == [trainings.seen[1]], "only the stopped trial's setting is trained again"
    assert [r["state"] for r in res.table] == ["ok", "ok"]
    retry = res.study.trials[-1]
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 1


def test_two_workers_share_one_study_without_training_a_point_twice(tiny_data, tmp_path, monkeypatch, trainings):
    # This process takes a grid point and, before training it, runs a second worker in a process of its own on the
    # same SQLite study: that worker trains the other point, then finds this one under way (GridSampler alone would
    # train it again) and ends; only then does this worker train its point.
    args = ["--data", str(tiny_data), "--arch", "tiny", "--epochs", "1", "--bs", "32", "-p", "lr=3e-3,1e-2", "--out",
            str(tmp_path), "--name", "sw"]  # fmt: skip
    other, real = {}, sweep_mod.run_fold

    def run_fold(plan, trial_dir, cbs):
        if not other:
            other["run"] = run_script("scripts/sweep.py", *args)
        return real(plan, trial_dir, cbs)

    monkeypatch.setattr(sweep_mod, "run_fold", run_fold)
    res = CliRunner().invoke(sweep_app, args)
    out = other["run"].stdout + other["run"].stderr
    assert (res.exit_code, other["run"].returncode) == (0, 0), (res.output, out)
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'sw' / 'study.db'}")
    assert sorted(t.params["lr"] for t in study.get_trials(states=[TrialState.COMPLETE])) == [3e-3, 1e-2]
    assert len(study.trials) == 2, "no grid point started twice"
    assert out.count("fold 1/1: valid accuracy") == 1 and res.output.count("fold 1/1: valid accuracy") == 1
    assert len(list((tmp_path / "sw" / "trials").iterdir())) == 2


def test_search_space_samplers_and_rejections(tiny_data, tmp_path):
    assert parse_param("lr=1e-3,3e-3") == Param("lr", values=(1e-3, 3e-3))
    assert parse_param("lr=1e-4:1e-2:log") == Param("lr", low=1e-4, high=1e-2, log=True)
    space = [parse_param("lr=1e-4:1e-2:log"), parse_param("crop-pad=0:4")]

    def draws(numbers):  # trial k draws the same setting whichever worker asks for it, in whatever order
        study = optuna.create_study(sampler=TrialSeededSampler(1))
        out = {}
        for n in range(max(numbers) + 1):
            trial = study.ask()
            out[trial.number] = {p.name: p.suggest(trial) for p in space}
        return [out[n] for n in numbers]

    first = draws([0, 1, 2])
    assert first == draws([0, 1, 2]) and len({d["lr"] for d in first}) == 3
    assert all(1e-4 <= d["lr"] <= 1e-2 and d["crop_pad"] in range(5) for d in first)
    base = TrainConfig(data=str(tiny_data), arch="tiny", out=str(tmp_path))
    for params, kw, message in [
        (["lr=1e-3:1e-2"], {}, "random or tpe"), (["arch=nope"], {}, "unknown architecture"),
        (["fold=1"], {}, "not a searchable"), (["bs=abc"], {}, "not a valid int"),
        (["lr=1e-3"], {"sampler": "tpe"}, "--trials"), (["lr=1e-3"], {"n_trials": 3}, "a grid trains every point"),
        (["lr=1e-3"], {"sampler": "bayes"}, "grid, random, tpe"),
        (["lr=1e-3"], {"storage": "nosuchdb://x"}, "cannot open it as a database"),
    ]:  # fmt: skip
        with pytest.raises(CifarFastaiError, match=message):
            sweep(base, params, verbose=False, **kw)
    with pytest.raises(CifarFastaiError, match="test set"):
        sweep(base.replace(valid="test"), ["lr=1e-3"], verbose=False)
    res = CliRunner().invoke(sweep_app, ["--data", str(tiny_data), "-p", "lr=1e-3", "--random", "2", "--sampler",
                                         "tpe", "--out", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and "--random N is short for" in res.output


def test_tpe_trains_a_redrawn_setting_once(tiny_data, tmp_path, trainings):
    base = TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=32, out=str(tmp_path), name="tpe")
    res = sweep(base, ["lr=3e-3,1e-2"], verbose=False, sampler="tpe", n_trials=3)
    trials = res.study.get_trials(states=[TrialState.COMPLETE])
    assert len(trials) == 3, "three trials over two values: one setting is drawn twice"
    assert sorted(lr for lr, _ in trainings.seen) == [3e-3, 1e-2] and res.ran == 2
    twin = next(t for t in trials if "same_as" in t.user_attrs)
    assert twin.value == res.study.trials[twin.user_attrs["same_as"]].value
    assert len(res.table) == 2


def test_fold_steps_keep_folds_and_fits_apart():
    class Reports:
        def __init__(self):
            self.steps = []

        def report(self, value, step):
            self.steps.append(step)

        def should_prune(self):
            return False

    trial = Reports()
    steps = FoldSteps(trial, fold=2)
    for epoch in (0, 1, 0):  # a fine-tuning run: the frozen fit's epoch 0, then the unfrozen fit's epochs 0, 1
        steps.report(0.5, epoch)
    assert trial.steps == [2 * sweep_mod.FOLD_STEPS, 2 * sweep_mod.FOLD_STEPS + 1, 2 * sweep_mod.FOLD_STEPS + 2]


def test_sweep_trials_train_the_recipe_and_keep_no_checkpoints(tiny_data, tmp_path):
    # --recipe fast: every trial trains the recipe's net and optimizer, with only the searched option changed
    base = TrainConfig(data=str(tiny_data), recipe="fast", epochs=1, out=str(tmp_path), name="sw")
    res = sweep(base, ["lr=0.05,0.1"], verbose=False, explicit={"data", "recipe", "epochs", "out", "name"})
    trial_dirs = sorted((res.sweep_dir / "trials").iterdir())
    assert len(trial_dirs) == 2
    for trial in trial_dirs:
        cfg = TrainConfig.from_json(trial / "config.json")
        assert (cfg.arch, cfg.optimizer, cfg.schedule, cfg.label_smoothing) == (
            "airbench94",
            "muon",
            "linear",
            0.2,
        )
        assert cfg.lr in (0.05, 0.1) and cfg.epochs == 1
        assert not (trial / "checkpoints").exists(), "no checkpoints unless --checkpoint is given"
    best = shlex.split((res.sweep_dir / "best_command.txt").read_text())
    assert best[best.index("--recipe") + 1] == "fast", "the best command trains what the trials trained"
