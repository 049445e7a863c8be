"""Device, precision, threads and DataLoader workers that suit the machine a run is on, and the callbacks that apply them."""

from __future__ import annotations

import copy
import ctypes
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.torch_core import default_device
from fastcore.foundation import L
from torch import nn
from torch.amp import GradScaler

from ..config import TrainConfig
from ..errors import CifarFastaiError
from ..utils import cpu_info, write_json

DEVICES = ("auto", "cpu", "cuda", "mps")


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class HardwareError(CifarFastaiError):
    """A device or precision this machine (or this torch build) cannot provide."""

    exit_code = 2  # like a bad option value: the command line asked for something impossible


# ------------------------------------------------------------------------------------------------- detection
def cores() -> int:
    """CPU cores this process may use (cgroup/affinity aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The x86 feature flags of /proc/cpuinfo (empty on other systems)."""
    return cpu_info()["flags"]


def cpu_bf16_pays() -> bool:
    """bf16 autocast speeds up CPU training only where the CPU has bf16 instructions: AVX-512 BF16 or Intel AMX.

    With AVX-512 BF16, bf16 + channels_last trains resnet18 faster than fp32; with AVX2 only it is slower (every
    bf16 operation is converted in software); bench/train_speed.py and bench/precision.py measure both
    (docs/hardware.md). AMX: PyTorch's "Leverage Intel AMX" tutorial recommends bf16 autocast there.
    """
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# ------------------------------------------------------------------------------------------------ precision probe
# bf16 instructions do not make bf16 faster everywhere: on the Intel AMX host resnet18 trained no faster in bf16 than
# in fp32, on the AMD AVX-512 BF16 host 1.3x faster. So where the CPU has them, `--precision auto` times a few training
# steps of the run's own model in both and keeps the faster, once per CPU model x model shape x batch (a file in the
# cache folder): the same choice for every later run of that shape on this machine.
PROBE_STEPS, PROBE_BS = 3, 64
# The choice is kept for every later run of the shape, so a probe bent by other work on the cores would bend them all:
# beside a training run on the AVX-512 BF16 host a probe of the half-width airbench_resnet read fp32 53 and bf16 25
# images/s, bf16 the slower, where bf16 is the faster there alone (full width: 254 and 398). Each precision is timed twice, in the order fp32, bf16, bf16, fp32 (a load that comes or goes
# mid-probe falls on both), and its faster round counts.
PROBE_ORDER = (False, True, True, False)


def probe_file() -> Path:
    from ..data.sources import cache_dir

    return cache_dir() / "precision_probe.json"


def probe_key(cfg: TrainConfig) -> str:
    return "|".join(map(str, (cpu_info()["model"], torch.__version__, cfg.arch, cfg.width, cfg.size,
                              min(cfg.bs, PROBE_BS), cfg.channels_last, cfg.threads or default_threads())))  # fmt: skip


_MEASURED: dict[str, dict] = {}  # what this process read or measured: one run asks several times, one answer


def measured_precision(cfg: TrainConfig) -> dict | None:
    """What the probe measured for this run's shape on this machine (None: not measured yet)."""
    key = probe_key(cfg)
    if key not in _MEASURED:
        try:
            found = json.loads(probe_file().read_text()).get(key)
        except (OSError, ValueError):
            found = None
        if found is None:
            return None
        _MEASURED[key] = found
    return _MEASURED[key]


def step_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, steps: int = PROBE_STEPS) -> float:
    """Training images per second of `model` (a copy: the run's weights and BatchNorm statistics stay untouched),
    in the memory layout of `x` (channels-last inputs: a channels-last model, as the run trains)."""
    model = copy.deepcopy(model).train()
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up: oneDNN picks and caches its kernels on the first call of a shape
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - t0)


def probe_precision(model: nn.Module, cfg: TrainConfig, n_classes: int) -> dict:
    """Time fp32 against bf16 autocast on this CPU for `model` and keep the faster (written to `probe_file()`)."""
    bs = min(cfg.bs, PROBE_BS)
    x = torch.randn(bs, 3, cfg.size, cfg.size, device=next(model.parameters()).device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (bs,), device=x.device)
    best = {False: 0.0, True: 0.0}
    for bf16 in PROBE_ORDER:
        best[bf16] = max(best[bf16], step_rate(model, x, y, bf16=bf16))
    rates = {"fp32": best[False], "bf16": best[True]}
    result = {"fp32_images_per_s": round(rates["fp32"], 1), "bf16_images_per_s": round(rates["bf16"], 1),
              "picked": max(rates, key=rates.get), "cpu": cpu_info()["model"]}  # fmt: skip
    _MEASURED[probe_key(cfg)] = result
    path = probe_file()
    try:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[probe_key(cfg)] = result
        write_json(path, table)  # whole or not at all, even with two runs starting at once
    except OSError:  # a read-only cache: this run keeps its measurement, the next one probes again
        pass
    return result


