"""The named fast recipes, the whitening stem, and the time-to-accuracy benchmark (behaviour, not timings)."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

from cifar_fastai import TrainConfig
from cifar_fastai.cli import train_app
from cifar_fastai.errors import CifarFastaiError, ConfigError
from cifar_fastai.models import get_arch
from cifar_fastai.models.cifar_resnet import PatchWhiten
from cifar_fastai.training.recipes import RECIPES, apply_recipe
from cifar_fastai.training.resolve import Resolved, resolve
from tests.conftest import REPO
from tests.test_deploy import invoke, script_app


def test_recipe_fills_defaults_and_explicit_options_win():
    cfg = apply_recipe(TrainConfig(recipe="fast", epochs=2, data="sample"))
    fast = RECIPES["fast"].options
    assert cfg.arch == fast["arch"] and cfg.bs == fast["bs"] and cfg.channels_last and cfg.tta
    assert cfg.precision == "auto", "bf16 only where the CPU has bf16 instructions (emulated bf16 is far slower)"
    assert cfg.epochs == 2, "an option given with a non-default value is the user's"
    assert apply_recipe(TrainConfig()) == TrainConfig(), "no recipe: nothing changes"
    kept = apply_recipe(TrainConfig(recipe="fast"), explicit={"tta"})  # e.g. --recipe fast --no-tta
    assert not kept.tta and kept.arch == fast["arch"]
    plan = resolve(TrainConfig(recipe="fast"), explicit={"tta"})
    assert not plan.cfg.tta and resolve(plan) is plan, "resolved once: a resolved run is not resolved again"
    with pytest.raises(CifarFastaiError, match="fast, long, record"):
        apply_recipe(TrainConfig(recipe="warp"))
    # the CLI's choices for --recipe (config.py cannot import recipes.py, which imports it) are the recipes
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "recipe")
    assert set(field.metadata["choices"]) == set(RECIPES)


def test_whitening_stem_decorrelates_patches_and_is_frozen():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.3], [0.0, 0.0, 0.2]])  # strongly correlated channels
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))
    layer = PatchWhiten(24)
    layer.whiten(images)
    with torch.no_grad():
        out = layer(images)[:, :12] - layer.bias[:12, None, None]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    # the well-determined directions come out with unit variance and no correlation (eps damps the tiny ones)
    assert torch.allclose(cov[:6, :6], torch.eye(6), atol=0.1)
    assert not layer.weight.requires_grad and bool(layer.whitened)
    fresh = PatchWhiten(24)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.whitened) and not fresh.weight.requires_grad, "a reloaded stem stays whitened and frozen"


def test_airbench_resnet_is_a_resnet_with_fastai_groups():
    model = get_arch("airbench_resnet").builder(n_out=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert 1.9e6 < sum(p.numel() for p in model.parameters()) < 2.0e6  # airbench94's 1.97M
    # the registered splitter gives fastai body ... head groups that together hold every parameter once
    groups = get_arch("airbench_resnet").splitter(model)
    ids = [set(map(id, g)) for g in groups]
    assert len(ids) >= 2 and sum(map(len, ids)) == len(set().union(*ids)) == len(list(model.parameters()))
    head = [m for m in model[1].modules() if isinstance(m, torch.nn.Linear)][-1]
    stem = next(p for p in model[0].parameters() if p.dim() == 4)
    assert id(head.weight) in ids[-1] and id(stem) in ids[0], "stem first, classifier last: rates grow towards the head"


# the benchmark's own logic (the record first, the others measured against it) needs two recipes; every recipe runs
# end to end in test_each_recipe_trains_tests_and_exports_from_the_cli (a benchmark run is a process per recipe)
BENCHED = ("record", "fast")


@pytest.fixture(scope="module")
def bench(tiny_data, tmp_path_factory):
    """The time-to-accuracy benchmark of every recipe in one invocation, as a user runs it (each recipe one
    scripts/train.py process). Its host-speed probe is a stub that returns distinct speeds, so the bookkeeping
    around each run is checked without the probe's seconds of work (the probe itself: its own test)."""
    main = script_app("bench/time_to_accuracy.py", "main")
    module = main.__globals__  # the script's namespace: a fresh one, so nothing to restore
    probes = []  # (scale, speeds) per call, in order

    def probe(scale=1.0):
        speeds = {k: (len(probes) + 1) * v for k, v in module["ANCHORS"].items()}  # 1x, 2x, ... the reference
        probes.append((scale, speeds))
        return speeds

    module["host_speed"] = probe

    def train_in_process(cmd, check, cwd):
        """`python scripts/train.py ...` as the benchmark spawns it, run here (a process of imports per recipe saved;
        the script itself runs as a process in test_cli)."""
        assert cmd[:2] == [sys.executable, str(REPO / "scripts/train.py")] and check and cwd == REPO
        res = CliRunner().invoke(train_app, cmd[2:])
        assert res.exit_code == 0, res.output[-3000:]

    module["subprocess"] = types.SimpleNamespace(run=train_in_process)
    out = tmp_path_factory.mktemp("bench") / "tta.json"
    # fast runs as a variant (the recipe with an option on top, under its own name): the A/B form of the benchmark
    invoke(main, "--data", str(tiny_data), "--runs", "fast-half-tta:0", "--runs", "record:0", "--epochs", "2",
           "--variant", f"fast-half-tta=fast {' '.join(VARIANT_OPTIONS)}",
           "--train-per-class", "10", "--out", str(out), "--host-speed", "--probe-scale", "0.1")  # fmt: skip
    return json.loads(out.read_text()), out, probes


