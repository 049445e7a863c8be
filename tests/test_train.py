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
    # throughput counts the images trained on (full batches of 16, 2 epochs) over the training passes' time, and the
    # wall clock covers those passes, validation and the rest of the run
    n_train = json.loads((tiny_run / "config.json").read_text())["resolved"]["n_train"]
    seen = metrics["train_images_per_s"] * metrics["train_seconds"]
    assert seen == pytest.approx(2 * (n_train // 16) * 16, rel=1e-6)
    assert metrics["wall_seconds"] > metrics["train_seconds"] + metrics["valid_seconds"]
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
    # fastai's discriminative rates need the splitter to partition the parameters into body ... head groups
    groups = [set(map(id, g)) for g in learn.splitter(learn.model)]
    params = set(map(id, learn.model.parameters()))
    assert len(groups) >= 2 and set().union(*groups) == params and sum(map(len, groups)) == len(params)
    head = [m for m in learn.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert id(head.weight) in groups[-1] and id(head.weight) not in groups[0]
    learn.create_opt()
    assert len(learn.opt.param_lists) == len(groups), "the optimizer got one parameter group per layer group"


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
    res = lr_find(TrainConfig(data=str(tiny_data), arch="tiny", bs=16, out=str(tmp_path)), verbose=False, num_it=30)
    assert (res.run_dir / "lr_find.png").stat().st_size > 0
    assert set(res.metrics) == {"minimum", "steep", "valley", "slide"}
    assert json.loads((res.run_dir / "lr_find.json").read_text()) == res.metrics


def test_lr_find_with_too_few_rates_to_suggest_from_says_so(tiny_data, tmp_path):
    from cifar_fastai.errors import TrainingError

    with pytest.raises(TrainingError, match="too few to suggest one"):  # fastai's suggestions index past the start
        lr_find(TrainConfig(data=str(tiny_data), arch="tiny", bs=16, out=str(tmp_path)), verbose=False, num_it=10)


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
    res = lr_find(cfg, verbose=False, num_it=30)  # bf16 is emulated on CPUs without bf16 instructions: fewer steps
    assert seen == {((16, 16), True, torch.bfloat16)}
    assert json.loads((res.run_dir / "lr_find.json").read_text()) == res.metrics


def test_get_learner_two_lines_for_notebooks():
    learn = get_learner("sample", "tiny", bs=32)
    assert list(learn.dls.vocab)[:2] == ["airplane", "automobile"] and learn.dls.train.bs == 32


def test_tta_on_the_tensor_loader(tiny_data):
    """`learn.tta` switches the loader to training augmentation and back (fastai's set_split_idx protocol)."""
    learn = get_learner(str(tiny_data), "tiny", bs=16)
    data_dl = learn.dls.valid
    plain, _ = learn.get_preds(dl=data_dl)
    aug, targs = learn.tta(dl=data_dl, n=2, beta=0)  # beta=0: the augmented views' mean alone
    assert aug.shape == (len(targs), 10) and torch.allclose(aug.sum(1), torch.ones(len(targs)), atol=1e-4)
    assert not torch.allclose(aug, plain), "the views went through the training augmentation"
    assert data_dl.dataset.split_idx == 1, "validation split restored after TTA"
    assert torch.equal(learn.get_preds(dl=data_dl)[0], plain), "and the loader predicts unaugmented again"
