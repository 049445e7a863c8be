"""Fine-tuning: weights from our own runs, the freezing choices, fastai's fine_tune with them, and its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler
from fastai.callback.training import BnFreeze
from fastai.learner import Learner, Recorder

from .config import DEFAULTS, TrainConfig
from .errors import TrainingError, WeightsError

# A run folder's weights: issue 6's safetensors file (cifar_fastai.safe), or a plain state dict from older runs (read
# with torch.load(weights_only=True)). `export.pkl` is never read for weights: unpickling it runs code.
WEIGHTS_FILES = ("model.safetensors", "model.pth")


# ------------------------------------------------------------------------------------------ weights from our runs
def run_weights(run_dir: str | Path) -> Path:
    """The weights file of a finished run folder."""
    run_dir = Path(run_dir).expanduser()
    for name in WEIGHTS_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise WeightsError(
        f"{run_dir}: no weights file ({' or '.join(WEIGHTS_FILES)}) in this run folder; did the run finish?"
    )


def weights_file(path: str | Path) -> Path:
    """`--weights` as given, or the weights file of a run folder (or of the run an `export.pkl` belongs to)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return run_weights(path)
    if path.name == "model.json":  # issue 6's description of a run's model: the weights are beside it
        return run_weights(path.parent)
    if path.suffix == ".pkl":
        try:
            return run_weights(path.parent)
        except WeightsError:
            raise WeightsError(
                f"--weights {path}: a pickled Learner is never loaded for weights (unpickling runs code); pass a "
                f"run folder, or a {' / '.join(WEIGHTS_FILES)} file"
            ) from None
    return path


def weights_cache_hint(arch) -> str:
    """Where torchvision (TORCH_HOME) or timm (the Hugging Face cache) look for weights before downloading them."""
    if arch.kind == "torchvision":
        from torchvision.models import get_model_weights

        name = Path(get_model_weights(arch.builder).DEFAULT.url).name
        return (
            str(Path(torch.hub.get_dir()) / "checkpoints" / name)
            + " (torchvision's cache: $TORCH_HOME/hub/checkpoints)"
        )
    from huggingface_hub import constants

    return (
        f"{constants.HF_HUB_CACHE} (the Hugging Face cache timm reads: $HF_HOME/hub; HF_HUB_OFFLINE=1 to stay offline)"
    )


def source_run(cfg: TrainConfig) -> Path | None:
    """The run folder the starting weights come from (`--init-from`, or `--weights` inside a run folder), if any."""
    if cfg.init_from:
        return Path(cfg.init_from).expanduser()
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        run = path if path.is_dir() else path.parent
        if (run / "config.json").is_file() and path.name in (run.name, *WEIGHTS_FILES, "export.pkl", "model.json"):
            return run
    return None


def run_stats(run_dir: Path) -> tuple[list[float], list[float]]:
    """The normalization a run trained with: fine-tuning must feed the body inputs scaled the same way."""
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    return list(resolved["normalize_mean"]), list(resolved["normalize_std"])


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


# ---------------------------------------------------------------------------------------------- fine-tuning
def freeze(learn: Learner, mode: str, trainable_groups: int = 1) -> None:
    """Freeze all but the last `trainable_groups` layer groups; 'bn' keeps every BatchNorm training, 'head' does not."""
    n_groups = len(learn.splitter(learn.model))
    if trainable_groups >= n_groups:
        raise TrainingError(
            f"--trainable-groups {trainable_groups}: this model has {n_groups} layer groups, so nothing would be "
            f"frozen; use at most {n_groups - 1}, or --freeze none"
        )
    # fastai marks BatchNorm parameters `force_train` when the optimizer is created (Learner.create_opt), so the
    # choice has to be made before a fresh optimizer is built.
    learn.train_bn = mode == "bn"
    learn.create_opt()
    learn.freeze_to(-trainable_groups)


