"""The project's CIFAR ResNets: every arch trains a step, published sizes, freezing by layer groups, the study command."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_arch, get_data, list_archs
from cifar_fastai.cli import compare_app
from cifar_fastai.models.cifar_resnet import Scale, fold_head_scale, zero_init_residual
from cifar_fastai.studies.compare import CompareError, compare, parse_grid
from cifar_fastai.training.learner import create_learner
from cifar_fastai.training.resolve import resolve


def build(name: str, width: float = 1.0) -> torch.nn.Module:
    return get_arch(name).builder(n_out=10, width=width, dropout=0.0)


@pytest.fixture(scope="module")
def data(tiny_data):
    """Loaders only for their vocab: each model is built by `create_learner`, as a run builds it."""
    return get_data(TrainConfig(data=str(tiny_data), bs=2), verbose=False)


# Deeper nets of a family differ only in their block counts: cifar_resnet50 stands for the 101 and 152 layer ones
# (same builder); one basic-block and one bottleneck torchvision ResNet, and timm's, stand for theirs.
DEEP = {"cifar_resnet101", "cifar_resnet152"}


@pytest.mark.parametrize("name", [*sorted(set(list_archs("cifar")) - DEEP), "resnet18", "resnet50", "timm/resnet18"])
def test_archs_train_a_step_on_cifar_sized_images(name, data):
    torch.manual_seed(0)
    model = create_learner(TrainConfig(arch=name, bs=2), data).model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# He et al. 2015 table 6 (option-A shortcuts) and the CIFAR-stem ResNet-18 (kuangliu/pytorch-cifar, 11.17M).
@pytest.mark.parametrize(
    "name, published", [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6), ("cifar_resnet18", 11.17e6)]
)
def test_parameter_counts_match_the_papers(name, published):
    n = sum(p.numel() for p in build(name).parameters())
    assert abs(n - published) / published < 0.02, f"{name}: {n:,} parameters, published {published:,.0f}"


def test_the_larger_airbench_rungs_have_their_published_shapes():
    """airbench95: the plain two-conv groups at 128/384/384; airbench96: 128/512/512 with a third conv per group,
    the residual over the last two and the activation after the sum (Jordan 2024)."""
    import torch.nn.functional as F

    for name, widths, convs in [("airbench95", [128, 384, 384], 2), ("airbench96", [128, 512, 512], 3)]:
        body = build(name)[0]
        groups = [body.layer1, body.layer2, body.layer3]
        assert [g.conv1.out_channels for g in groups] == widths
        assert all(sum(isinstance(m, torch.nn.Conv2d) for m in g.modules()) == convs for g in groups), name
    g = build("airbench96", 0.25)[0].layer2.eval()
    for bn in (g.bn1, g.bn2, g.bn3):  # statistics that are not the identity, so a misplaced one shows
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, g.conv1.in_channels, 16, 16)
    x0 = F.gelu(g.bn1(F.max_pool2d(g.conv1(x), 2)))
    expected = F.gelu(x0 + g.bn3(g.conv3(F.gelu(g.bn2(g.conv2(x0))))))
    assert torch.allclose(g(x), expected, atol=1e-5)
    assert TrainConfig(arch="airbench96", optimizer="muon", schedule="linear").arch == "airbench96", "Muon trains it"


def test_width_multiplier_and_zero_init():
    narrow, wide = build("resnet20", 1.0), build("resnet20", 2.0)
    n1, n2 = (sum(p.numel() for p in m.parameters()) for m in (narrow, wide))
    assert 3.5 < n2 / n1 < 4.1, "double width ~ four times the conv parameters"
    x = torch.randn(2, 16, 8, 8)
    block = narrow[0].layer1[0].eval()
    assert zero_init_residual(narrow) == 9  # 3 stages x 3 blocks
    assert torch.allclose(block(x), torch.relu(x)), "a zero-initialised block starts as the identity (then ReLU)"


def test_freeze_trains_only_the_head_and_groups_unfreeze_in_order(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), arch="resnet20", bs=32, out=str(tmp_path))
    learn = create_learner(cfg, get_data(cfg, verbose=False))
    learn.freeze()
    assert len(learn.opt.param_lists) == 3, "stem+early stages / late stages / head, like torchvision ResNets"
    body, head = learn.model[0], learn.model[1]
    convs = {k: v.clone() for k, v in body.state_dict().items() if k.endswith(("conv1.weight", "conv2.weight"))}
    head_before = head[-1].weight.clone()
    learn.fit(1, 1e-2)
    after = body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in convs.items()), "frozen body convs moved"
    assert not torch.equal(head[-1].weight, head_before), "the head did not train"
    learn.freeze_to(-2)
    trainable = [any(p.requires_grad for p in g if p.ndim > 1) for g in learn.opt.param_lists]
    assert trainable == [False, True, True]
    # the groups `slice(lo, hi)` spreads rates over: early stages, late stages, head
    groups = [set(map(id, g)) for g in learn.opt.param_lists]
    linear = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    assert {id(p) for p in body.layer1.parameters()} <= groups[0]
    assert {id(p) for p in body.layer3.parameters()} <= groups[1]
    assert {id(p) for p in linear.parameters()} <= groups[2]


def test_compare_runs_end_to_end_and_resumes(tiny_data, tmp_path, capsys, monkeypatch):
    from cifar_fastai.studies import study as study_module
    from cifar_fastai.studies.compare import run_row

    base = TrainConfig(data=str(tiny_data), epochs=1, bs=16, lr=1e-2, out=str(tmp_path), train_per_class=20)
    with monkeypatch.context() as m:  # the first row in this process, the second in its own (what users get)
        m.setattr(study_module, "spawn_row", lambda cfg, explicit, measure=None: run_row(resolve(cfg, explicit)))
        compare(base, parse_grid("tiny"), study="s")
    compare(base, parse_grid("tiny,tiny:0.5"), study="s")  # resumes: only the new row trains
    assert "tiny seed 42: already in" in capsys.readouterr().out
    study = tmp_path / "s"
    rows = list(csv.DictReader((study / "study.csv").open()))
    assert [(r["row"], r["arch"], float(r["width"])) for r in rows] == [("tiny", "tiny", 1.0), ("tiny:0.5", "tiny", 0.5)]
    wide, narrow = rows
    assert float(wide["params_m"]) > float(narrow["params_m"]) and float(wide["mflops"]) > float(narrow["mflops"])
    assert all(float(r["test_acc"]) > 0.3 for r in rows)
    for r in rows:  # each row reports its own run, and the memory its training took on top of the imports
        m = json.loads((Path(r["run"]) / "metrics.json").read_text())
        assert float(r["train_img_s"]) == round(m["train_images_per_s"], 1)
        assert float(r["test_acc"]) == round(m["test_accuracy"], 4)
        assert int(r["epochs"]) == 1 == len((Path(r["run"]) / "history.csv").read_text().splitlines()) - 1
    assert float(narrow["peak_mem_mb"]) > 0, "the row process's own peak above its imports"
    table = (study / "study.md").read_text()
    assert "| tiny:0.5 | 1 |" in table and "Budget: " in table and "Machine: " in table
    assert (study / "study.png").stat().st_size > 10_000
    with pytest.raises(CompareError, match="another budget"):
        compare(base.replace(epochs=2), parse_grid("tiny"), study="s")


def test_compare_command_rejects_unknown_arch_and_widths_of_torchvision_models():
    res = CliRunner().invoke(compare_app, ["--data", "sample", "--grid", "resnet20,nosuchnet"])
    assert res.exit_code != 0 and "unknown architecture 'nosuchnet'" in res.output
    assert parse_grid("resnet18,resnet20", "1,2") == [("resnet18", 1.0), ("resnet20", 1.0), ("resnet20", 2.0)]
    with pytest.raises(CompareError, match="own models"):
        parse_grid("resnet18:2")


def head_scale(model: torch.nn.Module) -> float:
    return float(next(m for m in model.modules() if isinstance(m, Scale)).factor)


def built_and_folded(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A quarter-width net as built (eval mode) and a folded copy of it."""
    torch.manual_seed(0)
    model = build(name, 0.25).eval()
    folded = copy.deepcopy(model)
    return model, folded