def has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------ resolution
def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` is fastai's `default_device()` (CUDA, else Apple MPS, else CPU); an unavailable device is an error."""
    if requested == "auto":
        return torch.device(default_device())
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
            raise HardwareError(
                f"--device cuda: no CUDA GPU is visible to PyTorch (torch {torch.__version__}, {build} build; "
                "check nvidia-smi and CUDA_VISIBLE_DEVICES). Use --device cpu, or --device auto to take what there is"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "mps":
        if not has_mps():
            raise HardwareError(
                "--device mps: the Apple-silicon GPU (MPS) is not available here (it needs macOS 12.3+ on an M-series "
                "Mac and a torch built with MPS). Use --device cpu, or --device auto"
            )
        return torch.device("mps")
    raise HardwareError(f"--device {requested}: choose one of {', '.join(DEVICES)}")


def resolve_precision(requested: str, device: torch.device, cfg: TrainConfig | None = None) -> str:
    """The precision actually used: `auto` is the fastest choice that is safe on `device` (on a CPU with bf16
    instructions, what the probe measured for `cfg`'s model, once it has); impossible ones are errors."""
    kind = device.type
    if requested not in PRECISIONS:
        raise HardwareError(f"--precision {requested}: choose one of {', '.join(PRECISIONS)}")
    if kind == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            # bf16 where the GPU has it (Ampere+): as fast as fp16 with fp32's range, so no loss scaling or overflow.
            return "bf16" if bf16 else "fp16"
        if requested == "bf16" and not bf16:
            raise HardwareError(
                f"--precision bf16: this GPU ({gpu_name()}) has no bfloat16 support (it needs an Ampere or newer GPU). "
                "Use --precision fp16 (or auto)"
            )
        return requested
    if kind == "mps":
        if requested in ("fp16", "bf16"):
            raise HardwareError(
                f"--precision {requested} on mps: fastai's mixed precision (MixedPrecision) runs on CUDA only. "
                "Use --precision fp32 (or auto)"
            )
        return "fp32"
    # CPU
    if requested == "fp16":
        raise HardwareError(
            "--precision fp16 needs a CUDA GPU: CPUs have no fast float16 kernels. "
            "Use --precision fp32, or bf16 (CPU autocast), or auto"
        )
    if requested == "auto":
        if not cpu_bf16_pays():  # bf16 in software: always slower (docs/hardware.md)
            return "fp32"
        measured = measured_precision(cfg) if cfg is not None else None
        return measured["picked"] if measured else "bf16"
    return requested


def precision_reason(cfg: TrainConfig, device: torch.device) -> str:
    """Why `--precision auto` picked what it did, for the hardware line."""
    if cfg.precision != "auto" or device.type != "cpu":
        return ""
    if not cpu_bf16_pays():
        return "no bf16 instructions"
    m = measured_precision(cfg)
    if not m:
        return "bf16 instructions"
    return f"probe: fp32 {m['fp32_images_per_s']:,.0f}, bf16 {m['bf16_images_per_s']:,.0f} images/s"


def default_workers(loader: str, device_type: str = "cpu", n_cores: int | None = None) -> int:
    """DataLoader worker processes that suit the hardware when `--workers` is not given.

    tensor loader: 0 everywhere. A batch is one index into a uint8 tensor (~1 ms); a worker process would only
    fight the OpenMP threads on a small CPU and gains nothing in front of a GPU.
    DataBlock loader: every item is a PIL decode + resize. In front of a GPU these must keep up, so
    min(8, cores) workers (fastai's own default is min(16, cores); 8 bounds the memory of the worker copies).
    On a CPU-only machine at most one worker, leaving the other cores to the model's threads.
    """
    n = n_cores or cores()
    if loader == "tensor":
        return 0
    if device_type in ("cuda", "mps"):
        return max(0, min(8, n))
    return min(1, n - 1)


def default_threads(n_cores: int | None = None) -> int:
    """torch intra-op threads: all cores (the model's convolutions are the work on a CPU), shared by the ranks
    a launcher such as torchrun starts on this machine (2 cores, 2 ranks: 1 thread each)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (n_cores or cores()) // local_ranks)


# glibc malloc serves a block above its mmap threshold with mmap and returns the free top of its heap to the OS above
# its trim threshold; a CPU training step frees and reallocates tens of MB of activations and gradients, so each
# step page-faults them in again, zeroed by the kernel (a one-off count: several times the minor page faults). Keeping the
# memory (the role of jemalloc/tcmalloc in PyTorch's CPU performance tuning guide, docs.pytorch.org/tutorials/recipes/
# recipes/tuning_guide.html, "Switch Memory allocator") makes the training step faster (bench/train_speed.py,
# docs/speed.md); the process keeps its peak memory resident instead.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit); larger blocks are still mmapped


TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top


_memory_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory in the process (`--keep-memory`); False where there is no glibc
    (macOS, Windows, musl) or it refuses. Process-wide and lasting: nothing in this project undoes it."""
    global _memory_kept
    if _memory_kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _memory_kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _memory_kept


@dataclass(frozen=True)
class Runtime:
    """What a run actually uses, beside what was asked for: printed at start and recorded in config.json."""

    device: str
    precision: str
    threads: int
    workers: int | None
    channels_last: bool
    cores: int
    gpu: str | None
    memory_kept: bool = False  # glibc told to keep freed memory (`--keep-memory`, `keep_freed_memory`)
    precision_reason: str = ""  # why `auto` picked it (the probe's rates, or the CPU's lack of bf16)

    def line(self, cfg: TrainConfig) -> str:
        dev = self.device + (f" ({self.gpu})" if self.gpu else "")
        why = f": {self.precision_reason}" if self.precision_reason else ""
        return (
            f"hardware: device {dev} [--device {cfg.device}], precision {self.precision} [--precision {cfg.precision}{why}], "
            f"{self.threads} threads, {self.workers} DataLoader workers, channels_last {'on' if self.channels_last else 'off'}"
            f" ({self.cores} cores){', freed memory kept' if self.memory_kept else ''}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def runtime(cfg: TrainConfig, dls=None) -> Runtime:
    """Resolve the config's hardware choices (raises `HardwareError` for impossible ones); `dls` gives the workers."""
    device = resolve_device(cfg.device)
    # fastai's DataLoader keeps the real worker count on its `fake_l` (its own `num_workers` means something else)
    workers = getattr(getattr(getattr(dls, "train", None), "fake_l", None), "num_workers", None)
    return Runtime(
        device=str(device),
        precision=resolve_precision(cfg.precision, device, cfg),
        precision_reason=precision_reason(cfg, device),
        threads=cfg.threads or default_threads(),
        workers=workers,
        channels_last=cfg.channels_last,
        cores=cores(),
        gpu=gpu_name() if device.type == "cuda" else None,
        memory_kept=_memory_kept,
    )


# ------------------------------------------------------------------------------------------------- applying
def setup(cfg: TrainConfig) -> Runtime:
    """Check the requests before any data is loaded (a clear error, not a crash inside torch), set threads and
    keep freed memory (`--keep-memory`)."""
    rt = runtime(cfg)
    torch.set_num_threads(rt.threads)
    if cfg.keep_memory and keep_freed_memory():
        rt = replace(rt, memory_kept=True)
    return rt


def place(learn, data, cfg: TrainConfig) -> Runtime:
    """Model and every DataLoader (train, valid, test) onto the chosen device; TfmdDL moves each batch there."""
    device = resolve_device(cfg.device)
    learn.dls.to(device)
    data.test_dl.to(device)
    learn.model.to(device)
    # under a launcher every rank would time its own copy on the same cores and could pick differently: those runs
    # take what an earlier one-process run measured, or the flags' answer
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if cfg.precision == "auto" and device.type == "cpu" and cpu_bf16_pays() and one_process and not measured_precision(cfg):
        probe_precision(learn.model, cfg, len(data.vocab))
    return runtime(cfg, data.dls)


class CpuMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` with CPU bf16 autocast around the forward pass and loss.

    fastai 2.8.12's `MixedPrecision.before_fit` hard-codes `autocast('cuda')`, so on the CPU it would do nothing
    (with a warning). Everything else (pred back to float after the forward, step, fake-optimizer trick) is fastai's.
    """

    def __init__(self):
        super().__init__(amp_mode=AMPMode.BF16)

    def before_fit(self):
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        # bf16 has fp32's exponent range, so no loss scaling: a disabled scaler just calls the step (as fastai on CUDA)
        self.learn.scaler, self.scales = GradScaler("cpu", enabled=False), L()


class ChannelsLastInputs(ChannelsLast):
    """fastai's `ChannelsLast` (model in NHWC) plus NHWC input batches, back to the default layout after the fit.

    fastai converts only the model (cuDNN then picks NHWC kernels); oneDNN on the CPU wants the inputs NHWC too,
    and an exported model in the default layout loads the same everywhere.
    """

    def before_batch(self):
        self.learn.xb = tuple(
            x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.ndim == 4 else x
            for x in self.xb
        )

    def after_fit(self):
        self.learn.model.to(memory_format=torch.contiguous_format)


def callbacks(cfg: TrainConfig) -> list[Callback]:
    """The fit-time callbacks for the resolved precision and memory layout (added only for the fit, so the
    exported learner is a plain fp32 one that any device and precision can load)."""
    rt = runtime(cfg)
    cbs: list[Callback] = []
    if rt.channels_last:
        cbs.append(ChannelsLastInputs())
    if rt.precision != "fp32":
        on_cpu = torch.device(rt.device).type == "cpu"
        # on CUDA exactly what fastai's `learn.to_fp16()` / `learn.to_bf16()` add
        cbs.append(CpuMixedPrecision() if on_cpu else MixedPrecision(amp_mode=AMPMode(rt.precision)))
    return cbs
