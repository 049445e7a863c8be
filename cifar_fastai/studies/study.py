"""Named studies (`scripts/study.py NAME`): the questions of docs/studies.md, each a list of rows trained under one
budget, on any CIFAR-layout data.

Every row is one `train()` run in a process of its own (`compare.spawn_row`: its peak memory and wall time are its
own, a crashed row does not end the study), then measured there (params, FLOPs, epochs reached, and for `robust` a
PGD-20 attack). Rows go into `<out>/<name>/study.csv` as they finish, with `study.md` (the table, the budget and the
machine) and `study.png` rewritten after each; rerunning the command skips the rows already in the CSV. The budget
(the settings every row shares) is kept in `budget.json`, and a rerun with another budget into the same folder is
refused: the table would mix two budgets.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import statistics
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ..callbacks.checkpoint import LAST, checkpoint_dir, load_checkpoint
from ..config import TrainConfig
from ..errors import ConfigError, StudyError, TrainingError
from ..training.resolve import resolve
from ..utils import write_json as write_json_file
from ..utils import write_text_atomic
from .compare import spawn_row

COLUMNS = ["row", "seed", "arch", "width", "params_m", "mflops", "epochs", "train_img_s", "peak_mem_mb", "wall_s",
           "valid_acc", "test_acc", "robust_acc", "attack_n", "run", "host"]  # fmt: skip


@dataclass(frozen=True)
class Row:
    label: str
    options: dict = field(default_factory=dict)  # TrainConfig fields on top of the study's base
    # settings of this row that the user's command line overrides (a transfer row's epochs: a smoke run's --epochs 1)
    defaults: dict = field(default_factory=dict)
    # (option, label of an earlier row, its column): set from that row's result for the same seed when this row
    # starts, e.g. ("init_from", "pretrain", "run"), ("time_budget", "50/class fine-tuned", "wall_s")
    linked: tuple[tuple[str, str, str], ...] = ()

    def settings(self, user_given: Collection[str]) -> dict:
        return {**{k: v for k, v in self.defaults.items() if k not in user_given}, **self.options}


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    base: dict  # the budget: TrainConfig fields every row shares
    rows: tuple[Row, ...]
    seeds: tuple[int, ...] = (0,)
    # in the row's process after training: {"attack": "pgd", "eps": ..., "alpha": ..., "steps": ..., "n": ...}
    measure: dict | None = None
    # "cost": accuracy against wall time, FLOPs and params; "bars": accuracy per row; "transfer": both arms against
    # the images per class, with the table of their gains
    plot: str = "bars"
    search: tuple[str, ...] = ()  # a search study: scripts/sweep.py's -p values, cross-validated (no rows)


def _arch_rows(specs: str) -> tuple[Row, ...]:
    rows = []
    for spec in specs.split():
        arch, _, width = spec.partition(":")
        rows.append(Row(spec, {"arch": arch, "width": float(width or 1)}))
    return tuple(rows)


# The same schedule for every net: AdamW one-cycle (fastai's default fit), batch 128, pad-crop-flip; each row as many
# epochs of --epochs as end in --time-budget (the schedule still finishes), so the table answers "what wins in ten
# minutes on this machine"; with --budget 0 every row trains --epochs ("what wins per epoch").
_DEPTH_WIDTH = {"time_budget": 600.0, "epochs": 60, "bs": 128, "lr": 2e-3, "wd": 0.05, "precision": "auto"}

# The residual fast net's settings, spelt out rather than `--recipe fast`: the studies' committed rows were trained
# with them, and a later change of the recipe must not change what a resumed study trains (its budget.json holds the
# options before a recipe fills them in, so it would not notice). The `fast` recipe of the time: airbench_resnet,
# Muon at batch 250, 20 -> 32 px.
_FAST_NET = {"arch": "airbench_resnet", "width": 1.0, "optimizer": "muon", "schedule": "linear", "bs": 250, "lr": 0.12,
             "label_smoothing": 0.2, "crop_pad": 2, "alt_flip": True, "precision": "auto", "channels_last": True,
             "valid_pct": 0.02, "progressive": 20}  # fmt: skip

# That net and optimizer at a fixed epoch count (no time budget: each row trains the same images); the baseline row
# is its own augmentation and regularization (2-px pad-crop, alternating flip, label smoothing 0.2, weight decay
# 0.05, no dropout), and each other row changes one thing.
_ABLATION = {**_FAST_NET, "epochs": 8, "time_budget": 0.0, "tta": False}
_NO_FLIP = {"alt_flip": False, "flip": False}

# Equal wall time for the three kinds of training; all attacked at eps 8/255 (Madry et al. 2018's CIFAR-10 setting).
# FGSM with a random start and step 1.25 eps is Wong et al. 2020 ("Fast is better than free"): one PGD step from a
# uniform start. PGD-7 with step 2/255 is Madry et al.'s training attack.
_ROBUST = {"arch": "resnet20", "time_budget": 600.0, "epochs": 60, "bs": 128, "lr": 2e-3, "eps": 8 / 255,
           "precision": "fp32"}  # fmt: skip

# Fine-tuning against training from scratch: the residual fast net pretrained with its own settings (Muon, a
# ten-minute budget) on five classes, then the other five learnt at three data sizes, twice each with the same net,
# data, AdamW rate and batch: fine-tuned from the pretrained run (fastai's fine_tune: one frozen epoch, then all
# layers) and from scratch (fit_one_cycle) within the fine-tuned row's wall time, so both arms get the same time
# and at most the same images. Epochs per size: about 60,000 training images a row, at most 40 epochs (the
# earlier transfer script's rule), on CIFAR-10's 4,500 images per class after the hold-out. The two halves each mix
# vehicles and animals, so neither is "the easy one".
TRANSFER_SOURCE, TRANSFER_TARGET = "airplane,automobile,bird,cat,deer", "dog,frog,horse,ship,truck"
_TRANSFER = {"arch": "airbench_resnet", "precision": "auto"}
_SCRATCH = {"init_from": None, "weights": None, "pretrained": False}  # the scratch arm, whatever the command line says


def _transfer_rows() -> tuple[Row, ...]:
    # defaults, not options: a smoke run's --epochs 1 or --width 0.25 reaches the pretraining too
    pretrain = {**_FAST_NET, "epochs": 16, "time_budget": 600.0, "tta": True, "tta_select": 0.25}
    rows = [Row("pretrain", {"classes": TRANSFER_SOURCE}, pretrain)]
    for tag, per_class, epochs, bs in (("50", 50, 40, 32), ("500", 500, 24, 128), ("all", None, 3, 128)):
        data = {"classes": TRANSFER_TARGET, "train_per_class": per_class}
        fit = {"bs": bs, "lr": 2e-3, "time_budget": 0.0}
        rows += [
            Row(f"{tag}/class fine-tuned", {**data, "freeze_epochs": 1}, {**fit, "epochs": epochs - 1},
                (("init_from", "pretrain", "run"),)),
            Row(f"{tag}/class scratch", {**data, **_SCRATCH}, {**fit, "epochs": epochs},
                (("time_budget", f"{tag}/class fine-tuned", "wall_s"),)),
        ]  # fmt: skip
    return tuple(rows)


# A 3 x 3 grid of AdamW's rate and weight decay for resnet20, each setting 3-fold cross-validated on the training
# images (the test images are never seen), then the best mean validation accuracy trained once on all of them and
# tested: the selection a reader can trust, with the spread over the folds beside each mean.
_SEARCH = {"arch": "resnet20", "epochs": 5, "bs": 128, "folds": 3, "time_budget": 0.0, "precision": "auto"}

STUDIES = {
    s.name: s
    for s in (
        Study(
            "depth-width", "how ResNet depth and width change accuracy and cost at equal wall time",
            _DEPTH_WIDTH,
            _arch_rows("resnet20 resnet56 resnet110 resnet20:2 resnet20:4 cifar_resnet18:0.5 cifar_resnet18 "
                       "cifar_resnet50 resnet18 resnet50 resnet9 airbench_resnet"),
            plot="cost",
        ),
        Study(
            "augment", "what augmentation and regularization buy, one change at a time from the residual fast net",
            _ABLATION,
            (
                Row("baseline"),  # crop 2 + alternating flip, label smoothing 0.2, wd 0.05, no dropout
                Row("none", {"crop_pad": 0, **_NO_FLIP}),
                Row("flip only", {"crop_pad": 0}),
                Row("crop only", dict(_NO_FLIP)),
                Row("crop 4 + flip", {"crop_pad": 4, "alt_flip": False}),
                Row("+ cutout 0.5", {"cutout": 0.5}),
                Row("+ mixup 0.4", {"mixup": 0.4}),
                Row("label smoothing 0", {"label_smoothing": 0.0}),
                Row("weight decay 0", {"wd": 0.0}),
                Row("weight decay 3x", {"wd": 0.15}),
                Row("dropout 0.2", {"dropout": 0.2}),
            ),
            seeds=(0, 1),
        ),
        Study(
            "robust", "what adversarial training costs and buys at equal wall time (PGD-20 robust accuracy)",
            _ROBUST,
            (
                Row("standard"),
                Row("fgsm-rs", {"adv": "pgd", "adv_steps": 1, "adv_alpha": 1.25 * 8 / 255}),
                Row("pgd-7", {"adv": "pgd", "adv_steps": 7, "adv_alpha": 2 / 255}),
            ),
            measure={"attack": "pgd", "eps": 8 / 255, "alpha": 2 / 255, "steps": 20, "n": 1000},
        ),
        Study(
            "transfer", "when fine-tuning a pretrained body beats training from scratch, at equal wall time",
            _TRANSFER, _transfer_rows(), plot="transfer",
        ),
        Study(
            "search", "how to choose hyperparameters without touching the test set (k-fold, then one test)",
            _SEARCH, (), search=("lr=1e-3,3e-3,1e-2", "wd=0.005,0.05,0.5"),
        ),
    )
}  # fmt: skip


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise StudyError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)}")
    return STUDIES[name]


def pick_rows(study: Study, only: str | None) -> tuple[Row, ...]:
    """`--rows "a,b"`: a subset of the study's rows by label (a row label may hold spaces, not commas)."""
    if not only:
        return study.rows
    labels = [x.strip() for x in only.split(",") if x.strip()]
    known = {r.label: r for r in study.rows}
    if missing := [x for x in labels if x not in known]:
        raise StudyError(f"--rows {', '.join(missing)}: not a row of {study.name} ({'; '.join(known)})")
    return tuple(known[x] for x in labels)


