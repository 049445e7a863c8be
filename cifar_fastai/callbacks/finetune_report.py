"""The fine-tuning report: accuracy before and after each phase, and how far each layer group's weights moved."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler
from fastai.learner import Learner, Recorder

from ..utils import eval_mode


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
    n, correct, loss = 0, 0, 0.0
    with eval_mode(learn.model):
        for xb, yb in learn.dls.valid:
            out = learn.model(xb)
            loss += float(learn.loss_func(out, yb)) * len(yb)
            correct += int((out.argmax(dim=1) == yb).sum())
            n += len(yb)
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
