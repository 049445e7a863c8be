"""The pickle-free model format: same predictions as export.pkl, and tampering is refused with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cifar_fastai import ModelFileError, load, load_model


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the shared run folder, free to tamper with."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_every_run_writes_both_formats(tiny_run):
    assert {"export.pkl", "model.json", "model.safetensors"} <= {p.name for p in tiny_run.iterdir()}
    meta = json.loads((tiny_run / "model.json").read_text())
    assert meta["arch"] == "tiny" and meta["arch_kind"] == "cifar" and meta["input_size"] == 32
    assert len(meta["vocab"]) == 10 and len(meta["normalize"]["mean"]) == 3
    assert {"fastai", "torch", "cifar_fastai"} <= set(meta["versions"])


def test_predictions_match_the_pickle(tiny_run, tiny_data):
    from fastai.learner import load_learner

    files = sorted((tiny_data / "test").glob("*/*.*"))[::20]  # JPEG and PNG, five classes
    pkl = load_learner(tiny_run / "export.pkl")
    safe = load_model(tiny_run)
    assert safe.dls.vocab == pkl.dls.vocab
    with pkl.no_bar(), safe.no_bar():
        for f in files:
            label_a, _, probs_a = pkl.predict(f)
            label_b, _, probs_b = safe.predict(f)
            assert label_a == label_b
            assert torch.allclose(probs_a, probs_b, atol=1e-6)
    x = torch.rand(2, 3, 32, 32)
    for path in (tiny_run / "model.json", tiny_run / "model.safetensors"):  # the other ways to name the model
        assert torch.equal(load_model(path).model(x), safe.model(x))


def test_tta_and_fine_tuning_work_on_the_loaded_model(tiny_run, tiny_data):
    learn = load_model(tiny_run)
    dl = learn.dls.test_dl(sorted((tiny_data / "test").glob("*/*.*")), with_labels=True)
    probs, targs = learn.tta(dl=dl, n=2)
    assert probs.shape == (100, 10) and (probs.argmax(1) == targs).float().mean() > 0.3

    learn = load_model(tiny_run, data=str(tiny_data))
    before = (learn.validate()[1],)
    learn.fit_one_cycle(1, 1e-3)
    assert learn.recorder.values[-1][2] > 0.3 and before[0] > 0.3  # still a working classifier after more training


def test_pickle_needs_explicit_trust(tiny_run):
    with pytest.raises(ModelFileError, match="pickle"):
        load(tiny_run / "export.pkl")
    assert load(tiny_run / "export.pkl", trust_pickle=True).dls.vocab == load(tiny_run).dls.vocab


def _edit_json(run: Path, fn) -> None:
    meta = json.loads((run / "model.json").read_text())
    fn(meta)
    (run / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda m: m["vocab"].reverse(), "edited"),
        (lambda m: m.update(arch="resnet18"), "edited"),
        (lambda m: m["normalize"].update(mean=[0.0, 0.0, 0.0]), "edited"),
        (lambda m: m["model"].update(width=2.0), "edited"),
        (lambda m: m.pop("vocab"), "vocab"),
        (lambda m: m["weights"].update(file="../../etc/passwd"), "plain file name"),
    ],
    ids=["vocab", "arch", "normalization", "width", "missing-field", "path-escape"],
)
def test_tampered_json_is_refused(run_copy, tamper, message):
    _edit_json(run_copy, tamper)
    with pytest.raises(ModelFileError, match=message):
        load_model(run_copy)


def test_broken_json_is_refused(run_copy):
    (run_copy / "model.json").write_text('{"format": "cifar_fastai.safe-model", ')
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(run_copy)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "other-model"])
def test_tampered_weights_are_refused(run_copy, tmp_path, damage):
    w = run_copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF  # one weight changed: the sha256 catches it
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:  # a valid safetensors file of another model
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
        data = (tmp_path / "other.safetensors").read_bytes()
    w.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="sha256"):
        load_model(run_copy)


def test_weights_of_another_arch_with_a_matching_hash_are_refused(run_copy):
    """Even a description re-signed after editing (hash updated) cannot load weights that do not fit its arch."""
    from safetensors.torch import load_file, save_file

    from cifar_fastai.deploy.safe import sha256

    w = run_copy / "model.safetensors"
    meta = json.loads((run_copy / "model.json").read_text())
    meta["model"]["width"] = 2.0  # the arch built from this description has twice the channels
    embedded = {k: v for k, v in meta.items() if k != "weights"}
    save_file(load_file(str(w)), str(w), metadata={"cifar_fastai": json.dumps(embedded)})
    meta["weights"]["sha256"] = sha256(w)
    (run_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(run_copy)


def test_missing_files_say_what_a_run_folder_holds(tmp_path):
    with pytest.raises(ModelFileError, match="model.json"):
        load_model(tmp_path)


def test_an_old_pickle_only_run_converts_with_trust(run_copy):
    from cifar_fastai.deploy.safe import convert_pickle

    (run_copy / "model.json").unlink()
    (run_copy / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="pickle"):
        convert_pickle(run_copy)
    convert_pickle(run_copy, trust_pickle=True)
    x = torch.rand(4, 3, 32, 32)
    pkl = load(run_copy / "export.pkl", trust_pickle=True).model.eval()
    assert torch.allclose(load_model(run_copy).model.eval()(x), pkl(x), atol=1e-6)
