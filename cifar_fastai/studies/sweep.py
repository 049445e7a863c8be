"""Hyperparameter search on optuna: grid, random or TPE over any config field, k-fold cross-validated, one resumable
study (SQLite, or any database several workers share), never selected on the test set."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import statistics
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import FastAIPruningCallback

from ..config import TrainConfig, checked_value, field_type
from ..errors import ArchError, ConfigError
from ..models import get_arch
from ..training.resolve import Resolved, resolve
from .sweep_report import fmt_params, summarize, train_command, write_outputs
from .sweep_study import (
    GRACE_S,
    SweepError,
    open_study,
    quiet,
    same_setting,
    work_left,
)

__all__ = ["Param", "SweepError", "SweepResult", "parse_param", "sweep", "train_command"]

NOT_SEARCHABLE = ("name", "out", "lr_find", "fold", "folds", "valid")
LOG_SCALE = "log"
SAMPLERS = ("grid", "random", "tpe")
# Pruning step of epoch n of fold f: f * FOLD_STEPS + n, so one (fold, epoch) has one step in every trial.
FOLD_STEPS = 1000


# ------------------------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One searched field: a list of values (grid or categorical) or a range `lo:hi[:log]` (random or TPE)."""

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial):
        if self.values is not None:
            return trial.suggest_categorical(self.name, list(self.values))
        if field_type(self.name) is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def convert(name: str, text: str):
    """A value for config field `name` from its text, checked by `TrainConfig`'s own rules for that field."""
    meta = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    kind = field_type(name)
    try:
        if "parser" in meta.metadata:
            value = text  # TrainConfig parses it (e.g. 8/255)
        elif kind is bool:
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        else:
            value = kind(text)
        value = checked_value(meta, value)
        if name == "arch":
            get_arch(value)  # an unknown arch fails now, not after an hour of other trials
        return value
    except (ValueError, KeyError) as e:
        raise SweepError(f"--param {name}: {text!r} is not a valid {kind.__name__}") from e
    except (ConfigError, ArchError) as e:
        raise SweepError(f"--param {name}: {e}") from None


def parse_param(spec: str) -> Param:
    """`lr=1e-3,3e-3` (values), `lr=1e-4:1e-2:log` or `width=0.5:2` (ranges, random or TPE search)."""
    name, sep, rhs = spec.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not sep or not rhs:
        raise SweepError(f"--param {spec!r}: write name=value1,value2 or name=low:high[:log], e.g. lr=1e-3,3e-3")
    if name not in known or name in NOT_SEARCHABLE:
        raise SweepError(f"--param {spec!r}: {name!r} is not a searchable option of scripts/train.py")
    parts = rhs.split(":")
    if len(parts) in (2, 3) and "," not in rhs and field_type(name) in (int, float):
        log = len(parts) == 3
        if log and parts[2] != LOG_SCALE:
            raise SweepError(f"--param {spec!r}: the third part of a range can only be 'log'")
        low, high = convert(name, parts[0]), convert(name, parts[1])
        if not low < high or (log and low <= 0):
            raise SweepError(f"--param {spec!r}: need low < high (and low > 0 for a log range)")
        return Param(name, low=low, high=high, log=log)
    return Param(name, values=tuple(dict.fromkeys(convert(name, v.strip()) for v in rhs.split(","))))


def search_space(params: list[str], sampler: str) -> list[Param]:
    space = [parse_param(p) for p in params]
    if len({p.name for p in space}) != len(space):
        raise SweepError("each --param name may appear once")
    ranged = [p.name for p in space if p.values is None]
    if sampler == "grid" and ranged:
        raise SweepError(f"--param {ranged[0]}: a low:high range needs --sampler random or tpe (or --random N)")
    if sampler != "grid" and not space:
        raise SweepError(f"--sampler {sampler} draws settings: give at least one --param")
    return space


def grid_points(space: list[Param]) -> list[dict]:
    """Every combination of the value lists: the points GridSampler visits."""
    return [dict(zip([p.name for p in space], combo)) for combo in itertools.product(*(p.values for p in space))]


class TrialSeededSampler(optuna.samplers.RandomSampler):
    """optuna's random sampler with each draw seeded by (seed, trial number, name): the same settings for the same
    --trials whether one worker drew them or several, in one go or resumed (a process-wide seed would repeat the
    first worker's draws in every other worker and after every restart)."""

    def __init__(self, seed: int):
        super().__init__(seed=seed)
        self.base_seed = seed

    def sample_independent(self, study, trial, param_name, param_distribution):
        digest = hashlib.sha256(f"{self.base_seed}/{trial.number}/{param_name}".encode()).digest()
        draw = optuna.samplers.RandomSampler(seed=int.from_bytes(digest[:4], "little"))
        return draw.sample_independent(study, trial, param_name, param_distribution)


