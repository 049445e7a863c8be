"""CPU deployment: ONNX export with the preprocessing inside the graph, int8 static quantization, and a speed benchmark."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.index import NATIVE_SIZE
from ..data.transforms import input_spec
from ..errors import CifarFastaiError, ModelFileError
from ..utils import cpu_info

ONNX_NAME, INT8_NAME, ONNX_DOC = "model.onnx", "model.int8.onnx", "model.onnx.json"


OPSET = 18  # torch.onnx's dynamo exporter default; onnxruntime >= 1.16 runs it


PARITY_ATOL = 1e-4  # fp32 ONNX vs eager logits: only float reassociation differs (measured ~1e-6 on resnet18)


class DeployError(CifarFastaiError):
    """A model that cannot be exported, quantized or benchmarked."""


class WithPreprocessing(nn.Module):
    """The model plus what fastai's batch pipeline does after decoding: resize (if trained larger) and normalize.

    Input: float32 NCHW RGB in [0, 1] at 32x32 (a CIFAR image / 255); output: logits. Same order as
    `transforms.batch_tfms_for`: BatchResize (order 15) before Normalize (order 99).
    """

    def __init__(self, model: nn.Module, mean, std, size: int):
        super().__init__()
        self.model, self.size = model, size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != NATIVE_SIZE:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model((x - self.mean) / self.std)


def wrapped_model(run: str | Path, trust_pickle: bool = False) -> tuple[WithPreprocessing, dict]:
    from .safe import load

    learn = load(run, trust_pickle=trust_pickle)
    meta = input_spec(learn.dls)
    model = WithPreprocessing(learn.model.cpu().eval(), meta["mean"], meta["std"], meta["input_size"]).eval()
    return model, meta


def run_folder(run: str | Path) -> Path:
    run = Path(run).expanduser()
    folder = run if run.is_dir() else run.parent
    if not folder.is_dir():
        raise ModelFileError(f"{run}: no such run folder")
    return folder


# ------------------------------------------------------------------------------------------------------- ONNX
def export_onnx(run: str | Path, out: str | Path | None = None, trust_pickle: bool = False) -> Path:
    """Write `model.onnx` (preprocessing inside, dynamic batch) and `model.onnx.json` (how to feed it) beside the model."""
    model, meta = wrapped_model(run, trust_pickle)
    out = Path(out) if out else run_folder(run) / ONNX_NAME
    x = torch.rand(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    try:
        torch.onnx.export(
            model, (x,), str(out), input_names=["image"], output_names=["logits"], opset_version=OPSET,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, external_data=False, verbose=False,
        )  # fmt: skip
    except Exception as e:
        raise DeployError(f"ONNX export of {run} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    doc = {
        "model": out.name,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["batch", 3, NATIVE_SIZE, NATIVE_SIZE],
            "layout": "NCHW, RGB",
            "range": "[0, 1] (uint8 pixels / 255)",
            "how": "any picture: first frame, EXIF rotation, RGB (transparency on white), centre-crop to a square, "
            f"bilinear resize to {NATIVE_SIZE}x{NATIVE_SIZE}: cifar_fastai.data.images.prepare_image",
        },
        "inside_the_graph": (
            (f"bilinear resize to {meta['input_size']}x{meta['input_size']}, " if meta["input_size"] != NATIVE_SIZE else "")
            + f"normalize (x - mean) / std with mean {meta['mean']} and std {meta['std']}"
        ),
        "output": {"name": "logits", "shape": ["batch", len(meta["vocab"])], "softmax": "not applied"},
        "vocab": meta["vocab"],
        "opset": OPSET,
    }
    out.with_name(ONNX_DOC).write_text(json.dumps(doc, indent=2))
    return out


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(sess, x: np.ndarray, bs: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + bs]})[0] for i in range(0, len(x), bs)])


@torch.inference_mode()
def eager_logits(model: nn.Module, x: np.ndarray, bs: int = 256) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(x[i : i + bs])).numpy() for i in range(0, len(x), bs)])


# ------------------------------------------------------------------------------------------------ images as arrays
def image_arrays(data: str, test: bool, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float32 NCHW in [0, 1], labels, vocab) for the train or test images of `--data`, optionally a seeded subset."""
    from ..data.images import prepare_image
    from ..data.index import index_images
    from ..data.sources import resolve_data

    index = index_images(resolve_data(data), verbose=False)
    idx = index.split(test)
    if n is not None and n < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    if index.images is not None and index.images.shape[1:3] == (NATIVE_SIZE, NATIVE_SIZE):
        imgs = index.images[idx]
    else:  # images of other sizes: the demo's own conversion to 32x32
        imgs = np.stack([np.asarray(prepare_image(index.files[i])) for i in idx])
    x = np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    return x, index.labels[idx].astype(np.int64), index.vocab


