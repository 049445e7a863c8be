"""The flow of a run, as named steps: resolve -> prepare -> fit -> keep the chosen weights -> test -> export -> summarize.

`train(cfg)` runs them all into one run folder; `lr_find`, the sweep and the studies reuse the same steps.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, SchedNo, combine_scheds
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastcore.basics import noop

from ..callbacks.adversarial import adversarial_callback
from ..callbacks.checkpoint import RestoreBest
from ..callbacks.ema import ModelEma
from ..callbacks.fast import AlternateFlip, Lookahead, ProgressiveResize
from ..callbacks.finetune_report import FineTuneReport
from ..callbacks.monitor import monitor_callbacks
from ..callbacks.progress import HistoryLogger, PlainProgress, StopOnNaN, Throughput
from ..callbacks.regularize import regularization_callbacks
from ..callbacks.select import SelectHard
from ..config import TrainConfig
from ..data.loaders import CifarData, get_data, inference_dls
from ..data.transforms import input_size
from ..deploy.safe import save_model
from ..errors import CifarFastaiError, TrainingError
from ..evaluation.report import TTA_VIEWS, Interpretation, tta_result
from ..utils import versions, write_json
from . import distributed, hardware
from .budget import TimeBudget, process_start
from .finetune import fine_tune
from .learner import create_learner
from .resolve import Resolved, resolve


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict


@dataclass
class Run:
    """A run in progress: its resolved settings, folder, data and learner, and what the fit left behind."""

    plan: Resolved
    run_dir: Path
    data: CifarData
    learn: Learner
    info: dict
    t0: float
    log: object = noop
    cbs: list = field(default_factory=list)
    timer: Throughput = field(default_factory=Throughput)
    nan: StopOnNaN = field(default_factory=StopOnNaN)
    budget: TimeBudget | None = None
    kept: RestoreBest | None = None
    ema: ModelEma | None = None
    tta_marked: int | None = None  # test images that got the extra TTA views (--tta-select)

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg


def make_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.name or f"{cfg.arch.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out) / name
    for i in range(1, 1000):
        if not run_dir.exists():
            break
        run_dir = Path(cfg.out) / f"{name}-{i}"
    run_dir.mkdir(parents=True)
    return run_dir


def prepare(cfg: TrainConfig | Resolved, run_dir: Path, verbose: bool = True) -> tuple[CifarData, Learner]:
    """Runtime, seed, data and learner for a run; a run folder that a bad --data or --device leaves empty is removed
    again, so a failed start leaves nothing behind."""
    plan = resolve(cfg)
    try:
        hardware.setup(plan.cfg)  # impossible --device/--precision stop here, before data loads; sets threads
        set_seed(plan.cfg.seed)  # before the DataLoaders: the hold-out split and the first shuffles depend on it
        data = get_data(plan.cfg, plan.stats, verbose=verbose)
        learn = create_learner(plan.cfg, data, path=run_dir, arch=plan.arch)
    except CifarFastaiError:
        with contextlib.suppress(OSError):  # not empty, or another rank removed it first
            run_dir.rmdir()
        raise
    rt = hardware.place(learn, data, plan.cfg)  # model + DataLoaders onto the chosen device
    if verbose:
        print(rt.line(plan.cfg), flush=True)
    if not sys.stdout.isatty():
        learn.remove_cb(learn.progress)  # no progress bars in logs; PlainProgress prints one line per epoch
        learn.logger = noop
    return data, learn


def describe(plan: Resolved, data: CifarData) -> dict:
    """config.json: every setting, what they resolved to on this data and machine, and the library versions."""
    cfg = plan.cfg
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
            "arch_kind": plan.arch.kind,
            "base_lr": cfg.base_lr,
            "threads": torch.get_num_threads(),
            "hardware": hardware.runtime(cfg, data.dls).to_dict(),
            "distributed": distributed.describe(cfg.bs, cfg.base_lr),
        },
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_callbacks(cfg: TrainConfig, run_dir: Path, start: float | None = None) -> list:
    """The side behaviour of a run, each a fastai callback added for the duration of the fit."""
    main = distributed.is_main()  # under torchrun only rank 0 writes and prints
    cbs = [HistoryLogger(run_dir.resolve() / "history.csv", start)] if main else []
    if not sys.stdout.isatty() and main:
        cbs.append(PlainProgress())
    if cfg.fine_tuning and main:  # how far fine-tuning moved each layer group
        cbs.append(FineTuneReport(run_dir.resolve(), cfg.init_from or cfg.weights or "ImageNet weights"))
    if (adv := adversarial_callback(cfg)) is not None:
        cbs.append(adv)
    cbs += monitor_callbacks(cfg, run_dir)  # tensorboard, checkpoints, early stopping, resume
    cbs += regularization_callbacks(cfg)  # random erasing, mixup, cutmix
    cbs += hardware.callbacks(cfg)  # precision and memory layout
    if cfg.alt_flip:
        cbs.append(AlternateFlip())
    if cfg.progressive:
        cbs.append(ProgressiveResize(cfg.progressive, cfg.size, cfg.shares))
    if cfg.select < 1:  # the net trains on the highest-loss share of each batch (airbench96_faster)
        cbs.append(SelectHard(cfg.select))
    if cfg.lookahead:
        cbs.append(Lookahead())
    if cfg.ema:
        cbs.append(ModelEma(cfg.ema))
    return cbs


def lr_schedule(cfg: TrainConfig):
    """The rate as a function of the fraction of training done (fastai's schedule functions), from the full rate:
    'linear' to 0 (airbench94_muon), 'cosine' to 0, 'step' divided by 10 at each of `cfg.steps` (He et al. 2015)."""
    lr = cfg.base_lr
    if cfg.schedule == "linear":
        return SchedLin(lr, 0.0)
    if cfg.schedule == "cosine":
        return SchedCos(lr, 0.0)
    edges = (0.0, *cfg.steps)
    pcts = [b - a for a, b in itertools.pairwise(edges)]
    pcts.append(1.0 - sum(pcts))  # combine_scheds wants shares that sum to exactly 1
    return combine_scheds(pcts, [SchedNo(lr / 10**i, lr / 10**i) for i in range(len(pcts))])


def fit(learn: Learner, cfg: TrainConfig, cbs: list) -> None:
    """Pretrained weights -> `fine_tune` (frozen head, then discriminative rates); from scratch -> `fit_one_cycle`,
    or `--schedule linear|cosine|step`: `fit` with a `ParamScheduler` on the rate alone (`lr_schedule`), so the
    optimizer's momentum stays as set (SGD's --momentum; Muon's groups' own)."""
    if cfg.fine_tuning:
        fine_tune(learn, cfg, cbs)  # fastai's fine_tune with the freezing choice (finetune.py)
    elif cfg.schedule == "one_cycle":
        learn.fit_one_cycle(cfg.epochs, cfg.base_lr, cbs=cbs)
    else:
        learn.fit(cfg.epochs, cfg.base_lr, cbs=[*cbs, ParamScheduler({"lr": lr_schedule(cfg)})])


# ------------------------------------------------------------------------------------------------ the steps
def start(plan: Resolved, verbose: bool, t0: float, run_dir: Path | None = None) -> Run:
    """The run folder (named by rank 0 for every rank), data, learner and config.json (first: a crashed run still
    says what it was)."""
    cfg, main = plan.cfg, distributed.is_main()
    log = print if verbose and main else noop
    if run_dir is None:
        run_dir = plan.resume_dir or Path(distributed.on_main(lambda: str(make_run_dir(cfg))))
    log(f"run folder: {run_dir}")
    data, learn = prepare(plan, run_dir, verbose and main)
    info = describe(plan, data)
    if main:
        write_json(run_dir / "config.json", info)
    log(
        f"{cfg.arch} on {data.root} ({data.loader} loader): {data.n_train} train / {data.n_valid} valid / "
        f"{data.n_test} test images; {info['resolved']['validation']}"
    )
    return Run(plan, run_dir, data, learn, info, t0, log)


def fit_run(run: Run, budget_start: float | None = None) -> None:
    """Fit with the run's callbacks and its time budget (counted from `budget_start`, by default this process's
    start: the wall time a user waits includes the imports). A NaN loss stops the fit: see `check_finite`. With --ema
    the run then keeps the weight average instead of the trained weights if it validates better."""
    cfg = run.cfg
    run.cbs = [run.timer, run.nan, *run_callbacks(cfg, run.run_dir, start=run.t0)]
    if cfg.time_budget:  # the recipes' wall-time targets on a host whose speed drifts
        start_s = process_start() if budget_start is None else budget_start
        passes = 1 + (len(TTA_VIEWS) - 1) * cfg.tta_select if cfg.tta else 1  # the extra views: --tta-select's share
        # forward + backward passes per training image: an attack adds its steps (FGSM one), validation does not
        attack = 0 if cfg.adv == "none" else cfg.adv_ratio * (1 if cfg.adv == "fgsm" else cfg.adv_steps)
        run.budget = TimeBudget(cfg.time_budget, start_s, cfg.size, cfg.progressive, run.data.n_valid,
                                run.data.n_test, test_passes=passes, shares=cfg.shares,
                                train_passes=1 + attack, valid_passes=2 if cfg.ema else 1)  # fmt: skip
        run.cbs.append(run.budget)
    fit(run.learn, cfg, run.cbs)
    run.kept = next((cb for cb in run.cbs if isinstance(cb, RestoreBest)), None)  # with --patience
    run.ema = next((cb for cb in run.cbs if isinstance(cb, ModelEma)), None)
    if run.ema is not None and run.nan.bad_epoch is None:  # against the trained weights RestoreBest kept, if any
        run.ema.keep_better(run.learn, kept_validation(run), cfg.monitor)


def check_finite(run: Run) -> None:
    """fastai's NaN stop ends `fit` normally: a diverged run must end in an error, not in an exported model."""
    if run.nan.bad_epoch is not None:
        raise TrainingError(
            f"loss became NaN/inf in epoch {run.nan.bad_epoch + 1}: stopped, nothing exported. Try a lower --lr"
        )


