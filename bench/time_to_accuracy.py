"""Time to accuracy of the named recipes: validation accuracy after every epoch against wall time, test at the end.

    python bench/time_to_accuracy.py --data ../shared/data/cifar10-jpeg75.tgz --recipes fast --seeds 0,1,2
    python bench/time_to_accuracy.py --data ../shared/data/cifar10-jpeg75.tgz --runs fast:0,1,2 --runs long:0
    python bench/time_to_accuracy.py --data sample --recipes fast --epochs 2        # smoke run

Each (recipe, seed) is one `python scripts/train.py --recipe R --seed S` process, timed from its start (imports,
data loading and the final test + TTA pass included: the wall time a user waits). Runs that already have
metrics.json are reused, so a stopped benchmark resumes. Writes bench/out/time_to_accuracy.json (every curve, per
recipe mean and spread of test accuracy and wall time, against the targets of the issue) and a PNG plot.

With record runs in the same invocation they run first, `fast` runs get `--time-budget` 0.75x their mean wall time
(`--fast-budget-vs-record`), and `summary[recipe]["vs_record"]` says whether each recipe meets its goal against the
record (`GOALS_VS_RECORD`); `--interleave` runs them in rounds instead (record, fast, record, fast), each budget a
share of its own round's record run, and `vs_record.paired` compares each run with its round's record.
`--runs docs:0` adds the fastai-docs recipe (bench/train_speed.py) as one more run.
`--variant "fast-sel=fast --select 0.5"` then `--runs fast-sel:0,1` runs a recipe with train.py options on top under
its own name, with its recipe's budget and goal: the A/B of one lever beside the plain recipe, in one invocation.

This shared host's speed drifts by 20% and more from hour to hour, and the targets are wall times, so right before
and after each run the benchmark also measures the host against two reference speeds (`host_speed`): the bare
training step of resnet18 (fp32, bs 256, channels_last; issue: about 1,200 images/s) and the fastai-docs recipe
(about 320 images/s on the reference host; on the shipped sample), both from bench/train_speed.py.
"""

from __future__ import annotations

import csv
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench/out/time_to_accuracy.json"
TARGETS = {"fast": (0.91, 600.0), "long": (0.93, 1800.0)}  # the recipes' goals: test accuracy within wall seconds
BASELINE = "record"  # the CIFAR-10 speed record's own settings (recipes.py); the issue asks both recipes to beat it
# the goals against the record measured in the same invocation: at least this many accuracy points over its test
# accuracy (with TTA), in at most this share of its wall time
GOALS_VS_RECORD = {"fast": {"min_points": 0.0, "max_wall_ratio": 0.75}, "long": {"min_points": 1.0, "max_wall_ratio": 3.5}}


DOCS = "docs"  # not a --recipe: the fastai-docs recipe (bench/train_speed.py `docs_recipe`) run as one, for scale
DOCS_PER_CLASS = 5000  # all of CIFAR-10's training images (and so, at a fifth, all of its test images)


ANCHORS = {"resnet18_bare_step_images_per_s": 1200.0, "docs_recipe_images_per_s": 320.0}  # the reference host's speed (docs/speed.md)


def host_speed(scale: float = 1.0) -> dict:
    """The host's speed now, against the reference speeds (a few seconds of work; nothing else should run).
    The docs recipe reads the shipped sample (2,000 training + 500 test images), the same files on every host."""
    if str(REPO / "bench") not in sys.path:  # once, though it is called around every run
        sys.path.insert(0, str(REPO / "bench"))
    from train_speed import bare_step, docs_recipe

    from cifar_fastai.data.sources import resolve_data

    # scale < 1: a smaller probe (smoke runs and tests on slow hosts); its rates are then rougher
    bare = bare_step("resnet18", 256, steps=max(1, round(8 * scale)), channels_last=True, bf16=False)["images_per_s"]
    docs = docs_recipe(resolve_data("sample"), per_class=max(10, round(200 * scale)))["epoch_images_per_s"]
    return {"resnet18_bare_step_images_per_s": bare, "docs_recipe_images_per_s": docs}


def mean_speed(before: dict, after: dict) -> dict:
    speed = {k: (before[k] + after[k]) / 2 for k in ANCHORS}
    return {**speed, **{f"{k}_vs_issue": speed[k] / v for k, v in ANCHORS.items()}, "before": before, "after": after}


