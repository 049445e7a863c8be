"""scripts/evaluate.py: the run's test set or any labelled folder -> evaluation.json/.md + confusion matrix PNG."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from typer.testing import CliRunner

from cifar_fastai.errors import DataError
from cifar_fastai.evaluation.evaluate import evaluate
from tests.conftest import CLASSES, REPO


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "tiny")  # tiny_run is shared and read-only


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_writes_report_with_tta_and_robust_accuracy(run_copy):
    app = load_script("evaluate").app
    res = CliRunner().invoke(app, [str(run_copy), "--attack", "fgsm", "--eps", "32/255", "--attack-n", "40"])
    assert res.exit_code == 0, res.output
    assert "robust accuracy" in res.output and "TTA accuracy" in res.output
    ev = json.loads((run_copy / "evaluation.json").read_text())
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert ev["n"] == 100 and abs(ev["accuracy"] - metrics["test_accuracy"]) < 1e-6, "same test set as training's"
    assert abs(ev["loss"] - metrics["test_loss"]) < 1e-4
    assert set(ev["per_class"]) == set(CLASSES)
    assert {"precision", "recall", "f1-score", "support"} <= set(ev["per_class"]["cat"])
    assert 0 <= ev["tta_accuracy"] <= 1 and ev["tta_accuracy"] > 0.5
    attack = ev["attack"]
    assert attack["attack"] == "fgsm" and attack["eps_255"] == 32 and attack["n"] == 40
    assert attack["robust_accuracy"] < attack["clean_accuracy"]
    assert (run_copy / "evaluation_confusion_matrix.png").stat().st_size > 1000
    md = (run_copy / "evaluation.md").read_text()
    assert "robust accuracy" in md and "precision" in md and "evaluation_confusion_matrix.png" in md


def test_evaluate_on_a_folder_of_class_folders(run_copy, tiny_data, tmp_path):
    folder = tmp_path / "mine"
    for cls in ("ship", "frog"):
        shutil.copytree(tiny_data / "test" / cls, folder / cls)
    (folder / "ship" / "broken.jpg").write_bytes(b"not an image")
    ev = evaluate(run_copy, data=str(folder), tta=False, verbose=False)
    assert ev["n"] == 20 and ev["accuracy"] > 0.5
    assert ev["skipped_files"] and ev["skipped_files"][0].endswith("broken.jpg")
    assert list(run_copy.glob("evaluation-*mine.json")) and list(run_copy.glob("evaluation-*mine_confusion_matrix.png"))
    (folder / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        evaluate(run_copy, data=str(folder), tta=False, verbose=False)


def test_evaluate_missing_run_is_one_line_error(tmp_path):
    res = CliRunner().invoke(load_script("evaluate").app, [str(tmp_path / "nope")])
    assert res.exit_code == 1 and res.output.strip() == f"error: {tmp_path / 'nope'}: no such run folder"
