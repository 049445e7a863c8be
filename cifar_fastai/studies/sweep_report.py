"""A sweep's outputs, built from its optuna study: the ranked table (CSV, Markdown), the plot, the best command."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import TrainConfig, train_command
from ..utils import write_text_atomic

# What a row says about a setting whose trial did not complete.
STATES = {TrialState.RUNNING: "running", TrialState.WAITING: "waiting", TrialState.PRUNED: "pruned",
          TrialState.FAIL: "failed"}  # fmt: skip


def fmt_params(values: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "(base config)"


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over the folds (no spread from a single fold or the hold-out)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _preference(t: FrozenTrial) -> int:
    """Which of several trials of one setting its row shows: the completed one, else the one still in progress."""
    order = [TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED, TrialState.FAIL]
    return order.index(t.state)


def summarize(study: optuna.Study, names: list[str]) -> list[dict]:
    """One row per setting tried: mean and sample standard deviation over its folds, each fold's value, ranked by the
    study's objective (the mean validation --monitor); settings without a result follow, with their state."""
    best: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if "same_as" in t.user_attrs or (not t.params and names):
            continue  # a setting trained before (its value was reused), or a trial not yet given its setting
        key = repr([t.params.get(n) for n in names])
        if key not in best or _preference(t) < _preference(best[key]):
            best[key] = t
    rows = []
    for t in best.values():
        accs, losses = t.user_attrs.get("fold_valid_accuracy", []), t.user_attrs.get("fold_valid_loss", [])
        (mean, std), (mean_loss, std_loss) = _spread(accs), _spread(losses)
        state = "ok" if t.state == TrialState.COMPLETE else STATES[t.state]
        if t.user_attrs.get("status") == "nan":
            state = "NaN loss"
        rows.append({
            "trial": t.number, "params": {n: t.params.get(n) for n in names}, "state": state,
            "value": t.value if state == "ok" else None, "mean": mean if state == "ok" else None, "std": std,
            "fold_accuracies": accs, "mean_valid_loss": mean_loss, "std_valid_loss": std_loss,
            "fold_losses": losses, "folds": len(accs), "seconds": round(t.user_attrs.get("seconds", 0.0), 1),
        })  # fmt: skip
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    rows.sort(key=lambda r: (r["value"] is None, 0 if r["value"] is None else sign * r["value"], r["trial"]))
    return rows


def write_outputs(sweep_dir: Path, base: TrainConfig, table: list[dict], best: str, names: list[str],
                  storage: str) -> None:  # fmt: skip
    num = lambda v: "" if v is None else f"{v:.6g}"
    folds = lambda vs: ";".join(f"{v:.6g}" for v in vs)
    header = ["rank", *names, "mean_valid_accuracy", "std_valid_accuracy", "fold_valid_accuracy",
              "mean_valid_loss", "std_valid_loss", "folds", "seconds", "trial", "state"]  # fmt: skip
    lines = [",".join(header)]
    validation = (
        f"{base.folds}-fold cross-validation of the training images (seed {base.seed})"
        if base.folds
        else f"seeded hold-out of {base.valid_pct:g} of the training images"
    )
    md = [
        f"# Sweep `{sweep_dir}`",
        "",
        (
            f"Validation: {validation}. The test set is never used. Ranked by the mean over the folds of the "
            f"validation {base.monitor} of the weights each fold keeps (the last epoch's, or with --patience the best "
            f"epoch's); +- is the sample standard deviation over the folds. Study: `{storage}`."
        ),
        "",
        f"Base: `{train_command(base)}`",
        "",
        "| rank | " + " | ".join(names) + " | valid accuracy (mean +- std) | per fold | valid loss | trial | state |",
        "|---" * (len(names) + 6) + "|",
    ]
    for rank, r in enumerate(table, 1):
        vals = [r["params"][n] for n in names]
        shown = [f"{v:.4g}" if isinstance(v, float) else v for v in vals]  # the CSV keeps the exact values
        lines.append(",".join(map(str, [rank, *vals, num(r["mean"]), num(r["std"]), folds(r["fold_accuracies"]),
                                        num(r["mean_valid_loss"]), num(r["std_valid_loss"]), r["folds"],
                                        r["seconds"], r["trial"], r["state"]])))  # fmt: skip
        acc = "" if r["mean"] is None else f"{r['mean']:.4f}" + ("" if r["std"] is None else f" +- {r['std']:.4f}")
        per_fold = ", ".join(f"{v:.4f}" for v in r["fold_accuracies"])
        loss = "" if r["mean_valid_loss"] is None else f"{r['mean_valid_loss']:.4f}"
        md.append(f"| {rank} | " + " | ".join(map(str, shown)) + f" | {acc} | {per_fold} | {loss} | {r['trial']} | "
                  f"{r['state']} |")  # fmt: skip
    md += ["", "Best configuration, ready to train on all training images:", "", "```bash", best or "# none", "```",
           "", "![sweep](sweep.png)", ""]  # fmt: skip
    write_text_atomic(sweep_dir / "results.csv", "\n".join(lines) + "\n")
    write_text_atomic(sweep_dir / "results.md", "\n".join(md))
    write_text_atomic(sweep_dir / "best_command.txt", best + "\n")
    plot(sweep_dir / "sweep.png", table, base.monitor)


def plot(path: Path, table: list[dict], monitor: str) -> Path:
    """Mean +- std of the monitored validation value per setting (best on top), every fold's value as a dot."""
    import matplotlib.pyplot as plt

    key = "fold_accuracies" if monitor == "accuracy" else "fold_losses"
    rows = [r for r in table if r["state"] == "ok"][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5), dpi=100)
    ys = list(range(len(rows)))
    spreads = [_spread(r[key]) for r in rows]
    ax.barh(ys, [m for m, _ in spreads], xerr=[s or 0 for _, s in spreads], color="tab:blue", alpha=0.6, capsize=3)
    for y, r in zip(ys, rows):
        ax.plot(r[key], [y] * len(r[key]), "k.", ms=4)
    ax.set_yticks(ys, [fmt_params(r["params"]) for r in rows], fontsize=8)
    ax.set_xlabel(f"validation {monitor.replace('_', ' ')} (mean +- std over folds; dots: folds)")
    ax.set_title(path.parent.name)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, path)
    plt.close(fig)
    return path
