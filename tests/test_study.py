"""scripts/study.py: each named study end to end at a tiny budget, resumed row by row, refusing a changed budget."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifar_fastai.cli import study_app
from cifar_fastai.studies import study as study_module
from cifar_fastai.studies.compare import run_row
from cifar_fastai.studies.study import STUDIES
from cifar_fastai.training.resolve import resolve

# two cheap rows of each study (the row process itself: test_cifar_resnets' compare test runs it for real)
ROWS = {"depth-width": "resnet20,resnet20:2", "augment": "none,baseline", "robust": "standard,fgsm-rs"}
SEARCHES = {"search"}  # a sweep, then one test run: its own test below
LINKED = {"transfer"}  # rows that start from earlier rows' results: its own test below
TINY = ["--epochs", "1", "--train-per-class", "10", "--time-budget", "0", "--seeds", "0"]


@pytest.fixture
def rows_in_process(monkeypatch):
    """Each row trained in this process (imports paid once); records what every row was trained with."""
    calls = []

    def spawn(cfg, explicit, measure=None):
        plan = resolve(cfg, explicit)
        calls.append((plan.cfg, measure))
        return run_row(plan, measure)

    monkeypatch.setattr(study_module, "spawn_row", spawn)
    return calls


def run(*args: str):
    return CliRunner().invoke(study_app, list(args))


def test_every_named_study_is_in_the_test_and_its_labels_can_be_picked():
    assert set(ROWS) | SEARCHES | LINKED == set(STUDIES), "each study runs end to end below"
    for s in STUDIES.values():
        labels = [r.label for r in s.rows]
        assert len(set(labels)) == len(labels) and not any("," in x for x in labels), f"{s.name}: --rows splits on ','"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_study_runs_end_to_end_and_writes_its_table_and_plot(name, tiny_data, tmp_path, rows_in_process, monkeypatch):
    spec = STUDIES[name]
    if spec.measure:  # the same attack at 2 steps on 50 images: the bookkeeping, not PGD-20's seconds
        spec = dataclasses.replace(spec, measure={**spec.measure, "steps": 2, "n": 50})
        monkeypatch.setitem(STUDIES, name, spec)
    res = run(name, "--data", str(tiny_data), "--out", str(tmp_path), "--rows", ROWS[name], *TINY)
    assert res.exit_code == 0, res.output[-3000:]
    folder = tmp_path / name
    rows = list(csv.DictReader((folder / "study.csv").open()))
    assert [r["row"] for r in rows] == ROWS[name].split(",") and {r["seed"] for r in rows} == {"0"}
    picked = {r.label: r for r in spec.rows}
    for r, (cfg, measure) in zip(rows, rows_in_process):
        options = picked[r["row"]].options
        assert {k: getattr(cfg, k) for k in options} == options, "the row's own settings reached its run"
        assert cfg.epochs == 1 and cfg.train_per_class == 10, "the user's options won over the study's budget"
        for k, v in spec.base.items():  # the rest of the study's budget reached the run
            if k not in ("epochs", "time_budget", "recipe") and k not in options:
                assert getattr(cfg, k) == v, k
        m = json.loads((Path(r["run"]) / "metrics.json").read_text())
        assert float(r["test_acc"]) == round(m["test_accuracy"], 4) and int(r["epochs"]) == 1
        assert measure == spec.measure
        if measure:  # the robust study attacks each row's model on the run's own test images
            assert 0 <= float(r["robust_acc"]) <= float(r["test_acc"]) + 0.05 and int(r["attack_n"]) == 50
    if name == "augment":  # on top of the fast recipe: 'none' trains without crop and flip, the recipe row with both
        (none, _), (recipe, _) = rows_in_process
        assert (none.crop_pad, none.flip, none.alt_flip) == (0, False, False)
        assert (recipe.crop_pad, recipe.alt_flip, recipe.arch, recipe.optimizer) == (2, True, "airbench_resnet", "muon")
    table = (folder / "study.md").read_text()
    assert all(f"| {label} | 1 |" in table for label in ROWS[name].split(","))
    if name == "augment":  # the budget line says what the rows trained with: the recipe's settings, not the defaults
        assert "bs=250" in table and "optimizer=muon" in table and "optimizer=adam" not in table
    assert "Machine: " in table and "Budget: " in table and ("robust acc" in table) == bool(spec.measure)
    assert json.loads((folder / "machine.json").read_text())["cores"] >= 1
    assert (folder / "study.png").stat().st_size > 10_000


def test_a_rerun_skips_finished_rows_and_a_changed_budget_is_refused(tiny_data, tmp_path, rows_in_process):
    args = ["depth-width", "--data", str(tiny_data), "--out", str(tmp_path), *TINY]
    assert run(*args, "--rows", "resnet20").exit_code == 0
    res = run(*args, "--rows", "resnet20,resnet20:2")
    assert res.exit_code == 0, res.output[-3000:]
    assert "resnet20 seed 0: already in" in res.output
    assert [cfg.width for cfg, _ in rows_in_process] == [1.0, 2.0], "the finished row was not trained again"
    rows = list(csv.DictReader((tmp_path / "depth-width" / "study.csv").open()))
    assert [r["row"] for r in rows] == ["resnet20", "resnet20:2"]
    bad = run(*[a if a != "1" else "2" for a in args], "--rows", "resnet20")  # --epochs 2 into the same folder
    assert bad.exit_code == 2 and "another budget" in bad.output and "epochs: 1 -> 2" in bad.output
    assert len(rows_in_process) == 2, "refused before anything trained"


def test_a_row_stopped_mid_run_goes_on_from_its_checkpoint_in_its_own_folder(tiny_data, tmp_path, rows_in_process):
    args = ["depth-width", "--data", str(tiny_data), "--out", str(tmp_path), "--rows", "resnet20", *TINY]
    assert run(*args).exit_code == 0
    folder = tmp_path / "depth-width"
    (first,) = list(csv.DictReader((folder / "study.csv").open()))
    # what a kill in the row's test pass leaves: the checkpoint of its last epoch, no metrics, no model, no table row
    run_dir = Path(first["run"])
    for name in ("metrics.json", "export.pkl", "model.safetensors", "study.csv"):
        (run_dir / name if name != "study.csv" else folder / name).unlink()
    res = run(*args)
    assert res.exit_code == 0, res.output[-3000:]
    assert f"{run_dir}: interrupted before it finished; resuming it" in res.output
    assert rows_in_process[-1][0].resume == str(run_dir), "the row was resumed, not trained again"
    (again,) = list(csv.DictReader((folder / "study.csv").open()))
    assert again["run"] == first["run"] and not run_dir.with_name(run_dir.name + "-1").exists(), "in its own folder"
    assert again["test_acc"] == first["test_acc"] and again["epochs"] == first["epochs"] == "1"


def test_a_row_with_an_unreadable_checkpoint_trains_again_and_keeps_the_file(tiny_data, tmp_path, rows_in_process):
    args = ["depth-width", "--data", str(tiny_data), "--out", str(tmp_path), "--rows", "resnet20", *TINY]
    assert run(*args).exit_code == 0
    folder = tmp_path / "depth-width"
    run_dir = Path(next(csv.DictReader((folder / "study.csv").open()))["run"])
    (run_dir / "metrics.json").unlink()
    (folder / "study.csv").unlink()
    last = run_dir / "checkpoints" / "last.pth"
    last.write_bytes(b"half a checkpoint")  # what a full disk or a copy cut short leaves
    for attempt in range(2):  # the rerun trains the row; one after it does not trip over the file again
        res = run(*args)
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output[-3000:]
        assert ("cannot be read" in res.output and "training the row again" in res.output) == (attempt == 0)
    assert len(rows_in_process) == 2 and not rows_in_process[-1][0].resume, "trained again, once, not resumed"
    kept = run_dir.with_name(run_dir.name + ".unreadable") / "checkpoints" / "last.pth"
    assert kept.read_bytes() == b"half a checkpoint", "the old folder is kept aside"
    (row,) = list(csv.DictReader((folder / "study.csv").open()))
    assert Path(row["run"]) == run_dir and (run_dir / "metrics.json").is_file(), "the retrain took the row's folder"


def test_transfer_fine_tunes_the_pretrained_row_and_gives_scratch_its_wall_time(tiny_data, tmp_path, rows_in_process):
    from cifar_fastai.studies.study import TRANSFER_SOURCE, TRANSFER_TARGET

    picked = "pretrain,50/class fine-tuned,50/class scratch"
    args = ["transfer", "--data", str(tiny_data), "--out", str(tmp_path), "--epochs", "1", "--width", "0.25"]
    res = run(*args, "--rows", picked)
    assert res.exit_code == 0, res.output[-3000:]
    (pre, _), (ft, _), (sc, _) = rows_in_process
    folder = tmp_path / "transfer"
    table = {r["row"]: r for r in csv.DictReader((folder / "study.csv").open())}
    assert pre.classes == TRANSFER_SOURCE and (pre.arch, pre.optimizer, pre.bs) == ("airbench_resnet", "muon", 250)
    assert (pre.epochs, pre.width) == (1, 0.25), "the command line reached the pretraining too"
    assert ft.classes == sc.classes == TRANSFER_TARGET and ft.train_per_class == sc.train_per_class == 50
    assert ft.init_from == table["pretrain"]["run"] and ft.freeze_epochs == 1 and sc.init_from is None
    assert ft.epochs == sc.epochs == 1, "the command line's --epochs won over the rows' own"
    assert ft.bs == sc.bs == 32 and ft.lr == sc.lr == 2e-3 and ft.optimizer == sc.optimizer == "adam"
    assert sc.time_budget == float(table["50/class fine-tuned"]["wall_s"]) > 0, "scratch gets the fine-tuned time"
    md = (folder / "study.md").read_text()
    ft_acc, sc_acc = (float(table[f"50/class {arm}"]["test_acc"]) for arm in ("fine-tuned", "scratch"))
    assert f"| {100 * (ft_acc - sc_acc):+.2f} |" in md and "finetune.png" in md
    own = next(line for line in md.splitlines() if line.startswith("Row `pretrain` trains with settings of its own"))
    assert "optimizer=muon" in own and "epochs=1," in own, "the pretraining's line says what it trained with"
    assert (Path(table["50/class fine-tuned"]["run"]) / "finetune.png").is_file()
    assert (folder / "study.png").stat().st_size > 10_000
    for rows, extra, message in [
        ("50/class scratch", ["--name", "other"], "starts from row '50/class fine-tuned'"),
        # with a budget: fine-tuning's two fits refuse it
        (picked, ["--name", "other", "--time-budget", "60"], "cannot be trained with these options"),
        (picked, [], "another budget (epochs: 1 -> per row"),  # the rows' own epochs into the 1-epoch folder
    ]:
        bad = run(*(args if extra else args[:-4] + args[-2:]), "--rows", rows, *extra)
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
    assert len(rows_in_process) == 3, "refused before anything trained"
    # a row already in the table counts as run before: the scratch arm alone again, the command line's --init-from
    # not reaching it
    lines = (folder / "study.csv").read_text().splitlines(keepends=True)
    (folder / "study.csv").write_text("".join(lines[:3]))
    res = run(*args, "--rows", "50/class scratch", "--init-from", table["pretrain"]["run"])
    assert res.exit_code == 0, res.output[-3000:]
    assert rows_in_process[-1][0].init_from is None and rows_in_process[-1][0].weights is None


def test_rows_say_their_machine_and_a_study_does_not_mix_two_kinds(tiny_data, tmp_path, rows_in_process, monkeypatch):
    amd = {"cpu": "AMD EPYC", "cores": 2, "bf16": True, "amx": False, "versions": {}}
    xeon = {**amd, "cpu": "Intel Xeon", "amx": True}
    args = ["depth-width", "--data", str(tiny_data), "--out", str(tmp_path), *TINY]
    monkeypatch.setattr(study_module, "machine", lambda: amd)
    assert run(*args, "--rows", "resnet20").exit_code == 0
    (row,) = csv.DictReader((tmp_path / "depth-width" / "study.csv").open())
    assert row["host"] == "AMD EPYC (AVX-512 BF16), 2 cores"
    assert "Machine: AMD EPYC (AVX-512 BF16), 2 cores." in (tmp_path / "depth-width" / "study.md").read_text()
    monkeypatch.setattr(study_module, "machine", lambda: xeon)  # the study moved to another kind of host
    res = run(*args, "--rows", "resnet20,resnet20:2")
    assert res.exit_code == 2 and "holds rows measured on AMD EPYC (AVX-512 BF16), 2 cores; this machine is Intel " \
        "Xeon (AMX), 2 cores" in res.output and "Traceback" not in res.output, res.output
    assert len(rows_in_process) == 1, "refused before anything trained"
    monkeypatch.setattr(study_module, "machine", lambda: amd)  # back on the first kind: it resumes
    assert run(*args, "--rows", "resnet20,resnet20:2").exit_code == 0 and len(rows_in_process) == 2


def test_bad_study_names_rows_and_seeds_end_in_one_line(tiny_data, tmp_path, rows_in_process):
    for args, message in [
        (["nosuch"], "unknown study 'nosuch': choose one of depth-width, augment, robust"),
        (["augment", "--rows", "cutout"], "--rows cutout: not a row of augment"),
        (["robust", "--seeds", "a,b"], "--seeds a,b: comma-separated integers"),
        (["search", "--rows", "x"], "--rows and --seeds pick rows; search is one search"),
        (["depth-width", "--rows", "resnet20", "--mixup", "-1"], "--mixup -1: must be at least 0"),
        (
            ["augment", "--rows", "+ mixup 0.4", "--cutmix", "1"],
            (
                "augment row '+ mixup 0.4' cannot be trained with these "
                "options: --mixup and --cutmix cannot be used together"
            ),
        ),
    ]:
        res = run(*args, "--data", str(tiny_data), "--out", str(tmp_path))
        assert res.exit_code == 2 and f"error: {message}" in res.output and "Traceback" not in res.output, res.output
    assert rows_in_process == []
    listed = run("--list")
    assert listed.exit_code == 0 and all(name in listed.output for name in STUDIES)


def test_each_row_waits_for_the_lock_other_timed_work_holds(tiny_data, tmp_path, monkeypatch):
    """--lock FILE: a row starts only once no other process holds an flock on FILE (a benchmark, another study)."""
    import fcntl
    import subprocess
    import sys
    import time

    started = []
    monkeypatch.setattr(study_module, "spawn_row", lambda cfg, explicit, measure=None: started.append(time.monotonic()))
    lock = tmp_path / "cpu.lock"
    holder = subprocess.Popen([sys.executable, "-c", (f"import fcntl, time; f = open({str(lock)!r}, 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(2)")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    held_at = time.monotonic()
    res = run("depth-width", "--data", str(tiny_data), "--out", str(tmp_path), "--rows", "resnet20", "--lock", str(lock),
              *TINY)  # fmt: skip
    assert holder.wait() == 0
    assert "1 row(s) failed" in res.output, "the stand-in row reports nothing: counted as failed, as a crashed row"
    assert len(started) == 1 and started[0] - held_at > 1.5, "the row began only after the other process let go"
    with open(lock) as f:  # and the study let go of it too
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_search_study_selects_on_folds_then_tests_the_chosen_setting_once(tiny_data, tmp_path, monkeypatch,
                                                                             rows_in_process):  # fmt: skip
    """k-fold validation picks the setting (the test images never seen by a trial), one run of it is tested, and a
    rerun trains nothing again."""
    spec = dataclasses.replace(STUDIES["search"], search=("lr=1e-4,3e-2",))  # two settings: a clear winner
    monkeypatch.setitem(STUDIES, "search", spec)
    args = ["search", "--data", str(tiny_data), "--out", str(tmp_path), "--arch", "tiny", "--folds", "2", "--bs", "16",
            "--epochs", "2", "--train-per-class", "20"]  # fmt: skip
    res = run(*args)
    assert res.exit_code == 0, res.output[-3000:]
    table = (tmp_path / "search" / "study.md").read_text()
    sweep = list(csv.DictReader((tmp_path / "search" / "sweep" / "results.csv").open()))
    assert len(sweep) == 2 and all(int(r["folds"]) == 2 for r in sweep), "each setting on both folds"
    best = max(sweep, key=lambda r: float(r["mean_valid_accuracy"]))
    metrics = json.loads((tmp_path / "search" / "chosen" / "metrics.json").read_text())
    [(chosen, _)] = rows_in_process  # the one run outside the sweep's folds: the tested one
    assert chosen.lr == float(best["lr"]) and chosen.folds == 0, "the best on validation, trained once"
    assert f"test accuracy {100 * metrics['test_accuracy']:.2f}%" in table and "| 0.0001 | 2 |" in table
    again = run(*args)
    assert again.exit_code == 0 and len(rows_in_process) == 1, "a rerun reuses the sweep and the tested run"


def test_a_refused_first_attempt_leaves_no_budget_behind_and_a_bad_lock_is_one_line(tiny_data, tmp_path,
                                                                                    rows_in_process):  # fmt: skip
    args = ["augment", "--data", str(tiny_data), "--out", str(tmp_path), "--rows", "+ mixup 0.4", *TINY]
    assert run(*args, "--cutmix", "1").exit_code == 2 and rows_in_process == []
    res = run(*args)  # corrected: not refused for the budget of the attempt that never trained
    assert res.exit_code == 0 and "another budget" not in res.output, res.output[-2000:]
    bad = run(*args, "--lock", str(tmp_path / "no" / "such" / "dir" / "cpu.lock"), "--name", "other")
    assert bad.exit_code == 2 and "error: --lock" in bad.output and "Traceback" not in bad.output, bad.output


def test_the_committed_augment_study_resumes_and_no_recipe_change_reaches_its_rows(tiny_data, tmp_path,
                                                                                   rows_in_process, monkeypatch):
    # the rows spell out the net they were trained with: a later `fast` recipe must not retrain them differently
    from cifar_fastai.training.recipes import RECIPES, Recipe

    monkeypatch.setitem(RECIPES, "fast", Recipe("fast", "another net", {"arch": "resnet18", "bs": 64}))
    monkeypatch.setattr(study_module, "check_host", lambda *a: None)  # the table was trained on another machine
    folder = tmp_path / "augment"
    folder.mkdir()
    (folder / "study.csv").write_text(Path("docs/data/augment/study.csv").read_text())
    budget = json.loads(Path("docs/data/augment/budget.json").read_text())
    (folder / "budget.json").write_text(json.dumps({**budget, "data": str(tiny_data)}))
    res = run("augment", "--data", str(tiny_data), "--out", str(tmp_path), "--rows", "baseline", "--seeds", "0")
    assert res.exit_code == 0 and "baseline seed 0: already in" in res.output, res.output[-3000:]
    assert rows_in_process == [], "the committed row is not trained again"
    res = run("augment", "--data", str(tiny_data), "--out", str(tmp_path), "--name", "new", "--rows", "baseline", *TINY)
    assert res.exit_code == 0, res.output[-3000:]
    (cfg, _), = rows_in_process
    assert (cfg.arch, cfg.bs, cfg.optimizer, cfg.progressive, cfg.recipe) == ("airbench_resnet", 250, "muon", 20, None)