def kept_validation(run: Run) -> tuple[float, float]:
    """Validation loss and accuracy of the weights the run keeps: the last epoch's, or with early stopping the best
    epoch's (after --resume read from history.csv when that epoch ran before the interruption); with --ema the
    average's, when the run keeps it."""
    if run.ema is not None and run.ema.kept == "ema":
        return run.ema.valid
    if run.kept is not None and run.kept.restored:
        row = [float(v) for v in run.kept.best_row or history_row(run.run_dir, run.kept.best_epoch - 1)]
    else:  # no epoch in this process: resumed after its last one, in the test pass or the export
        row = run.learn.recorder.values[-1] if run.learn.recorder.values else history_row(run.run_dir, -1)
    return float(row[1]), float(row[2])


def history_row(run_dir: Path, index: int) -> list[float]:
    """An epoch's values from history.csv, as the Recorder holds them (train loss, valid loss, metrics...)."""
    rows = list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))
    return [float(v) for k, v in rows[index].items() if k not in ("phase", "epoch", "time", "elapsed_s")]


def test_run(run: Run) -> tuple[Interpretation, float | None]:
    """The test pass (and TTA) under the fit's precision and memory layout, as the validation passes were. Every
    rank predicts its shard and fastai gathers them (its to_detach all-gathers whenever WORLD_SIZE > 1)."""
    ev = hardware.callbacks(run.cfg)
    interp = Interpretation.from_dl(run.learn, run.data.test_dl, run.data.vocab, ev)
    tta = None
    if run.cfg.tta:  # the extra views for the --tta-select share of uncertain images (all of them at 1)
        tta, run.tta_marked = tta_result(
            run.learn, run.data.test_dl, run.cfg.tta_select, ev, interp.logits, interp.targs
        )
    return interp, tta