def docs_run(data: str, run_dir: str, seed: str, epochs: str, per_class: str) -> None:
    """One run of the fastai-docs recipe (resnet18 from scratch, `aug_transforms`, `fit_one_cycle`, bs 64) written as
    a recipe run: config.json, history.csv (accuracy on the test images after each epoch) and metrics.json, so
    `run_one` reads it as any other. Its validation set is the test images (a fifth of `per_class` per class)."""
    t0 = time.perf_counter()
    from fastai.callback.core import Callback
    from fastai.learner import Recorder
    from fastai.torch_core import set_seed
    from train_speed import docs_recipe

    from cifar_fastai.data.sources import resolve_data
    from cifar_fastai.utils import write_json

    class Clock(Callback):  # seconds since t0 and the test accuracy after each epoch
        order = Recorder.order + 1  # after the Recorder has the epoch's metrics

        def before_fit(self):
            self.rows = []

        def after_epoch(self):
            self.rows.append((time.perf_counter() - t0, float(self.learn.recorder.values[-1][-1])))

    set_seed(int(seed))
    clock = Clock()
    r = docs_recipe(resolve_data(data), int(per_class), epochs=int(epochs), cbs=[clock])
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"recipe": DOCS, "arch": "resnet18", "bs": r["bs"], "epochs": r["epochs"], "seed": int(seed), "what": r["what"]}
    write_json(out / "config.json", {"config": cfg})
    rows = ["epoch,elapsed_s,accuracy", *(f"{i},{t:.2f},{a:.4f}" for i, (t, a) in enumerate(clock.rows))]
    (out / "history.csv").write_text("\n".join(rows) + "\n")
    write_json(out / "metrics.json", {
        "test_accuracy": r["accuracy"], "valid_accuracy": r["accuracy"], "n_test": r["n_valid"],
        # per second of the fit, its validation passes included (the docs recipe's loop times them together)
        "train_images_per_s": r["epochs"] * r["n_train"] / r["wall_seconds"],
        "wall_seconds": time.perf_counter() - t0,
    })  # fmt: skip


def parse_variants(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """`NAME=RECIPE --opt value ...` -> {NAME: (RECIPE, [options])}: a recipe with options of train.py on top, run
    and summarized under its own name, with its recipe's budget share and goal (an A/B of one lever)."""
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        words = shlex.split(rest)
        if not sep or not name.strip() or not words or words[0].startswith("-") or ":" in name:
            raise typer.BadParameter(f"--variant {spec!r}: NAME=RECIPE [train.py options], e.g. 'fast-sel=fast --select 0.5'")
        from cifar_fastai.training.recipes import RECIPES

        if name.strip() in (*RECIPES, DOCS):  # its runs would be taken for the plain recipe's
            raise typer.BadParameter(f"--variant {spec!r}: {name.strip()} is a recipe's name: give the variant its own")
        if words[0] == DOCS:
            raise typer.BadParameter(f"--variant {spec!r}: the fastai-docs run takes no train.py options")
        out[name.strip()] = (words[0], words[1:])
    return out


def without_budget(words: list[str]) -> list[str]:
    """The options less `--time-budget VALUE`: the benchmark sets it from the record's wall time, which differs from
    one invocation to the next."""
    out, skip = [], False
    for w in words:
        if not skip and w != "--time-budget":
            out.append(w)
        skip = w == "--time-budget"
    return out


def run_one(recipe: str, seed: int, data: str, runs: Path, extra: list[str], measure_host: bool = True, scale: float = 1.0,
            docs: tuple[int, int] = (1, DOCS_PER_CLASS), name: str | None = None) -> dict:  # fmt: skip
    """One run of `recipe` (with `extra` options) in bench's folder `runs/<name>-seed<seed>`; `name` (a variant's)
    defaults to the recipe's."""
    name = name or recipe
    run_dir = runs / f"{name}-seed{seed}"
    asked = {"recipe": recipe, "options": without_budget(extra)}
    kept = run_dir / "bench_run.json"  # what the run in this folder was asked to train
    if kept.exists() and (old := json.loads(kept.read_text())) != asked:
        raise SystemExit(f"error: {run_dir} holds a run of {old['recipe']} {' '.join(old['options'])}, not of {recipe} "
                         f"{' '.join(asked['options'])}: use another --out or variant name")  # fmt: skip
    if not (run_dir / "metrics.json").exists():
        interrupted = (run_dir / "config.json").exists()  # train.py had started: its checkpoint continues it
        before = host_speed(scale) if measure_host else None
        cmd = [sys.executable, str(REPO / "scripts/train.py"), "--recipe", recipe, "--seed", str(seed), "--data", data]
        cmd += ["--out", str(runs), "--name", run_dir.name, *extra]
        if recipe == DOCS:  # its own process too, timed the same way (`docs`: epochs, training images per class)
            code = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); from time_to_accuracy import docs_run; docs_run(*sys.argv[1:])"
            cmd = [sys.executable, "-c", code, data, str(run_dir), str(seed), *map(str, docs)]
        elif interrupted:  # its checkpoint continues it (same config)
            cmd = [sys.executable, str(REPO / "scripts/train.py"), "--resume", str(run_dir)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        kept.write_text(json.dumps(asked))  # train.py names and makes the folder: written once it has
        (run_dir / "process_wall.json").write_text(json.dumps({"process_wall_s": time.perf_counter() - t0}))
        if measure_host:
            (run_dir / "host_speed.json").write_text(json.dumps(mean_speed(before, host_speed(scale)), indent=2))
    m = json.loads((run_dir / "metrics.json").read_text())
    wall_file = run_dir / "process_wall.json"
    process_wall = json.loads(wall_file.read_text())["process_wall_s"] if wall_file.exists() else m["wall_seconds"]
    startup = process_wall - m["wall_seconds"]  # python + imports before train() started its clock
    rows = list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))
    curve = [(startup + float(r["elapsed_s"]), float(r["accuracy"])) for r in rows if r.get("elapsed_s")]
    cfg = json.loads((run_dir / "config.json").read_text())
    speed_file = run_dir / "host_speed.json"  # absent for runs made before the benchmark measured it
    return {
        "recipe": name,
        "base_recipe": recipe,
        "options": extra,
        "seed": seed,
        "run_dir": str(run_dir),
        "config": cfg.get("config", cfg),
        "process_wall_s": process_wall,
        "train_images_per_s": m["train_images_per_s"],
        "test_accuracy": m["test_accuracy"],
        "test_accuracy_tta": m.get("test_accuracy_tta"),
        "valid_accuracy": m["valid_accuracy"],
        "curve_wall_s_valid_accuracy": curve,
        "host_speed": json.loads(speed_file.read_text()) if speed_file.exists() else None,
    }