def machine() -> dict:
    """What every figure of the table depends on: the CPU kind (they differ between hosts), its cores, the versions."""
    from ..utils import cpu_info, versions

    cpu = cpu_info()
    return {"cpu": cpu["model"], "cores": os.cpu_count(), "bf16": "avx512_bf16" in cpu["flags"],
            "amx": "amx_tile" in cpu["flags"], "versions": versions()}  # fmt: skip


def host_kind(m: dict | None = None) -> str:
    """The kind of machine a row's figures hold for: the CPU model, its bf16 units (they change what a step costs
    and, with `--precision auto`, the numerics) and its cores."""
    m = m or machine()
    units = "AMX" if m["amx"] else "AVX-512 BF16" if m["bf16"] else "no bf16"
    return f"{m['cpu']} ({units}), {m['cores']} cores"


def check_host(folder: Path, done_rows: list[dict]) -> None:
    """Refuse to add rows measured on another kind of machine than the rows already in the table: their times do not
    compare, nor (bf16 against fp32) quite their accuracies. Rows from before the host was recorded pass."""
    here = host_kind()
    others = sorted({r["host"] for r in done_rows if r.get("host")} - {here})
    if others:
        raise StudyError(f"{folder / 'study.csv'} holds rows measured on {'; '.join(others)}; this machine is {here}: "
                         "rows from two kinds of machine do not compare. Resume on that kind of machine, or use "
                         "another --name to start the study here")  # fmt: skip


