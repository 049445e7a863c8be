"""`--time-budget`: finish a whole run (imports to export) within a wall-clock budget by training fewer epochs.

The named recipes target minutes of wall time on shared hosts whose speed drifts from hour to hour, so a fixed
epoch count overruns on slow hours. With a budget, `--epochs` is
the most the run trains: after every epoch the callback measures what an epoch costs on this host now and, if the
planned epochs would not end in time, lowers fastai's `n_epoch` (and raises it again, up to `--epochs`, when
a later epoch shows the cut was for a slow one). fastai's schedules read `n_epoch` at the start of
every epoch (`TrainEvalCallback.before_train` sets `pct_train = epoch / n_epoch`), so the linear or one-cycle rate
still ends at its final value, and progressive resizing still ends at full size, in the shorter run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastai.callback.core import Callback, CancelFitException, CancelTrainException

from . import distributed
from .recipes import progressive_size

# confusion matrix, export.pkl and the safetensors twin (about 2 s here), then the interpreter's exit, which the user
# waits for too: with 5 s kept, `fast` runs timed from spawn to exit by bench/time_to_accuracy.py ended 3 s past
# their budget
EXPORT_S = 8.0


def process_start() -> float:
    """`time.perf_counter()` at this process's start (the wall time a user waits includes the imports)."""
    try:
        import psutil  # installed with accelerate (a dependency)
    except ImportError:  # the budget then counts from train(), a few seconds after the imports
        return time.perf_counter()
    try:
        return time.perf_counter() - (time.time() - psutil.Process().create_time())
    except (OSError, psutil.Error):  # no access to the process table
        return time.perf_counter()


EpochCost = Callable[[int], float]  # training seconds of one epoch at a size


def epoch_cost(measured: dict[int, float], size: int) -> tuple[EpochCost, bool]:
    """The training seconds of an epoch at any size, anchored at the epoch just measured at `size` (the host's speed
    now); `measured`: the latest epoch's seconds at each size trained so far. With a second size measured, the cost
    grows from the anchor along the line in size**2 through both (part of an epoch does not grow with the image: a
    32 px epoch of the `fast` recipe took 2.1x a 20 px one, not (32/20)**2 = 2.56x, and the line through 20 and 24 px
    predicted 28 and 32 px within 4%); with one size only, quadratically (the known high side). Returns the cost
    and whether it is the quadratic fallback."""
    t = measured[size]
    slope = t / size**2
    quadratic = True
    others = [s for s in measured if s != size]
    if others:
        near = min(others, key=lambda s: abs(s - size))
        fitted = (t - measured[near]) / (size**2 - near**2)
        if fitted > 0:  # not a host that sped up between the two sizes
            slope, quadratic = fitted, False
    return (lambda s: max(0.0, t + slope * (s * s - size * size))), quadratic


def finish_s(
    elapsed_s: float, epoch: int, n: int, cost: float | EpochCost, valid_s: float, reserve_s: float, size: int,
    progressive: int = 0, shares: tuple[float, ...] = (),
) -> float:  # fmt: skip
    """When a run of `n` epochs would end: `epoch` epochs are done, each further epoch at size s costs `cost(s)`
    seconds of training (a number: `cost * s**2`) plus `valid_s`, and the test pass and export `reserve_s` at the
    end."""
    sizes = [progressive_size(e, n, progressive, size, shares=shares) for e in range(epoch, n)]
    cost_at = cost if callable(cost) else (lambda s: cost * s * s)
    return elapsed_s + sum(cost_at(s) + valid_s for s in sizes) + reserve_s


def plan_epochs(
    budget_s: float, elapsed_s: float, epoch: int, n_epoch: int, cost: float | EpochCost, valid_s: float,
    reserve_s: float, size: int, progressive: int = 0, tolerance: float = 0.0, shares: tuple[float, ...] = (),
) -> int:  # fmt: skip
    """The most epochs (<= `n_epoch`) whose remaining ones fit (`finish_s`). Never fewer than `epoch` (those are done);
    `epoch` means: stop now. `tolerance`: the share of the time left by which the estimate may run high (one known
    to overestimate): a plan over the budget by less still counts as fitting, and later epochs, measured again, can
    still drop epochs."""
    for n in range(n_epoch, epoch, -1):
        end = finish_s(elapsed_s, epoch, n, cost, valid_s, reserve_s, size, progressive, shares)
        if end - budget_s <= tolerance * (end - elapsed_s):
            return n
    return epoch