def export(learn: Learner, data: CifarData, run_dir: Path, example: Path) -> Path:
    """`learn.export` with DataBlock DataLoaders, so `load_learner(...).predict(path)` works whatever trained it."""
    train_dls = learn.dls
    learn.dls = inference_dls(data.vocab, input_size(learn.dls), data.stats, example)
    try:
        learn.export(run_dir.resolve() / "export.pkl")
    finally:
        learn.dls = train_dls
    return run_dir / "export.pkl"


def export_run(run: Run, interp: Interpretation) -> None:
    """The confusion matrix, `export.pkl` (for `load_learner`) and its pickle-free twin (for `load_model`)."""
    interp.save_confusion_matrix(run.run_dir / "confusion_matrix.png", title=f"{run.cfg.arch}: test set")
    export(run.learn, run.data, run.run_dir, run.data.example)
    save_model(run.learn, run.cfg, run.data.vocab, run.data.stats, input_size(run.learn.dls), run.run_dir)


def summarize(run: Run, valid: tuple[float, float], interp: Interpretation, tta: float | None) -> dict:
    """metrics.json: validation of the kept weights, the test set once, and how the run went (after --resume: the
    whole run, both parts, and where it was resumed)."""
    test, kept = interp.summary(), run.kept
    select = next((cb for cb in run.cbs if isinstance(cb, SelectHard)), None)
    history = next((cb for cb in run.cbs if isinstance(cb, HistoryLogger)), None)  # rank 0's: the run's clock
    return {
        "valid_loss": valid[0],
        "valid_accuracy": valid[1],
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "per_class_test_accuracy": test["per_class_accuracy"],
        "most_confused": test["most_confused"],
        "validation": run.info["resolved"]["validation"],
        "n_test": test["n"],
        **({"test_accuracy_tta": tta, "test_tta_extra_view_images": run.tta_marked} if tta is not None else {}),
        **({"time_budget": run.budget.summary()} if run.budget is not None else {}),
        **({"early_stopping": {"epochs_run": kept.seen, "kept_epoch": kept.best_epoch}} if kept and kept.best_epoch else {}),
        **({"ema": run.ema.summary()} if run.ema is not None else {}),
        **({"select": select.summary()} if select is not None else {}),
        "skipped_files": [p for p, _ in run.data.bad],
        "wall_seconds": history.elapsed() if history is not None else time.perf_counter() - run.t0,
        **({"resumed": history.resumed} if history is not None and history.resumed else {}),
        **distributed.global_throughput(run.timer.stats()),
    }


