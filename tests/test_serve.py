"""Demo input handling: any picture a user may upload becomes the 32x32 RGB image the model expects, or a clear error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_fastai.data.images import MAX_FILE_BYTES, prepare_image
from cifar_fastai.deploy.serve import Classifier, find_default_model
from cifar_fastai.errors import ImageInputError, ModelFileError

RED = (220, 30, 30)


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def odd_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One file per awkward format, with the colour its centre should have after conversion."""
    red = Image.new("RGB", (64, 48), RED)
    big = Image.new("RGB", (4000, 3000), RED)
    grey = Image.new("L", (40, 40), 128)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent -> white
    rgba.paste((*RED, 255), (10, 10, 30, 30))
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, *RED] + [0] * 762)
    pal.paste(1, (10, 10, 30, 30))
    pal.info["transparency"] = 0
    cmyk = Image.new("CMYK", (40, 40), (0, 220, 220, 30))
    deep = Image.fromarray(np.full((40, 40), 65535 // 2, dtype=np.uint16))  # 16-bit grey, half range
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), (30, 30, 220))]
    gif = folder / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "large-jpeg": (save(big, folder / "big.jpg", quality=90), RED),
        "grayscale": (save(grey, folder / "grey.png"), (128, 128, 128)),
        "rgba-png": (save(rgba, folder / "rgba.png"), RED),
        "palette-png-transparent": (save(pal, folder / "pal.png", transparency=0), RED),
        "cmyk-jpeg": (save(cmyk, folder / "cmyk.jpg"), None),  # colour depends on PIL's naive CMYK->RGB
        "16-bit-png": (save(deep, folder / "deep.png"), (128, 128, 128)),
        "webp": (save(red, folder / "red.webp", lossless=True), RED),
        "animated-gif-first-frame": (gif, RED),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return odd_images(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize(
    "kind",
    ["large-jpeg", "grayscale", "rgba-png", "palette-png-transparent", "cmyk-jpeg", "16-bit-png", "webp",
     "animated-gif-first-frame"],
)  # fmt: skip
def test_odd_formats_become_32px_rgb(images, kind):
    path, colour = images[kind]
    im = prepare_image(path)
    assert im.mode == "RGB" and im.size == (32, 32)
    centre = np.asarray(im)[16, 16].astype(int)
    if colour is not None:
        assert np.abs(centre - colour).max() <= 12, centre
    if kind in ("rgba-png", "palette-png-transparent"):
        assert np.asarray(im)[0, 0].min() >= 245  # transparent border shown on white, not black
    if kind == "cmyk-jpeg":
        assert centre[0] > centre[1] + 100  # still a red, not inverted to cyan


def test_photo_is_centre_cropped_not_squashed(tmp_path):
    im = Image.new("RGB", (300, 100), (0, 0, 255))
    im.paste((255, 0, 0), (100, 0, 200, 100))  # red square in the middle, blue on the sides
    out = np.asarray(prepare_image(save(im, tmp_path / "wide.png")))
    assert out[:, 2:30, 0].min() > 200 and out[:, 2:30, 2].max() < 50


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (60, 30), RED)
    im.paste((30, 30, 220), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = np.asarray(prepare_image(save(im, tmp_path / "rot.jpg", exif=exif, quality=95)))
    assert out[2, 16, 2] > 150 and out[29, 16, 0] > 150  # blue on top, red at the bottom after rotation


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"%PDF-1.4 this is a document, not an image", "not an image"),
        ("truncated", "truncated"),
        ("huge", "MB limit"),
    ],
    ids=["empty", "not-an-image", "truncated-jpeg", "over-size-limit"],
)
def test_bad_files_give_a_clear_message(tmp_path, content, message):
    path = tmp_path / "upload.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    elif content == "huge":
        content = b"\xff\xd8" + b"\0" * (MAX_FILE_BYTES + 1)
    path.write_bytes(content)
    with pytest.raises(ImageInputError, match=message):
        prepare_image(path)


@pytest.mark.parametrize("size", [(8000, 7000), (10000, 9000), (20000, 10000)], ids=["56MP", "90MP", "200MP"])
def test_too_many_pixels_is_refused_by_our_limit(tmp_path, size):
    # one colour: tiny on disk, tens of MP in memory; 56 MP is under PIL's own bomb warning (89 MP), so only the
    # project's 50 MP limit can refuse it; a real 90 MP photo is over the limit, not "not an image"
    path = save(Image.new("1", size), tmp_path / "bomb.png", optimize=True)
    assert path.stat().st_size < MAX_FILE_BYTES
    with pytest.raises(ImageInputError, match="megapixel limit"):
        prepare_image(path)


def test_classifier_top3_comes_from_the_model_vocab(tiny_run, images):
    from cifar_fastai import load_model

    clf, learn = Classifier.load(tiny_run), load_model(tiny_run)
    for path, _ in images.values():
        out = clf.predict(path)
        probs = learn.predict(path)[2]  # the Python API on the same file: the demo's top 3 are its best 3, in order
        top = probs.topk(3)
        assert list(out) == [clf.vocab[int(i)] for i in top.indices], path.name
        assert list(out.values()) == pytest.approx(top.values.tolist(), abs=1e-6)


def test_classifier_needs_trust_for_a_pickle(tiny_run):
    with pytest.raises(ModelFileError, match="trust"):
        Classifier.load(tiny_run / "export.pkl")
    assert Classifier.load(tiny_run / "export.pkl", trust_pickle=True).vocab == Classifier.load(tiny_run).vocab


def test_default_model_is_the_newest_run_or_a_clear_message(tiny_run, tmp_path):
    import os
    import shutil

    runs = tmp_path / "runs"
    with pytest.raises(ModelFileError, match="scripts/train.py"):
        find_default_model(runs)
    old, new = (shutil.copytree(tiny_run, runs / name) for name in ("old", "new"))
    pickle_only = runs / "pickle-only"  # newest of all, but no safe model: not a default
    pickle_only.mkdir()
    shutil.copy(tiny_run / "export.pkl", pickle_only)
    t = (new / "model.json").stat().st_mtime
    os.utime(old / "model.json", (t - 100, t - 100))
    os.utime(pickle_only / "export.pkl", (t + 100, t + 100))
    assert find_default_model(runs) == new
    os.utime(old / "model.json", (t + 50, t + 50))
    assert find_default_model(runs) == old
