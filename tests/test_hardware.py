"""Device and precision choices: resolution with faked GPUs, CPU bf16 training, exports across devices and precisions."""

from __future__ import annotations

import json
import shutil
import typing
from types import SimpleNamespace

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.training import ShortEpochCallback
from fastai.learner import load_learner
from torch import serialization
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_data, load
from cifar_fastai.cli import train_app
from cifar_fastai.deploy.serve import Classifier
from cifar_fastai.training import hardware
from cifar_fastai.training.hardware import CpuMixedPrecision, HardwareError, resolve_device, resolve_precision
from cifar_fastai.training.learner import create_learner
from cifar_fastai.training.run import train

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA GPU is present; `bf16` says whether it is an Ampere+ one."""

    def fake(bf16: bool = True, mps: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")

    return fake


REAL_CPU_BF16_PAYS = hardware.cpu_bf16_pays
REAL_STEP_RATE = hardware.step_rate  # read at import, before conftest's session-wide stand-in for the probe


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    monkeypatch.setattr(hardware, "cpu_bf16_pays", lambda: False)


def test_auto_picks_gpu_and_its_fastest_safe_precision(fake_gpu):
    fake_gpu(bf16=True)
    assert resolve_device("auto") == CUDA
    assert resolve_precision("auto", CUDA) == "bf16", "Ampere+: bf16 (no loss scaling needed)"
    fake_gpu(bf16=False)
    assert resolve_precision("auto", CUDA) == "fp16", "older GPUs: fp16 with fastai's loss scaling"
    assert resolve_precision("fp32", CUDA) == "fp32"
    with pytest.raises(HardwareError, match="bf16.*Fake GPU.*Ampere"):
        resolve_precision("bf16", CUDA)


def test_auto_on_cpu_and_mps(no_gpu, monkeypatch):
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(hardware, "cpu_bf16_pays", REAL_CPU_BF16_PAYS)  # no_gpu stubs it; here the flags decide
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})
    assert resolve_precision("auto", CPU) == "fp32", "no bf16 instructions: bf16 was measured slower than fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    for flag in ("avx512_bf16", "amx_bf16"):  # measured faster with AVX-512 BF16; recommended with AMX
        monkeypatch.setattr(hardware, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps" and resolve_device("mps") == MPS
    assert resolve_precision("auto", MPS) == "fp32"
    with pytest.raises(HardwareError, match="CUDA only"):
        resolve_precision("fp16", MPS)


class MixedPrecisionSpy(Callback):
    """Whether the fit ran under the CPU's bf16 autocast (what the run did, beside what config.json says)."""

    order = 100
    seen: typing.ClassVar[list] = []

    def before_batch(self):
        if self.training:
            MixedPrecisionSpy.seen.append(torch.is_autocast_enabled("cpu"))


@pytest.mark.parametrize("rates,picked", [({False: 200.0, True: 120.0}, "fp32"), ({False: 100.0, True: 180.0}, "bf16")])
def test_auto_on_a_bf16_cpu_trains_in_what_the_probe_measured_faster(rates, picked, tiny_data, tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """The AMX host (bf16 no faster than fp32) and the AVX-512 BF16 host (bf16 faster): `auto` follows the probe,
    says so, and probes each model shape once per machine."""
    from cifar_fastai.training import run as run_module

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    monkeypatch.setattr(hardware, "probe_file", lambda: tmp_path / "probe.json")
    monkeypatch.setattr(hardware, "_MEASURED", {})  # nothing this process measured before
    calls = []
    monkeypatch.setattr(hardware, "step_rate", lambda model, x, y, bf16, steps=3: calls.append(bf16) or rates[bf16])
    callbacks = run_module.run_callbacks
    monkeypatch.setattr(run_module, "run_callbacks", lambda *a, **k: [*callbacks(*a, **k), MixedPrecisionSpy()])
    MixedPrecisionSpy.seen = []
    cfg = TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=16, lr=1e-2, device="cpu", out=str(tmp_path), name="p")
    res = train(cfg)
    out = capsys.readouterr().out
    assert f"precision {picked} [--precision auto: probe: fp32 {rates[False]:,.0f}, bf16 {rates[True]:,.0f} images/s]" in out
    assert json.loads((res.run_dir / "config.json").read_text())["resolved"]["hardware"]["precision"] == picked
    assert MixedPrecisionSpy.seen and set(MixedPrecisionSpy.seen) == {picked == "bf16"}, "the fit ran as it says"
    assert calls == [False, True, True, False], "each timed twice, in an order that shares out a passing load"
    if picked == "bf16":  # the caching below is the same for either outcome
        return
    monkeypatch.setattr(hardware, "_MEASURED", {})  # a later process: it reads the table
    train(cfg.replace(name="p2"), verbose=False)
    assert len(calls) == 4, "the same shape on the same machine: measured once"
    train(cfg.replace(name="p3", width=0.5), verbose=False)
    assert len(calls) == 8, "another shape is probed anew"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    train(cfg.replace(name="p4", width=0.25), verbose=False)
    assert len(calls) == 8, "no bf16 instructions: fp32 without a probe"
    assert "no bf16 instructions" in json.dumps(json.loads((tmp_path / "p4" / "config.json").read_text()))