def sampler_choice(sampler: str | None, n_random: int, n_trials: int) -> tuple[str, int]:
    """The sampler and how many settings it draws (0 for a grid: it trains every point)."""
    if n_random:
        if sampler not in (None, "random") or n_trials not in (0, n_random):
            raise SweepError("--random N is short for --sampler random --trials N: give one or the other")
        return "random", n_random
    sampler = sampler or "grid"
    if sampler not in SAMPLERS:
        raise SweepError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    if sampler == "grid" and n_trials:
        raise SweepError("--trials sets how many settings --sampler random/tpe draws; a grid trains every point")
    if sampler != "grid" and n_trials < 1:
        raise SweepError(f"--sampler {sampler}: say how many settings to draw with --trials N")
    return sampler, n_trials


def make_sampler(kind: str, space: list[Param], seed: int, n_existing: int) -> optuna.samplers.BaseSampler:
    if kind == "grid":
        # Trial k of a study takes grid point k, so workers sharing the storage split the grid between them.
        return optuna.samplers.GridSampler({p.name: list(p.values) for p in space}, seed=seed)
    if kind == "random":
        return TrialSeededSampler(seed)
    # TPE learns from the study's trials (constant liar: it also avoids the ones still running in other workers);
    # the seed moves on with the study so a resumed worker does not replay the first worker's start-up draws.
    return optuna.samplers.TPESampler(seed=seed + n_existing, constant_liar=True)


# --------------------------------------------------------------------------------------------------------- trials
class FoldSteps:
    """The trial as optuna's fastai pruning callback sees it during one fold. The callback reports each epoch at
    step `epoch`, which would repeat in every fold (optuna keeps only the first report of a step) and restart in a
    fine-tuning run's second fit. Here epoch n of fold f is step f * FOLD_STEPS + n: every trial trains the same
    seeded folds, so the pruner compares a trial's fold f, epoch n with the other trials' fold f, epoch n."""

    def __init__(self, trial: optuna.Trial, fold: int):
        self.trial, self.first, self.n = trial, fold * FOLD_STEPS, 0

    def report(self, value: float, step: int) -> None:
        self.trial.report(value, self.first + self.n)
        self.n += 1

    def should_prune(self) -> bool:
        return self.trial.should_prune()


def run_fold(plan: Resolved, trial_dir: Path, cbs: list) -> dict:
    """Train one setting on one fold with the run's own steps; report the *validation* result only."""
    from ..training.run import fit_run, kept_validation, start

    trial_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = start(plan, verbose=False, t0=t0, run_dir=trial_dir)
    with run.learn.added_cbs(cbs):
        fit_run(run, budget_start=t0)  # a --time-budget is each fold's own
    out = {"seconds": time.perf_counter() - t0, "n_train": run.data.n_train, "n_valid": run.data.n_valid}
    if run.nan.bad_epoch is not None:
        return {**out, "valid_accuracy": None, "valid_loss": None}
    valid_loss, accuracy = kept_validation(run)  # with --patience: the epoch the trial would keep
    return {**out, "valid_accuracy": accuracy, "valid_loss": valid_loss}


@dataclass
class Objective:
    """One optuna trial: one setting trained on every fold; its value the mean validation --monitor over them."""

    base: TrainConfig
    given: set[str]
    space: list[Param]
    folds: list[int]
    sweep_dir: Path
    prune: bool
    log: Callable = print
    ran: int = 0  # settings this worker trained

    def __call__(self, trial: optuna.Trial) -> float:
        values = {p.name: p.suggest(trial) for p in self.space}
        label = f"[trial {trial.number}] {fmt_params(values)}"
        if (twin := same_setting(trial)) is not None:
            if twin.state == TrialState.COMPLETE:
                trial.set_user_attr("same_as", twin.number)
                self.log(f"{label}: trained in trial {twin.number}, its value reused")
                return twin.value
            raise optuna.TrialPruned(f"trial {twin.number} trains this setting")
        try:
            plan = resolve(self.base.replace(**values), self.given)
        except ConfigError as e:
            raise SweepError(f"{label} cannot be trained: {e}") from None
        self.ran += 1
        results: list[dict] = []
        for fold in self.folds:
            fold_plan = dataclasses.replace(plan, cfg=plan.cfg.replace(fold=fold))
            cbs = [FastAIPruningCallback(FoldSteps(trial, fold), monitor=self.base.monitor)] if self.prune else []
            r = run_fold(fold_plan, self.sweep_dir / "trials" / f"trial{trial.number:04d}-fold{fold}", cbs)
            results.append(r)
            where = f"{label} fold {fold + 1}/{len(self.folds)}"
            trial.set_user_attr("seconds", sum(x["seconds"] for x in results))
            trial.set_user_attr("n_train", r["n_train"])
            trial.set_user_attr("n_valid", r["n_valid"])
            if r["valid_accuracy"] is None:  # a diverged setting: not rankable, and its other folds would not help
                self.log(f"{where}: NaN loss ({r['seconds']:.0f} s)")
                trial.set_user_attr("status", "nan")
                return float("nan")  # optuna marks the trial FAIL: never the best
            trial.set_user_attr("fold_valid_accuracy", [x["valid_accuracy"] for x in results])
            trial.set_user_attr("fold_valid_loss", [x["valid_loss"] for x in results])
            self.log(f"{where}: valid accuracy {r['valid_accuracy']:.4f}, valid loss {r['valid_loss']:.4f} "
                     f"({r['seconds']:.0f} s)")  # fmt: skip
        key = "valid_accuracy" if self.base.monitor == "accuracy" else "valid_loss"
        return statistics.fmean(x[key] for x in results)


