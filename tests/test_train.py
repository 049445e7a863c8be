"""Learners, a real training run, its outputs, export + load_learner in a fresh process, lr-find."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torchvision.models import resnet18

from cifar_fastai import TrainConfig, get_data
from cifar_fastai.data.transforms import cifar_stats, imagenet_stats
from cifar_fastai.training.learner import create_learner, norm_stats
from cifar_fastai.training.run import get_learner, lr_find
from tests.conftest import run_script


def test_training_beats_chance_and_writes_run_folder(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5, "10 separable classes: far above the 0.1 of chance"
    assert metrics["valid_accuracy"] > 0.5
    assert set(metrics["per_class_test_accuracy"]) == {
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    }  # fmt: skip
    assert metrics["train_images_per_s"] > 0 and metrics["wall_seconds"] > 0
    assert metrics["skipped_files"] and metrics["skipped_files"][0].endswith("9999.jpg")
    for name in ("export.pkl", "config.json", "metrics.json", "history.csv", "confusion_matrix.png"):
        assert (tiny_run / name).stat().st_size > 0, name
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["config"]["arch"] == "tiny" and config["config"]["seed"] == 42
    assert config["resolved"]["normalize_mean"] == cifar_stats[0]
    assert "fastai" in config["versions"] and "torch" in config["versions"]
    history = (tiny_run / "history.csv").read_text().splitlines()
    assert history[0].startswith("phase,epoch,train_loss,valid_loss,accuracy")
    assert len(history) == 3  # header + 2 epochs


def test_load_learner_in_fresh_process_predicts_jpeg_and_png(tiny_run, tiny_data, tmp_path):
    """Downstream use: another directory, another process, plain fastai `load_learner`."""
    code = textwrap.dedent(
        f"""
        import json
        from fastai.learner import load_learner
        learn = load_learner({str(tiny_run / "export.pkl")!r})
        out = []
        for f in [{str(tiny_data / "test" / "ship" / "0001.jpg")!r}, {str(tiny_data / "test" / "ship" / "0000.png")!r}]:
            label, idx, probs = learn.predict(f)
            out.append([str(label), list(map(float, probs)), list(learn.dls.vocab)])
        print(json.dumps(out))
        """
    )
    res = run_script("-c", code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for label, probs, vocab in json.loads(res.stdout.strip().splitlines()[-1]):
        assert label in vocab and len(probs) == 10
        assert abs(sum(probs) - 1) < 1e-4
        assert label == "ship"


def test_export_has_no_main_or_test_references(tiny_run):
    raw = (tiny_run / "export.pkl").read_bytes()
    assert b"__main__" not in raw and b"conftest" not in raw and b"<lambda>" not in raw


@pytest.mark.parametrize("arch", ["resnet18", "timm/resnet18"])
def test_learner_for_torchvision_and_timm(tiny_data, arch):
    cfg = TrainConfig(data=str(tiny_data), arch=arch, bs=8)
    data = get_data(cfg, norm_stats(cfg), verbose=False)
    learn = create_learner(cfg, data)
    x, _ = data.dls.one_batch()
    with torch.no_grad():
        assert learn.model.eval()(x).shape == (8, 10)
    assert len(learn.opt_func.__name__) and len(learn.splitter(learn.model)) >= 2, "fastai layer groups found"


def test_local_weights_fine_tune_with_imagenet_stats_and_frozen_body(tiny_data, tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), weights)
    cfg = TrainConfig(data=str(tiny_data), arch="resnet18", weights=str(weights), bs=8)
    assert norm_stats(cfg) == imagenet_stats
    data = get_data(cfg, norm_stats(cfg), verbose=False)
    learn = create_learner(cfg, data)
    ref = resnet18()
    ref.load_state_dict(torch.load(weights))
    assert torch.equal(learn.model[0][0].weight, ref.conv1.weight), "body holds the file's weights"
    assert not learn.model[0][0].weight.requires_grad, "body frozen for the head-only epochs"
    assert learn.model[1][-1].weight.requires_grad


def test_lr_find_saves_plot_and_suggestions(tiny_data, tmp_path):
    res = lr_find(TrainConfig(data=str(tiny_data), arch="tiny", bs=16, out=str(tmp_path)), verbose=False)
    assert (res.run_dir / "lr_find.png").stat().st_size > 0
    assert set(res.metrics) == {"minimum", "steep", "valley", "slide"}
    assert all(0 < v < 10 for v in res.metrics.values())


def test_lr_find_probes_as_the_run_trains(tiny_data, tmp_path, monkeypatch):
    """Under the run's precision and layout, and with --progressive at the start size, where the peak rate is used."""
    from fastai.callback.core import Callback

    import cifar_fastai.training.run as train_module

    seen = set()

    class Spy(Callback):
        order = 5  # after ProgressiveResize and ChannelsLastInputs, before MixedPrecision turns pred to float

        def after_pred(self):
            x = self.xb[0]
            seen.add((tuple(x.shape[-2:]), x.is_contiguous(memory_format=torch.channels_last), self.pred.dtype))

    prepare = train_module.prepare

    def prepare_with_spy(*args, **kwargs):
        data, learn = prepare(*args, **kwargs)
        learn.add_cb(Spy())
        return data, learn

    monkeypatch.setattr(train_module, "prepare", prepare_with_spy)
    cfg = TrainConfig(data=str(tiny_data), arch="airbench_resnet", width=0.25, bs=16, out=str(tmp_path),
                      precision="bf16", channels_last=True, progressive=16)  # fmt: skip
    res = lr_find(cfg, verbose=False)
    assert seen == {((16, 16), True, torch.bfloat16)}
    assert all(0 < v < 10 for v in res.metrics.values())


def test_get_learner_two_lines_for_notebooks():
    learn = get_learner("sample", "tiny", bs=32)
    assert list(learn.dls.vocab)[:2] == ["airplane", "automobile"] and learn.dls.train.bs == 32


def test_tta_on_the_tensor_loader(tiny_data):
    """`learn.tta` switches the loader to training augmentation and back (fastai's set_split_idx protocol)."""
    learn = get_learner(str(tiny_data), "tiny", bs=16)
    data_dl = learn.dls.valid
    preds, targs = learn.tta(dl=data_dl, n=2)
    assert preds.shape == (len(targs), 10) and torch.allclose(preds.sum(1), torch.ones(len(targs)), atol=1e-4)
    assert data_dl.dataset.split_idx == 1, "validation split restored after TTA"


def test_a_run_ends_by_printing_the_next_commands(tiny_data, tmp_path, capsys):
    from cifar_fastai import TrainConfig, train

    run_dir = train(TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=16, out=str(tmp_path))).run_dir
    out = capsys.readouterr().out
    for cmd in (f"python scripts/evaluate.py {run_dir}", f"python demo/app.py --model {run_dir}",
                f"python scripts/export.py onnx {run_dir}"):  # fmt: skip
        assert cmd in out