# Until a second size has been measured, the cost of an epoch at a larger size is scaled up from the one measured,
# quadratically, and that runs high here: in the full-width `airbench_resnet` runs (bf16, bs 250) a 32 px epoch took
# 2.1-2.5x a 20 px one rather than (32/20)^2 = 2.56x, and the first epochs, which still train the whitening bias
# (recipes.WhitenInit), take up to ~10% longer. An overrun estimated at under SCALED_TOLERANCE of the time left is left
# to the later, better measured epochs; so is one under FITTED_TOLERANCE once two sizes give the line `epoch_cost`
# extrapolates along, until the full size is measured (the full-size stage alone is a quarter of a progressive
# run's epochs). A cut early in a run changes the rate schedule of every epoch after it (fastai's schedule reads
# n_epoch), even when a later plan takes it back.
SCALED_TOLERANCE = 0.25


# A first epoch that alone takes most of the budget (a big net on a slow CPU: resnet20's epoch of 45,000 images took
# 160 s on a 2-core AVX2 EPYC) is not waited for: its first batches are timed, and when the projection says that
# fewer than half the planned epochs fit, `n_epoch` is set right then. fastai's schedule follows `n_epoch` at every
# batch (`pct_train` grows by 1 / (n_iter * n_epoch)), so the one-cycle or linear rate then runs its whole shape over
# the epochs that fit, not the first few percent of a plan that would be cut after the epoch. Smaller overruns wait
# for the epoch's end as before (the first-epoch tolerance above). Progressive runs wait too: their first epochs are
# at another size.
EARLY_BATCHES, EARLY_CUT, VALID_SHARE = 20, 0.5, 0.4

# When not even one epoch fits (cifar_resnet50 trained at 11 images/s on that host: 45,000 images take over an hour),
# the one epoch is cut to the batches that fit, so "ten minutes per net" means ten minutes for the big nets too, not
# a budget that only the small ones keep. fastai's schedule then ends with those batches (the rest of the epoch is
# stretched over them: `after_batch`), and the train phase ends with fastai's CancelTrainException before the next
# batch, so validation, the test pass and export run as usual.


FITTED_TOLERANCE = 0.05


# The first epoch warms up (and, in the recipes, whitens the stem before it): in the `fast` runs of
# bench/time_to_accuracy.py it took 6-17% longer than the second (history.csv), and a busy host can add more. Its plan
# cuts only an overrun beyond this share of the time left: a cut after it, even one taken back after the second epoch,
# changes the second epoch's rates (fastai's schedule reads n_epoch), so the same seed would train differently
# depending on how fast the host was in the first epoch.
FIRST_EPOCH_TOLERANCE = 0.25

# Whole epochs leave the time of the epoch they drop unused: the `fast` runs at 0.75x the record's wall time ended
# 55-110 s inside their budget, a dropped 32 px epoch being the biggest one (docs/speed.md). So when the budget binds,
# the plan takes one epoch more, the last, and that one trains the share of its batches that fits (as a first epoch
# over the whole budget already does); the schedule's last share is stretched over those batches, so the rate
# still ends at its final value. A share under LAST_PART_MIN is not taken: its validation pass would cost about as
# much as its few batches buy. The share is measured again after the last epoch's first batches (the host's pace
# then), so a slower hour trims it rather than overrun.
LAST_PART_MIN = 0.25


