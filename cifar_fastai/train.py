"""The one flow of a run: data -> learner -> fit (from scratch or fine-tune) -> evaluate -> export, in a run folder."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.schedule import ParamScheduler, SchedLin
from fastai.torch_core import set_seed
from fastcore.basics import noop

from . import distributed, hardware
from .adversarial import adversarial_callback
from .archs import get_arch
from .budget import TimeBudget, process_start
from .callbacks import HistoryLogger, PlainProgress, StopOnNaN, Throughput
from .checkpoint import RestoreBest, resume_run
from .config import TrainConfig
from .data import CifarData, get_data, inference_dls
from .errors import CifarFastaiError, ConfigError, TrainingError
from .finetune import FineTuneReport, fine_tune, resolve_init_from
from .learner import create_learner, norm_stats
from .monitor import monitor_callbacks
from .recipes import AlternateFlip, Lookahead, ProgressiveResize, apply_recipe, parse_shares
from .regularize import regularization_callbacks
from .report import TTA_VIEWS, Interpretation, tta_accuracy
from .safe import save_model


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict


def versions() -> dict[str, str]:
    import fastai
    import timm
    import torchvision

    from . import __version__

    return {
        "cifar_fastai": __version__,
        "fastai": fastai.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
    }


def make_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.name or f"{cfg.arch.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out) / name
    for i in range(1, 1000):
        if not run_dir.exists():
            break
        run_dir = Path(cfg.out) / f"{name}-{i}"
    run_dir.mkdir(parents=True)
    return run_dir


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: readers never see half a file


def setup_runtime(cfg: TrainConfig) -> None:
    hardware.setup(cfg)  # issue 9: impossible --device/--precision stop here, before data loads; sets threads
    set_seed(cfg.seed)  # before the DataLoaders: the hold-out split and the first shuffles depend on it


def prepare(cfg: TrainConfig, run_dir: Path, verbose: bool = True):
    """Seed, data and learner for a run (shared by training and lr-find); a run folder that a bad --data, --device
    or --arch leaves empty is removed again, so a failed start leaves nothing behind."""
    try:
        return _prepare(cfg, run_dir, verbose)
    except CifarFastaiError:
        with contextlib.suppress(OSError):  # not empty, or another rank removed it first
            run_dir.rmdir()
        raise


def _prepare(cfg: TrainConfig, run_dir: Path, verbose: bool = True):
    setup_runtime(cfg)
    if cfg.progressive and not 8 <= cfg.progressive < cfg.size:
        raise ConfigError(f"--progressive {cfg.progressive}: the start size must be at least 8 and below --size {cfg.size}")
    parse_shares(cfg.progressive_shares, cfg.progressive, cfg.size)  # a wrong count fails here, before any data loads
    if cfg.time_budget and cfg.fine_tuning:  # fine_tune is two fits (frozen, then unfrozen); the budget plans one
        raise ConfigError("--time-budget plans a from-scratch run; fine-tuning (--pretrained/--weights) runs two fits: drop one")
    data = get_data(cfg, norm_stats(cfg, get_arch(cfg.arch)), verbose=verbose)
    learn = create_learner(cfg, data, path=run_dir)
    rt = hardware.place(learn, data, cfg)  # issue 9: model + DataLoaders onto the chosen device
    if verbose:
        print(rt.line(cfg), flush=True)
    if not sys.stdout.isatty():
        learn.remove_cb(learn.progress)  # no progress bars in logs; PlainProgress prints one line per epoch
        learn.logger = noop
    return data, learn


def describe(cfg: TrainConfig, data: CifarData) -> dict:
    return {
        "config": cfg.to_dict(),
        "resolved": {
            "data_root": str(data.root),
            "loader": data.loader,
            "vocab": data.vocab,
            "normalize_mean": list(data.stats[0]),
            "normalize_std": list(data.stats[1]),
            "validation": "test set used as validation" if data.valid_is_test else f"hold-out of {data.n_valid} training images",
            "n_train": data.n_train,
            "n_valid": data.n_valid,
            "n_test": data.n_test,
            "arch_kind": get_arch(cfg.arch).kind,
            "base_lr": cfg.base_lr,
            "threads": torch.get_num_threads(),
            "hardware": hardware.runtime(cfg, data.dls).to_dict(),  # issue 9
            "distributed": distributed.describe(cfg.bs, cfg.base_lr),
        },
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_callbacks(cfg: TrainConfig, run_dir: Path, start: float | None = None) -> list:
    """The side behaviour of a run, each a fastai callback added for the duration of the fit."""
    main = distributed.is_main()  # issue 8: under torchrun only rank 0 writes and prints
    cbs = [HistoryLogger(run_dir.resolve() / "history.csv", start)] if main else []
    if not sys.stdout.isatty() and main:
        cbs.append(PlainProgress())
    # --- issue 8: multi-process (a simulated rank failure, for the tests) ---
    cbs += distributed.fault_injection_cbs()
    # --- issue 5: fine-tuning report ---
    if cfg.fine_tuning and main:  # rank 0 writes the report
        cbs.append(FineTuneReport(run_dir.resolve(), cfg.init_from or cfg.weights or "ImageNet weights"))
    # --- issue 7: tensorboard, checkpoints, early stopping, regularization, adversarial ---
    if (adv := adversarial_callback(cfg)) is not None:
        cbs.append(adv)
    cbs += monitor_callbacks(cfg, run_dir)  # tensorboard, checkpoints, early stopping, resume
    cbs += regularization_callbacks(cfg)  # random erasing, mixup, cutmix
    # --- issue 9: precision ---
    cbs += hardware.callbacks(cfg)
    # --- issue 10: fast recipes ---
    if cfg.alt_flip:
        cbs.append(AlternateFlip())
    if cfg.progressive:
        shares = parse_shares(cfg.progressive_shares, cfg.progressive, cfg.size)
        cbs.append(ProgressiveResize(cfg.progressive, cfg.size, shares))
    if cfg.lookahead:
        cbs.append(Lookahead())
    return cbs


def fit(learn, cfg: TrainConfig, cbs: list) -> None:
    """Pretrained weights -> `fine_tune` (frozen head, then discriminative rates); from scratch -> `fit_one_cycle`,
    or `--schedule linear`: the full rate decaying linearly to 0 (airbench94_muon; fastai's `SchedLin`)."""
    if cfg.fine_tuning:
        fine_tune(learn, cfg, cbs)  # fastai's fine_tune with the freezing choice (finetune.py)
    elif cfg.schedule == "linear":
        learn.fit(cfg.epochs, cfg.base_lr, cbs=[*cbs, ParamScheduler({"lr": SchedLin(cfg.base_lr, 0.0)})])
    else:
        learn.fit_one_cycle(cfg.epochs, cfg.base_lr, cbs=cbs)


def best_row(kept: RestoreBest, run_dir: Path) -> list[float]:
    """The recorder row (train loss, valid loss, metrics) of the epoch `kept` restored; after `--resume` from the
    run's history.csv when that epoch ran before the interruption."""
    if kept.best_row is not None:
        return [float(v) for v in kept.best_row]
    rows = list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))
    row = rows[kept.best_epoch - 1]
    return [float(v) for k, v in row.items() if k not in ("phase", "epoch", "time", "elapsed_s")]


