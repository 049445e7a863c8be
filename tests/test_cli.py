"""The command line as a user meets it: help, clear errors with exit codes, and a real run."""

from __future__ import annotations

import dataclasses
import json

from typer.testing import CliRunner

from cifar_fastai.cli import train_app
from cifar_fastai.config import TrainConfig
from tests.conftest import run_script

runner = CliRunner()


def test_help_documents_every_option_with_default():
    res = runner.invoke(train_app, ["--help"], terminal_width=200)
    assert res.exit_code == 0
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in res.output, f.name
    assert "[default: resnet18]" in res.output and "[default: cifar10]" in res.output


def test_unknown_arch_exits_2_listing_choices():
    res = runner.invoke(train_app, ["--arch", "resnet9000", "--data", "sample"])
    assert res.exit_code == 2
    assert "resnet9000" in res.output and "resnet18" in res.output and "resnet50" in res.output


def test_zero_epochs_rejected():
    res = runner.invoke(train_app, ["--epochs", "0", "--data", "sample"])
    assert res.exit_code == 2 and "--epochs" in res.output


def test_missing_data_is_one_clear_line(tmp_path):
    res = runner.invoke(train_app, ["--data", str(tmp_path / "nope"), "--arch", "tiny", "--out", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), "a clean exit, not an exception"
    assert "error: --data" in res.stderr and "train/<class>" in res.stderr
    assert list(tmp_path.iterdir()) == [], "a failed start leaves no empty run folder behind"


def test_wrong_layout_is_one_clear_line(tmp_path):
    (tmp_path / "images").mkdir()
    res = runner.invoke(train_app, ["--data", str(tmp_path / "images"), "--out", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "expected a CIFAR-layout folder" in res.stderr and [p.name for p in tmp_path.iterdir()] == ["images"]


def test_list_archs():
    res = runner.invoke(train_app, ["--list-archs"])
    assert res.exit_code == 0 and "resnet50" in res.output and "timm/" in res.output


def test_script_trains_and_prints_where_results_are(tiny_data, tmp_path):
    res = run_script(
        "scripts/train.py", "--data", str(tiny_data), "--arch", "tiny", "--epochs", "1", "--bs", "16",
        "--lr", "0.01", "--out", str(tmp_path), "--name", "cli",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "cli"
    assert f"results in {run_dir}" in res.stdout
    assert "epoch 1/1" in res.stdout, "plain per-epoch lines when stdout is not a terminal"
    for cmd in (f"python scripts/evaluate.py {run_dir}", f"python demo/app.py --model {run_dir}",
                f"python scripts/export.py onnx {run_dir}"):  # fmt: skip
        assert cmd in res.stdout, "the run ends by printing the commands that use it next"
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["test_accuracy"] > 0.3