VARIANT_OPTIONS = ("--tta-select", "0.5")
RUN_NAME = {"record": "record", "fast": "fast-half-tta"}


@pytest.mark.parametrize("recipe", BENCHED)
def test_the_benchmark_runs_the_record_and_fast_recipes_end_to_end_on_tiny_data(recipe, bench):
    """Through the time-to-accuracy benchmark: train.py --recipe, JSON, curve and plot, the record as yardstick."""
    result, out, probes = bench
    assert [r["recipe"] for r in result["runs"]] == ["record", "fast-half-tta"], "the record first, whatever the order"
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1, "the figures name the host they hold for"
    name = RUN_NAME[recipe]
    i, run = next((i, r) for i, r in enumerate(result["runs"]) if r["recipe"] == name)  # i: the order they ran in
    assert run["base_recipe"] == recipe == run["config"]["recipe"]
    assert run["config"]["arch"] == RECIPES[recipe].options["arch"]
    assert run["config"]["train_per_class"] == 10 and run["config"]["epochs"] == 2, "the overrides reached train.py"
    # the variant's options reached its run, and only its run
    assert run["config"]["tta_select"] == (0.5 if recipe == "fast" else 1.0)
    run_dir = out.parent / "tta_runs" / f"{name}-seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # he2015 reports the plain test accuracy only (no TTA), as the paper does
    reported = (metrics["test_accuracy"], metrics.get("test_accuracy_tta"))
    assert (run["test_accuracy"], run["test_accuracy_tta"]) == reported
    assert ("test_accuracy_tta" in metrics) == bool(RECIPES[recipe].options.get("tta"))
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    walls = [w for w, _ in run["curve_wall_s_valid_accuracy"]]
    # one point per epoch fit (a time budget may stop a run before its 2), in the order the run made them
    assert 1 <= len(walls) == len(history) <= 2 and walls == sorted(walls) and walls[-1] <= run["process_wall_s"]
    assert [float(h["elapsed_s"]) for h in history] == sorted(float(h["elapsed_s"]) for h in history)
    summary = result["summary"][name]
    assert summary["base_recipe"] == recipe
    if recipe in ("fast", "long"):  # the baseline and the sample's first model have no full-data target
        assert summary["target"]["test_accuracy"] in (0.91, 0.93)
    # measured in the same invocation, the record's recipe is the yardstick of the others
    if recipe == "record":
        assert "vs_record" not in summary
    else:
        record = result["summary"]["record"]["process_wall_s"]["mean"]
        assert summary["vs_record"]["wall_ratio"] == pytest.approx(run["process_wall_s"] / record)
        assert summary["vs_record"]["goal"]["max_wall_ratio"] == 0.75, "a variant is held to its recipe's goal"
        budget = 0.75 * result["runs"][0]["process_wall_s"]  # and gets its recipe's budget: a share of the record's
        assert run["config"]["time_budget"] == pytest.approx(budget, abs=0.06)
    assert out.with_suffix(".png").stat().st_size > 0
    # the host measured right before and right after this run, at the probe scale asked for, and averaged
    assert [scale for scale, _ in probes] == [0.1] * 2 * len(BENCHED)
    (_, before), (_, after) = probes[2 * i : 2 * i + 2]
    speed = run["host_speed"]
    assert speed["before"] == before and speed["after"] == after
    assert speed["resnet18_bare_step_images_per_s_vs_issue"] == pytest.approx(2 * i + 1.5)  # (2i+1 + 2i+2) / 2
    assert summary["host_speed_vs_issue"]["docs_recipe_images_per_s"]["mean"] == pytest.approx(2 * i + 1.5)


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - set(BENCHED)))
def test_each_recipe_trains_tests_and_exports_from_the_cli(recipe, tiny_data, tmp_path):
    res = CliRunner().invoke(train_app, ["--data", str(tiny_data), "--recipe", recipe, "--epochs", "2",
                                         "--train-per-class", "10", "--out", str(tmp_path), "--name", recipe])  # fmt: skip
    assert res.exit_code == 0, res.output[-2000:]
    run_dir = tmp_path / recipe
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["recipe"] == recipe and config["arch"] == RECIPES[recipe].options["arch"]
    assert all(config[k] == v for k, v in RECIPES[recipe].options.items() if k != "epochs"), "the recipe's settings"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert ("test_accuracy_tta" in metrics) == bool(RECIPES[recipe].options.get("tta"))
    assert 1 <= len(list(csv.DictReader((run_dir / "history.csv").open()))) <= 2 and (run_dir / "export.pkl").exists()