def export(learn, data: CifarData, run_dir: Path, example: Path) -> Path:
    """`learn.export` with DataBlock DataLoaders, so `load_learner(...).predict(path)` works whatever trained it."""
    train_dls = learn.dls
    learn.dls = inference_dls(data.vocab, learn_size(learn, data), data.stats, example)
    try:
        learn.export(run_dir.resolve() / "export.pkl")
    finally:
        learn.dls = train_dls
    return run_dir / "export.pkl"


def learn_size(learn, data: CifarData) -> int:
    from .transforms import BatchResize

    sizes = [t.size for t in learn.dls.after_batch.fs if isinstance(t, BatchResize)]
    return sizes[0] if sizes else 32


def train(cfg: TrainConfig, verbose: bool = True) -> RunResult:
    """Train (or fine-tune), evaluate once on the test set, export; everything lands in one run folder."""
    t0 = time.perf_counter()
    # issue 7: --resume continues a killed run in its own folder with its saved config
    cfg, resumed_dir = resume_run(cfg) if cfg.resume else (apply_recipe(cfg), None)  # issue 10: --recipe
    cfg = resolve_init_from(cfg)  # --init-from RUN: that run's arch and weights file (issue 5)
    distributed.init(cfg.dist_timeout)  # under torchrun: join the other ranks (no-op in one process)
    main = distributed.is_main()  # only rank 0 writes the run folder and prints; it names the folder for all ranks
    run_dir = resumed_dir or Path(distributed.on_main(lambda: str(make_run_dir(cfg))))
    log = print if verbose and main else noop
    log(f"run folder: {run_dir}")
    data, learn = prepare(cfg, run_dir, verbose and main)
    info = describe(cfg, data)
    if main:
        write_json(run_dir / "config.json", info)  # first: even a crashed run says what it was
    log(
        f"{cfg.arch} on {data.root} ({data.loader} loader): {data.n_train} train / {data.n_valid} valid / "
        f"{data.n_test} test images; {info['resolved']['validation']}"
    )
    timer, nan, kept = Throughput(), StopOnNaN(), None
    cbs = [timer, nan, *run_callbacks(cfg, run_dir, start=t0)]
    budget = None
    if cfg.time_budget:  # issue 10: the recipes' wall-time targets on a host whose speed drifts
        budget = TimeBudget(cfg.time_budget, process_start(), cfg.size, cfg.progressive, data.n_valid, data.n_test,
                            test_passes=len(TTA_VIEWS) if cfg.tta else 1,
                            shares=parse_shares(cfg.progressive_shares, cfg.progressive, cfg.size))  # fmt: skip
        cbs.append(budget)
    try:
        with distributed.distrib_ctx(learn):  # DDP + sharded loaders under torchrun, nothing in one process
            fit(learn, cfg, cbs)
            if nan.bad_epoch is None:  # a NaN stop may come before any epoch was recorded
                valid_loss, *valid_metrics = learn.recorder.values[-1][1:]  # before get_preds changes the record
                kept = next((cb for cb in cbs if isinstance(cb, RestoreBest)), None)  # with --patience
                if kept is not None and kept.restored:
                    valid_loss, *valid_metrics = best_row(kept, run_dir)[1:]  # the values of the weights kept
            # every rank predicts its shard of the test set and fastai gathers them: the whole set on every rank
            # (fastai's to_detach all-gathers whenever WORLD_SIZE > 1, so rank 0 cannot predict alone)
            # under the fit's precision and memory layout, as the validation passes were (bf16 + channels_last predict
            # well over 1.5x faster on this CPU than the fp32 default layout the exported learner keeps)
            ev, interp, tta = hardware.callbacks(cfg), None, None
            if nan.bad_epoch is None:
                interp = Interpretation.from_dl(learn, data.test_dl, data.vocab, ev)
                if cfg.tta:  # issue 10; the plain view is the test pass above
                    tta = tta_accuracy(learn, data.test_dl, ev, interp.logits)
    except KeyboardInterrupt:
        if main:
            learn.save(run_dir.resolve() / "interrupted", with_opt=True)
        raise TrainingError(f"interrupted: model and optimizer saved to {run_dir / 'interrupted.pth'}") from None
    if nan.bad_epoch is not None:
        raise TrainingError(
            f"loss became NaN/inf in epoch {nan.bad_epoch + 1}: stopped, nothing exported. Try a lower --lr"
        )
    if not main:  # rank 0 alone writes the run folder; the others wait for its metrics
        return RunResult(run_dir, distributed.broadcast_object(None))
    test = interp.summary()
    interp.save_confusion_matrix(run_dir / "confusion_matrix.png", title=f"{cfg.arch}: test set")
    export(learn, data, run_dir, data.example)
    save_model(learn, cfg, data.vocab, data.stats, learn_size(learn, data), run_dir)  # issue 6: the pickle-free twin
    metrics = {
        "valid_loss": float(valid_loss),
        "valid_accuracy": float(valid_metrics[0]),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "per_class_test_accuracy": test["per_class_accuracy"],
        "most_confused": test["most_confused"],
        "validation": info["resolved"]["validation"],
        "n_test": test["n"],
        **({"test_accuracy_tta": tta} if tta is not None else {}),
        **({"time_budget": budget.summary()} if budget is not None else {}),
        **({"early_stopping": {"epochs_run": kept.seen, "kept_epoch": kept.best_epoch}} if kept and kept.best_epoch else {}),
        "skipped_files": [p for p, _ in data.bad],
        "wall_seconds": time.perf_counter() - t0,
        **distributed.global_throughput(timer.stats()),
    }
    write_json(run_dir / "metrics.json", metrics)
    distributed.broadcast_object(metrics)
    if kept is not None and kept.restored:
        log(f"early stopping: the weights of epoch {kept.best_epoch} of {kept.seen} (best validation {cfg.monitor}) are kept")
    log(
        f"valid accuracy {metrics['valid_accuracy']:.4f}  test accuracy {metrics['test_accuracy']:.4f}  "
        + (f"test accuracy with TTA {tta:.4f}  " if tta is not None else "")
        + f"({metrics['train_images_per_s']:.0f} train images/s, {metrics['wall_seconds']:.0f} s)"
    )
    log(f"results in {run_dir}: export.pkl, model.json + model.safetensors, config.json, metrics.json, history.csv, confusion_matrix.png")
    return RunResult(run_dir, metrics)