def study_budget(study: Study, base: TrainConfig, user_given: Collection[str] = ()) -> dict:
    """What every row of the study shares: the config without the fields any of its rows sets (all its rows, so a
    `--rows` subset keeps the same budget; a row's default only where the user left it), the row's seed, name and
    folder; and the study's measurement (a search: its grid, and its seed, which draws the folds)."""
    varied = {k for r in study.rows for k in r.options} | {"name", "out"} | ({"seed"} if study.rows else set())
    # a row's default or linked setting: the user's value when given, else recorded as the rows' own, so a rerun
    # with or without --epochs into the same folder is refused like any other change of budget
    per_row = {k for r in study.rows for k in (*r.defaults, *(o for o, _, _ in r.linked))} - varied
    budget = {k: v for k, v in base.to_dict().items() if k not in varied}
    budget.update({k: "per row" for k in per_row if k not in user_given})
    return {**budget, "measure": study.measure, **({"search": list(study.search)} if study.search else {})}


def check_budget(folder: Path, budget: dict) -> None:
    """Refuse a folder trained under another budget. Options the project gained since count as their defaults; a
    setting the saved file has and this budget does not (no longer recorded) is not a change."""
    path = folder / "budget.json"
    if path.exists():
        saved = json.loads(path.read_text())
        defaults = TrainConfig().to_dict()
        old = {**{k: defaults[k] for k in budget if k in defaults and k not in saved}, **saved}
        if changed := sorted(k for k in budget if old.get(k) != budget.get(k)):
            what = ", ".join(f"{k}: {old.get(k)} -> {budget.get(k)}" for k in changed)
            raise StudyError(f"{folder} holds a study with another budget ({what}): use another --name, or the same "
                             "settings to resume it")  # fmt: skip