def test_benchmark_variants_parse_into_a_recipe_and_options_and_refuse_what_is_not_one():
    import typer

    parse = script_app("bench/time_to_accuracy.py", "parse_variants")
    assert parse(["fast-sel=fast --select 0.5 --ema 0.99", "l=long"]) == {
        "fast-sel": ("fast", ["--select", "0.5", "--ema", "0.99"]),
        "l": ("long", []),
    }
    for bad in ("fast --select 0.5", "=fast", "x=", "x=--select 0.5", "a:b=fast"):
        with pytest.raises(typer.BadParameter, match="NAME=RECIPE"):
            parse([bad])
    with pytest.raises(typer.BadParameter, match="a recipe's name"):  # its runs would pass for the plain recipe's
        parse(["fast=fast --select 0.5"])


def test_benchmark_says_how_much_sooner_each_recipe_reaches_the_docs_recipes_accuracy():
    """With the fastai-docs recipe in the same invocation, each recipe's summary has `vs_docs`: the docs runs' mean
    test accuracy, the wall time at which each run's curve first reached it, and the speedup over the docs runs."""
    summarize = script_app("bench/time_to_accuracy.py", "summarize")

    def run(recipe, wall, acc, curve, tta=None):
        return {"recipe": recipe, "base_recipe": recipe, "options": [], "config": {}, "host_speed": None,
                "process_wall_s": wall, "test_accuracy": acc, "test_accuracy_tta": tta,
                "curve_wall_s_valid_accuracy": curve}  # fmt: skip

    docs = [run("docs", 1000.0, 0.80, [(200.0, 0.6), (1000.0, 0.80)])]
    fast = [run("fast", 300.0, 0.88, [(50.0, 0.7), (100.0, 0.81), (250.0, 0.88)], tta=0.89),
            run("fast", 320.0, 0.87, [(50.0, 0.7), (150.0, 0.80), (270.0, 0.87)], tta=0.88),
            # the curve stays under, the final test pass reaches it: the whole run counts
            run("fast", 340.0, 0.81, [(60.0, 0.7), (300.0, 0.79)])]  # fmt: skip
    late = [run("record", 900.0, 0.70, [(900.0, 0.70)])]  # never reaches it: no speedup
    out = summarize([*docs, *fast, *late])
    v = out["fast"]["vs_docs"]
    assert v["docs_test_accuracy"] == 0.80 and v["wall_s_to_docs_accuracy"] == [100.0, 150.0, 340.0]
    assert v["speedup"] == pytest.approx(1000.0 / ((100 + 150 + 340) / 3))
    assert v["wall_ratio"] == pytest.approx(320.0 / 1000.0)
    assert v["test_accuracy_points"] == pytest.approx(100 * ((0.89 + 0.88 + 0.81) / 3 - 0.80))
    assert out["record"]["vs_docs"]["speedup"] is None and out["record"]["vs_docs"]["wall_s_to_docs_accuracy"] == [None]
    assert "vs_docs" not in out["docs"] and "vs_docs" not in summarize([*fast, *late])["fast"]


def test_interleaved_benchmark_runs_in_rounds_each_budget_from_its_rounds_record(tmp_path, monkeypatch):
    """--interleave: record, fast, record, fast; each fast run's budget a share of the record run just before it (not
    of the mean), and vs_record.paired compares each run with its own round's record."""
    main = script_app("bench/time_to_accuracy.py", "main")
    module = main.__globals__
    walls = {("record", 0): 1000.0, ("record", 1): 1200.0, ("fast", 0): 700.0, ("fast", 1): 880.0}
    accs = {("record", 0): 0.90, ("record", 1): 0.91, ("fast", 0): 0.905, ("fast", 1): 0.905}
    ran = []

    def run_one(recipe, seed, data, runs, extra, *args, name=None, **kwargs):
        ran.append((name or recipe, seed, extra))
        key = (name or recipe, seed)
        return {"recipe": key[0], "base_recipe": recipe, "options": extra, "seed": seed, "config": {},
                "process_wall_s": walls[key], "train_images_per_s": 1.0, "test_accuracy": accs[key] - 0.01,
                "test_accuracy_tta": accs[key], "valid_accuracy": 0.5, "curve_wall_s_valid_accuracy": [(1.0, 0.5)],
                "host_speed": None}  # fmt: skip

    monkeypatch.setitem(module, "run_one", run_one)
    monkeypatch.setitem(module, "plot", lambda runs, path: None)
    out = tmp_path / "tta.json"
    invoke(main, "--runs", "fast:0,1", "--runs", "record:0,1", "--interleave", "--no-host-speed", "--out", str(out))
    assert [(n, s) for n, s, _ in ran] == [("record", 0), ("fast", 0), ("record", 1), ("fast", 1)]
    budgets = [extra[extra.index("--time-budget") + 1] for n, _, extra in ran if n == "fast"]
    assert budgets == ["750.0", "900.0"], "0.75x the round's own record run"
    paired = json.loads(out.read_text())["summary"]["fast"]["vs_record"]["paired"]
    assert [p["test_accuracy_points"] for p in paired["pairs"]] == pytest.approx([0.5, -0.5])
    assert [p["wall_ratio"] for p in paired["pairs"]] == pytest.approx([0.7, 880 / 1200])
    assert paired["points_mean"] == pytest.approx(0.0) and paired["points_min"] == pytest.approx(-0.5)
    # without it: every record run first, and every budget a share of their mean
    ran.clear()
    invoke(main, "--runs", "fast:0,1", "--runs", "record:0,1", "--no-host-speed", "--out", str(out))
    assert [(n, s) for n, s, _ in ran] == [("record", 0), ("record", 1), ("fast", 0), ("fast", 1)]
    assert {extra[extra.index("--time-budget") + 1] for n, _, extra in ran if n == "fast"} == {"825.0"}


