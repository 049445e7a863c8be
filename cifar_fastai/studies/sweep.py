"""Hyperparameter search: grid or random over any config field, k-fold cross-validated, resumable, never on test."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import shlex
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULTS, TrainConfig, checked_value, field_type
from ..errors import ArchError, CifarFastaiError, ConfigError
from ..models import get_arch
from ..training.resolve import Resolved, resolve

# Fields that name where or how fast a trial runs, not what it learns: they never change a trial's key.
NOT_HYPERPARAMETERS = ("name", "out", "workers", "threads", "lr_find", "fold")


NOT_SEARCHABLE = ("name", "out", "lr_find", "fold", "folds", "valid")


LOG_SCALE = "log"


class SweepError(CifarFastaiError):
    """A search space or sweep setting that cannot be run."""

    exit_code = 2


# ------------------------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One searched field: a list of values (grid or random choice) or a range `lo:hi[:log]` (random search only)."""

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def sample(self, rng: random.Random):
        if self.values is not None:
            return rng.choice(self.values)
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return round(value) if field_type(self.name) is int else float(f"{value:.4g}")


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
    """`lr=1e-3,3e-3` (values), `lr=1e-4:1e-2:log` or `width=0.5:2` (ranges, random search)."""
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


def plan(params: list[Param], n_random: int = 0, seed: int = 42) -> list[dict]:
    """The configurations to try: the full grid, or `n_random` seeded random draws (duplicates dropped)."""
    if len({p.name for p in params}) != len(params):
        raise SweepError("each --param name may appear once")
    if not n_random:
        ranged = [p.name for p in params if p.values is None]
        if ranged:
            raise SweepError(f"--param {ranged[0]}: a low:high range needs random search (--random N)")
        return [dict(zip([p.name for p in params], combo)) for combo in itertools.product(*(p.values for p in params))]
    rng = random.Random(seed)  # the same draws on a restart: finished trials are then found and skipped
    draws = [{p.name: p.sample(rng) for p in params} for _ in range(n_random)]
    return list({json.dumps(d, sort_keys=True): d for d in draws}.values())


def config_key(cfg: TrainConfig) -> str:
    """A short hash of everything that changes what a trial learns (fold excluded: folds of one config share it)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in NOT_HYPERPARAMETERS}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------------------- trials
def run_trial(plan: Resolved, trial_dir: Path) -> dict:
    """Train one configuration on one fold with the run's own steps; report the *validation* result only."""
    from ..training.run import fit_run, kept_validation, start

    shutil.rmtree(trial_dir, ignore_errors=True)  # a trial killed half-way starts over, not appended to
    trial_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    run = start(plan, verbose=False, t0=t0, run_dir=trial_dir)
    fit_run(run, budget_start=t0)  # a --time-budget is each trial's own
    out = {"seconds": round(time.perf_counter() - t0, 2), "n_train": run.data.n_train, "n_valid": run.data.n_valid}
    if run.nan.bad_epoch is not None:
        return {**out, "status": "nan", "valid_accuracy": None, "valid_loss": None}
    valid_loss, accuracy = kept_validation(run)  # with --patience: the epoch the trial would keep
    return {**out, "status": "ok", "valid_accuracy": accuracy, "valid_loss": valid_loss}


