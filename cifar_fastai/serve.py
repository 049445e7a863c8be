"""Serve a trained model: any uploaded picture -> a CIFAR-like 32x32 RGB image -> top-k classes (Gradio demo logic)."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .data import NATIVE_SIZE
from .errors import ImageInputError, ModelFileError

MAX_FILE_BYTES = 20 * 1024 * 1024  # 20 MB: a 4000x3000 phone JPEG is 3-8 MB; far larger uploads are not photos
MAX_PIXELS = 50_000_000  # 50 MP (an 8000x6000 camera); PIL's own decompression-bomb limit is 89 MP
WHITE = (255, 255, 255)  # transparent pixels are shown on white by browsers, so the model sees them on white too
TOP_K = 3
# 32 px images would show as a thumbnail: scale them up to the box, with visible pixels (that is what the model sees)
CSS = "#input-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


# ------------------------------------------------------------------------------------------------ any image -> RGB
def open_image(src: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a path, bytes or PIL image, refusing empty, oversized, non-image and over-large-in-pixels inputs."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageInputError(f"{path.name}: no such file")
        n = path.stat().st_size
        name = path.name
    else:
        n, name = len(src), "upload"
    if n == 0:
        raise ImageInputError(f"{name}: the file is empty")
    if n > MAX_FILE_BYTES:
        raise ImageInputError(f"{name}: {n / 2**20:.1f} MB is over the {MAX_FILE_BYTES / 2**20:.0f} MB limit")
    data = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"{name}: not an image this demo can read ({type(e).__name__})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"{name}: not a readable image ({e})") from None
    if im.width * im.height > MAX_PIXELS:
        raise ImageInputError(
            f"{name}: {im.width}x{im.height} pixels is over the {MAX_PIXELS / 1e6:.0f} megapixel limit"
        )
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit and float scaled to 8 bits, palette/alpha composited on white, CMYK converted."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit files span 0..65535; 'I'/'F' may hold anything: scale by the type's range, not the image's own
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F" and arr.max() <= 1.0:
            top = 1.0  # float images in [0, 1]
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa", "RGBA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba)
    return im if im.mode == "RGB" else im.convert("RGB")  # L, 1, CMYK (Adobe-inverted handled by PIL), YCbCr


def prepare_image(src: str | Path | bytes | Image.Image, size: int = NATIVE_SIZE) -> Image.Image:
    """Any picture -> the `size`x`size` RGB image the model was trained on (CIFAR: 32x32, centred square crop).

    Steps: first frame of an animation; EXIF rotation applied; RGB (see `to_rgb`); centre-crop to a square and
    resize with PIL's antialiased bilinear filter, as fastai's `Resize(size)` does at inference (crop, bilinear).
    """
    im = open_image(src)
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated GIF/WebP/PNG: the first frame
        if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            im.draft(im.mode, (size * 4, size * 4))  # decode a 4000x3000 JPEG at 1/8 scale: 64x less work
        im.load()
        im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
    except ImageInputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated data, broken chunks, unsupported modes
        raise ImageInputError(f"this image cannot be decoded, it may be truncated or damaged ({e})") from None
    return ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR, centering=(0.5, 0.5))


# ------------------------------------------------------------------------------------------------ model + predict
class Classifier:
    """A loaded model and its vocab; `predict` maps any picture to {label: probability} for the top classes."""

    def __init__(self, learn, source: Path):
        self.learn, self.source = learn, source
        self.vocab = [str(v) for v in learn.dls.vocab]

    @classmethod
    def load(cls, path: str | Path, trust_pickle: bool = False) -> Classifier:
        from .safe import load

        return cls(load(path, trust_pickle=trust_pickle), Path(path))

    def predict(self, img: str | Path | bytes | Image.Image, k: int = TOP_K) -> dict[str, float]:
        from fastai.vision.core import PILImage

        rgb = prepare_image(img)  # the model's own pipeline then resizes to its input size and normalizes
        with self.learn.no_bar():  # no progress bar per request in the server log
            _, _, probs = self.learn.predict(PILImage.create(rgb))
        top = probs.topk(min(k, len(self.vocab)))
        return {self.vocab[i]: float(p) for p, i in zip(top.values, top.indices)}


def find_default_model(runs: str | Path = "runs") -> Path:
    """The newest run folder under `runs/` that holds the safe format, or a message saying how to make one."""
    from .safe import JSON_NAME

    found = sorted(Path(runs).glob(f"*/{JSON_NAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ModelFileError(
            f"no model found under {runs}/ (a run folder with {JSON_NAME}). Train one first, e.g. "
            "`python scripts/train.py --data sample --epochs 1`, or pass --model runs/<name>"
        )
    return found[-1].parent


def payload_source(payload) -> str | bytes | None:
    """What gradio hands an event with `preprocess=False`: an `ImageData` dict with a cached `path` (or a data URL)."""
    if payload is None or isinstance(payload, (str, Path)):
        return payload
    if isinstance(payload, dict):
        url = payload.get("url") or ""
        if not payload.get("path") and url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=False)
            except (IndexError, ValueError):
                raise ImageInputError("the pasted image is not valid base64 data") from None
        return payload.get("path")
    raise ImageInputError(f"unexpected input of type {type(payload).__name__}")


# ------------------------------------------------------------------------------------------------------- the page
def build_demo(clf: Classifier, examples: list[Path] | None = None):
    """The Gradio page: an image in, the top-3 classes out; errors appear in the page and the server keeps going."""
    import gradio as gr

    def classify(payload) -> dict[str, float] | None:
        src = payload_source(payload)
        if src is None:
            return None  # the image was cleared
        try:
            return clf.predict(src)
        except ImageInputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="cifar_fastai demo") as demo:
        gr.Markdown(
            f"# CIFAR-10 classifier\nUpload, paste or pick an image; the model ({clf.source}) shows its top "
            f"{TOP_K} of {len(clf.vocab)} classes: {', '.join(clf.vocab)}. Any photo works; it is centre-cropped "
            f"and shrunk to {NATIVE_SIZE}x{NATIVE_SIZE} pixels like the training images."
        )
        with gr.Row():
            image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="input-image", height=320)
            label = gr.Label(num_top_classes=TOP_K, label="prediction", elem_id="prediction")
        # preprocess=False: our own decoder sees the raw upload, so a bad file gets our message, not a traceback
        image.change(classify, image, label, api_name="predict", preprocess=False)
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=image, label="CIFAR-10 test images")
    return demo


def serve(demo, host: str = "127.0.0.1", port: int | None = None, queue_size: int = 16, **kwargs):
    """Queue (one prediction at a time, at most `queue_size` waiting) and launch with the upload size limit."""
    demo.queue(max_size=queue_size, default_concurrency_limit=1)  # learn.predict is not thread-safe
    return demo.launch(
        server_name=host, server_port=port, max_file_size=MAX_FILE_BYTES, show_error=True, css=CSS, **kwargs
    )
