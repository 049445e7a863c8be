"""Hub model folders: `scripts/export.py hub` writes files that timm and the Hub read, `load_model` reads them back,
and with no network a push or an `hf-hub:` id ends in one clear line."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cifar_fastai import ModelFileError, TrainConfig, load_model
from cifar_fastai.deploy.hub import export_hub
from tests.conftest import REPO

HUB_FILES = {"model.safetensors", "model.json", "config.json", "README.md"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hub_folder(tiny_run, tmp_path_factory) -> Path:
    return export_hub(tiny_run, tmp_path_factory.mktemp("hub") / "tiny-hub")


def card_meta(folder: Path) -> dict:
    from huggingface_hub import metadata_load

    return metadata_load(folder / "README.md")  # the YAML front matter, parsed as the Hub parses it


def test_folder_holds_the_model_files(hub_folder, tiny_run):
    assert HUB_FILES <= {p.name for p in hub_folder.iterdir()}
    for name in ("model.json", "model.safetensors"):  # copied byte for byte: model.json's sha256 still holds
        assert (hub_folder / name).read_bytes() == (tiny_run / name).read_bytes()


def test_config_json_is_what_timm_reads(hub_folder, tiny_run):
    import timm.data
    from timm.models._hub import load_model_config_from_path

    meta = json.loads((tiny_run / "model.json").read_text())
    config = json.loads((hub_folder / "config.json").read_text())
    assert {"architecture", "num_classes", "num_features", "label_names", "pretrained_cfg"} <= set(config)
    assert config["num_features"] == load_model(tiny_run).model[1][-1].in_features  # what the tiny head's Linear takes
    pretrained_cfg, name, _ = load_model_config_from_path(hub_folder)  # timm's own reader of a local hub folder
    assert name == "tiny" and pretrained_cfg["num_classes"] == 10
    assert list(pretrained_cfg["label_names"]) == meta["vocab"]
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32)
    assert data_cfg["crop_pct"] == 1.0 and data_cfg["interpolation"] == "bilinear"
    assert list(data_cfg["mean"]) == pytest.approx(meta["normalize"]["mean"])  # the run's stats, not timm's default
    assert list(data_cfg["std"]) == pytest.approx(meta["normalize"]["std"])


def test_folder_predicts_as_the_run(hub_folder, tiny_run, tiny_data):
    files = sorted((tiny_data / "test").glob("*/*.*"))[::10]
    preds = []
    for source in (tiny_run, hub_folder):
        learn = load_model(source)
        with learn.no_bar():
            preds.append(learn.get_preds(dl=learn.dls.test_dl(files))[0])
    assert torch.equal(preds[0], preds[1])


def test_card_yaml_and_text(hub_folder, tiny_run):
    meta, metrics = card_meta(hub_folder), json.loads((tiny_run / "metrics.json").read_text())
    assert meta["library_name"] == "cifar_fastai" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "cifar10", "fastai"} <= set(meta["tags"])
    assert meta["datasets"] == ["cifar10"] and meta["metrics"] == ["accuracy"]
    assert "base_model" not in meta  # trained from scratch
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert index["name"] == tiny_run.name  # no --push repo: the run's name
    assert result["task"]["type"] == "image-classification" and result["dataset"]["type"] == "cifar10"
    assert result["metrics"] == [
        {"type": "accuracy", "value": round(metrics["test_accuracy"], 4), "name": "Test accuracy"}
    ]
    text = (hub_folder / "README.md").read_text()
    assert "python scripts/train.py --data" in text and "--arch tiny --epochs 2 --bs 16 --lr 0.01" in text
    for cls, acc in metrics["per_class_test_accuracy"].items():
        assert f"| {cls} | {acc:.2%} |" in text
    assert "## Limitations" in text and "## Intended use" in text


def test_card_reports_tta_robust_accuracy_and_base_model(tiny_run, tmp_path):
    from cifar_fastai.evaluation.evaluate import evaluate

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))  # the shared run stays as it was
    ev = evaluate(run, attack="fgsm", attack_n=20, tta=True, bs=64, verbose=False)
    folder = export_hub(run, tmp_path / "hub", repo_id="someone/tiny-cifar", base_model="someone/tiny-base")
    meta = card_meta(folder)
    assert meta["base_model"] == "someone/tiny-base" and meta["model-index"][0]["name"] == "tiny-cifar"
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values["Test accuracy (TTA)"] == round(ev["tta_accuracy"], 4)
    assert values["Robust accuracy (FGSM L-inf eps 8/255)"] == round(ev["attack"]["robust_accuracy"], 4)
    text = (folder / "README.md").read_text()
    assert f"Robust accuracy: {ev['attack']['robust_accuracy']:.2%}" in text and "hf-hub:someone/tiny-cifar" in text
    assert "| class | accuracy (recall) | precision | F1 |" in text  # evaluation.json's per-class report


def test_base_model_is_timms_hub_id_when_fine_tuned_from_timm():
    import timm

    from cifar_fastai.deploy.card import base_model_id

    assert (
        base_model_id(TrainConfig(arch="timm/resnet18", pretrained=True))
        == timm.get_pretrained_cfg("resnet18").hf_hub_id
    )
    assert base_model_id(TrainConfig(arch="resnet18", pretrained=True)) is None  # torchvision's weights: no Hub id
    assert base_model_id(TrainConfig(arch="timm/resnet18")) is None  # from scratch


def export_app():
    return runpy.run_path(str(REPO / "scripts" / "export.py"), run_name="test")["app"]


def test_push_offline_is_one_line_and_keeps_the_folder(tiny_run, tmp_path):
    out = tmp_path / "hub"
    res = CliRunner().invoke(export_app(), ["hub", str(tiny_run), "--out", str(out), "--push", "someone/tiny-cifar"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE" in errors[0] and str(out) in errors[0]
    assert HUB_FILES <= {p.name for p in out.iterdir()}


def test_push_without_a_token_is_refused(hub_folder, monkeypatch):
    import huggingface_hub

    from cifar_fastai.deploy.hub import push

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ModelFileError, match="no Hugging Face token"):
        push(hub_folder, "someone/tiny-cifar")
    assert (hub_folder / "model.safetensors").is_file()


def test_bad_repo_id_is_refused_before_any_work(tiny_run, tmp_path):
    out = tmp_path / "hub"
    res = CliRunner().invoke(export_app(), ["hub", str(tiny_run), "--out", str(out), "--push", "not a repo"])
    assert res.exit_code == 2 and "not a Hub repo id" in res.output and not out.exists()


def test_hf_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelFileError, match="HF_HUB_OFFLINE is set") as err:
        load_model("hf-hub:someone/not-downloaded")
    assert "\n" not in str(err.value)


def test_evaluate_reads_a_hub_folder_as_its_run(hub_folder, tiny_run):
    """A Hub folder's config.json is timm's; the run's own test split is found through model.json instead."""
    from cifar_fastai.evaluation.evaluate import evaluate

    result = evaluate(hub_folder, tta=False, verbose=False)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert result["n"] == 100 and result["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert (hub_folder / "evaluation.json").is_file()