def train(cfg: TrainConfig | Resolved, verbose: bool = True) -> RunResult:
    """Train (or fine-tune), evaluate once on the test set, export; everything lands in one run folder."""
    t0 = time.perf_counter()
    plan = resolve(cfg)
    distributed.init(plan.cfg.dist_timeout)  # under torchrun: join the other ranks (no-op in one process)
    run = start(plan, verbose, t0)
    try:
        with distributed.distrib_ctx(run.learn):  # DDP + sharded loaders under torchrun, nothing in one process
            fit_run(run)
            check_finite(run)
            valid = kept_validation(run)
            interp, tta = test_run(run)
    except KeyboardInterrupt:
        if distributed.is_main():
            run.learn.save(run.run_dir.resolve() / "interrupted", with_opt=True)
        raise TrainingError(f"interrupted: model and optimizer saved to {run.run_dir / 'interrupted.pth'}") from None
    if not distributed.is_main():  # rank 0 alone writes the run folder; the others wait for its metrics
        return RunResult(run.run_dir, distributed.broadcast_object(None))
    export_run(run, interp)
    metrics = summarize(run, valid, interp, tta)
    write_json(run.run_dir / "metrics.json", metrics)
    distributed.broadcast_object(metrics)
    report(run, metrics)
    return RunResult(run.run_dir, metrics)


