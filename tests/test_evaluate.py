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


def run_precision(run) -> str:
    return json.loads((run / "config.json").read_text())["resolved"]["hardware"]["precision"]


def assert_same_test_pass(ev: dict, metrics: dict, precision: str) -> None:
    """The evaluation (fp32) against the run's own test pass, which ran under the run's precision (`--precision auto`
    picks bf16 on CPUs with bf16 instructions): like for like at fp32, within bf16's rounding otherwise."""
    if precision == "fp32":
        assert abs(ev["accuracy"] - metrics["test_accuracy"]) < 1e-6, "same test set as training's"
        assert abs(ev["loss"] - metrics["test_loss"]) < 1e-4
    else:  # bf16 keeps 8 bits of mantissa (relative error ~2**-8 per op): a borderline image may flip
        assert abs(ev["accuracy"] - metrics["test_accuracy"]) <= 2 / ev["n"] + 1e-9
        assert abs(ev["loss"] - metrics["test_loss"]) <= 0.05 * metrics["test_loss"] + 1e-3
        assert ev["loss"] != metrics["test_loss"], "the two passes really ran at different precisions"


def test_evaluate_after_a_bf16_run_agrees_within_bf16_rounding(tiny_data, tmp_path, monkeypatch):
    """The host kinds with bf16 instructions (AVX-512 BF16, AMX) faked here: `auto` then trains and tests in bf16."""
    from cifar_fastai import TrainConfig
    from cifar_fastai.training import hardware
    from cifar_fastai.training.run import train

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    cfg = TrainConfig(
        data=str(tiny_data), arch="tiny", epochs=1, bs=16, lr=1e-2, device="cpu", out=str(tmp_path), name="b"
    )
    res = train(cfg, verbose=False)
    assert run_precision(res.run_dir) == "bf16"
    ev = evaluate(res.run_dir, tta=False, verbose=False)
    assert_same_test_pass(ev, res.metrics, "bf16")


def test_evaluate_script_writes_report_with_tta_and_robust_accuracy(run_copy, monkeypatch):
    import cifar_fastai.evaluation.evaluate as evaluate_module

    tta_calls = []
    tta_result = evaluate_module.tta_result

    def spy(*args, **kwargs):
        tta_calls.append({"plain": kwargs.get("plain"), "result": tta_result(*args, **kwargs)})
        return tta_calls[-1]["result"]

    monkeypatch.setattr(evaluate_module, "tta_result", spy)
    app = load_script("evaluate").app
    res = CliRunner().invoke(app, [str(run_copy), "--attack", "fgsm", "--eps", "32/255", "--attack-n", "40"])
    assert res.exit_code == 0, res.output
    assert "robust accuracy" in res.output and "TTA accuracy" in res.output
    ev = json.loads((run_copy / "evaluation.json").read_text())
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert ev["n"] == 100
    assert_same_test_pass(ev, metrics, run_precision(run_copy))
    assert set(ev["per_class"]) == set(CLASSES)
    assert {"precision", "recall", "f1-score", "support"} <= set(ev["per_class"]["cat"])
    # TTA ran once, on the test set, reusing the plain pass's logits as its first view
    assert len(tta_calls) == 1 and tta_calls[0]["plain"].shape == (100, 10)
    assert ev["tta_accuracy"] == tta_calls[0]["result"][0] and ev["tta_accuracy"] > 0.5
    assert f"TTA accuracy {ev['tta_accuracy']:.4f}" in res.output
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
