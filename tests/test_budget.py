"""`--time-budget` trains fewer epochs when the planned ones would not end in time (behaviour, not timings)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from cifar_fastai import TrainConfig
from cifar_fastai.cli import train_app
from cifar_fastai.training import budget as budget_module
from cifar_fastai.training import distributed
from cifar_fastai.training.budget import TimeBudget, epoch_cost, plan_epochs


class FakeClock:
    """The budget's clock, advanced only by training batches: `pace(epoch)` seconds each (1 s unless told), so what
    fits is exact. `slow()` is the callback that advances it; `trained` records (epoch, batch) of each batch."""

    def __init__(self):
        self.now, self.trained = 0.0, []

    def slow(self, pace=lambda epoch: 1.0):
        from fastai.callback.core import Callback

        clock = self

        class Slow(Callback):
            order = -30  # before the budget's own after_batch: the batch it measures is over

            def after_batch(self):
                if self.training:
                    clock.now += pace(self.epoch)
                    clock.trained.append((self.epoch, self.iter))

        return Slow()


@pytest.fixture
def fake_clock(monkeypatch):
    import types

    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


def test_plan_keeps_the_epochs_that_fit_with_the_test_pass_reserved():
    # 1 epoch done after 20 s; an epoch at 32 px costs 10 s training + 2 s validation; 16 s kept for the end
    one = 10 / 32**2
    assert plan_epochs(100, 20, 1, 10, one, 2, 16, 32) == 6, "20 + 5 x 12 + 16 = 96 <= 100; a 7th would end at 108"
    assert plan_epochs(1000, 20, 1, 10, one, 2, 16, 32) == 10, "--epochs stays the most"
    assert plan_epochs(40, 20, 1, 10, one, 2, 16, 32) == 1, "nothing more fits: stop after the epoch done"
    # progressive resizing: the epochs left are planned at their own sizes, the last at full size (cheaper early ones)
    assert plan_epochs(100, 20, 1, 10, one, 2, 16, 32, progressive=20) == 7
    # an estimate that may run 10% high: 7 epochs end at 108 s by it, 8 s over, within 10% of the 88 s it gives them
    assert plan_epochs(100, 20, 1, 10, one, 2, 16, 32, tolerance=0.1) == 7
    # --progressive-shares: more of the left epochs at the cheap sizes, so more fit
    assert plan_epochs(100, 20, 1, 10, one, 2, 16, 32, progressive=20, shares=(3.0, 1.0, 1.0, 1.0)) == 9


def test_epoch_cost_follows_two_measured_sizes_instead_of_the_quadratic_guess():
    # the fast recipe's epochs in the README's runs: 23.5 s at 20 px, 30.5 s at 24, then 37.3 s at 28 and 49.7 s at 32
    cost, quadratic = epoch_cost({20: 23.5}, 20)
    assert quadratic and cost(32) == pytest.approx(23.5 * (32 / 20) ** 2), (
        "one size: scaled by the pixels, the known high side"
    )
    cost, quadratic = epoch_cost({20: 23.5, 24: 30.5}, 24)
    assert not quadratic and cost(24) == 30.5, "anchored at the epoch just measured"
    assert abs(cost(28) - 37.3) < 0.05 * 37.3 and abs(cost(32) - 49.7) < 0.05 * 49.7
    cost, quadratic = epoch_cost({20: 23.5, 24: 20.0}, 24)
    assert quadratic and cost(32) == pytest.approx(20.0 * (32 / 24) ** 2), (
        "a host that sped up between the sizes: no line"
    )
    # on a host 4% faster, the line says 16 epochs fit where the quadratic guess from the 24 px epoch says they do not
    elapsed = 15 + 4 * 22.5 + 29.2  # process start to the end of the first 24 px epoch (epoch 5 of 16)
    line, _ = epoch_cost({20: 22.5, 24: 29.2}, 24)
    assert plan_epochs(600, elapsed, 5, 16, line, 0.3, 23, 32, progressive=20) == 16
    assert plan_epochs(600, elapsed, 5, 16, 29.2 / 24**2, 0.3, 23, 32, progressive=20) < 16


def test_estimates_scaled_from_a_smaller_size_get_the_tolerance_until_full_size_is_measured(monkeypatch):
    from types import SimpleNamespace

    from cifar_fastai.training import budget

    seen = []
    monkeypatch.setattr(budget, "plan_epochs", lambda *a, **k: seen.append(a[-1]) or a[3])  # its tolerance argument
    cb = TimeBudget(600, 0.0, 32, progressive=20)
    cb.learn = SimpleNamespace(epoch=0, n_epoch=8)
    cb.before_fit()
    cb.t_valid = 1.0
    for epoch, size in enumerate([20, 20, 24, 24, 28, 28, 32, 32]):
        cb.learn.epoch = epoch
        cb.t_train = 10.0 * (size / 20) ** 1.6  # a bigger size costs more, a little under quadratically
        cb.plan(epoch + 1)
    first, scaled, fitted = budget.FIRST_EPOCH_TOLERANCE, budget.SCALED_TOLERANCE, budget.FITTED_TOLERANCE
    assert seen == [first, scaled, fitted, fitted, fitted, fitted, 0.0, 0.0], (
        "the warm-up epoch gets the most slack, one measured size the quadratic guess's, two sizes the fitted line's; "
        "measured at full size, the estimate is taken as it is"
    )
    flat = TimeBudget(600, 0.0, 32, progressive=20)  # a host that sped up as the size grew: no line, the guess again
    flat.learn = SimpleNamespace(epoch=0, n_epoch=8)
    flat.before_fit()
    flat.t_valid = 1.0
    for epoch, t in enumerate([10.0, 10.0, 9.0]):
        flat.learn.epoch, flat.t_train = epoch, t
        flat.plan(epoch + 1)
    assert seen[-3:] == [first, scaled, scaled]
    resumed = TimeBudget(600, 0.0, 32, progressive=20)  # a --resume: the new process warms up at epoch 6
    resumed.learn = SimpleNamespace(epoch=5, n_epoch=8)
    resumed.before_fit()
    resumed.t_train, resumed.t_valid = 10.0, 1.0
    resumed.plan(6)
    resumed.learn.epoch = 6
    resumed.plan(7)
    assert seen[-2:] == [budget.FIRST_EPOCH_TOLERANCE, 0.0], "the first epoch a process measures is its warm-up"


class FixedPlan(TimeBudget):
    """A budget whose plan after the first epoch is 3 epochs, whatever the clock says."""

    def plan(self, done: int) -> int:
        self.reason = "test"
        return 3 if done == 1 else self.n_epoch


def test_a_shortened_run_still_ends_its_schedule_and_at_full_size(tiny_data):
    from fastai.callback.core import Callback

    from cifar_fastai.callbacks.fast import ProgressiveResize
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    seen = []

    class Spy(Callback):
        order = 70  # after ProgressiveResize (-2) and ParamScheduler (60), which sets this batch's rate

        def before_batch(self):
            if self.training:
                seen.append((self.epoch, self.xb[0].shape[-1], self.opt.hypers[0]["lr"]))

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=50, epochs=6, valid_pct=0.2,
                      train_per_class=10, optimizer="muon", schedule="linear", lr=0.12)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    budget = FixedPlan(1e9, 0.0, 32, progressive=20)
    fit(learn, cfg, [ProgressiveResize(20, 32), budget, Spy()])
    assert [e for e, *_ in seen][-1] == 2 and len(learn.recorder.values) == 3, "3 of the 6 epochs ran"
    assert {e: s for e, s, _ in seen} == {0: 20, 1: 24, 2: 32}, "re-planned stages still end at full size"
    n_iter = len(learn.dls.train)
    assert seen[-1][2] < 0.12 / (3 * n_iter) + 1e-9, "the linear rate decays to ~0 over the 3 epochs, not 6"
    assert budget.summary() == {"budget_s": 1e9, "epochs_planned": 6, "epochs_run": 3}


@pytest.mark.parametrize("epochs_of_budget,fitting", [(1.5, 1), (2.6, 2)])
def test_a_first_epoch_far_over_the_budget_is_cut_early_so_the_schedule_still_decays(epochs_of_budget, fitting, tiny_data,
                                                                                     capsys, fake_clock):  # fmt: skip
    """A net too slow for its plan (the budget's clock made to advance 1 s per training batch): the first batches
    project that 1 of 6 epochs fits, so the linear rate decays to ~0 within that epoch instead of following the
    6-epoch plan."""
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=8, epochs=6, valid_pct=0.2, schedule="linear", lr=0.01,
                      optimizer="sgd", train_per_class=20)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    n_iter = len(learn.dls.train)
    assert n_iter >= 10, "enough batches to project from"
    budget = TimeBudget(n_iter * epochs_of_budget + budget_module.EXPORT_S, 0.0, 32)
    fit(learn, cfg, [fake_clock.slow(), budget])
    # 2.6: the first epoch's tolerance would let a third whole epoch in (over budget); the early plan holds, and
    # takes the share of one more that the whole epochs leave
    assert len(learn.recorder.values) == fitting + 1 and fitting < budget.summary()["epochs_run"] < fitting + 1
    early = max(2, min(budget_module.EARLY_BATCHES, n_iter // 5))
    printed = capsys.readouterr().out
    assert f"{fitting} of 6 epochs fit, and " in printed and f"% of epoch {fitting + 1} (the first {early} batches of " \
        f"epoch 1 took {early} s" in printed
    assert learn.recorder.lrs[-1] < 0.01 * 3 / n_iter, "the rate decayed over the epochs that fit"


def test_a_budget_shorter_than_one_epoch_trains_the_batches_that_fit_then_validates(tiny_data, capsys, monkeypatch,
                                                                                    fake_clock):  # fmt: skip
    """The same clock (1 s per training batch) with a budget of under half an epoch: the epoch is cut to the
    batches that fit, the rate schedule ends within them, and validation, test and export still run."""
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=4, epochs=6, valid_pct=0.2, schedule="linear", lr=0.01,
                      optimizer="sgd", train_per_class=20)  # fmt: skip
    data = get_data(cfg, norm_stats(cfg))

    def cut(train_passes: float, world: int = 1, valid_passes: int = 1):
        monkeypatch.setattr(distributed, "world_size", lambda: world)  # torchrun's ranks each validate a shard
        fake_clock.now = 0.0
        fake_clock.trained.clear()
        learn = create_learner(cfg, data)
        n_iter = len(learn.dls.train)
        # what a plain run reserves for validation and test at the first estimate (VALID_SHARE of a 1 s batch per
        # image), on top of a third of an epoch of training
        reserve = budget_module.VALID_SHARE * (data.n_valid + data.n_test) / cfg.bs + budget_module.EXPORT_S
        budget = TimeBudget(n_iter / 3 + reserve, 0.0, 32, n_valid=data.n_valid, n_test=data.n_test,
                            train_passes=train_passes, valid_passes=valid_passes)  # fmt: skip
        fit(learn, cfg, [fake_clock.slow(), budget])
        return learn, budget, n_iter

    # a step that costs 8 passes (PGD-7 training) says less about the forward-only validation: less is reserved
    attacked = cut(8.0)[1].summary()["batches_run"]
    # a validation pass twice as long (--ema's second model), or half as long (two ranks' shards), is reserved for
    ema, ranks = cut(1.0, valid_passes=2)[1].summary()["batches_run"], cut(1.0, world=2)[1].summary()["batches_run"]
    learn, budget, n_iter = cut(1.0)
    early = max(2, min(budget_module.EARLY_BATCHES, n_iter // 5))
    fit_batches = budget.summary()["batches_run"]
    assert early < fit_batches <= n_iter / 3 < attacked < n_iter, "the batches that fit beside what is reserved"
    assert ema < fit_batches < ranks < attacked, "what each validation pass costs is kept free"
    assert fake_clock.trained == [(0, i) for i in range(fit_batches)], "training stopped there, inside the first epoch"
    assert len(learn.recorder.values) == 1, "and the epoch was still validated"
    (row,) = learn.recorder.values  # train loss, valid loss, accuracy, error rate: every column has its value
    assert len(row) == len(learn.recorder.metric_names) - 2 and row[2] == pytest.approx(1 - row[3])
    assert budget.summary() == {"budget_s": budget.budget_s, "epochs_planned": 6, "batches_run": fit_batches,
                                "epochs_run": round(fit_batches / n_iter, 3), "batches_per_epoch": n_iter}  # fmt: skip
    lrs = learn.recorder.lrs
    assert lrs[-1] < 0.01 * 2 / (fit_batches - early), "the rate decayed to ~0 over the batches after the cut"
    # from where the long plan had it (the batches before the cut were a sliver of it), not a jump down its shape
    assert lrs[early] == pytest.approx(lrs[early - 1], abs=0.01 * 1.5 / (fit_batches - early)) and lrs[early - 1] > 0.0095
    assert f"not one epoch fits ({n_iter} s an epoch at the pace of the first {early} batches): epoch 1 trains " \
        f"{fit_batches} of its {n_iter} batches" in capsys.readouterr().out


@pytest.mark.parametrize("last_pace", [1.0, 2.0])
def test_the_time_whole_epochs_leave_trains_part_of_one_more(last_pace, tiny_data, capsys, fake_clock):
    """The clock advances 1 s per training batch and the budget holds 2.4 epochs: after 2 whole epochs the plan
    takes 40% of a third, the rate schedule ends within those batches, and validation, test and export still run.
    A host that slows down in that last epoch (2 s a batch: `last_pace`) has it trimmed to what still fits."""
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=4, epochs=3, valid_pct=0.2, schedule="linear", lr=0.01,
                      optimizer="sgd", train_per_class=20)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    n_iter = len(learn.dls.train)
    assert n_iter >= 40, "enough batches for a share of one to be measured"
    budget = TimeBudget(2.4 * n_iter + budget_module.EXPORT_S, 0.0, 32)  # validation takes no time on this clock
    fit(learn, cfg, [fake_clock.slow(lambda epoch: last_pace if epoch == 2 else 1.0), budget])
    last = [i for e, i in fake_clock.trained if e == 2]
    planned = round(0.4 * n_iter)
    assert len(learn.recorder.values) == 3, "the part epoch was validated too"
    assert "2 of 3 epochs fit, and 40% of epoch 3" in capsys.readouterr().out
    assert learn.pct_train == pytest.approx(1.0), "the schedule ran to its end"
    if last_pace == 1.0:
        assert last == list(range(planned)), "the share of the last epoch that fits, from its first batch"
        assert learn.recorder.lrs[-1] < 0.01 * 1.5 / (3 * planned), "the rate decayed to ~0 over those batches"
        assert budget.summary() == {"budget_s": budget.budget_s, "epochs_planned": 3, "epochs_run": round(2 + planned / n_iter, 3),
                                    "last_epoch_batches": planned, "batches_per_epoch": n_iter}  # fmt: skip
    else:  # measured after its first batches: at 2 s a batch nothing more fits
        early = min(budget_module.EARLY_BATCHES, planned // 2)
        assert last == list(range(early)) and budget.summary()["last_epoch_batches"] == early
    assert fake_clock.now <= budget.budget_s - budget_module.EXPORT_S + 1e-9, "and the export's time is still kept"


class PartAfterEpochOne(TimeBudget):
    """From the first epoch on: 3 whole epochs and half of a 4th fit, whatever the clock says."""

    def plan(self, done: int) -> int:
        self.reason = "test"
        self.last_part, self.end_s = 0.5, 0.0
        return 4

    def retrim_last(self) -> None:  # the budget is endless here: measured again, the part would be the whole epoch
        pass


class MoreAfterTheEnd(TimeBudget):
    """2 of 5 epochs fit after the first; after the second, the last of the plan, all 5 would (a host that sped up)."""

    def plan(self, done: int) -> int:
        self.reason = "test"
        return 2 if done == 1 else self.planned


def test_a_schedule_at_its_end_is_not_restarted_by_a_later_plan(tiny_data):
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=16, epochs=5, valid_pct=0.2, schedule="linear", lr=0.01,
                      optimizer="sgd", train_per_class=10)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    budget = MoreAfterTheEnd(1e9, 0.0, 32)
    fit(learn, cfg, [budget])
    assert len(learn.recorder.values) == 2 and budget.summary()["epochs_run"] == 2, "the run ended with its schedule"


def test_a_part_epoch_adds_full_size_training_after_the_stages(tiny_data):
    from fastai.callback.core import Callback

    from cifar_fastai.callbacks.fast import ProgressiveResize
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    seen = []

    class Spy(Callback):
        order = 70

        def before_batch(self):
            if self.training:
                seen.append((self.epoch, self.xb[0].shape[-1], self.opt.hypers[0]["lr"]))

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=10, epochs=8, valid_pct=0.2,
                      train_per_class=10, optimizer="muon", schedule="linear", lr=0.12)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    n_iter = len(learn.dls.train)
    budget = PartAfterEpochOne(1e9, 0.0, 32, progressive=20)
    fit(learn, cfg, [ProgressiveResize(20, 32), budget, Spy()])
    sizes = {e: s for e, s, _ in seen}
    assert sizes == {0: 20, 1: 24, 2: 32, 3: 32}, "the stages over the 3 whole epochs, then the part at full size"
    assert len([e for e, *_ in seen if e == 3]) == round(0.5 * n_iter) and len(learn.recorder.values) == 4
    assert seen[-1][2] < 0.12 / (4 * round(0.5 * n_iter)) * 1.5, "the rate ended within the part"
    assert budget.summary()["epochs_run"] == round(3 + round(0.5 * n_iter) / n_iter, 3)


def test_a_sliver_of_an_epoch_is_not_worth_its_validation(tiny_data):
    from types import SimpleNamespace

    cb = TimeBudget(100.0, 0.0, 32)
    cb.learn = SimpleNamespace(epoch=0, n_epoch=4)
    cb.before_fit()
    cb.t_train, cb.t_valid = 30.0, 2.0
    assert cb.part_that_fits(2, 1, 32.0, lambda s: 30.0, 2.0, 5.0) == pytest.approx((100 - 32 - 32 - 2 - 5) / 30)
    assert cb.part_that_fits(1, 1, 88.0, lambda s: 30.0, 2.0, 5.0) == 0.0, "5 s of a 30 s epoch: under a quarter"
    assert cb.part_that_fits(1, 1, 0.0, lambda s: 30.0, 2.0, 5.0) == 0.0, "a whole epoch fits: not a part"


def test_a_cut_made_after_a_slow_epoch_is_taken_back(tiny_data):
    from cifar_fastai.callbacks.fast import ProgressiveResize
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    class SlowFirstEpoch(TimeBudget):  # the first epoch (warm-up) says 3 fit; the next ones, at speed, say all 5
        def plan(self, done: int) -> int:
            self.reason = "test"
            return 3 if done == 1 else self.planned

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=50, epochs=5, valid_pct=0.2,
                      train_per_class=10, optimizer="muon", schedule="linear", lr=0.12)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    budget = SlowFirstEpoch(1e9, 0.0, 32, progressive=20)
    fit(learn, cfg, [ProgressiveResize(20, 32), budget])
    assert len(learn.recorder.values) == 5 and budget.summary()["epochs_run"] == 5, "all 5 epochs ran after all"
    assert learn.recorder.lrs[-1] < 0.12 / len(learn.recorder.lrs) * 1.5, "and the rate still decayed to ~0"


def test_time_budget_from_the_cli_stops_in_time_and_says_so(tiny_data, tmp_path):
    # the budget counts from the process start, here pytest's: 1 s is spent before the first epoch ends, so the run
    # stops after it, then tests and exports
    res = CliRunner().invoke(train_app, ["--data", str(tiny_data), "--arch", "airbench_resnet", "--width", "0.25",
                                         "--epochs", "3", "--bs", "32", "--train-per-class", "10", "--time-budget", "1",
                                         "--out", str(tmp_path), "--name", "b"])  # fmt: skip
    assert res.exit_code == 0, res.output[-2000:]
    assert "time budget 1 s: 1 of 3 epochs fit" in res.output
    assert "epoch 1/1  " in res.output, "the epoch line counts the epochs of the plan now"
    run = tmp_path / "b"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["time_budget"] == {"budget_s": 1.0, "epochs_planned": 3, "epochs_run": 1}
    assert (run / "export.pkl").exists() and len(list(csv.DictReader((run / "history.csv").open()))) == 1


def test_a_run_the_budget_ended_is_not_resumed_and_one_killed_after_its_plan_finishes(tiny_data, tmp_path):
    import contextlib
    import io

    import pytest

    from cifar_fastai.errors import ConfigError
    from cifar_fastai.training.run import train

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=32, epochs=3, time_budget=1,
                      out=str(tmp_path), name="ended")  # fmt: skip
    res = train(cfg, verbose=False)
    # the 1 s ran out before the first batches: part of epoch 1 trained, the rest of the plan will not be
    assert 0 < res.metrics["time_budget"]["epochs_run"] < 1 and res.metrics["time_budget"]["epochs_planned"] == 3
    with pytest.raises(ConfigError, match="finished after 1 epochs"):
        train(TrainConfig(resume=str(res.run_dir)), verbose=False)
    # killed after the plan's last checkpoint, in the test pass or the export: --resume trains nothing more and
    # finishes them on the trained weights, as the uninterrupted run did
    for name in ("metrics.json", "export.pkl", "model.safetensors"):
        (res.run_dir / name).unlink()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        again = train(TrainConfig(resume=str(res.run_dir)), verbose=False)
    assert "after its last epoch (1 of 1 done): the test pass and the export" in printed.getvalue()
    m, first = again.metrics, res.metrics
    assert m["test_accuracy"] == first["test_accuracy"] and m["test_loss"] == pytest.approx(first["test_loss"], rel=1e-5)
    assert (m["valid_loss"], m["valid_accuracy"]) == pytest.approx((first["valid_loss"], first["valid_accuracy"]))
    assert m["time_budget"] == first["time_budget"], "the cut plan as the first part ran it"
    assert m["resumed"][0]["at_epoch"] == 2 and m["wall_seconds"] >= first["wall_seconds"] - 0.5
    assert (res.run_dir / "export.pkl").is_file() and (res.run_dir / "model.safetensors").is_file()
    assert len(list(csv.DictReader((res.run_dir / "history.csv").open()))) == 1, "no epoch trained again"


def test_the_recipes_carry_the_issues_wall_times_and_the_command_line_wins():
    from cifar_fastai.training.recipes import apply_recipe

    assert apply_recipe(TrainConfig(recipe="fast")).time_budget == 600
    assert apply_recipe(TrainConfig(recipe="long")).time_budget == 1800
    assert apply_recipe(TrainConfig(recipe="record")).time_budget == 0, "the baseline runs as the record does"
    assert apply_recipe(TrainConfig(recipe="fast", time_budget=0), explicit={"time_budget"}).time_budget == 0


def test_time_budget_refuses_fine_tuning_with_a_message(tiny_data, tmp_path):
    weights, out = tmp_path / "w.pth", tmp_path / "runs"
    weights.write_bytes(b"")  # refused before any weights are read
    res = CliRunner().invoke(train_app, ["--data", str(tiny_data), "--weights", str(weights), "--time-budget", "60",
                                         "--out", str(out)])  # fmt: skip
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), "a usage error, not a crash"
    assert "--time-budget plans a from-scratch run" in res.stderr
    assert not any(out.glob("*")), "no run folder left behind"
