"""--resume continues the run's records too: smoothed train loss, elapsed time, wall seconds and throughput."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time

import pytest
from fastai.callback.core import Callback

from cifar_fastai import TrainConfig
from cifar_fastai.errors import TrainingError
from cifar_fastai.training.budget import TimeBudget
from cifar_fastai.training.run import train

# fp32: on the AVX-512 BF16 host two identical bf16 runs of this model differed in the 4th digit of the first
# epoch's loss, and the comparison below is of a resumed run with an uninterrupted one, not of the kernels
TINY = {"arch": "tiny", "bs": 16, "lr": 1e-2, "threads": 1, "precision": "fp32"}
SLOW_START_S = 1.5  # the first part's clock is well ahead of a fresh process's when the run resumes


class SlowStartThenInterrupt(Callback):
    """A slow first part, then Ctrl-C right after epoch 1 was checkpointed."""

    order = 99  # after Checkpoint wrote last.pth

    def before_fit(self):
        time.sleep(SLOW_START_S)

    def after_epoch(self):
        raise KeyboardInterrupt


def history(run_dir) -> list[dict]:
    return list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The same 3-epoch run twice: uninterrupted, and interrupted after epoch 1 then resumed."""
    import cifar_fastai.training.run as train_module

    out = tmp_path_factory.mktemp("resume")
    whole = train(TrainConfig(data=str(tiny_data), epochs=3, out=str(out), name="whole", **TINY), verbose=False)
    run_callbacks = train_module.run_callbacks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "run_callbacks", lambda *a, **k: [*run_callbacks(*a, **k), SlowStartThenInterrupt()])
        with pytest.raises(TrainingError, match="interrupted"):
            train(TrainConfig(data=str(tiny_data), epochs=3, out=str(out), name="cut", **TINY), verbose=False)
    first = history(out / "cut")
    t, printed = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "run_callbacks", lambda *a, **k: [*run_callbacks(*a, **k), EARLY])
        resumed = train(TrainConfig(resume=str(out / "cut")), verbose=False)
    return whole, resumed, first, time.perf_counter() - t, printed.getvalue()


class EarlyEpochs(Callback):
    """A callback ordered before the resume (as the whitening stem's and the time budget's are): the epochs whose
    before_epoch it saw."""

    order = -15

    def __init__(self):
        self.seen = []

    def before_epoch(self):
        self.seen.append(self.epoch)


EARLY = EarlyEpochs()


def test_callbacks_ordered_before_the_resume_see_every_resumed_epoch_start(runs):
    assert EARLY.seen[-2:] == [1, 2], "epochs 2 and 3 (resumed) each began for it too"


def test_history_of_a_resumed_run_is_the_uninterrupted_ones(runs):
    whole, resumed, first, *_ = runs
    assert len(first) == 1, "interrupted after epoch 1"
    rows, expected = history(resumed.run_dir), history(whole.run_dir)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    # the smoothed train loss goes on from the checkpoint's average instead of restarting (fastai's AvgSmoothLoss)
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([float(r["train_loss"]) for r in expected], rel=1e-4)
    assert [float(r["valid_loss"]) for r in rows] == pytest.approx([float(r["valid_loss"]) for r in expected], rel=1e-4)


def test_elapsed_time_goes_on_across_the_resume(runs):
    _, resumed, first, resume_s, _ = runs
    elapsed = [float(r["elapsed_s"]) for r in history(resumed.run_dir)]
    assert elapsed[0] == float(first[0]["elapsed_s"]) >= SLOW_START_S, "the first part's row is kept as it was"
    assert elapsed[0] < elapsed[1] < elapsed[2], "the clock goes on from the first part's, not from 0"
    assert elapsed[2] - elapsed[0] < resume_s + 0.2, "between them: only the resumed part's time"


def test_metrics_say_resumed_and_cover_both_parts(runs):
    whole, resumed, first, resume_s, _ = runs
    metrics = resumed.metrics
    assert json.loads((resumed.run_dir / "metrics.json").read_text())["resumed"] == metrics["resumed"]
    (entry,) = metrics["resumed"]
    assert entry["at_epoch"] == 2 and entry["elapsed_s"] >= float(first[0]["elapsed_s"])
    assert "resumed" not in whole.metrics
    # wall seconds: the first part up to its checkpoint, plus the whole resumed process
    assert metrics["wall_seconds"] >= entry["elapsed_s"] + resume_s - 0.5
    # throughput counts every epoch's training images, the first part's too

    def images(m):
        return round(m["train_images_per_s"] * m["train_seconds"])

    assert images(metrics) == images(whole.metrics) > 0


def test_resume_says_where_it_starts(runs):
    *_, printed = runs
    assert sum(line.startswith("resuming cut at epoch 2 of 3 from ") for line in printed.splitlines()) == 1


