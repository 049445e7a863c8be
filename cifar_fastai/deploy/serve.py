"""Serve a trained model: any uploaded picture -> a CIFAR-like 32x32 RGB image -> top-k classes (Gradio demo logic)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import MAX_FILE_BYTES, CifarImage, prepare_image
from ..data.index import NATIVE_SIZE
from ..errors import ImageInputError, ModelFileError

TOP_K = 3


# 32 px images would show as a thumbnail: scale them up to the box, with visible pixels (that is what the model sees)
CSS = (
    "#input-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; } "
    "#heatmap img { image-rendering: pixelated; }"
)


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
        # prepared here (not by the learner's pipeline) so that a learner from an older export.pkl sees the same
        # image; a CifarImage is also a PILImage, the input type such a pipeline expects
        rgb = CifarImage(prepare_image(img))
        with self.learn.no_bar():  # no progress bar per request in the server log
            _, _, probs = self.learn.predict(rgb)
        top = probs.topk(min(k, len(self.vocab)))
        return {self.vocab[i]: float(p) for p, i in zip(top.values, top.indices)}

    def explain(self, img: str | Path | bytes | Image.Image) -> np.ndarray:
        """Where the model looked for its top class: the Grad-CAM overlay on the image it saw, RGB uint8, upscaled."""
        from ..evaluation.cam import heatmaps, overlay

        maps, _, seen = heatmaps(self.learn, [img])
        return overlay(seen[0], maps[0])


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
    """The Gradio page: an image in, the top-3 classes and where the model looked (Grad-CAM) out; errors appear in
    the page and the server keeps going."""
    import gradio as gr

    def classify(payload) -> tuple[dict[str, float] | None, np.ndarray | None]:
        try:
            src = payload_source(payload)  # a pasted data URL is decoded here: its errors are the user's too
            if src is None:
                return None, None  # the image was cleared
            return clf.predict(src), clf.explain(src)
        except ImageInputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="cifar_fastai demo") as demo:
        gr.Markdown(
            f"# CIFAR-10 classifier\nUpload, paste or pick an image; the model ({clf.source}) shows its top "
            f"{TOP_K} of {len(clf.vocab)} classes: {', '.join(clf.vocab)}. Any photo works; it is centre-cropped "
            f"and shrunk to {NATIVE_SIZE}x{NATIVE_SIZE} pixels like the training images. The heat map (Grad-CAM) "
            "shows which parts of the image raised the top class's score most."
        )
        with gr.Row():
            image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="input-image", height=320)
            label = gr.Label(num_top_classes=TOP_K, label="prediction", elem_id="prediction")
            # png: a lossless copy of the overlay's pixels (gradio's default webp blurs the model's 32 px grid)
            heat = gr.Image(type="numpy", format="png", label="where it looked (Grad-CAM)",
                            elem_id="heatmap", height=320, interactive=False)  # fmt: skip
        # preprocess=False: our own decoder sees the raw upload, so a bad file gets our message, not a traceback
        # `input`, not `change`: change also fires when the page itself sets the value, so replacing a shown image
        # ran the model twice (and showed an error twice); examples run the model on click instead
        predicted = image.input(classify, image, [label, heat], api_name="predict", preprocess=False)
        # no earlier prediction (or heat map) beside an error
        predicted.failure(lambda: (None, None), None, [label, heat], api_name=False)
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=image, outputs=[label, heat], fn=classify,
                        run_on_click=True, preprocess=False, label="CIFAR-10 test images", api_name=False)  # fmt: skip
    return demo


def serve(demo, host: str = "127.0.0.1", port: int | None = None, queue_size: int = 16, **kwargs):
    """Queue (one prediction at a time, at most `queue_size` waiting) and launch with the upload size limit."""
    demo.queue(max_size=queue_size, default_concurrency_limit=1)  # learn.predict is not thread-safe
    return demo.launch(
        server_name=host, server_port=port, max_file_size=MAX_FILE_BYTES, show_error=True, css=CSS, **kwargs
    )
