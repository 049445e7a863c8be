"""Resolve what the user asked for into the settings a run uses: recipe, --resume, --config, --init-from, arch, stats.

Every entry point (train, lr_find, sweep, compare, the transfer study, the benchmarks) calls `resolve` once and
passes the result on, so the same settings train the same way wherever they come from.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..callbacks.checkpoint import LAST, checkpoint_dir, load_checkpoint, plan_done, trim_history
from ..config import DEFAULTS, FIELD_NAMES, TrainConfig
from ..errors import ConfigError, WeightsError
from ..models import Arch, get_arch
from ..utils import versions
from .learner import norm_stats
from .recipes import apply_recipe
from .weights import run_weights


def resolve_init_from(cfg: TrainConfig) -> TrainConfig:
    """`--init-from RUN` (or `--weights RUN`) -> that run's arch and width, with `weights` set to its weights file."""
    if cfg.weights and Path(cfg.weights).expanduser().is_dir():
        if cfg.init_from:
            raise WeightsError("pass either --init-from RUN or --weights, not both")
        cfg = cfg.replace(init_from=cfg.weights, weights=None)
    if not cfg.init_from:
        return cfg
    run = Path(cfg.init_from).expanduser()
    if not (run / "config.json").is_file():
        raise WeightsError(f"--init-from {run}: not a run folder (no config.json); expected runs/<name>")
    if cfg.weights or cfg.pretrained:
        raise WeightsError("--init-from already says where the weights come from: drop --weights/--pretrained")
    src = TrainConfig.from_json(run / "config.json")
    if cfg.arch not in (src.arch, DEFAULTS.arch):
        raise WeightsError(f"--arch {cfg.arch} conflicts with --init-from {run}, a {src.arch} run: drop --arch")
    return cfg.replace(arch=src.arch, width=src.width, weights=str(run_weights(run)))


def resume_run(cfg: TrainConfig) -> tuple[TrainConfig, Path]:
    """The saved config of `cfg.resume` (other options are ignored) and its run folder, ready to continue.

    Refuses runs with no checkpoint, finished runs (metrics.json) and fine-tuning runs (two fits: `fine_tune` would
    need the phase and position in both; only the from-scratch `fit_one_cycle` path is resumable). A run whose epochs
    are all done goes on to its test pass and export.
    """
    run_dir = Path(cfg.resume).expanduser()
    last = checkpoint_dir(run_dir) / LAST
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (no config.json)")
    if not last.is_file():
        raise ConfigError(
            f"--resume {run_dir}: no checkpoint ({last} is missing): the run stopped before its first epoch ended "
            "or ran with --no-checkpoint; start it again"
        )
    saved = TrainConfig.from_json(run_dir / "config.json")
    if saved.fine_tuning:
        raise ConfigError(f"--resume {run_dir}: resuming fine-tuning runs is not supported (only from-scratch runs)")
    meta = load_checkpoint(last)["meta"]
    if (run_dir / "metrics.json").is_file():
        raise ConfigError(
            f"--resume {run_dir}: the run finished after {meta['epochs_done']} epochs (metrics.json); nothing to resume"
        )
    given = {k: v for k, v in cfg.to_dict().items() if k != "resume" and v != getattr(DEFAULTS, k)}
    ignored = [f"--{k.replace('_', '-')}" for k in given]
    if ignored:
        print(f"note: --resume uses the run's saved config; ignoring {' '.join(ignored)}")
    planned = meta.get("n_epoch", saved.epochs)  # a --time-budget may have cut the plan below --epochs
    trim_history(run_dir / "history.csv", meta["epochs_done"])
    if plan_done(meta, saved.patience):  # killed in the test pass or the export, after the last epoch it trains
        print(f"resuming {run_dir.name} after its last epoch ({meta['epochs_done']} of {planned} done): the test "
              f"pass and the export, from {last}")  # fmt: skip
    else:
        print(f"resuming {run_dir.name} at epoch {meta['epochs_done'] + 1} of {planned} from {last}")
    return saved.replace(resume=str(run_dir), name=run_dir.name, out=str(run_dir.parent)), run_dir


def rerun_config(path: str | Path, given: dict[str, Any], explicit: Collection[str]) -> TrainConfig:
    """`--config runs/<name>/config.json`: that run's settings again, the options given on the command line
    (`explicit`, values in `given`) winning, under a new run name unless --name is given. Prints one line for each
    library version that differs from the one the run recorded.

    Resolve the result with every option counted as given: the saved settings are the resolved ones, a recipe's
    choices already in them (re-applying it would change an option the first run set to its default value)."""
    explicit = set(explicit) & FIELD_NAMES
    if "resume" in explicit:
        raise ConfigError("--config starts a new run from a saved one; --resume continues a run: pass one of them")
    if "recipe" in explicit:
        raise ConfigError("--config already holds the settings its recipe chose: drop --recipe")
    saved = TrainConfig.from_json(path)  # a missing or garbled file: one ConfigError line
    settings = saved.to_dict()
    # what resolving the first run added follows from the rest again: --init-from's weights file (resolve_init_from
    # refuses it given twice), the folder a resumed run continued in, the run's name
    settings.update(name=None, resume=None, weights=None if saved.init_from else saved.weights)
    settings.update({k: given[k] for k in explicit})
    for line in version_differences(path):
        print(line)
    return TrainConfig(**settings)


def version_differences(path: str | Path) -> list[str]:
    """One line per library whose installed version is not the one a run's config.json recorded."""
    path = Path(path).expanduser()
    raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    recorded = raw.get("versions")
    if not isinstance(recorded, dict):  # a file of bare settings records none
        recorded = {}
    installed = versions()
    return [
        f"note: {path} was made with {name} {version}; installed: {installed.get(name, 'none')}"
        for name, version in recorded.items()
        if installed.get(name) != version
    ]


@dataclass(frozen=True)
class Resolved:
    """The settings a run uses, and what follows from them, computed once."""

    cfg: TrainConfig  # recipe applied; --init-from's arch, width and weights file; a resumed run's saved config
    arch: Arch
    stats: tuple[list[float], list[float]]  # input normalization: CIFAR's from scratch, the source model's otherwise
    resume_dir: Path | None = None  # the run folder --resume continues in


def resolve(cfg: TrainConfig | Resolved, explicit: Collection[str] = ()) -> Resolved:
    """`cfg` as a run will use it. `explicit`: the option names the user gave (the CLI knows them), which a recipe
    leaves alone; without it an option still at its default counts as not given. A `Resolved` is returned as it is."""
    if isinstance(cfg, Resolved):
        return cfg
    resume_dir = None
    if cfg.resume:
        cfg, resume_dir = resume_run(cfg)  # the saved config was resolved when the run started
    else:
        cfg = resolve_init_from(apply_recipe(cfg, explicit))
    arch = get_arch(cfg.arch)
    return Resolved(cfg, arch, norm_stats(cfg, arch), resume_dir)
