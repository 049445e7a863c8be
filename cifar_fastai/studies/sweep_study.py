"""The sweep's optuna study: its database, resuming it, and which trials are left for a worker to start."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import optuna
import sqlalchemy.exc
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ..config import TrainConfig
from ..errors import CifarFastaiError

if TYPE_CHECKING:
    from .sweep import Param

# Fields that say where or on which machine a worker runs, not what a trial learns: workers on several machines
# (their own data path, device and folders) may join one study.
WORKER_FIELDS = ("name", "out", "workers", "threads", "lr_find", "fold", "data", "device", "checkpoint", "tensorboard")
# A worker's trial beats every HEARTBEAT_S; one silent for GRACE_S (several missed beats) belonged to a killed worker.
HEARTBEAT_S, GRACE_S = 60, 180
STALE_RETRIES = 2  # a setting that kills every worker that trains it (out of memory) is not retried for ever
SQLITE_TIMEOUT_S = 60  # workers sharing one SQLite file wait for each other's writes instead of failing


class SweepError(CifarFastaiError):
    """A search space or sweep setting that cannot be run."""

    exit_code = 2


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database. Heartbeats mark the trials of a killed worker (SIGKILL, lost machine: it could not say
    so itself) FAIL once they fall silent, and optuna's retry callback queues their setting again for any worker."""
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    try:
        with quiet():
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES),
            )  # fmt: skip
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:  # a bad URL, a missing driver, no server
        raise SweepError(f"--storage {url}: optuna cannot open it as a database ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """optuna's own log lines and experimental-API warnings off: the sweep prints one line per fold itself."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def is_nan(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and t.user_attrs.get("status") == "nan"


def retry_interrupted(study: optuna.Study) -> int:
    """Queue again the setting of every trial that an exception or Ctrl-C stopped (optuna marked those FAIL at once;
    a diverged setting is a result, not an interruption), with optuna's retry callback as for a killed worker."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    queued = 0
    for t in trials:
        if t.state == TrialState.FAIL and not is_nan(t) and t.number not in retried:
            RetryHeartbeatStaleTrialCallback()(study, t)
            queued += 1
    return queued


def taken(t: FrozenTrial) -> bool:
    """A trial whose setting needs no more work from another worker: done, diverged, pruned, or under way."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING) or is_nan(t)


def work_left(study: optuna.Study, grid: list[dict] | None, n_trials: int) -> bool:
    """Whether this worker should start another trial. GridSampler alone would not stop: once every point is started
    it trains a point still running in another worker again (so a dead worker's point still gets done); here the
    heartbeat takes care of dead workers, so a worker stops when every point is done or under way."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True  # a queued retry
    mine = [t for t in trials if taken(t)]
    if grid is None:
        return len(mine) < n_trials
    points = {json.dumps(p, sort_keys=True) for p in grid}
    done = {json.dumps(t.params, sort_keys=True) for t in mine if t.params} & points
    return len(done) + sum(1 for t in mine if not t.params) < len(points)


def same_setting(trial: optuna.Trial) -> FrozenTrial | None:
    """Another trial of this very setting (TPE redraws categorical points; two workers may both take the last grid
    point, or both queue one retry): a setting is trained once."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.number == trial.number or t.params != trial.params:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or is_nan(t):
            return t
        if t.state == TrialState.RUNNING and t.number < trial.number:  # the earlier of two at once goes on
            return t
    return None


def open_study(url: str, name: str, base: TrainConfig, space: list[Param], prune: bool) -> tuple[optuna.Study, int]:
    """The sweep's study, created or loaded (several workers may do so at once), and how many interrupted trials it
    queued again.

    A stopped sweep resumes through the study: its finished trials stand; trials that an exception or Ctrl-C stopped
    (optuna marked them FAIL itself) are queued again now; a trial left RUNNING by a killed worker may still be
    running in another worker, so optuna's heartbeat check fails it and queues it again only once it has been
    silent for GRACE_S (here, and before every trial any worker starts)."""
    with quiet():
        study = optuna.create_study(
            storage=open_storage(url), study_name=name, load_if_exists=True,
            direction="maximize" if base.monitor == "accuracy" else "minimize",
            # MedianPruner: a trial stops once its best value so far is below the median of the finished trials
            # at the same fold and epoch (after optuna's default start-up trials); without --prune all finish
            pruner=optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner(),
        )  # fmt: skip
        check_same_sweep(study, space, base, url)
        optuna.storages.fail_stale_trials(study)
        return study, retry_interrupted(study)


def check_same_sweep(study: optuna.Study, space: list[Param], base: TrainConfig, url: str) -> None:
    """A study holds one sweep: rerunning it with another search space or base config would mix their trials."""
    config = {k: v for k, v in base.to_dict().items() if k not in WORKER_FIELDS}
    meta = json.loads(json.dumps({"params": [dataclasses.asdict(p) for p in space], "config": config}, default=str))
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", meta)
    elif stored != meta:
        changed = sorted({k for k in {*meta["config"], *stored["config"]}
                          if meta["config"].get(k) != stored["config"].get(k)})  # fmt: skip
        what = "--param" if stored["params"] != meta["params"] else "--" + ", --".join(changed).replace("_", "-")
        raise SweepError(
            f"study {study.study_name!r} in {url} was started with other settings ({what}): rerun it as it was, or "
            "give this sweep another --name"
        )