def test_a_probe_round_bent_by_other_work_does_not_decide(monkeypatch, tmp_path):
    """Other work on the cores during the first bf16 round (a fifth of its speed) and during the last fp32 round:
    each precision's faster round counts, so bf16 still wins, as it does alone."""
    monkeypatch.setattr(hardware, "probe_file", lambda: tmp_path / "probe.json")
    monkeypatch.setattr(hardware, "_MEASURED", {})
    alone = {False: 250.0, True: 400.0}
    bent = iter([1.0, 0.2, 1.0, 0.3])  # per call, in PROBE_ORDER
    monkeypatch.setattr(hardware, "step_rate", lambda model, x, y, bf16, steps=3: alone[bf16] * next(bent))
    result = hardware.probe_precision(torch.nn.Conv2d(3, 4, 3), TrainConfig(arch="tiny", bs=16), 10)
    assert result["picked"] == "bf16" and (result["fp32_images_per_s"], result["bf16_images_per_s"]) == (250.0, 400.0)


def test_the_probe_times_a_copy_and_leaves_the_model_as_it_was():
    from cifar_fastai.models import get_arch

    model = get_arch("tiny").builder(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    rate = REAL_STEP_RATE(model, x, y, bf16=False, steps=1)
    assert rate > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights and BN statistics untouched"


def test_impossible_requests_are_clear_errors(no_gpu):
    with pytest.raises(HardwareError, match="--device cuda: no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(HardwareError, match="--device mps: .*not available"):
        resolve_device("mps")
    with pytest.raises(HardwareError, match="--precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_workers_suit_the_hardware():
    assert hardware.default_workers("tensor", "cpu", 2) == 0
    assert hardware.default_workers("tensor", "cuda", 32) == 0
    assert hardware.default_workers("datablock", "cpu", 2) == 1
    assert hardware.default_workers("datablock", "cuda", 32) == 8
    assert hardware.default_workers("datablock", "cuda", 4) == 4


def test_gpu_run_gets_fastai_mixed_precision_callbacks(fake_gpu):
    fake_gpu(bf16=False)
    cbs = hardware.callbacks(TrainConfig(channels_last=True))
    kinds = {type(cb).__name__: cb for cb in cbs}
    assert set(kinds) == {"MixedPrecision", "ChannelsLastInputs"}
    assert kinds["MixedPrecision"].amp_mode.value == "fp16", "what learn.to_fp16() adds"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda"], "--device cuda: no CUDA GPU"),
        (["--device", "mps"], "--device mps: "),
        (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    ],
)
def test_cli_impossible_requests_are_one_line(args, message, tmp_path, no_gpu):
    res = CliRunner().invoke(train_app, ["--data", "sample", "--arch", "tiny", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.exception
    assert f"error: {message}" in res.output
    assert not list(tmp_path.glob("*/config.json")), "stopped before any data was loaded"


class PredDtype(Callback):
    """Records the dtype of the model output before MixedPrecision (order 10) turns it back to float."""

    order = 5

    def after_pred(self):
        self.dtype = self.pred.dtype


def test_cpu_bf16_training_step_matches_fp32(tiny_data):
    cfg = TrainConfig(data=str(tiny_data), arch="tiny", bs=32, valid="test", device="cpu")
    learn = create_learner(cfg, get_data(cfg, verbose=False))
    fp32 = learn.validate()[0]
    bf16 = learn.validate(cbs=[CpuMixedPrecision()])[0]
    # the callback really switches the pass to bf16 (fastai's own would autocast CUDA only: the same loss here),
    # which keeps ~3 significant digits
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.02 * abs(fp32), (fp32, bf16)
    before = learn.model[0][0][0].weight.detach().clone()
    spy = PredDtype()
    learn.fit(1, 1e-2, cbs=[CpuMixedPrecision(), spy, ShortEpochCallback(pct=0.3)])  # a few batches
    assert spy.dtype == torch.bfloat16, "the forward pass really ran in bf16"
    weight = learn.model[0][0][0].weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before), "fp32 master weights were updated"
    assert learn.validate()[0] < fp32, "and the bf16 steps trained it: the full test loss (fp32) went down"


class PassSpy(PredDtype):
    """One entry per fit or prediction pass (fastai calls `before_fit` for both): output dtype, input layout."""

    def __init__(self):
        self.passes = []

    def before_fit(self):
        self.passes.append({})

    def after_pred(self):
        x = self.xb[0]
        self.passes[-1].update(dtype=self.pred.dtype, nhwc=x.is_contiguous(memory_format=torch.channels_last))


def test_bf16_trained_export_predicts_in_fp32(tiny_data, tmp_path, capsys, monkeypatch):
    spy = PassSpy()
    fit_time = hardware.callbacks
    monkeypatch.setattr(hardware, "callbacks", lambda cfg: [*fit_time(cfg), spy])
    res = train(
        TrainConfig(data=str(tiny_data), arch="tiny", epochs=1, bs=16, lr=1e-2, out=str(tmp_path), name="bf16",
                    precision="bf16", device="cpu", channels_last=True, tta=True, train_per_class=20),
    )  # fmt: skip
    # the fit, the test pass and the other 5 TTA views all ran under the run's precision and memory layout
    assert spy.passes == [{"dtype": torch.bfloat16, "nhwc": True}] * 7  # the plain view is predicted once
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("hardware:")]
    assert line and "precision bf16" in line[0] and "device cpu" in line[0] and "channels_last on" in line[0]
    resolved = json.loads((res.run_dir / "config.json").read_text())
    assert resolved["config"]["precision"] == "bf16" and resolved["resolved"]["hardware"]["precision"] == "bf16"
    assert resolved["resolved"]["hardware"]["device"] == "cpu" and resolved["resolved"]["hardware"]["workers"] == 0
    assert res.metrics["test_accuracy"] > 0.5, "bf16 still learns the separable classes"

    image = tiny_data / "test" / "ship" / "0001.jpg"
    learn = load_learner(res.run_dir / "export.pkl")
    assert not any(isinstance(cb, CpuMixedPrecision) for cb in learn.cbs), "export is a plain fp32 learner"
    assert learn.model[0][0][0].weight.is_contiguous(), "model back in the default memory layout"
    label, _, probs = learn.predict(image)
    assert label == "ship" and probs.dtype == torch.float32


def test_gpu_export_loads_and_predicts_on_cpu(tiny_run, tiny_data, tmp_path):
    """An export made on a GPU: every tensor in the file (weights, normalization stats) is tagged 'cuda:0'.

    Faked with the hook behind torch's documented `register_package`, which decides the device tag of every saved
    storage: the file then fails a plain `torch.load` here exactly as a real GPU export does.
    """
    learn = load_learner(tiny_run / "export.pkl")
    entry = (-100, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda storage, loc: None)
    serialization._package_registry.append(entry)
    serialization._package_registry.sort(key=lambda e: e[0])
    try:
        learn.export(tmp_path / "gpu_export.pkl")
    finally:
        serialization._package_registry.remove(entry)
    path = tmp_path / "gpu_export.pkl"
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does with a real GPU file here
        torch.load(path, weights_only=False)
    moved = tmp_path / "elsewhere.pkl"
    shutil.copy(path, moved)
    cpu_learn = load(moved, trust_pickle=True)  # mapped to the CPU, no user action
    assert cpu_learn.dls.device == CPU and next(cpu_learn.model.parameters()).device == CPU
    image = tiny_data / "test" / "ship" / "0001.jpg"
    label, _, probs = cpu_learn.predict(image)
    assert label == "ship" and abs(float(probs.sum()) - 1) < 1e-4
    top = Classifier.load(moved, trust_pickle=True).predict(image)  # what the demo serves from such a file
    assert next(iter(top)) == "ship" and top["ship"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_tensor_loader_batches_land_on_the_chosen_device(tiny_data):
    """TensorDL is a fastai TfmdDL: `dls.to(device)` moves every batch (meta device stands in for a GPU)."""
    data = get_data(TrainConfig(data=str(tiny_data), arch="tiny", bs=8), verbose=False)
    assert data.loader == "tensor"
    data.dls.to(torch.device("meta"))
    xb, yb = data.dls.train.one_batch()
    assert xb.device.type == "meta" and yb.device.type == "meta" and xb.shape == (8, 3, 32, 32)


def test_training_keeps_freed_memory_unless_told_not_to(monkeypatch):
    """`--keep-memory` (default): glibc keeps freed memory, so a training step does not page-fault its activations
    in again; `--no-keep-memory` leaves the allocator alone; where there is no glibc it reports False, no error."""
    calls = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: calls.append(1) or False)
    hardware.setup(TrainConfig(keep_memory=False, device="cpu", precision="fp32"))
    assert calls == []
    hardware.setup(TrainConfig(device="cpu", precision="fp32"))
    assert calls == [1]
    monkeypatch.undo()

    monkeypatch.setattr(hardware, "_memory_kept", False)
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    assert hardware.keep_freed_memory() is False
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    # a stand-in glibc, so the path is taken on every host (musl and macOS included) and what it is told is seen
    told, answer = [], [1]

    def mallopt(param, value):
        told.append((param, value))
        return answer[0]

    monkeypatch.setattr(hardware.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    answer[0] = 0  # glibc refuses: reported, not raised
    assert hardware.keep_freed_memory() is False and not hardware._memory_kept
    answer[0], told[:] = 1, []
    rt = hardware.setup(TrainConfig(device="cpu", precision="fp32"))
    assert told == [
        (hardware._M_MMAP_THRESHOLD, hardware.MMAP_THRESHOLD),
        (hardware._M_TRIM_THRESHOLD, hardware.TRIM_THRESHOLD),
    ]
    assert rt.memory_kept and rt.to_dict()["memory_kept"], "recorded where config.json reads it"
    assert "freed memory kept" in rt.line(TrainConfig())