@dataclass
class SweepResult:
    sweep_dir: Path
    table: list[dict]
    best_command: str
    ran: int  # trials this call trained
    skipped: int  # settings the study had finished before this call
    study: optuna.Study


def sweep(
    base: TrainConfig,
    params: list[str],
    n_random: int = 0,
    sweep_dir: str | Path | None = None,
    verbose: bool = True,
    explicit: Collection[str] = (),
    *,
    sampler: str | None = None,
    n_trials: int = 0,
    storage: str | None = None,
    prune: bool = False,
) -> SweepResult:
    """Run this worker's share of an optuna study: each trial is one setting trained on every fold (or the hold-out),
    its value the mean validation --monitor over the folds; then write the table, plot and best command.

    Each trial is resolved as `scripts/train.py` resolves a run (recipe, --init-from; `explicit`: the options the
    user gave, which a recipe leaves alone) and trained with its steps, its time budget included. Trials keep no
    checkpoints unless --checkpoint is given. --tta is a test-time option: trials never see the test set, and the
    best command keeps it. `n_random` is the short form of `sampler="random", n_trials=n_random`."""
    if base.valid == "test":
        raise SweepError(
            "--valid test would select on the test set: a sweep uses --folds K or the --valid-pct hold-out"
        )
    if base.resume:
        raise SweepError("--resume continues one run; rerun the same sweep command to resume a sweep")
    if base.lr_find:
        raise SweepError("--lr-find is a one-off probe: run it with scripts/train.py")
    sampler, n_trials = sampler_choice(sampler, n_random, n_trials)
    space = search_space(params, sampler)
    asked = base  # what the best command reproduces
    if "checkpoint" not in explicit:
        base = base.replace(checkpoint=False)  # a full checkpoint per trial fills the disk and is never resumed
    given = {*explicit, *(p.name for p in space)}
    grid = grid_points(space) if sampler == "grid" else None
    # every grid point (or every listed value and range end) is checked now, not after an hour of other trials
    probes = grid or [{p.name: v} for p in space for v in (p.values or (p.low, p.high))]
    try:
        for values in probes:
            resolve(base.replace(**values), given)
    except ConfigError as e:
        raise SweepError(f"a trial of this sweep cannot be trained: {e}") from None

    sweep_dir = Path(sweep_dir or Path(base.out) / (base.name or "sweep"))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    folds = list(range(base.folds)) if base.folds else [0]
    log = print if verbose else (lambda *a, **k: None)
    study, requeued = open_study(url, sweep_dir.name, asked, space, prune)
    before = study.get_trials(deepcopy=False)
    study.sampler = make_sampler(sampler, space, base.seed, len(before))
    skipped = len({json.dumps(t.params, sort_keys=True) for t in before if t.state == TrialState.COMPLETE})
    size = f"{len(grid)} grid point(s)" if grid is not None else f"{n_trials} setting(s)"
    validation = f"{base.folds}-fold cross-validation" if base.folds else f"hold-out {base.valid_pct:g}"
    log(
        f"sweep {sweep_dir}: {sampler} search, {size} x {len(folds)} fold(s), validation: {validation} of the "
        f"training images; study {sweep_dir.name!r} in {url}"
        + (f"; {skipped} setting(s) done before" if skipped else "")
        + (f", {requeued} interrupted trial(s) queued again" if requeued else "")
    )
    objective = Objective(base, given, space, folds, sweep_dir, prune, log)

    def stop_when_done(study: optuna.Study, _trial: FrozenTrial) -> None:
        if not work_left(study, grid, n_trials):
            study.stop()

    with quiet():
        if work_left(study, grid, n_trials):
            study.optimize(objective, callbacks=[stop_when_done])
        trials = study.get_trials(deepcopy=False)
    table = summarize(study, [p.name for p in space])
    best = train_command(asked.replace(**table[0]["params"])) if table and table[0]["state"] == "ok" else ""
    write_outputs(sweep_dir, asked, table, best, [p.name for p in space], url)
    if best:
        r = table[0]
        spread = "" if r["std"] is None else f" +- {r['std']:.4f} over {r['folds']} folds"
        log(f"best: {fmt_params(r['params'])}  mean valid accuracy {r['mean']:.4f}{spread} (trial {r['trial']})")
        log(f"train it: {best}")
    else:
        log("no setting has finished without NaN loss yet")
    busy = sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING))
    if busy:
        log(f"{busy} trial(s) still running in another worker or queued; a killed worker's trial is queued again "
            f"{GRACE_S} s after its last heartbeat: rerun this command then")  # fmt: skip
    log(f"results: {sweep_dir / 'results.md'}, results.csv, sweep.png, best_command.txt")
    return SweepResult(sweep_dir, table, best, objective.ran, skipped, study)
