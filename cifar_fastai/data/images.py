"""Any picture -> the RGB image a CIFAR model expects: one path for the Python API, evaluation and the demo."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from fastai.vision.core import PILImage
from PIL import Image, ImageOps
from torch import Tensor

from ..errors import ImageInputError
from .index import NATIVE_SIZE

MAX_FILE_BYTES = 20 * 1024 * 1024  # 20 MB: a 4000x3000 phone JPEG is 3-8 MB; far larger uploads are not photos


MAX_PIXELS = 50_000_000  # 50 MP (an 8000x6000 camera); PIL's own decompression-bomb limit is 89 MP


WHITE = (255, 255, 255)  # transparent pixels are shown on white by browsers, so the model sees them on white too


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
            # our own pixel limit below decides, with a message that says so; PIL's warns from 89 MP
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL refuses to even open twice its limit (over 178 MP)
        raise ImageInputError(f"{name}: over the {MAX_PIXELS / 1e6:.0f} megapixel limit") from None
    except Image.UnidentifiedImageError as e:
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
        raise ImageInputError(f"{source_name(src)}: this image cannot be decoded, it may be truncated or damaged ({e})") from None
    return ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR, centering=(0.5, 0.5))


def source_name(src) -> str:
    """How a message names an input: the file's name, or 'upload' for bytes and in-memory images."""
    return Path(src).name if isinstance(src, (str, Path)) else "upload"


class CifarImage(PILImage):
    """fastai's `PILImage` whose `create` prepares a file, bytes or PIL image as the demo does (`prepare_image`):
    so `learn.predict(path)`, `dls.test_dl(files)` and the demo see the same 32x32 RGB image, and an unreadable
    input raises `ImageInputError` naming it. Arrays and tensors are taken as they are (fastai's own path)."""

    # the annotation is PILImage.create's: fastai's test_dl (and so learn.predict) accepts the types it names
    @classmethod
    def create(cls, fn: Path | str | Tensor | np.ndarray | bytes | Image.Image, **kwargs):
        if isinstance(fn, (str, Path, bytes, Image.Image)):
            return cls(prepare_image(fn))
        return super().create(fn, **kwargs)