def read_trials(path: Path) -> dict[tuple[str, int], dict]:
    """Finished trials by (config key, fold); a half-written last line (a killed sweep) is ignored."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                t = json.loads(line)
                done[(t["key"], t["fold"])] = t
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def append_trial(path: Path, trial: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(trial, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a finished trial survives a crash or kill that follows


@dataclass
class SweepResult:
    sweep_dir: Path
    table: list[dict]
    best_command: str
    ran: int
    skipped: int


def sweep(
    base: TrainConfig,
    params: list[str],
    n_random: int = 0,
    sweep_dir: str | Path | None = None,
    verbose: bool = True,
    explicit: Collection[str] = (),
) -> SweepResult:
    """Train every planned configuration on every fold (or the hold-out) and rank them by mean validation accuracy.

    Each trial is resolved as `scripts/train.py` resolves a run (recipe, --init-from; `explicit`: the options the
    user gave, which a recipe leaves alone) and trained with its steps, its time budget included. Trials keep no
    checkpoints unless --checkpoint is given. --tta is a test-time option: trials never see the test set, and the
    best command keeps it."""
    if base.valid == "test":
        raise SweepError(
            "--valid test would select on the test set: a sweep uses --folds K or the --valid-pct hold-out"
        )
    if base.resume:
        raise SweepError("--resume continues one run; rerun the same sweep command to resume a sweep")
    if base.lr_find:
        raise SweepError("--lr-find is a one-off probe: run it with scripts/train.py")
    asked = base  # what the best command reproduces
    if "checkpoint" not in explicit:
        base = base.replace(checkpoint=False)  # a full checkpoint per trial fills the disk and is never resumed
    space = [parse_param(p) for p in params]
    configs = plan(space, n_random, base.seed)
    given = {*explicit, *(p.name for p in space)}
    try:  # every trial's settings are checked now, not after an hour of other trials
        plans = [resolve(base.replace(**values), given) for values in configs]
    except ConfigError as e:
        raise SweepError(f"a planned trial cannot be trained: {e}") from None
    sweep_dir = Path(sweep_dir or Path(base.out) / (base.name or "sweep"))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials_path = sweep_dir / "trials.jsonl"
    done = read_trials(trials_path)
    folds = list(range(base.folds)) if base.folds else [0]
    log = print if verbose else (lambda *a, **k: None)
    log(
        f"sweep {sweep_dir}: {len(configs)} configuration(s) x {len(folds)} fold(s); validation: "
        + (
            f"{base.folds}-fold cross-validation of the training images"
            if base.folds
            else f"hold-out {base.valid_pct:g}"
        )
    )
    ran = skipped = 0
    for i, (values, trial_plan) in enumerate(zip(configs, plans), 1):
        cfg = trial_plan.cfg
        key = config_key(cfg)
        for fold in folds:
            label = f"[{i}/{len(configs)}] {fmt_params(values)} fold {fold + 1}/{len(folds)}"
            if (key, fold) in done:
                skipped += 1
                log(f"{label}: done before, skipped")
                continue
            trial_cfg = cfg.replace(fold=fold)
            fold_plan = dataclasses.replace(trial_plan, cfg=trial_cfg)
            result = run_trial(fold_plan, sweep_dir / "trials" / f"{key}-fold{fold}")
            trial = {"key": key, "fold": fold, "params": values, "config": trial_cfg.to_dict(), **result}
            append_trial(trials_path, trial)
            done[(key, fold)] = trial
            ran += 1
            acc = "NaN loss" if trial["valid_accuracy"] is None else f"valid accuracy {trial['valid_accuracy']:.4f}"
            log(f"{label}: {acc} ({trial['seconds']:.0f} s)")
    table = summarize(configs, [config_key(p.cfg) for p in plans], folds, done)
    best = train_command(asked.replace(**table[0]["params"])) if table and table[0]["mean"] is not None else ""
    write_outputs(sweep_dir, asked, table, best, space)
    log(
        f"best: {fmt_params(table[0]['params'])}  mean valid accuracy {table[0]['mean']:.4f} +- {table[0]['std']:.4f}"
        if best
        else "no configuration finished without NaN loss"
    )
    log(f"train it: {best}" if best else "")
    log(f"results: {sweep_dir / 'results.md'}, results.csv, sweep.png, best_command.txt")
    return SweepResult(sweep_dir, table, best, ran, skipped)


# -------------------------------------------------------------------------------------------------------- outputs
def fmt_params(values: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "(base config)"


def summarize(configs: list[dict], keys: list[str], folds: list[int], done: dict) -> list[dict]:
    """One row per configuration: mean and sample standard deviation of validation accuracy over its folds."""
    rows = []
    for values, key in zip(configs, keys):
        trials = [done[(key, f)] for f in folds if (key, f) in done]
        accs = [t["valid_accuracy"] for t in trials if t["valid_accuracy"] is not None]
        losses = [t["valid_loss"] for t in trials if t["valid_loss"] is not None]
        mean = sum(accs) / len(accs) if accs and len(accs) == len(trials) else None  # any NaN fold: not rankable
        std = (
            (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if mean is not None and len(accs) > 1 else 0.0
        )
        rows.append({
            "key": key,
            "params": values,
            "mean": mean,
            "std": std,
            "folds": len(trials),
            "fold_accuracies": accs,
            "mean_valid_loss": sum(losses) / len(losses) if losses else None,
            "seconds": round(sum(t["seconds"] for t in trials), 1),
        })  # fmt: skip
    rows.sort(key=lambda r: -1 if r["mean"] is None else r["mean"], reverse=True)
    return rows


def train_command(cfg: TrainConfig) -> str:
    """`python scripts/train.py ...` with every option that differs from the defaults (folds dropped: train on all)."""
    args = ["python", "scripts/train.py"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("folds", "fold", "name", "out", "lr_find") or value == getattr(DEFAULTS, f.name) or value is None:
            continue
        opt = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(opt if value else "--no-" + f.name.replace("_", "-"))
        else:
            text = short(value) if isinstance(value, float) else str(value)
            if "parser" in f.metadata and float(round(value * 255)) / 255 == value:
                text = f"{round(value * 255)}/255"  # pixel amounts as written: --eps 4/255
            args += [opt, text]
    return " ".join(shlex.quote(a) for a in args)


def short(value: float) -> str:
    """3e-3 as '0.003', yet 8/255 exactly: `train.py` must get the very value that was searched."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def write_outputs(sweep_dir: Path, base: TrainConfig, table: list[dict], best: str, space: list[Param]) -> None:
    names = [p.name for p in space]
    header = ["rank", *names, "mean_valid_accuracy", "std_valid_accuracy", "folds", "mean_valid_loss", "seconds", "key"]
    lines = [",".join(header)]
    md = [
        f"# Sweep `{sweep_dir}`",
        "",
        "Validation: "
        + (
            f"{base.folds}-fold cross-validation of the training images (seed {base.seed})"
            if base.folds
            else f"seeded hold-out of {base.valid_pct:g} of the training images"
        )
        + ". The test set is never used. Mean and sample standard deviation of the final-epoch validation accuracy.",
        "",
        f"Base: `{train_command(base)}`",
        "",
        "| rank | " + " | ".join(names) + " | valid accuracy (mean +- std) | folds | seconds |",
        "|---" * (len(names) + 4) + "|",
    ]
    for rank, r in enumerate(table, 1):
        vals = [r["params"][n] for n in names]
        num = lambda v: "" if v is None else f"{v:.6g}"
        lines.append(
            ",".join(
                map(
                    str,
                    [
                        rank,
                        *vals,
                        num(r["mean"]),
                        num(r["std"]),
                        r["folds"],
                        num(r["mean_valid_loss"]),
                        r["seconds"],
                        r["key"],
                    ],
                )
            )
        )
        acc = "NaN loss" if r["mean"] is None else f"{r['mean']:.4f} +- {r['std']:.4f}"
        md.append(f"| {rank} | " + " | ".join(map(str, vals)) + f" | {acc} | {r['folds']} | {r['seconds']:.0f} |")
    md += [
        "",
        "Best configuration, ready to train on all training images:",
        "",
        "```bash",
        best or "# none",
        "```",
        "",
        "![sweep](sweep.png)",
        "",
    ]
    (sweep_dir / "results.csv").write_text("\n".join(lines) + "\n")
    (sweep_dir / "results.md").write_text("\n".join(md))
    (sweep_dir / "best_command.txt").write_text(best + "\n")
    plot(sweep_dir / "sweep.png", table)


def plot(path: Path, table: list[dict]) -> Path:
    """Mean +- std validation accuracy per configuration (best on top), every fold's accuracy as a dot."""
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["mean"] is not None][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5), dpi=100)
    ys = range(len(rows))
    ax.barh(list(ys), [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color="tab:blue", alpha=0.6, capsize=3)
    for y, r in zip(ys, rows):
        ax.plot(r["fold_accuracies"], [y] * len(r["fold_accuracies"]), "k.", ms=4)
    ax.set_yticks(list(ys), [fmt_params(r["params"]) for r in rows], fontsize=8)
    ax.set_xlabel("validation accuracy (mean +- std over folds; dots: folds)")
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
