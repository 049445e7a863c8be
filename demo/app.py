"""Gradio demo: upload a picture, see the model's top-3 CIFAR-10 classes (logic in `cifar_fastai.deploy.serve`).

    python demo/app.py                                  # newest run under runs/ (safe model.json format)
    python demo/app.py --model runs/resnet18-cifar10 --port 7860
    python demo/app.py --model runs/old/export.pkl --trust-pickle   # only for a .pkl you made yourself
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cifar_fastai.cli import run_or_exit
from cifar_fastai.deploy.serve import Classifier, build_demo, find_default_model, serve

EXAMPLES = sorted((Path(__file__).parent / "examples").glob("*.*"))
clf: Classifier | None = None


def predict(img) -> dict[str, float]:
    """A picture (path, bytes or PIL image) -> {label: probability} for the top 3 classes of the loaded model."""
    return clf.predict(img)


def make_demo(model: Path | None = None, trust_pickle: bool = False):
    """Load the model (the newest run's safe format by default) and build the page; nothing is launched."""
    global clf
    clf = run_or_exit(lambda: Classifier.load(model or find_default_model(), trust_pickle=trust_pickle))
    return build_demo(clf, EXAMPLES)


def main(
    model: Annotated[Path | None, typer.Option(help="run folder, model.json, or export.pkl (with --trust-pickle); default: newest run under runs/")] = None,
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the demo to your network")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port (default: gradio's, 7860 or the next free one)")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="allow loading export.pkl: unpickling runs code, so only for files you trust")] = False,
) -> None:
    """Serve a trained model in a web page: upload, paste or pick an image, see the top-3 classes."""
    demo = make_demo(model, trust_pickle)
    serve(demo, host=host, port=port)


if __name__ == "__main__":
    typer.run(main)
