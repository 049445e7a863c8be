"""Where the model looked: Grad-CAM heat maps (pytorch_grad_cam) over the image the model saw, and their overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.images import CifarImage, prepare_image
from ..errors import ConfigError

DISPLAY_SIZE = 256  # the overlay's side: a 32 px map is a thumbnail on a page or in a figure


ImageSource = str | Path | bytes | Image.Image


def as_learner(learn_or_classifier):
    """A fastai `Learner`, or the one inside the demo's `Classifier`."""
    return learn_or_classifier if hasattr(learn_or_classifier, "dls") else learn_or_classifier.learn


def model_inputs(learn, images: Sequence[ImageSource]) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized batch, the same images as HxWx3 floats in [0, 1]): what the model sees.

    Each image goes through the project's one input path (`prepare_image`, as the demo's `Classifier.predict`), then
    the learner's own inference pipeline (`dls.test_dl`, as `learn.predict`): its resize to the trained size and its
    normalization. The display images are that batch decoded, so a map and its picture line up pixel for pixel."""
    items = [CifarImage(prepare_image(im)) for im in images]
    dl = learn.dls.test_dl(items, bs=len(items), num_workers=0)
    (x,) = dl.one_batch()[:1]
    seen = dl.decode((x,))[0]  # Normalize and IntToFloatTensor undone: 0-255, NCHW
    return x, (seen.float() / 255).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def target_layer(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(the layer Grad-CAM reads, the model's logits for `x`).

    Grad-CAM wants the last convolutional feature map: the most class-specific one that still has a layout. Every
    model here (the project's `Sequential(body, head)`, fastai's torchvision and timm bodies) ends in a conv stage
    and then pools, so one forward pass with hooks finds it without a table per architecture: the last module to
    finish whose output is 4-D and larger than 1x1. Pooling (1x1) and the head (2-D) are past it. Modules called
    more than once (torchvision's shared ReLU in each block) are skipped: their hook would see several maps. At
    32 px an ImageNet-stem ResNet has shrunk to 1x1 by its last stage, so its last map above 1x1 is chosen (the
    stage before, or the first conv of the last one); a 1x1 map would be a constant heat map.
    """
    calls: dict[nn.Module, int] = {}
    finished: list[tuple[nn.Module, torch.Tensor, int]] = []  # feature-map outputs, in the order they finished

    def hook(module, _inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            finished.append((module, output, output._version))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    # an output changed in place afterwards (a BatchNorm's, by the ReLU(inplace=True) after it) is not the map that
    # pytorch_grad_cam's gradient hook sees
    layer = next((m for m, out, v in reversed(finished) if calls[m] == 1 and out._version == v), None)
    if layer is None:
        raise ConfigError(f"{type(model).__name__}: no feature map larger than 1x1 for Grad-CAM to read")
    return layer, logits


def class_index(vocab: list[str], target: int | str) -> int:
    if isinstance(target, str) and target in vocab:
        return vocab.index(target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and 0 <= target < len(vocab):
        return int(target)
    raise ConfigError(f"target {target!r}: not one of the model's classes ({', '.join(vocab)}) or their index")


def heatmaps(
    learn_or_classifier, images: Sequence[ImageSource], targets: Sequence[int | str | None] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Grad-CAM for a batch of pictures: (maps N x H x W in [0, 1], the class each map is for, the images the model
    saw N x H x W x 3 in [0, 1]). `targets`: a class name or index per image; None (or a None entry): its top class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    learn = as_learner(learn_or_classifier)
    vocab = [str(v) for v in learn.dls.vocab]
    model = learn.model
    x, seen = model_inputs(learn, images)
    targets = list(targets) if targets is not None else [None] * len(x)
    if len(targets) != len(x):
        raise ConfigError(f"{len(targets)} targets for {len(x)} images")
    was_training = model.training
    layer, logits = target_layer(model.eval(), x)
    idx = [int(i) if t is None else class_index(vocab, t) for t, i in zip(targets, logits.argmax(1))]
    cam = GradCAM(model=model, target_layers=[layer])
    try:
        with torch.enable_grad():
            # a plain tensor (not fastai's TensorImage, whose activations pytorch_grad_cam cannot release) that
            # needs its gradient: a frozen body (fine-tuning's first stage) would otherwise leave its feature map
            # without one for Grad-CAM to read
            x = x.as_subclass(torch.Tensor).float().detach().requires_grad_(True)
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(i) for i in idx])
    finally:
        cam.activations_and_grads.release()  # its hooks stay on the model otherwise
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.clip(maps, 0.0, 1.0), [vocab[i] for i in idx], seen


def heatmap(learn_or_classifier, image: ImageSource, target: int | str | None = None) -> tuple[np.ndarray, str]:
    """Grad-CAM of one picture (path, bytes or PIL image) for its top class, or `target` (a class name or index):
    (map H x W in [0, 1] at the size the model saw, the class it is for)."""
    maps, classes, _ = heatmaps(learn_or_classifier, [image], [target])
    return maps[0], classes[0]


def overlay(image: ImageSource | np.ndarray, cam: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """The heat map over the picture (`show_cam_on_image`), upscaled to `size` px: RGB uint8, size x size x 3.

    `image`: HxWx3 floats in [0, 1] (from `heatmaps`), or any picture, prepared as the model's input was and resized
    to the map. The upscale is nearest-neighbour, so the model's pixels stay visible (as the demo shows its input)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = cam.shape
    if not isinstance(image, np.ndarray):
        image = np.asarray(prepare_image(image).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    rgb = show_cam_on_image(np.asarray(image, dtype=np.float32), cam, use_rgb=True)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST))