def test_a_benchmark_folder_refuses_a_run_asked_with_other_options(tmp_path, monkeypatch):
    """Runs are reused by folder name: one trained with other options (a variant redefined) is refused, not mixed in;
    the --time-budget the benchmark computes anew each invocation is not an option that differs."""
    run_one = script_app("bench/time_to_accuracy.py", "run_one")
    folder = tmp_path / "v-seed0"
    module = run_one.__globals__
    spawned = []

    def train(cmd, **kwargs):  # what train.py leaves when it is stopped before the end: its folder, no metrics
        spawned.append(cmd)
        folder.mkdir(exist_ok=True)

    monkeypatch.setitem(module, "subprocess", types.SimpleNamespace(run=train))
    monkeypatch.setitem(module, "host_speed", lambda scale=1.0: None)
    with pytest.raises(FileNotFoundError):  # the stand-in trains nothing: no metrics.json to read
        run_one("fast", 0, "sample", tmp_path, ["--select", "0.5", "--time-budget", "400"], False, name="v")
    assert len(spawned) == 1 and json.loads((folder / "bench_run.json").read_text()) == {
        "recipe": "fast", "options": ["--select", "0.5"]}
    (folder / "config.json").write_text("{}")  # as if train.py had started, then been stopped
    with pytest.raises(FileNotFoundError):  # same options, another budget: the same run, continued
        run_one("fast", 0, "sample", tmp_path, ["--select", "0.5", "--time-budget", "300"], False, name="v")
    assert spawned[-1][2:] == ["--resume", str(folder)]
    with pytest.raises(SystemExit, match="holds a run of fast --select 0.5, not of fast --select 0.25"):
        run_one("fast", 0, "sample", tmp_path, ["--select", "0.25"], False, name="v")
    assert len(spawned) == 2


