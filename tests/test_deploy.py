"""CPU deployment: ONNX export matches PyTorch, int8 keeps the accuracy, the benchmark writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cifar_fastai.deploy.onnx import PARITY_ATOL, eager_logits, image_arrays, onnx_logits, ort_session, wrapped_model
from tests.conftest import REPO


def script_app(name: str, attr: str):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), REPO / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, attr)


def invoke(app, *args: str):
    import typer
    from typer.testing import CliRunner

    if not isinstance(app, typer.Typer):
        cli = typer.Typer()
        cli.command()(app)
        app = cli
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run, exported to ONNX and int8 with `scripts/export.py` as a user would."""
    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("deploy") / "run"))
    export = script_app("scripts/export.py", "app")
    assert "max abs logit diff" in invoke(export, "onnx", str(run)).output
    invoke(export, "int8", str(run), "--calib", "64")
    return run


def test_onnx_matches_pytorch(exported, tiny_data):
    x, _, _ = image_arrays(str(tiny_data), test=True)
    x = np.concatenate([x, np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)])
    model, _ = wrapped_model(exported)
    diff = np.abs(onnx_logits(ort_session(exported / "model.onnx"), x) - eager_logits(model, x)).max()
    assert diff < PARITY_ATOL


def test_onnx_with_documented_preprocessing_agrees_with_fastai_predict(exported, tiny_data):
    """Feeding the graph as model.onnx.json says gives the same classes as `learn.predict` on the files."""
    from cifar_fastai import load_model
    from cifar_fastai.data.images import prepare_image

    doc = json.loads((exported / "model.onnx.json").read_text())
    assert doc["input"]["shape"][1:] == [3, 32, 32] and "normalize" in doc["inside_the_graph"]
    learn = load_model(exported)
    files = sorted((tiny_data / "test").glob("*/*.*"))[::9]
    x = np.stack([np.asarray(prepare_image(f), dtype=np.float32).transpose(2, 0, 1) / 255 for f in files])
    onnx_labels = [doc["vocab"][i] for i in onnx_logits(ort_session(exported / "model.onnx"), x).argmax(1)]
    with learn.no_bar():
        assert onnx_labels == [learn.predict(f)[0] for f in files]


def test_int8_keeps_the_accuracy_and_is_smaller(exported, tiny_data):
    x, y, _ = image_arrays(str(tiny_data), test=True)
    acc = {
        name: (onnx_logits(ort_session(exported / name), x).argmax(1) == y).mean()
        for name in ("model.onnx", "model.int8.onnx")
    }
    assert acc["model.onnx"] > 0.5 and acc["model.int8.onnx"] >= acc["model.onnx"] - 0.05
    assert (exported / "model.int8.onnx").stat().st_size < (exported / "model.onnx").stat().st_size


def test_benchmark_writes_json_for_the_three_variants(exported, tmp_path, monkeypatch):
    from cifar_fastai.deploy import onnx

    timed = []  # (batch size, timed calls, median ms) of every latency measurement
    latency_ms = onnx.latency_ms

    def spy(fn, x, warmup=10, reps=100):
        ms = latency_ms(fn, x, warmup, reps)
        timed.append((len(x), reps, ms))
        return ms

    monkeypatch.setattr(onnx, "latency_ms", spy)
    out = tmp_path / "deploy_speed.json"
    bench = script_app("bench/deploy_speed.py", "main")
    r = invoke(bench, str(exported), "--n-test", "50", "--reps", "5", "--out", str(out))
    assert "int8_onnx" in r.output
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"fp32_eager", "fp32_onnx", "int8_onnx"} and res["n_test"] == 50
    acc = {k: v["test_accuracy"] for k, v in res["results"].items()}
    # the same 50 test images through each variant: the fp32 graph agrees with eager, int8 stays close
    assert acc["fp32_eager"] > 0.5 and acc["fp32_onnx"] == acc["fp32_eager"]
    assert abs(acc["int8_onnx"] - acc["fp32_eager"]) <= 0.1
    # per variant, a batch of (at most) 64, then --reps single images were timed; the JSON holds those medians
    assert [(n, reps) for n, reps, _ in timed] == [(50, 10), (1, 5)] * 3, "50 test images: the batch holds 50"
    for v, (n, _, ms_batch), (_, _, ms1) in zip(res["results"].values(), timed[::2], timed[1::2]):
        assert v["latency_ms_batch1"] == ms1 and v["throughput_img_s_batch64"] == pytest.approx(n / (ms_batch / 1000))
        assert v["speedup_batch1_vs_eager"] == pytest.approx(res["results"]["fp32_eager"]["latency_ms_batch1"] / ms1)
    assert res["max_abs_logit_diff_fp32_onnx"] < PARITY_ATOL


def test_int8_without_onnx_or_data_says_what_to_do(tiny_run, tmp_path):
    from cifar_fastai.deploy.onnx import DeployError, benchmark, quantize_int8

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    with pytest.raises(DeployError, match="scripts/export.py onnx"):
        benchmark(run)
    # no model.onnx, and no config.json to say which images calibrate it
    (run / "config.json").unlink()
    with pytest.raises(DeployError, match="no config.json to say which data it was trained on; pass --data"):
        quantize_int8(run)
    assert not (run / "model.int8.onnx").exists() and not (run / "model.onnx").exists(), "refused before any export"