# ------------------------------------------------------------------------------------------------------- int8
def quantize_int8(
    run: str | Path,
    data: str | None = None,
    n_calib: int = 512,
    per_channel: bool = True,
    reduce_range: bool = True,
    out: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Static int8 (QDQ, uint8 activations / int8 weights) calibrated on `n_calib` seeded *training* images.

    reduce_range (7-bit weights): onnxruntime's advice for x86 CPUs without VNNI, where u8s8 products can saturate.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = run_folder(run)
    data = data or run_data(folder)  # before any export: a run without calibration data fails at once, leaving nothing
    fp32 = folder / ONNX_NAME
    if not fp32.is_file():
        fp32 = export_onnx(run, trust_pickle=trust_pickle)
    calib, _, vocab = image_arrays(data, test=False, n=n_calib)
    if vocab != json.loads((folder / ONNX_DOC).read_text())["vocab"]:
        raise DeployError(f"--data {data}: its classes differ from the model's")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib[i : i + 32] for i in range(0, len(calib), 32))

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"image": b}

    out = Path(out) if out else folder / INT8_NAME
    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # fold BN, infer shapes: ORT's recipe
        quantize_static(
            str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)
    return out


def run_data(folder: Path) -> str:
    """The `--data` the run was trained on (from config.json), so calibration and accuracy use the same images."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise DeployError(f"{folder}: no config.json to say which data it was trained on; pass --data")
    return json.loads(cfg.read_text())["config"]["data"]


# --------------------------------------------------------------------------------------------------- benchmark
def latency_ms(fn, x, warmup: int = 10, reps: int = 100) -> float:
    """Median wall time of `fn(x)` in ms (median: robust to the other processes sharing these cores)."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def benchmark(
    run: str | Path, data: str | None = None, n_test: int | None = None, reps: int = 200, threads: int | None = None
) -> dict:
    """Accuracy on the test set and latency (batch 1) / throughput (batch 64) of fp32 eager, fp32 ONNX, int8 ONNX."""
    folder = run_folder(run)
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, meta = wrapped_model(folder)
    for name in (ONNX_NAME, INT8_NAME):
        if not (folder / name).is_file():
            raise DeployError(f"{folder / name} missing: run `python scripts/export.py {'onnx' if name == ONNX_NAME else 'int8'} {folder}`")
    data = data or run_data(folder)
    x, y, vocab = image_arrays(data, test=True, n=n_test)
    if vocab != meta["vocab"]:
        raise DeployError(f"--data {data}: its classes differ from the model's")
    sessions = {"fp32_onnx": ort_session(folder / ONNX_NAME, threads), "int8_onnx": ort_session(folder / INT8_NAME, threads)}

    @torch.inference_mode()
    def eager(b):
        return model(torch.from_numpy(b))

    runners = {"fp32_eager": eager}
    for key, sess in sessions.items():
        runners[key] = lambda b, s=sess: s.run(None, {"image": b})
    logits = {"fp32_eager": eager_logits(model, x)} | {k: onnx_logits(s, x) for k, s in sessions.items()}
    results = {}
    for key, fn in runners.items():
        b64 = x[:64]
        ms64 = latency_ms(fn, b64, warmup=3, reps=max(10, reps // 10))
        results[key] = {
            "test_accuracy": float((logits[key].argmax(1) == y).mean()),
            "latency_ms_batch1": latency_ms(fn, x[:1], reps=reps),
            "throughput_img_s_batch64": len(b64) / (ms64 / 1000),  # fewer than 64 with a small --n-test
            "file_mb": (folder / (ONNX_NAME if key == "fp32_onnx" else INT8_NAME)).stat().st_size / 2**20
            if key != "fp32_eager"
            else None,
        }
    base = results["fp32_eager"]
    for r in results.values():
        r["speedup_batch1_vs_eager"] = base["latency_ms_batch1"] / r["latency_ms_batch1"]
        r["speedup_batch64_vs_eager"] = r["throughput_img_s_batch64"] / base["throughput_img_s_batch64"]
        r["accuracy_points_vs_eager"] = 100 * (r["test_accuracy"] - base["test_accuracy"])
    return {
        "run": str(folder),
        "data": data,
        "n_test": len(y),
        "threads": threads,
        "max_abs_logit_diff_fp32_onnx": float(np.abs(logits["fp32_onnx"] - logits["fp32_eager"]).max()),
        "results": results,
        "goal_int8_2x_batch1_and_at_most_0.5_points": bool(
            results["int8_onnx"]["speedup_batch1_vs_eager"] >= 2 and results["int8_onnx"]["accuracy_points_vs_eager"] >= -0.5
        ),
        "cpu": cpu_info()["model"],
        "versions": _versions(),
    }


def _versions() -> dict:
    import onnxruntime

    from ..utils import versions

    return {**versions(), "onnxruntime": onnxruntime.__version__}