def test_host_speed_probe_scales_its_work_and_reports_the_reference_ratios(monkeypatch):
    """The benchmark's probe runs bench/train_speed.py's two measurements, cut to the scale asked for."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train_speed

    calls = {}

    def call_through(name):
        measure = getattr(train_speed, name)

        def spy(*args, **kwargs):
            calls[name] = (args, kwargs, measure(*args, **kwargs))
            return calls[name][-1]

        return spy

    for name in ("bare_step", "docs_recipe"):
        monkeypatch.setattr(train_speed, name, call_through(name))
    host_speed = script_app("bench/time_to_accuracy.py", "host_speed")
    speed = host_speed(0.05)
    assert calls["bare_step"][1]["steps"] == 1 and calls["docs_recipe"][1]["per_class"] == 10, "the smallest probe"
    assert speed == {"resnet18_bare_step_images_per_s": calls["bare_step"][-1]["images_per_s"],
                     "docs_recipe_images_per_s": calls["docs_recipe"][-1]["epoch_images_per_s"]}  # fmt: skip
    mean_speed = script_app("bench/time_to_accuracy.py", "mean_speed")
    ref = host_speed.__globals__["ANCHORS"]
    both = mean_speed({k: v for k, v in ref.items()}, {k: 3 * v for k, v in ref.items()})
    assert both["resnet18_bare_step_images_per_s"] == 2 * ref["resnet18_bare_step_images_per_s"]
    assert both["docs_recipe_images_per_s_vs_issue"] == pytest.approx(2.0)
    assert both["after"]["docs_recipe_images_per_s"] == 3 * ref["docs_recipe_images_per_s"]


def test_cli_options_given_with_a_recipe_win_even_at_their_default(monkeypatch):
    from cifar_fastai import cli
    from cifar_fastai.training import distributed

    seen = []
    monkeypatch.setattr(distributed, "launch", lambda job: seen.append(job))
    r = CliRunner().invoke(cli.train_app, ["--recipe", "fast", "--no-tta", "--bs", "256", "--epochs", "3"])
    assert r.exit_code == 0, r.output
    # the job closes over the config the command built; read it back from the closure
    cfg = next(c.cell_contents.cfg for c in seen[0].__closure__ if isinstance(c.cell_contents, Resolved))
    assert (cfg.recipe, cfg.arch, cfg.tta, cfg.bs, cfg.epochs) == ("fast", "airbench94", False, 256, 3)


# ---- Muon + Nesterov SGD (airbench94_muon), the linear schedule and the 6-view TTA
def test_muon_groups_split_filters_from_biases_and_head():
    from cifar_fastai.training.optim import muon_groups

    model = get_arch("airbench_resnet").builder(n_out=10, width=0.5)
    groups = muon_groups([list(model.parameters())], bs=500, lr=0.24)
    filters, biases, head = groups
    assert filters["muon"] and all(p.ndim == 4 for p in filters["params"])
    assert all(p.ndim == 1 for p in biases["params"]) and [p.ndim for p in head["params"]] == [2]
    # the record's summed-loss rates, as mean-loss rates for this batch size: 0.053 and 0.67 per example x 500
    assert biases["lr_scale"] * 0.24 == pytest.approx(0.053 * 500) and head["lr_scale"] * 0.24 == pytest.approx(
        0.67 * 500
    )
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters())), "every parameter in exactly one group"


def test_newton_schulz_flattens_the_spectrum():
    from cifar_fastai.training.optim import newton_schulz

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(576, 64))
    g = u @ torch.diag(torch.logspace(0, 1, 64)) @ v.T  # wide, singular values 1 ... 10
    s_out = torch.linalg.svdvals(newton_schulz(g).float())
    # 3 steps bring the spectrum into about [0.5, 1.5] (Jordan 2024): a 10x spread becomes < 3x
    assert 0.5 < s_out.min() and s_out.max() < 1.5
    assert newton_schulz(g.T).shape == (576, 64)


def test_the_iteration_runs_in_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    from cifar_fastai.training import hardware
    from cifar_fastai.training.optim import MuonSGD, iteration_dtype

    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    for flags, dtype in (({"avx2"}, torch.float32), ({"avx2", "avx512_bf16"}, torch.bfloat16),
                         ({"avx2", "amx_bf16"}, torch.bfloat16)):  # fmt: skip
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        opt = MuonSGD([{"params": [w], "muon": True}], lr=0.1)
        assert opt.iteration_dtype == iteration_dtype(torch.device("cpu")) == dtype, flags
    assert iteration_dtype(torch.device("cuda")) == torch.bfloat16, "a GPU computes bf16 natively"
    calls = []
    from cifar_fastai.training import optim

    real = optim.newton_schulz
    monkeypatch.setattr(optim, "newton_schulz", lambda g, **kw: calls.append(kw["dtype"]) or real(g, **kw))
    w.grad = torch.randn_like(w)
    opt.step()  # the last one: a bf16 CPU
    assert calls == [torch.bfloat16], "the step orthogonalizes in the optimizer's precision"


def test_muon_sgd_step_matches_torch_sgd_on_the_sgd_groups_and_keeps_filter_norms():
    from cifar_fastai.training.optim import MuonSGD

    torch.manual_seed(0)
    w, b = torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    b_ref = b.detach().clone().requires_grad_(True)
    groups = [{"params": [w], "muon": True}, {"params": [b], "momentum": 0.85, "weight_decay": 0.01, "lr_scale": 2.0}]
    ours = MuonSGD(groups, lr=0.1, momentum=0.6)
    ref = torch.optim.SGD([b_ref], lr=0.2, momentum=0.85, nesterov=True, weight_decay=0.01)
    for _ in range(3):
        grad_w, grad_b = torch.randn_like(w), torch.randn_like(b)
        w.grad, b.grad, b_ref.grad = grad_w, grad_b, grad_b.clone()
        ours.step()
        ref.step()
    assert torch.allclose(b, b_ref, atol=1e-6)
    # each step renormalizes the filter bank to sqrt(out_channels), then moves it by lr x an ~orthogonal update
    assert abs(w.detach().norm() - 8**0.5) < 0.1 * 8**0.5


def test_muon_recipe_trains_with_a_linear_decay_to_zero(tiny_data):
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, optimizer="muon", schedule="linear",
                      lr=0.2, bs=32, epochs=3, valid_pct=0.2)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    fit(learn, cfg, [])
    lrs = learn.recorder.lrs
    assert lrs[0] == pytest.approx(0.2) and lrs[-1] < 0.2 / len(lrs) * 1.5 and lrs == sorted(lrs, reverse=True)
    assert learn.recorder.values[-1][-2] > 0.5, "learns the colour-coded tiny set"  # accuracy
    stem = learn.model[0].whiten[0]
    assert bool(stem.whitened) and not stem.weight.requires_grad, "Muon leaves the whitened stem alone"


def test_whitening_bias_trains_for_its_first_epochs_then_freezes(tiny_data):
    from fastai.callback.core import Callback

    from cifar_fastai.callbacks.fast import WhitenInit
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    class Watch(Callback):  # the stem's bias at the end of every training epoch
        order = 50

        def before_fit(self):
            self.seen = []

        def after_train(self):
            bias = self.learn.model[0].whiten[0].bias
            self.seen.append((bias.detach().clone(), bias.requires_grad))

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, optimizer="muon", schedule="linear",
                      lr=0.2, bs=32, epochs=3, valid_pct=0.2)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    learn.cbs.filter(lambda cb: isinstance(cb, WhitenInit))[0].bias_epochs = 1
    watch = Watch()
    fit(learn, cfg, [watch])
    (b0, grad0), (b1, grad1), (b2, grad2) = watch.seen
    assert grad0 and not grad1 and not grad2, "trained in epoch 1 only (airbench94_muon: its first 3 of 8)"
    assert not torch.equal(b0, torch.zeros_like(b0)), "it did train in epoch 1"
    assert torch.equal(b0, b1) and torch.equal(b1, b2), "frozen afterwards: no step moves it, momentum included"
    assert learn.model[0].whiten[0].bias.requires_grad, "the model leaves the fit as it came (export, a later fit)"


def test_muon_refuses_what_its_rates_were_not_set_for():
    from cifar_fastai.errors import ConfigError
    from cifar_fastai.training.learner import opt_settings

    ok = TrainConfig(arch="airbench_resnet", optimizer="muon", schedule="linear")
    assert opt_settings(ok)["wd"] is None
    for bad, match in [  # refused when the config is made, before any learner
        (lambda: ok.replace(pretrained=True), "from scratch"),
        (lambda: ok.replace(arch="resnet18"), "is for the airbench nets .*airbench96; got resnet18"),
        (lambda: ok.replace(schedule="one_cycle"), "schedule linear"),
        (lambda: TrainConfig(pretrained=True, schedule="linear"), "from scratch"),
    ]:
        with pytest.raises(ConfigError, match=match):
            bad()


def test_a_recipe_with_pretrained_weights_keeps_adamw():
    cfg = apply_recipe(TrainConfig(recipe="fast", pretrained=True))
    assert (cfg.optimizer, cfg.schedule, cfg.lr) == ("adam", "one_cycle", None)
    assert cfg.alt_flip and cfg.tta, "the rest of the recipe still applies"


def test_airbench_batchnorm_trains_only_its_bias():
    model = get_arch("airbench_resnet").builder(n_out=10)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad and m.eps == 1e-12 for m in bns)


def test_airbench94_is_the_same_net_without_the_residual_adds():
    """`--recipe record`'s net: airbench_resnet's layers and weights, but each group ends in its second conv's output."""
    torch.manual_seed(0)
    plain, res = (get_arch(a).builder(n_out=10) for a in ("airbench94", "airbench_resnet"))
    res.load_state_dict(plain.state_dict())
    group_p, group_r = plain[0].layer1.eval(), res[0].layer1.eval()
    x = torch.randn(2, 24, 16, 16)
    with torch.no_grad():
        first = group_p.act(group_p.bn1(group_p.pool(group_p.conv1(x))))
        second = group_p.act(group_p.bn2(group_p.conv2(first)))
        assert torch.allclose(group_p(x), second) and torch.allclose(group_r(x), first + second)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in res.parameters())