def save_budget(folder: Path, budget: dict) -> None:
    """After the settings were checked: a refused first attempt leaves no budget to refuse the corrected one with."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_file(folder / "budget.json", budget)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def held(lock: str | None):
    """An exclusive `flock` on the file `lock` while the block runs (none: no lock). Other timed work on the machine
    (a benchmark, another study, `flock FILE command`) takes the same file, so no row is timed beside it."""
    if not lock:
        yield
        return
    import fcntl

    try:
        f = open(lock, "a")  # noqa: SIM115 - held across the yield
    except OSError as e:
        raise StudyError(f"--lock {lock}: {e.strerror}: give a file in a folder that exists") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {lock}: other timed work holds it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_study(
    study: Study, base: TrainConfig, explicit: Collection[str] = (), folder: Path | None = None,
    seeds: tuple[int, ...] | None = None, rows: tuple[Row, ...] | None = None, lock: str | None = None,
) -> Path:  # fmt: skip
    """Train every row x seed of `study` from `base` (the study's budget with the user's options on top; `explicit`:
    the options they gave) into `folder` (default `<base.out>/<study.name>`), each row under `lock` (a file to
    `flock`); returns the folder."""
    folder = Path(folder or Path(base.out) / study.name)
    if study.search:
        return run_search(study, base, explicit, folder, lock)
    seeds = tuple(dict.fromkeys(seeds or study.seeds))  # a seed given twice trains once
    rows = rows or study.rows
    user_given = set(explicit) - set(study.base)  # the options of the command line: they win over a row's defaults
    budget = study_budget(study, base, user_given)
    check_budget(folder, budget)
    labels = [r.label for r in rows]
    done_rows = read_rows(folder / "study.csv")
    check_host(folder, done_rows)
    finished = {r["row"] for r in done_rows}
    plans = []
    for row in rows:  # every row's settings checked before the first one trains
        for option, source, _ in row.linked:
            if option not in user_given and source not in {*labels[: labels.index(row.label)], *finished}:
                raise StudyError(f"{study.name} row {row.label!r} starts from row {source!r}: list it before "
                                 f"{row.label!r} in --rows")  # fmt: skip
        settings = row.settings(user_given)
        pending = {o: f"<{src}>" for o, src, column in row.linked if column == "run" and o not in user_given}
        for seed in seeds:
            cfg_name = f"{_slug(row.label)}-s{seed}"
            try:
                if pending:  # the config's own checks with the linked run in place (fine-tuning refuses a budget)
                    base.replace(**settings, **pending)
                cfg = base.replace(**settings, seed=seed, out=str(folder), name=cfg_name)
                resolve(cfg, {*explicit, *settings, "seed", "out", "name"})  # a linked setting is checked at its start
            except (ConfigError, TypeError) as e:
                raise StudyError(f"{study.name} row {row.label!r} cannot be trained with these options: {e}") from None
            plans.append((row, seed, cfg, settings))
    save_budget(folder, budget)
    done = {(r["row"], int(r["seed"])) for r in done_rows}
    failed = []
    given = {*explicit, "seed", "out", "name"}
    for row, seed, cfg, settings in plans:
        if (row.label, seed) in done:
            print(f"{row.label} seed {seed}: already in {folder / 'study.csv'}, skipped", flush=True)
            continue
        print(f"=== {study.name}: {row.label}, seed {seed} ===", flush=True)
        linked = linked_settings(row, seed, done_rows, user_given)
        if linked is None:
            failed.append(f"{row.label} (seed {seed}; a row it needs failed)")
            continue
        try:
            linked_cfg = cfg.replace(**linked)
        except ConfigError as e:
            raise StudyError(f"{study.name} row {row.label!r} cannot start from its earlier rows: {e}") from None
        cfg, explicit_row = interrupted_row(cfg) or (linked_cfg, {*given, *settings, *linked})
        with held(lock):
            result = spawn_row(cfg, explicit_row, study.measure)
        if result is None:
            failed.append(f"{row.label} (seed {seed})")
            continue
        done_rows.append({"row": row.label, "seed": seed, **result, "host": host_kind()})
        write_outputs(folder, study, done_rows, budget)
    if done_rows:
        write_outputs(folder, study, done_rows, budget)
    print(f"table: {folder / 'study.md'}\nplot: {folder / 'study.png'}", flush=True)
    if failed:
        raise TrainingError(f"{len(failed)} row(s) failed: {', '.join(failed)} (rerun the command to retry them)")
    return folder


def linked_settings(row: Row, seed: int, done_rows: list[dict], user_given: Collection[str]) -> dict | None:
    """The settings `row` takes from rows finished before it (same seed): a run folder (`run`) or a number; None when
    one of those rows is not in the table (it failed)."""
    out = {}
    for option, source, column in row.linked:
        if option in user_given:  # the command line wins here too (a smoke run's --time-budget 0)
            continue
        found = [r for r in done_rows if r["row"] == source and int(r["seed"]) == seed]
        if not found:
            print(f"{row.label} seed {seed}: row {source!r} did not finish, so this row cannot start", flush=True)
            return None
        # a run folder as an absolute path: the table may hold it relative to where the study started
        out[option] = str(Path(found[-1][column]).resolve()) if column == "run" else float(found[-1][column])
    return out


def interrupted_row(cfg: TrainConfig) -> tuple[TrainConfig, set[str]] | None:
    """A row whose run folder holds a checkpoint but no metrics.json was stopped mid-run (a study's row can train for
    half an hour): it goes on from its last epoch (`--resume`) instead of starting again in a new folder."""
    run_dir = Path(cfg.out) / cfg.name
    last = checkpoint_dir(run_dir) / LAST
    if not (run_dir / "config.json").is_file() or (run_dir / "metrics.json").is_file() or not last.is_file():
        return None
    try:
        if TrainConfig.from_json(run_dir / "config.json").fine_tuning:  # not resumable: trained again, as before
            return None
    except ConfigError:  # a garbled config: the row starts again in a new folder
        return None
    try:
        load_checkpoint(last)
    except ConfigError as e:
        # kept under another name: the retrain takes the row's own folder, so it can resume there in turn
        aside = run_dir.with_name(f"{run_dir.name}.unreadable")
        for i in range(1, 1000):
            if not aside.exists():
                break
            aside = run_dir.with_name(f"{run_dir.name}.unreadable-{i}")
        run_dir.rename(aside)
        print(f"{run_dir}: {e}; training the row again (the old folder is kept as {aside.name})", flush=True)
        return None
    print(f"{run_dir}: interrupted before it finished; resuming it", flush=True)
    return TrainConfig(resume=str(run_dir)), {"resume"}


def run_search(study: Study, base: TrainConfig, explicit: Collection[str], folder: Path, lock: str | None) -> Path:
    """The cross-validated sweep (scripts/sweep.py's engine: optuna, resumable), then the chosen setting trained once
    on every training image, in a process of its own (its own clock for --time-budget), and tested; `study.md` holds
    both."""
    from .sweep import sweep

    budget = study_budget(study, base)
    check_budget(folder, budget)
    with held(lock):  # one lock for the whole sweep: its trials run back to back in this process
        result = sweep(base, list(study.search), sweep_dir=folder / "sweep", explicit=explicit)
    save_budget(folder, budget)  # the sweep checked its settings (and keeps its own study's)
    done = [r for r in result.table if r["state"] == "ok"]
    if not done:
        raise TrainingError("no setting of the search finished: rerun the command to resume it")
    chosen = done[0]["params"]
    final = folder / "chosen"
    saved = json.loads((final / "config.json").read_text())["config"] if (final / "metrics.json").exists() else None
    if saved is None or any(saved.get(k) != v for k, v in chosen.items()):
        shutil.rmtree(final, ignore_errors=True)  # an interrupted run, or one of a setting no longer the best
        cfg = base.replace(**chosen, folds=0, fold=0, out=str(folder), name="chosen")
        with held(lock):
            if spawn_row(cfg, {*explicit, *chosen, "folds", "fold", "out", "name"}) is None:
                raise TrainingError("the chosen setting's run failed: rerun the command to train it again")
    metrics = json.loads((final / "metrics.json").read_text())
    write_text_atomic(folder / "study.md", search_markdown(study, result.table, chosen, metrics, budget))
    write_json_file(folder / "machine.json", machine())
    print(f"table: {folder / 'study.md'}", flush=True)
    return folder


def search_markdown(study: Study, table: list[dict], chosen: dict, metrics: dict, budget: dict) -> str:
    from .sweep_report import fmt_params

    names = list(chosen)
    lines = ["| " + " | ".join([*names, "folds", "mean valid acc (%)", "std (points)", "per fold (%)"]) + " |",
             "|" + "---:|" * (len(names) + 4)]  # fmt: skip
    for r in table:
        if r["state"] != "ok":
            continue
        std = "" if r["std"] is None else f"{100 * r['std']:.2f}"
        folds = ", ".join(f"{100 * a:.2f}" for a in r["fold_accuracies"])
        lines.append("| " + " | ".join([*(f"{r['params'][n]:g}" for n in names), str(r["folds"]),
                                        f"{100 * r['mean']:.2f}", std, folds]) + " |")  # fmt: skip
    m = machine()
    shown = {k: v for k, v in budget.items() if k in SHOWN and v not in (None, "", False)}
    lines += [
        "",
        f"Study `{study.name}`: {study.question}. Machine: {host_kind(m)}.",
        "Budget: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + f", folds={budget.get('folds')}.",
        (f"Chosen on validation only: {fmt_params(chosen)}; trained once on all the training images (its usual "
        f"hold-out for validation), then tested: **test accuracy {100 * metrics['test_accuracy']:.2f}%** on "
        f"{metrics['n_test']} test images (validation {100 * metrics['valid_accuracy']:.2f}%)."),
    ]
    return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in label).strip("-")[:60]


def write_outputs(folder: Path, study: Study, rows: list[dict], budget: dict) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    write_text_atomic(folder / "study.csv", table.getvalue())  # the record of finished rows: never half a file
    write_text_atomic(folder / "study.md", markdown(study, rows, budget))
    write_json_file(folder / "machine.json", machine())
    plot(study, rows, folder / "study.png")


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["row"], []).append(r)
    return out


def _mean(rs: list[dict], key: str) -> float | None:
    xs = [float(r[key]) for r in rs if r.get(key) not in (None, "")]
    return statistics.fmean(xs) if xs else None


def _acc(rs: list[dict], key: str) -> str:
    xs = [float(r[key]) for r in rs if r.get(key) not in (None, "")]
    if not xs:
        return ""
    text = f"{100 * statistics.fmean(xs):.2f}"
    return text + (f" ({100 * min(xs):.2f}-{100 * max(xs):.2f})" if len(xs) > 1 else "")


def markdown(study: Study, rows: list[dict], budget: dict) -> str:
    robust = study.measure is not None
    head = ["row", "seeds", "params (M)", "MFLOPs/image", "epochs", "train img/s", "peak mem (MB)", "wall (s)",
            "valid acc (%)", "test acc (%)", *(["robust acc (%)"] if robust else [])]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, rs in grouped(rows).items():
        cells = [label, str(len(rs)), f"{_mean(rs, 'params_m'):.2f}", f"{_mean(rs, 'mflops'):,.0f}",
                 f"{_mean(rs, 'epochs'):g}", f"{_mean(rs, 'train_img_s'):,.0f}", f"{_mean(rs, 'peak_mem_mb'):,.0f}",
                 f"{_mean(rs, 'wall_s'):,.0f}", _acc(rs, "valid_acc"), _acc(rs, "test_acc"),
                 *([_acc(rs, "robust_acc")] if robust else [])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    m = machine()
    # a row with a training recipe of its own (transfer's pretraining) does not say what the others trained with
    own = {r.label: {**r.defaults, **r.options} for r in study.rows}
    own = {label: o for label, o in own.items() if {"recipe", "optimizer"} & set(o)}
    shared = trained_budget(budget, [r for r in rows if r["row"] not in own] or rows)
    shared.update({k: v for k, v in budget.items() if v == "per row"})  # one row's value would pass for all rows'
    shown = {k: v for k, v in shared.items() if k in SHOWN and v not in (None, "", False)}
    lines += [
        "",
        f"Study `{study.name}`: {study.question}. Machine: {hosts_line(rows, m)}.",
        "Budget: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + ".",
        (
            "Accuracy: mean over the seeds (range in brackets). Wall: the row's whole `train()` (data, fit, test pass, "
            "export). Peak mem: the row process's peak resident memory above its memory after imports. MFLOPs: forward "
            "FLOPs per image at the training size (torch's FlopCounterMode, 1 MAC = 2 FLOPs)."
        ),
    ]
    for label, options in own.items():
        # what the row trained with where its run is at hand (the command line may have overridden its defaults)
        ran = next((c for r in rows if r["row"] == label and (c := _run_config(r).get("config"))), {})
        mine = ", ".join(f"{k}={ran.get(k, v)}" for k, v in options.items() if k in SHOWN or k in ("arch", "classes"))
        lines.append(f"Row `{label}` trains with settings of its own: {mine}.")
    if study.plot == "transfer":
        lines += ["", *transfer_table(rows)]
    if robust:
        a = study.measure
        lines.append(
            f"Robust acc: {a['attack'].upper()}-{a['steps']} at eps {a['eps'] * 255:g}/255 (step "
            f"{a['alpha'] * 255:g}/255) on the first {rs[0].get('attack_n') or a['n']} test images."
        )
    return "\n".join(lines) + "\n"


def hosts_line(rows: list[dict], m: dict) -> str:
    """The machine the rows were measured on (this one, when no row recorded it)."""
    hosts = list(dict.fromkeys(r["host"] for r in rows if r.get("host")))
    if len(hosts) > 1:  # a table written before hosts were checked
        return "rows from several kinds of machine: " + "; ".join(hosts)
    return hosts[0] if hosts else host_kind(m)


def _run_config(row: dict) -> dict:
    """A finished row's config.json (its settings and resolved sizes); {} when the run folder is gone or garbled."""
    try:
        return json.loads((Path(row["run"]) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_info(row: dict) -> dict:
    """A finished row's training-set size and whether it wrote a fine-tuning report."""
    return {"n_train": _run_config(row).get("resolved", {}).get("n_train"),
            "report": (Path(row["run"]) / "finetune.png").is_file()}  # fmt: skip


def transfer_pairs(rows: list[dict]) -> list[tuple[str, list[dict], list[dict]]]:
    """(size tag, fine-tuned rows, scratch rows) per data size, in the table's order; a size with one arm is left out."""
    groups = grouped(rows)
    tags = dict.fromkeys(label.split("/class")[0] for label in groups if "/class" in label)
    return [(t, groups[f"{t}/class fine-tuned"], groups[f"{t}/class scratch"]) for t in tags
            if f"{t}/class fine-tuned" in groups and f"{t}/class scratch" in groups]  # fmt: skip


def transfer_table(rows: list[dict]) -> list[str]:
    lines = [("| images per class | train images | fine-tuned: epochs, wall (s) | from scratch: epochs, wall (s) | "
             "fine-tuned: test acc (%) | from scratch: test acc (%) | gain (points) |"), "|---|" + "---:|" * 6]  # fmt: skip
    pairs = transfer_pairs(rows)
    for tag, ft, sc in pairs:
        # the gain pairs the arms seed by seed (a seed one arm lacks is left out)
        diffs = [float(a["test_acc"]) - float(b["test_acc"]) for a in ft for b in sc if a["seed"] == b["seed"]]
        gain = 100 * statistics.fmean(diffs) if diffs else float("nan")
        n_train = _run_info(ft[0])["n_train"]
        lines.append(f"| {tag} | {f'{n_train:,}' if n_train else ''} | {_mean(ft, 'epochs'):g}, {_mean(ft, 'wall_s'):,.0f} | "
                     f"{_mean(sc, 'epochs'):g}, {_mean(sc, 'wall_s'):,.0f} | {_acc(ft, 'test_acc')} | "
                     f"{_acc(sc, 'test_acc')} | {gain:+.2f} |")  # fmt: skip
    reports = [ft[0]["run"] for _, ft, _ in pairs if _run_info(ft[0])["report"]]
    lines += ["", ("Both arms learn the target classes with the same net, data, rate and batch; the scratch arm trains "
              "within the fine-tuned row's wall time (`--time-budget`), so its epochs can be fewer. Test accuracy on "
              "the target classes' test images.")]  # fmt: skip
    if reports:
        lines.append(f"How far fine-tuning moved each layer group: `{Path(reports[-1]) / 'finetune.png'}`.")
    return lines


# the budget's settings a reader compares rows by (an attack's eps: the robust line)
def trained_budget(budget: dict, rows: list[dict]) -> dict:
    """The budget as the rows trained it: a recipe fills in the options nobody gave (the quick recipe's batch 250 and
    Muon, not the defaults the budget holds), so the shared settings are read from the first row's config.json."""
    for r in rows:
        if saved := _run_config(r).get("config"):
            return {k: saved.get(k, v) for k, v in budget.items()}
    return budget


SHOWN = ("data", "recipe", "epochs", "time_budget", "bs", "lr", "wd", "optimizer", "schedule", "train_per_class",
         "valid_pct", "precision", "tta")  # fmt: skip


def plot(study: Study, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(rows)
    if study.plot == "transfer":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pairs = transfer_pairs(rows)
        xs = [_run_info(ft[0])["n_train"] or 0 for _, ft, _ in pairs]
        for arm, k in (("fine-tuned", 1), ("from scratch", 2)):
            ax.plot(xs, [_mean(p[k], "test_acc") for p in pairs], marker="o", label=arm)
        for x, (tag, _, _) in zip(xs, pairs):
            ax.annotate(f"{tag}/class", (x, ax.get_ylim()[0]), fontsize=7, xytext=(2, 4), textcoords="offset points")
        if "pretrain" in groups:
            ax.set_title(f"pretrained body: {100 * _mean(groups['pretrain'], 'test_acc'):.1f}% on its own classes",
                         fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training images of the target classes")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    elif study.plot == "cost":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, key, label in zip(axes, ("wall_s", "mflops", "params_m"),
                                  ("wall time of the row (s)", "MFLOPs per image (forward)", "parameters (M)")):  # fmt: skip
            for name, rs in groups.items():
                x, y = _mean(rs, key), _mean(rs, "test_acc")
                ax.scatter([x], [y])
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(groups) + 1.5))
        names = list(groups)
        keys = ["test_acc", *(["robust_acc"] if study.measure else [])]
        for k, key in enumerate(keys):
            ys = [i + 0.4 * k for i in range(len(names))]
            ax.barh(ys, [_mean(groups[n], key) or 0 for n in names], height=0.4, label=key.replace("_", " "))
            for y, n in zip(ys, names):  # each seed as a dot: the spread the mean hides
                ax.scatter([float(r[key]) for r in groups[n] if r.get(key) not in (None, "")], [y] * len(groups[n]),
                           color="black", s=8, zorder=3)  # fmt: skip
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8)
    fig.suptitle(f"{study.name}: {study.question}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["STUDIES", "Row", "Study", "StudyError", "get_study", "pick_rows", "run_study"]