def lr_find(cfg: TrainConfig, verbose: bool = True) -> RunResult:
    """`learn.lr_find()` on the configured data and model; saves lr_find.png and returns the suggestions."""
    import matplotlib.pyplot as plt
    from fastai.callback.schedule import minimum, slide, steep, valley

    if distributed.is_distributed():
        raise TrainingError("--lr-find runs in one process: start it with python, not torchrun")
    cfg = resolve_init_from(apply_recipe(cfg))
    run_dir = make_run_dir(cfg.replace(name=cfg.name or f"lr-find-{cfg.arch.replace('/', '-')}"))
    _, learn = prepare(cfg, run_dir, verbose)
    # probe as the run trains: its precision and memory layout, and with --progressive at the start size, where the
    # schedule's peak rate is used (one stage from start to start)
    probe = [*hardware.callbacks(cfg), *([ProgressiveResize(cfg.progressive, cfg.progressive)] if cfg.progressive else [])]
    with learn.added_cbs(probe):
        res = learn.lr_find(suggest_funcs=(minimum, steep, valley, slide), show_plot=True)
    plt.savefig(run_dir / "lr_find.png", bbox_inches="tight")
    plt.close("all")
    suggestions = {k: float(v) for k, v in res._asdict().items()}
    write_json(run_dir / "lr_find.json", suggestions)
    if verbose:
        print("suggested learning rates: " + ", ".join(f"{k} {v:.2e}" for k, v in suggestions.items()))
        print(f"plot: {run_dir / 'lr_find.png'}")
    return RunResult(run_dir, suggestions)