def test_lookahead_follows_airbench94s_average_and_resets_the_net_to_it():
    from types import SimpleNamespace

    from cifar_fastai.callbacks.fast import Lookahead

    net = torch.nn.Linear(2, 1, bias=False)
    cb = Lookahead(every_images=4, start=0.5, base=0.5, power=1.0)
    learn = cb.learn = SimpleNamespace(model=net, training=True, pct_train=0.2, yb=(torch.zeros(4),))
    cb.before_fit()

    def bump():
        with torch.no_grad():
            net.weight.add_(1.0)

    cb.after_batch()
    assert cb.ema is None, "nothing before 'start' of the training"
    learn.pct_train = 0.5
    cb.after_batch()  # the first update only takes a copy
    w0 = net.weight.detach().clone()
    assert torch.equal(cb.ema["weight"], w0)
    bump()
    learn.pct_train = 1.0
    cb.after_batch()  # decay 0.5 * 1.0 ** 1: halfway to the net, which is set to the average
    assert torch.allclose(net.weight, w0 + 0.5) and torch.equal(cb.ema["weight"], net.weight)
    bump()
    learn.yb = (torch.zeros(2),)
    cb.after_batch()  # 2 images: not yet 4 since the last update
    assert torch.allclose(net.weight, w0 + 1.5)
    learn.training = False
    cb.after_batch()  # validation batches change nothing
    cb.after_train()  # the epoch ends on the average: steps since the last update are dropped (airbench94)
    assert torch.allclose(net.weight, w0 + 0.5)


