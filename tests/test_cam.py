"""Grad-CAM, "where the model looked": the map over the image the model saw, in the API, the demo and the report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_fastai import ConfigError, heatmap, load_model, overlay
from cifar_fastai.evaluation.cam import target_layer


@pytest.fixture(scope="module")
def learn(tiny_run):
    return load_model(tiny_run)


@pytest.fixture(scope="module")
def cat(tiny_data):
    return tiny_data / "test" / "cat" / "0001.jpg"


def no_hooks(model) -> bool:
    return not any(m._forward_hooks for m in model.modules())


def test_map_covers_the_input_and_explains_the_top_class(learn, cat):
    cam, cls = heatmap(learn, cat)
    assert cam.shape == (32, 32) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert cam.max() - cam.min() > 0.5, "a map with a shape, not a constant"
    assert cls == str(learn.predict(cat)[0]), "the top class, as learn.predict names it"
    assert no_hooks(learn.model), "Grad-CAM's hooks are removed"


def test_another_target_gives_another_map(learn, cat):
    top, cls = heatmap(learn, cat)
    other = next(c for c in learn.dls.vocab if c != cls)
    cam, named = heatmap(learn, cat, target=other)
    assert named == other and np.abs(cam - top).max() > 0.1
    by_index, _ = heatmap(learn, cat, target=list(learn.dls.vocab).index(other))
    np.testing.assert_allclose(by_index, cam, atol=1e-5)
    with pytest.raises(ConfigError, match="zebra"):
        heatmap(learn, cat, target="zebra")


def test_map_has_the_trained_size_and_overlay_is_upscaled(tiny_data, cat):
    from cifar_fastai import get_learner

    learn = get_learner(str(tiny_data), "tiny", size=48, workers=0)  # a larger --size: the image is resized first
    cam, _ = heatmap(learn, Image.open(cat))
    assert cam.shape == (48, 48) and cam.max() - cam.min() > 0.5
    rgb = overlay(cat, cam, size=96)
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8
    assert (rgb[::2, ::2] == rgb[1::2, 1::2]).all(), "nearest-neighbour upscale: the model's pixels stay visible"


def test_layer_chooser_takes_the_last_map_before_pooling():
    from fastai.vision.learner import create_vision_model
    from torch import nn
    from torchvision.models import resnet18

    from cifar_fastai.models import get_arch

    x = torch.randn(2, 3, 32, 32)
    for name in ("tiny", "resnet20"):
        model = get_arch(name).builder(10).eval()
        assert target_layer(model, x)[0] is model[0], f"{name}: the body, the input to its pooling head"
    tv = create_vision_model(resnet18, 10, pretrained=False).eval()  # at 32 px its layer4 is 1x1
    layer, logits = target_layer(tv, x)
    assert layer is tv[0][6] and logits.shape == (2, 10), "layer3, the last stage above 1x1"
    with pytest.raises(ConfigError, match="feature map"):
        target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), x)


def test_demo_returns_the_overlay(tiny_run, cat):
    from gradio_client import Client, handle_file

    from cifar_fastai.deploy.serve import Classifier, build_demo, serve
    from tests.test_demo import free_port

    clf = Classifier.load(tiny_run)
    demo = build_demo(clf)
    port = free_port()
    serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        label, shown = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(cat)), api_name="/predict"
        )
    finally:
        demo.close()
    assert label["label"] == heatmap(clf, cat)[1]
    served = np.asarray(Image.open(shown).convert("RGB"))
    assert np.abs(served.astype(int) - clf.explain(cat)).max() <= 1, "the page shows the top class's overlay"


def test_evaluate_writes_the_top_losses_figure(tiny_run, tmp_path):
    from cifar_fastai.evaluation.evaluate import evaluate

    run = shutil.copytree(tiny_run, tmp_path / "tiny")  # tiny_run is shared and read-only
    result = evaluate(run, tta=False, verbose=False)
    png = run / result["top_losses_png"]
    with Image.open(png) as im:
        assert im.width > 1.5 * im.height, "9 images, each beside its heat map: 3 rows of 6"
    assert json.loads((run / "evaluation.json").read_text())["top_losses_png"] == png.name
    assert f"]({png.name})" in (run / "evaluation.md").read_text()