class PlanCutAfterEpochOne(TimeBudget):
    """A time budget that, after epoch 1, plans 2 of the 4 epochs (what a slow host makes it do)."""

    def plan(self, done: int) -> int:
        self.reason = "cut"
        return 2 if done == 1 else self.n_epoch


@pytest.fixture(scope="module")
def cut_select_runs(tiny_data, tmp_path_factory):
    """With data selection (its proxy net trains alongside) and a budget that cut the plan after epoch 1: the
    uninterrupted run, and the same interrupted after epoch 1 then resumed."""
    import cifar_fastai.training.run as train_module

    out, cfg = tmp_path_factory.mktemp("resume-cut"), {**TINY, "epochs": 4, "select": 0.5, "time_budget": 1e6}
    run_callbacks = train_module.run_callbacks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "TimeBudget", PlanCutAfterEpochOne)
        whole = train(TrainConfig(data=str(tiny_data), out=str(out), name="whole", **cfg), verbose=False)
        with pytest.MonkeyPatch.context() as cut:
            cut.setattr(train_module, "run_callbacks", lambda *a, **k: [*run_callbacks(*a, **k), SlowStartThenInterrupt()])
            with pytest.raises(TrainingError, match="interrupted"):
                train(TrainConfig(data=str(tiny_data), out=str(out), name="cut", **cfg), verbose=False)
        resumed = train(TrainConfig(resume=str(out / "cut")), verbose=False)
    return whole, resumed


def test_a_resumed_run_keeps_the_cut_plan_and_the_selection_proxy(cut_select_runs):
    whole, resumed = cut_select_runs
    assert whole.metrics["time_budget"]["epochs_run"] == 2 == len(history(whole.run_dir)), "the plan was cut to 2"
    rows, expected = history(resumed.run_dir), history(whole.run_dir)
    assert [r["epoch"] for r in rows] == ["0", "1"], "the resumed part trains the cut plan's last epoch only"
    # epoch 2's rates follow the 2-epoch plan, and its batches are ranked by the proxy as trained in epoch 1
    assert [float(r["valid_loss"]) for r in rows] == pytest.approx([float(r["valid_loss"]) for r in expected], rel=1e-4)
    assert resumed.metrics["select"] == whole.metrics["select"], "the proxy's counts go on from the checkpoint's"
    assert resumed.metrics["time_budget"]["epochs_run"] == 2


def test_the_budget_clock_of_a_resumed_run_counts_the_interrupted_part():
    import types

    budget = TimeBudget(600, start=1000.0, size=32)
    budget.learn = types.SimpleNamespace(n_epoch=60, epoch=2)
    budget.load_resume_state({"spent_s": 250.0, "n_epoch": 3})
    assert budget.start == 750.0 and budget.learn.n_epoch == 3, "250 s of the 600 are spent; the cut plan holds"
    assert budget.summary()["epochs_run"] == 2, "the epochs before the resume are counted"


def test_a_checkpoint_knows_when_its_run_has_trained_all_it_will():
    from cifar_fastai.callbacks.checkpoint import plan_done

    assert plan_done({"epochs_done": 3, "n_epoch": 3}) and not plan_done({"epochs_done": 2, "n_epoch": 3})
    # early stopping with patience 1: an epoch after the best that is no better ends the run
    assert plan_done({"epochs_done": 2, "n_epoch": 9, "best_epoch": 0}, patience=1)
    assert not plan_done({"epochs_done": 2, "n_epoch": 9, "best_epoch": 1}, patience=1)
    assert not plan_done({"epochs_done": 2, "n_epoch": 9, "best_epoch": 0}), "no early stopping"


def test_a_run_killed_after_its_last_epoch_finishes_with_its_weight_average_and_best_epoch(tiny_data, tmp_path):
    from fastai.learner import load_learner

    cfg = TrainConfig(data=str(tiny_data), epochs=2, ema=0.9, patience=3, out=str(tmp_path), name="done", **TINY)
    first = train(cfg, verbose=False)
    for name in ("metrics.json", "export.pkl", "model.safetensors"):  # what a kill in the test pass leaves
        (first.run_dir / name).unlink()
    again = train(TrainConfig(resume=str(first.run_dir)), verbose=False)
    assert again.metrics["ema"] == first.metrics["ema"], "the same weights kept, by the same two validations"
    assert again.metrics.get("early_stopping") == first.metrics.get("early_stopping")
    assert again.metrics["test_loss"] == pytest.approx(first.metrics["test_loss"], rel=1e-5)
    names = [m.name for m in load_learner(first.run_dir / "export.pkl").metrics]
    assert names == ["accuracy", "error_rate"], "the EMA's metrics left the learner before the export"