def fine_tune(learn: Learner, cfg: TrainConfig, cbs: list) -> None:
    """fastai's `Learner.fine_tune` (fastai/callback/schedule.py, same rates and schedules) with the config's
    freezing choice: a frozen phase (`freeze_epochs`), then all groups with `slice(lr/2/lr_mult, lr/2)`."""
    lr = cfg.base_lr
    if cfg.freeze != "none" and cfg.freeze_epochs:
        freeze(learn, cfg.freeze, cfg.trainable_groups)
        # BnFreeze keeps the running statistics of frozen BatchNorm layers too: 'head' then means head only.
        frozen_cbs = [*cbs, BnFreeze()] if cfg.freeze == "head" else cbs
        learn.fit_one_cycle(cfg.freeze_epochs, slice(lr), pct_start=0.99, cbs=frozen_cbs)
    lr /= 2
    learn.unfreeze()
    learn.fit_one_cycle(cfg.epochs, slice(lr / cfg.lr_mult, lr), pct_start=0.3, div=5.0, cbs=cbs)


# ------------------------------------------------------------------------------------------------- the report
def relative_change(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """‖W_after − W_before‖ / ‖W_before‖ over all parameters of one layer group, taken as one vector."""
    diff = math.sqrt(sum(float((a - b).float().pow(2).sum()) for a, b in zip(after, before)))
    norm = math.sqrt(sum(float(b.float().pow(2).sum()) for b in before))
    return diff / norm if norm else float("nan")


@torch.no_grad()
def evaluate(learn: Learner) -> dict[str, float]:
    """Validation loss and accuracy of the model as it is. A plain pass, not `learn.validate()`: called from inside a
    fit, that would fire every callback's epoch events (history rows, progress lines) for an epoch that is not one."""
    model, was_training = learn.model, learn.model.training
    model.eval()
    n, correct, loss = 0, 0, 0.0
    for xb, yb in learn.dls.valid:
        out = model(xb)
        loss += float(learn.loss_func(out, yb)) * len(yb)
        correct += int((out.argmax(dim=1) == yb).sum())
        n += len(yb)
    model.train(was_training)
    return {"valid_loss": loss / max(n, 1), "valid_accuracy": correct / max(n, 1)}


def scheduled_peak_lr(learn: Learner) -> list[float]:
    """Each layer group's peak rate in this fit's one-cycle schedule: the discriminative rates actually asked for.
    (`Learner.fit` resets every group to `learn.lr` before `before_fit`; the schedule holds the real rates.)"""
    scheds = [cb.scheds["lr"] for cb in learn.cbs if isinstance(cb, ParamScheduler) and "lr" in cb.scheds]
    n_groups = len(learn.opt.hypers)
    if not scheds:
        return [float(h["lr"]) for h in learn.opt.hypers]
    grid = np.linspace(0, 1, 1001)  # holds fastai's pct_start values (0.25, 0.3, 0.99) exactly
    values = [np.broadcast_to(np.asarray(scheds[-1](float(p)), dtype=float), (n_groups,)) for p in grid]
    return [float(v) for v in np.max(values, axis=0)]


def trainable_desc(learn: Learner) -> str:
    frozen_idx = getattr(learn.opt, "frozen_idx", 0)
    n_groups = len(learn.opt.param_lists)
    if not frozen_idx:
        return f"all {n_groups} layer groups"
    what = "the head" if frozen_idx == n_groups - 1 else f"the last {n_groups - frozen_idx} layer groups"
    return what + (" + every BatchNorm layer" if learn.train_bn else " (BatchNorm frozen too)")


class FineTuneReport(Callback):
    """Accuracy before fine-tuning, after the frozen phase and after unfreezing, and how far each layer group's
    weights moved; rewritten after every fit into finetune.md / .png / .json in the run folder."""

    order = Recorder.order + 1  # after the Recorder: its last row is this phase's final validation

    def __init__(self, run_dir: str | Path, source: str = ""):
        self.run_dir, self.source = Path(run_dir), source
        self.start = None
        self.phases: list[dict] = []

    def before_fit(self):
        if hasattr(self.learn, "gather_preds"):  # get_preds/validate also fire fit events: not a training phase
            self.skip = True
            return
        self.skip = False
        if self.start is None:  # the first fit of the fine-tune: pretrained body, new untrained head
            self.start = self._snapshot()
            self.before = evaluate(self.learn)
        self.phase_start = self._snapshot()
        self.phase = {
            "name": "frozen" if getattr(self.opt, "frozen_idx", 0) else "unfrozen",
            "epochs": self.n_epoch,
            "trains": trainable_desc(self.learn),
            "peak_lr": scheduled_peak_lr(self.learn),
        }

    def after_fit(self):
        if self.skip:
            return
        names = self.recorder.metric_names[1:-1]
        last = self.recorder.values[-1] if self.recorder.values else [float("nan")] * len(names)
        row = dict(zip(names, map(float, last)))
        now = self._snapshot()
        self.phase.update(
            valid_loss=row.get("valid_loss", float("nan")),
            valid_accuracy=row.get("accuracy", float("nan")),
            weight_change=[relative_change(a, b) for a, b in zip(now, self.phase_start)],
        )
        self.phases.append(self.phase)
        self.total_change = [relative_change(a, b) for a, b in zip(now, self.start)]
        self.write()

    def _snapshot(self) -> list[list[torch.Tensor]]:
        return [[p.detach().clone() for p in group] for group in self.opt.param_lists]

    def result(self) -> dict:
        sizes = [sum(p.numel() for p in group) for group in self.start]
        return {
            "source": self.source,
            "before": self.before,
            "phases": self.phases,
            "groups": [
                {"group": i, "role": "head" if i == len(sizes) - 1 else "body", "parameters": n, "total_change": c}
                for i, (n, c) in enumerate(zip(sizes, self.total_change))
            ],
        }

    def write(self) -> None:
        res = self.result()
        (self.run_dir / "finetune.json").write_text(json.dumps(res, indent=2))
        (self.run_dir / "finetune.md").write_text(markdown(res))
        plot(res, self.run_dir / "finetune.png")


def markdown(res: dict) -> str:
    lines = [
        f"# Fine-tuning report{': from ' + res['source'] if res['source'] else ''}",
        "",
        "| stage | trains | epochs | peak lr per layer group | valid accuracy | valid loss |",
        "|---|---|---:|---|---:|---:|",
        (
            f"| before fine-tuning (pretrained body, new untrained head) | - | 0 | - | "
            f"{res['before']['valid_accuracy']:.4f} | {res['before']['valid_loss']:.4f} |"
        ),
    ]
    for ph in res["phases"]:
        stage = "after the frozen phase" if ph["name"] == "frozen" else "after unfreezing"
        lrs = ", ".join(f"{lr:.2e}" for lr in ph["peak_lr"])
        lines.append(
            f"| {stage} | {ph['trains']} | {ph['epochs']} | {lrs} | {ph['valid_accuracy']:.4f} | {ph['valid_loss']:.4f} |"
        )
    header = " | ".join(f"{ph['name']} phase" for ph in res["phases"])
    lines += [
        "",
        "## How far each layer group moved: ‖W_after − W_before‖ / ‖W_before‖",
        "",
        f"| layer group | parameters | {header} | whole fine-tune |",
        "|---|---:|" + "---:|" * (len(res["phases"]) + 1),
    ]
    for g in res["groups"]:
        phases = " | ".join(f"{ph['weight_change'][g['group']]:.4f}" for ph in res["phases"])
        lines.append(f"| {g['group']} ({g['role']}) | {g['parameters']:,} | {phases} | {g['total_change']:.4f} |")
    lines += [
        "",
        (
            "The head starts from random weights, so its change is large by construction; the body groups show how much "
            "fine-tuning changed the pretrained features (0 while a group is frozen)."
        ),
        "",
    ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    stages = ["before"] + [f"after {ph['name']}" for ph in res["phases"]]
    accs = [res["before"]["valid_accuracy"]] + [ph["valid_accuracy"] for ph in res["phases"]]
    ax1.bar(stages, accs, color="tab:blue")
    for i, a in enumerate(accs):
        ax1.text(i, a, f"{a:.3f}", ha="center", va="bottom")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("validation accuracy")
    ax1.set_title("accuracy through fine-tuning")
    groups = [f"{g['group']} ({g['role']})" for g in res["groups"]]
    x = np.arange(len(groups))
    width = 0.8 / (len(res["phases"]) + 1)
    for k, ph in enumerate(res["phases"]):
        ax2.bar(x + k * width, ph["weight_change"], width, label=f"{ph['name']} phase")
    ax2.bar(x + len(res["phases"]) * width, [g["total_change"] for g in res["groups"]], width, label="whole fine-tune")
    ax2.set_xticks(x + width * len(res["phases"]) / 2, groups)
    ax2.set_yscale("symlog", linthresh=1e-3)
    ax2.set_ylabel("‖ΔW‖ / ‖W_before‖")
    ax2.set_title("relative weight change per layer group")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