class TimeBudget(Callback):
    """Set `n_epoch` after each epoch so that the run ends within `budget_s` seconds of `start` (a
    `time.perf_counter()` value); the test pass (`test_passes` times the validation pass, scaled to `n_test` images:
    6 with TTA) and the export are reserved for at the end. The cost of an epoch is anchored at the last one measured
    (`epoch_cost`), so a host that slows down mid-run is seen at the next epoch (`SCALED_TOLERANCE`,
    `FITTED_TOLERANCE`: how much an estimate from smaller sizes may be over before it counts). `train_passes`: the
    forward + backward passes a training image costs (adversarial training adds its attack's), which the first
    estimate of a validation pass is scaled down by; `valid_passes`: the models each validation runs (2 with --ema)."""

    order = -20  # before TrainEvalCallback: the cancelled epoch starts nothing (no flip phase, no history row)
    # predictions fetched inside the fit (the EMA's validation) are timed by the pass around them
    remove_on_fetch = True

    def __init__(
        self, budget_s: float, start: float, size: int, progressive: int = 0, n_valid: int = 1, n_test: int = 0,
        test_passes: int = 1, shares: tuple[float, ...] = (), train_passes: float = 1.0, valid_passes: int = 1,
    ):  # fmt: skip
        self.budget_s, self.start, self.size, self.progressive, self.shares = budget_s, start, size, progressive, shares
        self.test_scale = test_passes * n_test / max(n_valid, 1)
        self.n_valid, self.train_passes, self.valid_passes = n_valid, train_passes, valid_passes
        self.planned = self.epochs_run = None
        self.reason = ""
        self.stop_at = self.n_batches = 0  # a cut first or last epoch: the batches it trains, of how many
        self.last_part, self.end_s = 0.0, 0.0  # the share of the last epoch planned; what is kept after it (s)
        self.retrim_at, self._t_first = 0, 0.0

    def before_fit(self):
        self.planned, self.n_planned, self.measured, self.cut_early = self.n_epoch, 0, {}, False
        self.stop_at = self.n_batches = 0
        self.last_part = 0.0

    def before_epoch(self):
        if self.epoch >= self.n_epoch:  # lowered after the previous epoch: the run ends here
            raise CancelFitException
        self.t_train = self.t_valid = None
        # the epochs ProgressiveResize spreads its stages over: the whole ones, so a part epoch adds training at full
        # size rather than moving every stage later (None: all of them)
        self.learn.size_epochs = self.n_epoch - 1 if self.last_part else None

    def before_train(self):
        self._t0 = time.perf_counter()

    def before_batch(self):
        if not self.training:
            return
        if self.last_part and self.iter == 0 and self.epoch == self.n_epoch - 1 and not self.stop_at:
            # the last epoch, planned in part: TrainEvalCallback set pct_train = epoch / n_epoch and adds
            # 1 / (n_iter * n_epoch) per batch, so with n_iter = the batches it trains pct_train reaches 1 at its end
            self.stop_at, self.n_batches = max(1, round(self.last_part * self.n_iter)), self.n_iter
            self.learn.n_iter = self.stop_at
            self.retrim_at = min(EARLY_BATCHES, self.stop_at // 2)  # once: the batch count it changes is not its cue
            self.say(f"time budget {self.budget_s:.0f} s: the last epoch, {self.epoch + 1}, trains {self.stop_at:,} of "
                     f"its {self.n_batches:,} batches")  # fmt: skip
        if self.stop_at and self.iter >= self.stop_at:
            raise CancelTrainException  # the cut epoch's batches are done: on to validation

    def after_batch(self):
        if self.training and self.last_part and self.stop_at:  # the last epoch, in part
            if self.iter == 0:
                self._t_first = time.perf_counter()  # the pace is timed from here: the epoch's start-up is not a batch
            elif self.retrim_at >= 2 and self.iter + 1 == self.retrim_at:
                self.retrim_last()
            return
        early = max(2, min(EARLY_BATCHES, self.n_iter // 5))
        if not self.training or self.epoch != 0 or self.n_planned or self.progressive or self.cut_early:
            return
        if self.iter + 1 != early:
            return
        if self.n_iter < 2 * early:  # too few batches to project from
            return
        now = time.perf_counter()
        cost = (now - self._t0) / early * self.n_iter  # the epoch's training seconds at this pace
        # the validation pass, not measured yet: forward passes only, about a third of a training step per image
        # (docs/training.md), with a margin; of a plain step, when each training image also costs attack passes
        # (adversarial training: PGD-7 steps cost 8 plain ones); each process validates its shard of the images
        # (under torchrun), and --ema validates the average too
        n_valid = self.valid_passes * self.n_valid / distributed.world_size()
        valid_s = VALID_SHARE * cost * n_valid / max(self.n_iter * self.dls.train.bs, 1) / self.train_passes
        reserve = valid_s / self.valid_passes * self.test_scale + EXPORT_S  # the test pass: the kept weights only
        n = plan_epochs(
            self.budget_s, self._t0 - self.start, 0, self.planned, lambda s: cost, valid_s, reserve, self.size
        )
        # not even one epoch: the batches that fit in what is left once validation, test and export are kept
        per_batch = (now - self._t0) / early
        fit = early + int(max(0.0, self.budget_s - (now - self.start) - valid_s - reserve) / per_batch)
        n, fit = distributed.broadcast_object((max(1, n), fit if n < 1 and fit < self.n_iter else 0))
        if fit:
            self.say(f"time budget {self.budget_s:.0f} s: not one epoch fits ({cost:.0f} s an epoch at the pace "
                     f"of the first {early} batches): epoch 1 trains {fit:,} of its {self.n_iter:,} batches")  # fmt: skip
            self.learn.n_epoch, self.cut_early, self.stop_at, self.n_batches = 1, True, fit, self.n_iter
            remaining = fit - self.iter
        elif n < EARLY_CUT * self.planned:
            # and the share of one more that the whole epochs leave, planned now: added after the schedule has ended
            # it would restart the rate
            part = self.part_that_fits(n, 0, self._t0 - self.start, lambda s: cost, valid_s, reserve)
            part = distributed.broadcast_object(part)
            more = f", and {part:.0%} of epoch {n + 1}" if part else ""
            self.say(f"time budget {self.budget_s:.0f} s: {n} of {self.planned} epochs fit{more} (the first "
                     f"{early} batches of epoch 1 took {now - self._t0:.0f} s, {cost:.0f} s an epoch at that pace)")  # fmt: skip
            self.learn.n_epoch, self.cut_early = n + (1 if part else 0), True
            self.last_part, self.end_s = part, valid_s + reserve
            remaining = self.n_iter - self.iter
        else:
            return
        # the rate stays where it is (one-cycle's warm-up has just begun: the batches so far were a sliver of the
        # long plan) and the rest of this epoch's batches are stretched to reach the epoch's share of the new plan:
        # TrainEvalCallback, after this callback, adds 1 / (n_iter * n_epoch) to pct_train per batch, this one
        # included, and fastai sets n_iter again at the next epoch; so the schedule keeps its whole shape and ends
        # exactly at its final rate
        self.learn.n_iter = remaining / (1 - self.n_epoch * self.pct_train)

    def retrim_last(self) -> None:
        """The last epoch's batches again, at the pace of its first ones (the host's speed now, at the full size),
        and the schedule's end stretched or shrunk to match."""
        now = time.perf_counter()
        done = self.iter + 1
        per_batch = (now - self._t_first) / (done - 1)
        fit = done + int(max(0.0, self.budget_s - (now - self.start) - self.end_s) / per_batch)
        fit = distributed.broadcast_object(min(fit, self.n_batches))
        if fit == self.stop_at:
            return
        self.stop_at = fit
        # pct_train is to reach 1 after the batches left, this one included: TrainEvalCallback, after this callback,
        # adds 1 / (n_iter * n_epoch) for each
        self.learn.n_iter = (fit - self.iter) / (self.n_epoch * (1 - self.pct_train))
        self.say(f"time budget {self.budget_s:.0f} s: at the pace of its first {done} batches, the last epoch trains "
                 f"{fit:,} of its {self.n_batches:,} batches")  # fmt: skip

    def say(self, line: str) -> None:
        self.reason = line
        if distributed.is_main():
            print(line, flush=True)

    def after_train(self):
        self.t_train = time.perf_counter() - self._t0
        if self.stop_at and hasattr(self.learn, "recorder"):
            # fastai's Recorder drops the train loss from an epoch whose train phase was cancelled (after_cancel_train
            # sets `cancel_train`), which would shift every value of the epoch's row one column left (history.csv,
            # the printed line, the validation accuracy read from it); the cut epoch trained, so its loss is logged
            self.learn.recorder.cancel_train = False

    def before_validate(self):
        self._t1 = time.perf_counter()

    def after_validate(self):
        self.t_valid = time.perf_counter() - self._t1

    def after_epoch(self):
        self.epochs_run = done = self.epoch + 1
        if self.t_train is None or self.stop_at:  # skipped on --resume (nothing measured); or the cut one: the last
            return
        if done >= self.n_epoch:  # the schedule has ended at its final rate: more epochs now would restart it
            return
        # every rank stops after the same epoch, and trains as much of a last one (rank 0's clock)
        part = self.last_part
        n, self.last_part = distributed.broadcast_object((self.plan(done), self.last_part))
        # fewer; or more again (up to --epochs) when an earlier cut was for a slow epoch; or a new share of the last
        if n != self.n_epoch or (part > 0) != (self.last_part > 0):
            self.say(self.reason)
            self.learn.n_epoch = n

    def plan(self, done: int) -> int:
        """The epochs that fit, from this epoch's measured cost (`plan_epochs`), up to the planned `--epochs` every
        time: a cut made after one slow epoch is taken back when the next ones run at speed (fastai re-reads
        `n_epoch` each epoch, so the rate schedule follows either way). The first epoch this process measures (the
        first of the run, or the first after a --resume) warms up: `FIRST_EPOCH_TOLERANCE`."""
        stages = getattr(self.learn, "size_epochs", None) or self.n_epoch  # the epoch's own size, as it trained
        size = progressive_size(self.epoch, stages, self.progressive, self.size, shares=self.shares)
        valid_s = self.t_valid or 0.0  # --ema's pass over the average included; the test pass has one model
        reserve = valid_s / self.valid_passes * self.test_scale + EXPORT_S
        self.measured[size] = self.t_train
        cost, quadratic = epoch_cost(self.measured, size)
        full_measured = max(self.measured) >= self.size
        tolerance = 0.0 if full_measured else SCALED_TOLERANCE if quadratic else FITTED_TOLERANCE
        self.n_planned += 1
        # the tolerance keeps the planned schedule through a slow warm-up; after an early cut the schedule is already
        # the shorter one, and the tolerance would only let the run overrun its budget
        if self.n_planned == 1 and not self.cut_early:
            tolerance = max(tolerance, FIRST_EPOCH_TOLERANCE)
        elapsed = time.perf_counter() - self.start
        n = plan_epochs(
            self.budget_s, elapsed, done, self.planned, cost, valid_s, reserve, self.size, self.progressive, tolerance,
            shares=self.shares,
        )  # fmt: skip
        self.last_part = self.part_that_fits(n, done, elapsed, cost, valid_s, reserve) if n < self.planned else 0.0
        self.end_s = valid_s + reserve
        more = f", and {self.last_part:.0%} of epoch {n + 1}" if self.last_part else ""
        self.reason = (
            f"time budget {self.budget_s:.0f} s: {n} of {self.planned} epochs fit{more} (epoch {done} took "
            f"{self.t_train:.0f} s at {size} px + {valid_s:.0f} s validation; {reserve:.0f} s kept for test and export)"
        )
        return n + 1 if self.last_part else n

    def part_that_fits(
        self, n: int, done: int, elapsed: float, cost: EpochCost, valid_s: float, reserve: float
    ) -> float:
        """The share of one more epoch, after n whole ones, that ends within the budget (`LAST_PART_MIN`: the least
        worth taking; 0: none). Progressive resizing spreads its stages over the n whole epochs (`size_epochs`), and
        the part trains at full size, the size the model is tested at."""
        end = finish_s(elapsed, done, n, cost, valid_s, reserve, self.size, self.progressive, self.shares)
        part = (self.budget_s - end - valid_s) / max(cost(self.size), 1e-9)
        return part if LAST_PART_MIN <= part < 1 else 0.0

    # --resume (checkpoint.run_records): the plan goes on as it was cut (fastai's n_epoch; the saved config still
    # says --epochs), and the budget counts the time the interrupted part took, so a resumed run ends when the
    # uninterrupted one would have, on the same schedule
    def resume_state(self) -> dict:
        return {"spent_s": time.perf_counter() - self.start, "n_epoch": self.n_epoch, "cut_early": self.cut_early,
                "cut": [self.stop_at, self.n_batches], "last_part": self.last_part, "end_s": self.end_s}  # fmt: skip

    def load_resume_state(self, state: dict) -> None:
        self.start -= state["spent_s"]
        self.learn.n_epoch, self.cut_early = state["n_epoch"], state.get("cut_early", False)
        self.stop_at, self.n_batches = state.get("cut", (0, 0))
        self.last_part, self.end_s = state.get("last_part", 0.0), state.get("end_s", 0.0)
        self.epochs_run = self.epoch  # the epochs done before the resume (all of them, if none is left to train)

    def summary(self) -> dict:
        if self.stop_at and self.last_part:  # whole epochs, then a share of the last
            part = min(self.stop_at, self.n_batches) / self.n_batches
            return {"budget_s": self.budget_s, "epochs_planned": self.planned,
                    "epochs_run": round(self.epochs_run - 1 + part, 3), "last_epoch_batches": self.stop_at,
                    "batches_per_epoch": self.n_batches}  # fmt: skip
        if self.stop_at:  # a share of the one epoch
            run = round(min(self.stop_at, self.n_batches) / self.n_batches, 3)
            return {"budget_s": self.budget_s, "epochs_planned": self.planned, "epochs_run": run,
                    "batches_run": self.stop_at, "batches_per_epoch": self.n_batches}  # fmt: skip
        return {"budget_s": self.budget_s, "epochs_planned": self.planned, "epochs_run": self.epochs_run}