def test_lookahead_runs_from_the_cli(tiny_data, tmp_path, monkeypatch):
    from cifar_fastai.callbacks.fast import Lookahead

    averaged = []  # at each epoch's end: did the callback hold an average it reset the net to?
    after_train = Lookahead.after_train

    def spy(self):
        averaged.append(self.ema is not None)
        after_train(self)

    monkeypatch.setattr(Lookahead, "after_train", spy)
    # airbench94's interval (5,120 images) is more than the tiny set's three epochs: step every 64 images instead
    monkeypatch.setattr(Lookahead.__init__, "__defaults__", (64, *Lookahead.__init__.__defaults__[1:]))
    res = CliRunner().invoke(train_app, ["--data", str(tiny_data), "--recipe", "fast", "--width", "0.25", "--bs", "32",
                                         "--epochs", "3", "--lookahead", "--no-tta", "--time-budget", "0",
                                         "--out", str(tmp_path), "--name", "la"])  # fmt: skip
    assert res.exit_code == 0, res.output[-2000:]
    assert averaged == [False, True, True], "no average before 30% of training, then one at every epoch's end"
    cfg = json.loads((tmp_path / "la" / "config.json").read_text())
    assert cfg["config"]["lookahead"] and (tmp_path / "la" / "export.pkl").exists()


def test_tta_views_are_the_mirror_and_one_pixel_shifts():
    from types import SimpleNamespace

    from cifar_fastai.evaluation.report import TTA_VIEWS, View

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)

    def view(flip, shift):
        cb = View(flip, shift)
        cb.learn = SimpleNamespace(xb=(x,))
        cb.before_batch()
        return cb.learn.xb[0]

    assert torch.equal(view(False, 0), x) and torch.equal(view(True, 0), x.flip(-1))
    down_right, up_left = view(False, -1), view(False, 1)
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1]) and torch.equal(
        up_left[..., :-1, :-1], x[..., 1:, 1:]
    )
    assert torch.equal(view(True, 1), up_left.flip(-1))
    assert sum(w for *_, w in TTA_VIEWS) == pytest.approx(1.0) and len({v[:2] for v in TTA_VIEWS}) == 6


def test_tta_reuses_the_plain_test_pass_without_changing_the_result(tiny_data):
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.evaluation.report import Interpretation, tta_preds
    from cifar_fastai.training.learner import create_learner, norm_stats

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=32, valid="test")
    data = get_data(cfg, norm_stats(cfg))
    learn = create_learner(cfg, data)
    interp = Interpretation.from_dl(learn, data.test_dl, data.vocab)
    assert torch.allclose(interp.preds, interp.logits.softmax(1)) and interp.preds.argmax(1).equal(interp.decoded)
    full, targs = tta_preds(learn, data.test_dl)
    reused, targs2 = tta_preds(learn, data.test_dl, plain=interp.logits)
    assert torch.allclose(full, reused, atol=1e-5) and targs.equal(targs2) and targs.equal(interp.targs)


def test_alternating_flip_mirrors_each_image_in_exactly_one_of_two_epochs():
    from cifar_fastai.data.tensor_loader import TensorDL, TensorImageSet

    n = 400
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[..., 0] = 255  # a bright left column: mirrored images have it on the right
    ds = TensorImageSet(images, torch.zeros(n, dtype=torch.long), torch.arange(n).numpy(), ["a"], 0)
    dl = TensorDL(ds, alt_flip_seed=0, bs=n)

    def mirrored(phase):
        dl.flip_phase = phase
        x, _ = dl.create_batch(list(range(n)))
        return x[:, 0, 0, -1] == 255

    first, second = mirrored(0), mirrored(1)
    assert 0.4 < first.float().mean() < 0.6, "about half in the first epoch"
    assert torch.equal(first, ~second), "the other half in the next"
    plain = TensorDL(ds, bs=n).create_batch(list(range(n)))[0]
    assert torch.equal(plain, images), "without the option the loader never mirrors"
    copy = dl.new(shuffle=False)  # fastai's DataLoader.new, as lr_find, get_preds and callbacks use it
    assert torch.equal(copy.flip_bits, dl.flip_bits) and copy.flip_phase == dl.flip_phase == 1
    assert dl.new(alt_flip_seed=None).flip_bits is None, "and can be told to drop it"


def test_alternate_flip_callback_sets_the_phase_from_the_epoch_even_through_a_wrapper():
    from types import SimpleNamespace

    from cifar_fastai.callbacks.fast import AlternateFlip
    from cifar_fastai.data.tensor_loader import TensorDL, TensorImageSet

    ds = TensorImageSet(
        torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), torch.arange(8).numpy(), ["a"], 0
    )
    for wrap in (lambda dl: dl, lambda dl: SimpleNamespace(dl=dl)):  # plain, and like fastai's DistributedDL
        dl = TensorDL(ds, alt_flip_seed=0, bs=8)
        cb = AlternateFlip()
        for epoch, phase in [(0, 0), (3, 1), (4, 0)]:  # parity of the epoch, so a resumed run flips the same way
            cb.learn = SimpleNamespace(dls=SimpleNamespace(train=wrap(dl)), epoch=epoch)
            cb.before_epoch()
            assert dl.flip_phase == phase