def report(run: Run, metrics: dict) -> None:
    kept, tta = run.kept, metrics.get("test_accuracy_tta")
    if kept is not None and kept.restored:
        run.log(f"early stopping: the weights of epoch {kept.best_epoch} of {kept.seen} (best validation {run.cfg.monitor}) are kept")
    # None: the average never validated (no epoch ended), or a NaN loss skipped the comparison
    if run.ema is not None and None not in (metrics["ema"]["valid_accuracy_ema"], metrics["ema"]["valid_accuracy_raw"]):
        ema = metrics["ema"]
        which = "the weight average" if ema["kept"] == "ema" else "the trained weights, not their average"
        run.log(
            f"--ema: kept {which}: validation accuracy {ema['valid_accuracy_ema']:.4f}, loss {ema['valid_loss_ema']:.4f} "
            f"averaged; {ema['valid_accuracy_raw']:.4f}, {ema['valid_loss_raw']:.4f} trained"
        )
    run.log(
        f"valid accuracy {metrics['valid_accuracy']:.4f}  test accuracy {metrics['test_accuracy']:.4f}  "
        + (f"test accuracy with TTA {tta:.4f}  " if tta is not None else "")
        + f"({metrics['train_images_per_s']:.0f} train images/s, {metrics['wall_seconds']:.0f} s)"
    )
    run.log(f"results in {run.run_dir}: export.pkl, model.json + model.safetensors, config.json, metrics.json, history.csv, confusion_matrix.png")
    run.log(
        "next:\n"
        f"  python scripts/evaluate.py {run.run_dir}      # per-class report, TTA, robustness\n"
        f"  python demo/app.py --model {run.run_dir}      # the web demo\n"
        f"  python scripts/export.py onnx {run.run_dir}   # ONNX for CPU serving"
    )


def get_learner(data: str = "sample", arch: str = "resnet18", **settings) -> Learner:
    """A ready `Learner` in one call, for notebooks: `learn = get_learner("sample", "resnet18"); learn.lr_find()`.
    `settings` are any `TrainConfig` fields (a recipe too); the learner's folder is the current one."""
    plan = resolve(TrainConfig(data=data, arch=arch, **settings))
    hardware.setup(plan.cfg)
    set_seed(plan.cfg.seed)
    data_ = get_data(plan.cfg, plan.stats, verbose=False)
    learn = create_learner(plan.cfg, data_, arch=plan.arch)
    hardware.place(learn, data_, plan.cfg)
    return learn


def lr_find(cfg: TrainConfig | Resolved, verbose: bool = True, num_it: int = 100) -> RunResult:
    """`learn.lr_find()` on the configured data and model; saves lr_find.png and returns the suggestions.
    `num_it`: fastai's number of rates tried (its default, 100)."""
    import matplotlib.pyplot as plt
    from fastai.callback.schedule import minimum, slide, steep, valley

    if distributed.is_distributed():
        raise TrainingError("--lr-find runs in one process: start it with python, not torchrun")
    plan = resolve(cfg)
    cfg = plan.cfg
    run_dir = make_run_dir(cfg.replace(name=cfg.name or f"lr-find-{cfg.arch.replace('/', '-')}"))
    _, learn = prepare(plan, run_dir, verbose)
    # probe as the run trains: its precision and memory layout, and with --progressive at the start size, where the
    # schedule's peak rate is used (one stage from start to start)
    probe = [*hardware.callbacks(cfg), *([ProgressiveResize(cfg.progressive, cfg.progressive)] if cfg.progressive else [])]
    with learn.added_cbs(probe):
        try:
            res = learn.lr_find(num_it=num_it, suggest_funcs=(minimum, steep, valley, slide), show_plot=True)
        except IndexError:  # fastai's `slide`/`valley` index a fixed window back from the end of the recorded rates
            n = len(learn.recorder.lrs)
            raise TrainingError(
                f"lr_find recorded {n} rates before it stopped: too few to suggest one (the loss diverged early, or "
                "the data has few batches): use more training images or a smaller --bs"
            ) from None
    plt.savefig(run_dir / "lr_find.png", bbox_inches="tight")
    plt.close("all")
    suggestions = {k: float(v) for k, v in res._asdict().items()}
    write_json(run_dir / "lr_find.json", suggestions)
    if verbose:
        print("suggested learning rates: " + ", ".join(f"{k} {v:.2e}" for k, v in suggestions.items()))
        print(f"plot: {run_dir / 'lr_find.png'}")
    return RunResult(run_dir, suggestions)