def reported(run: dict) -> float:
    """The test accuracy a run reports: with TTA where it ran TTA (the recipes), plain otherwise (he2015, docs)."""
    return run["test_accuracy_tta"] or run["test_accuracy"]


def interleaved(plan: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`plan` in rounds: round k is the record's k-th run, then the k-th run of every other name (in the order
    asked). On a host whose speed drifts from hour to hour (docs/speed.md: a bare-step probe of 641 and 537 images/s
    around the record's runs, 474 and 527 around `fast`'s, run one after the other), the drift then falls on both
    arms of each pair instead of on one arm."""
    by_name: dict[str, list[int]] = {}
    for name, seed in plan:
        by_name.setdefault(name, []).append(seed)
    order = sorted(by_name, key=lambda name: name != BASELINE)
    rounds = max(map(len, by_name.values()), default=0)
    return [(name, by_name[name][k]) for k in range(rounds) for name in order if k < len(by_name[name])]


def pairs(runs: list[dict], records: list[dict]) -> dict:
    """The i-th run against the i-th record run: the per-pair accuracy difference (points, with TTA) and wall
    ratio, and their means. With --interleave the two of a pair ran back to back, so the pairs' spread is the
    recipe's own, not the host's hour."""
    rows = [{"seed": r.get("seed"), "record_seed": b.get("seed"),
             "test_accuracy_points": 100 * (reported(r) - reported(b)),
             "wall_ratio": r["process_wall_s"] / b["process_wall_s"]} for r, b in zip(runs, records)]  # fmt: skip
    if not rows:
        return {"pairs": []}
    points = [p["test_accuracy_points"] for p in rows]
    return {"pairs": rows, "points_mean": statistics.fmean(points), "points_min": min(points), "points_max": max(points),
            "wall_ratio_mean": statistics.fmean(p["wall_ratio"] for p in rows)}  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    def spread(xs):
        return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "std": statistics.pstdev(xs), "n": len(xs)}

    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == recipe]
        best = [reported(r) for r in rs]
        walls = [r["process_wall_s"] for r in rs]
        s = {"base_recipe": rs[0].get("base_recipe", recipe), "options": rs[0].get("options", []),
             "test_accuracy": spread([r["test_accuracy"] for r in rs]), "test_accuracy_reported": spread(best),
             "process_wall_s": spread(walls),
             "time_budget_s": sorted({r["config"].get("time_budget") or 0 for r in rs})}  # fmt: skip
        if speeds := [r["host_speed"] for r in rs if r["host_speed"]]:
            s["host_speed_vs_issue"] = {k: spread([h[f"{k}_vs_issue"] for h in speeds]) for k in ANCHORS}
        if s["base_recipe"] in TARGETS:
            acc, secs = TARGETS[s["base_recipe"]]
            s["target"] = {"test_accuracy": acc, "wall_s": secs, "met_by_mean": s["test_accuracy_reported"]["mean"] >= acc
                           and s["process_wall_s"]["mean"] <= secs}  # fmt: skip
        out[recipe] = s
    if base := out.get(BASELINE):  # the record's recipe measured in the same invocation: compare with ratios
        for recipe, s in out.items():
            if recipe != BASELINE:
                points = s["test_accuracy_reported"]["mean"] - base["test_accuracy_reported"]["mean"]
                ratio = s["process_wall_s"]["mean"] / base["process_wall_s"]["mean"]
                s["vs_record"] = {"test_accuracy_points": 100 * points, "wall_ratio": ratio,
                                  "beats_on_both": points >= 0 and ratio < 1,
                                  "paired": pairs([r for r in runs if r["recipe"] == recipe],
                                                  [r for r in runs if r["recipe"] == BASELINE])}  # fmt: skip
                if goal := GOALS_VS_RECORD.get(s["base_recipe"]):
                    acc_ok = 100 * points >= goal["min_points"] - 1e-9
                    wall_ok = ratio <= goal["max_wall_ratio"]
                    s["vs_record"].update(goal=goal, accuracy_met=acc_ok, wall_met=wall_ok, goal_met=acc_ok and wall_ok)
    if DOCS in out:
        for recipe, s in out.items():
            if recipe != DOCS:
                s["vs_docs"] = vs_docs([r for r in runs if r["recipe"] == recipe], [r for r in runs if r["recipe"] == DOCS])
    return out


def vs_docs(runs: list[dict], docs: list[dict]) -> dict:
    """How much sooner `runs` reach the fastai-docs recipe's accuracy: the docs runs' mean test accuracy (no TTA, as
    the docs recipe reports it), and for each run the wall time (from the command's start) of its first epoch whose
    validation accuracy reached it; a run whose curve never did but whose final test accuracy did counts its whole
    wall time, and one that reached it in neither does not count. `speedup`: the docs runs' mean wall time over the
    mean of those times (None when no run reached it). The hold-out behind the curve is small (1,000 images in the
    recipes), so the epoch that first crosses is a noisy reading; `wall_ratio` and `test_accuracy_points` compare the
    whole runs."""
    target = statistics.fmean(r["test_accuracy"] for r in docs)
    docs_wall = statistics.fmean(r["process_wall_s"] for r in docs)
    reached = []
    for r in runs:
        first = next((t for t, acc in r["curve_wall_s_valid_accuracy"] if acc >= target), None)
        if first is None and reported(r) >= target:
            first = r["process_wall_s"]
        reached.append(first)
    times = [t for t in reached if t is not None]
    final = statistics.fmean(reported(r) for r in runs)
    return {"docs_test_accuracy": target, "docs_wall_s": docs_wall, "wall_s_to_docs_accuracy": reached,
            "speedup": docs_wall / statistics.fmean(times) if times else None,
            "wall_ratio": statistics.fmean(r["process_wall_s"] for r in runs) / docs_wall,
            "test_accuracy_points": 100 * (final - target)}  # fmt: skip


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve_wall_s_valid_accuracy"]) if r["curve_wall_s_valid_accuracy"] else ((), ())
        line = ax.plot([x / 60 for x in xs], ys, marker="o", ms=3, label=f"{r['recipe']} seed {r['seed']} (valid)")[0]
        final = reported(r)
        ax.plot([r["process_wall_s"] / 60], [final], marker="*", ms=12, color=line.get_color(), ls="none")
    for recipe, (acc, secs) in TARGETS.items():
        if any(r["recipe"] == recipe for r in runs):
            ax.plot([secs / 60], [acc], marker="x", ms=10, color="red", ls="none")
            ax.annotate(f"{recipe} target", (secs / 60, acc), textcoords="offset points", xytext=(4, 4), color="red")
    ax.set_xlabel("wall time since the command started (min)")
    ax.set_ylabel("accuracy")
    ax.set_title("validation accuracy per epoch; star: final test accuracy (with TTA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    data: str = typer.Option(str(REPO.parent / "shared/data/cifar10-jpeg75.tgz"), help="--data of the runs"),
    recipes: str = typer.Option("fast,long", help="named recipes, comma-separated"),
    seeds: str = typer.Option("0,1,2", help="seeds, comma-separated (one run each per recipe)"),
    runs: Annotated[list[str] | None, typer.Option(help="recipe:seed,seed,... (repeatable); replaces --recipes/--seeds")] = None,
    epochs: int | None = typer.Option(None, help="override the recipes' epochs (smoke runs)"),
    train_per_class: int | None = typer.Option(None, help="override: training images per class (smoke runs)"),
    out: Annotated[Path, typer.Option(help="JSON result; the plot is written beside it")] = DEFAULT_OUT,
    host_speed: Annotated[bool, typer.Option(help="measure the host against the reference speeds around each run")] = True,
    probe_scale: Annotated[float, typer.Option(min=0.01, max=1.0, help="fraction of the full host-speed probe's work")] = 1.0,
    fast_budget_vs_record: Annotated[float, typer.Option(
        min=0.0, help="with record runs in the same invocation (they run first): fast runs get --time-budget this share "
        "of the record's mean wall time (its goal); 0: the recipe's own budget")] = 0.75,
    long_budget_vs_record: Annotated[float, typer.Option(
        min=0.0, help="the same for long runs (its goal: 3.5); 0: the recipe's own budget")] = 0.0,
    variant: Annotated[list[str] | None, typer.Option(
        help="NAME=RECIPE [train.py options] (repeatable): a recipe with options on top, run as NAME:SEEDS in --runs, "
        "e.g. 'fast-sel=fast --select 0.5'")] = None,
    docs_epochs: Annotated[int, typer.Option(
        min=1, help=f"epochs of the fastai-docs recipe, run as '{DOCS}:SEED' in --runs (resnet18 from scratch, bs 64)")] = 5,
    interleave: Annotated[bool, typer.Option(
        help="run in rounds (record seed 0, then each other run's first seed; record seed 1, then the second seeds, "
        "...), each budget a share of its own round's record run, so a host that drifts slows both arms alike")] = False,
) -> None:  # fmt: skip
    from cifar_fastai.studies.study import machine

    extra = [*(["--epochs", str(epochs)] if epochs else []), *(["--train-per-class", str(train_per_class)] if train_per_class else [])]
    docs = (epochs or docs_epochs, train_per_class or DOCS_PER_CLASS)
    runs_dir = out.parent / "tta_runs"
    results = []
    plan = [(r, int(x)) for r in recipes.split(",") for x in seeds.split(",")]
    if runs:
        plan = [(r, int(x)) for spec in runs for r, _, xs in [spec.partition(":")] for x in (xs or "0").split(",")]
    plan = interleaved(plan) if interleave else sorted(plan, key=lambda run: run[0] != BASELINE)
    shares = {"fast": fast_budget_vs_record, "long": long_budget_vs_record}
    variants = parse_variants(variant or [])
    for name, seed in plan:
        recipe, options = variants.get(name, (name, []))
        walls = [r["process_wall_s"] for r in results if r["recipe"] == BASELINE]
        if interleave:  # the record run of the same round, the host's pace of this hour
            walls = walls[-1:]
        budget = ["--time-budget", f"{shares[recipe] * statistics.fmean(walls):.1f}"] if shares.get(recipe) and walls else []
        # a variant's own --time-budget, after the benchmark's share, wins
        results.append(run_one(recipe, seed, data, runs_dir, [*extra, *budget, *options], host_speed, probe_scale, docs, name))
        out.parent.mkdir(parents=True, exist_ok=True)  # after every run: a stopped bench keeps what it has
        summary = summarize(results)
        command = "python bench/time_to_accuracy.py " + shlex.join(sys.argv[1:])
        # figures compare only within one kind of host: the CPU model and its bf16 units beside them
        record = {"command": command, "machine": machine(), "summary": summary, "runs": results}
        out.write_text(json.dumps(record, indent=2))
        plot(results, out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    print(f"written {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    typer.run(main)