def test_progressive_sizes_grow_in_equal_stages_and_end_at_full_size():
    from cifar_fastai.training.recipes import progressive_size

    assert [progressive_size(e, 16, 20, 32) for e in range(16)] == [20] * 4 + [24] * 4 + [28] * 4 + [32] * 4
    assert [progressive_size(e, 3, 24, 32) for e in range(3)] == [24, 28, 32]
    assert progressive_size(0, 1, 24, 32) == 32, "a one-epoch run trains at full size"
    assert [progressive_size(e, 2, 20, 32) for e in range(2)] == [20, 32], "fewer epochs than stages: still ends at 32"
    assert [progressive_size(e, 18, 20, 32) for e in range(18)] == [20] * 5 + [24] * 4 + [28] * 5 + [32] * 4
    assert [progressive_size(e, 5, 0, 32) for e in range(5)] == [32] * 5, "start 0: off, every epoch at full size"


def test_progressive_shares_set_the_stage_lengths_and_scale_with_the_epochs():
    from cifar_fastai.config import parse_shares
    from cifar_fastai.training.recipes import progressive_size

    shares = parse_shares("7,5,3,2", 20, 32)
    stages = [20] * 7 + [24] * 5 + [28] * 3 + [32] * 2
    assert [progressive_size(e, 17, 20, 32, shares=shares) for e in range(17)] == stages
    # a run cut to fewer epochs (--time-budget) keeps the proportions and still ends at full size
    assert [progressive_size(e, 12, 20, 32, shares=shares) for e in range(12)] == [20] * 5 + [24] * 4 + [28] * 2 + [32]
    equal = parse_shares("1,1,1,1", 20, 32)
    assert all(progressive_size(e, n, 20, 32, shares=equal) == progressive_size(e, n, 20, 32)
               for n in range(1, 30) for e in range(n)), "equal shares: the default stages"  # fmt: skip
    assert parse_shares("", 20, 32) == ()
    for bad in ("7,5,3", "7,5,3,0", "a,b,c,d", "nan,1,1,1", "inf,1,1,1"):
        with pytest.raises(ConfigError, match="one positive number per stage.*20, 24, 28, 32 px"):
            parse_shares(bad, 20, 32)
    with pytest.raises(ConfigError, match="it is off"):
        parse_shares("1,1", 0, 32)


class _SizeSpy:
    def __init__(self):
        self.seen = []

    def __call__(self, learn):
        self.seen.append((learn.epoch, learn.training, tuple(learn.xb[0].shape[-2:])))


def test_progressive_resize_shrinks_training_batches_only(tiny_data):
    from fastai.callback.core import Callback

    from cifar_fastai.callbacks.fast import ProgressiveResize
    from cifar_fastai.data.loaders import get_data
    from cifar_fastai.training.learner import create_learner, norm_stats
    from cifar_fastai.training.run import fit

    spy = _SizeSpy()

    class Spy(Callback):
        order = 50  # after ProgressiveResize

        def before_batch(self):
            spy(self.learn)

    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=32, epochs=3, valid_pct=0.2,
                      channels_last=True)  # fmt: skip
    learn = create_learner(cfg, get_data(cfg, norm_stats(cfg)))
    fit(learn, cfg, [ProgressiveResize(24, 32), Spy()])
    train_sizes = {e: s for e, t, s in spy.seen if t}
    assert train_sizes == {0: (24, 24), 1: (28, 28), 2: (32, 32)}
    assert {s for _, t, s in spy.seen if not t} == {(32, 32)}, "validation stays at full size"


def test_progressive_runs_from_the_cli_and_refuses_a_start_above_the_size(tiny_data, tmp_path, monkeypatch):
    from fastai.callback.core import Callback

    from cifar_fastai.training import run

    spy = _SizeSpy()

    class Spy(Callback):
        order = 50  # after ProgressiveResize

        def before_batch(self):
            spy(self.learn)

    callbacks = run.run_callbacks  # the run's own callbacks, and the spy after them
    monkeypatch.setattr(run, "run_callbacks", lambda *a, **k: [*callbacks(*a, **k), Spy()])
    res = CliRunner().invoke(train_app, ["--data", str(tiny_data), "--arch", "airbench_resnet", "--width", "0.25",
                                         "--epochs", "2", "--bs", "32", "--train-per-class", "10", "--progressive", "24",
                                         "--out", str(tmp_path), "--name", "p"])  # fmt: skip
    assert res.exit_code == 0, res.output[-2000:]
    assert {e: s for e, t, s in spy.seen if t} == {0: (24, 24), 1: (32, 32)}, "--progressive 24 resized the training"
    assert json.loads((tmp_path / "p" / "config.json").read_text())["config"]["progressive"] == 24
    for args, message in [
        (["--progressive", "32"], "--progressive 32"),
        (["--progressive", "24", "--progressive-shares", "3,1"], "--progressive-shares 3,1"),
    ]:
        out = tmp_path / "refused"
        bad = CliRunner().invoke(train_app, ["--data", str(tiny_data), *args, "--out", str(out)])
        assert bad.exit_code == 2 and isinstance(bad.exception, SystemExit), bad.output[-2000:]
        assert f"error: {message}" in bad.output
        assert not list(out.glob("*")), "no empty run folder left behind"