@pytest.mark.parametrize("name", ["airbench_resnet", "resnet9"])
def test_adam_runs_fold_the_logit_scale_into_the_head_with_the_same_outputs(name, data):
    model, folded = built_and_folded(name)
    assert fold_head_scale(folded) == 1 and fold_head_scale(folded) == 0  # once, and only once
    x = torch.randn(4, 3, 32, 32)
    assert head_scale(folded) == 1.0 and torch.allclose(folded(x), model(x), atol=1e-5)
    # wired where the learner is made: folded for fastai's Adam, left as tuned for Muon's and SGD's head rates
    assert head_scale(create_learner(TrainConfig(arch=name, width=0.25, bs=2), data).model) == 1.0
    sgd = create_learner(TrainConfig(arch=name, width=0.25, bs=2, optimizer="sgd"), data).model
    assert head_scale(sgd) == head_scale(model) < 1.0
    if name == "airbench_resnet":
        muon = TrainConfig(arch=name, width=0.25, bs=2, optimizer="muon", schedule="linear")
        assert head_scale(create_learner(muon, data).model) < 1.0


def test_an_adam_step_moves_the_folded_head_as_much_as_a_plain_layer():
    """What the fold is for: Adam steps each weight by about the rate, so a 1/64 scale after a unit-std head made its
    logits move 64x slower than they do once folded (fine-tuning's head-only phase then learnt next to nothing)."""
    model, folded = built_and_folded("airbench_resnet")  # 64 features: logits / 64
    fold_head_scale(folded)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def relative_logit_change(m):
        head = m[1][3]
        opt = torch.optim.Adam([head.weight], lr=1e-3)
        before = m(x).detach()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        with torch.no_grad():
            return float((m(x) - before).abs().mean() / before.abs().mean())

    assert relative_logit_change(folded) > 30 * relative_logit_change(model)


def test_the_folded_scale_is_saved_with_the_weights_and_old_files_still_load():
    model, folded = built_and_folded("airbench_resnet")
    fold_head_scale(folded)
    x = torch.randn(2, 3, 32, 32)
    fresh = build("airbench_resnet", 0.25).eval()  # as load_model builds it: unfolded, then the weights go in
    fresh.load_state_dict(folded.state_dict())
    assert head_scale(fresh) == 1.0 and torch.allclose(fresh(x), model(x), atol=1e-5)
    old = model.state_dict()  # unfolded: saved without the factor, as files from before the fold
    assert not any(k.endswith("factor") for k in old) and any(k.endswith("factor") for k in folded.state_dict())
    fresh = copy.deepcopy(folded)
    fresh.load_state_dict(old)  # strict: the missing factor is not an error, it takes the built-in value
    assert head_scale(fresh) == 1 / 64 and torch.allclose(fresh(x), model(x), atol=1e-5)
