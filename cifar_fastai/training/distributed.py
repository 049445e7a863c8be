"""Data-parallel training under `torchrun` / `accelerate launch`: fastai's DistributedTrainer on GPUs (NCCL) and CPUs (gloo).

`scripts/train.py` started by a launcher (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) trains one model
on every process: each rank reads its own shard of every epoch's shuffled training indices (fastai's `DistributedDL`),
gradients are averaged by `DistributedDataParallel` (set up by fastai's `DistributedTrainer` through accelerate), and
validation predictions are gathered from all ranks, so the metrics cover the whole validation set.

What fastai 2.8.12 (`fastai/distributed.py`) assumes, and what this module changes (the upstreamable patch is in
`DistributedDL._broadcast` below):
- `DistributedDL._broadcast` sends the shuffled indices from rank 0 as `LongTensor(t).cuda()`: without CUDA every
  rank fails at the first epoch with "Torch not compiled with CUDA enabled". NCCL needs CUDA tensors, gloo CPU ones:
  we put the tensor on the device the process group's backend uses.
- `DistributedTrainer` builds an `accelerate.Accelerator()`; without `cpu=True` accelerate treats a CPU-only torchrun
  as "not distributed", does not wrap the model in DDP and `after_fit` then fails on `model.module`. We pass `cpu=True`
  when there is no GPU.
- `sync_bn=True` (fastai's default) converts BatchNorm to `SyncBatchNorm`, which torch only runs on GPUs ("SyncBatchNorm
  expected input tensor to be on GPU") and which would also end up in the exported model. We keep per-rank BatchNorm
  (DDP's default; running statistics come from rank 0): per-rank batches of 256 are large enough for BatchNorm.
- `distrib_ctx(in_notebook=True)` calls `setup_distrib`, which hard-codes NCCL and `torch.cuda.set_device`; under a
  launcher we initialize the process group ourselves (`init`), with the right backend and a collective timeout, before
  the data and the run folder exist (all ranks must agree on the run folder's name).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import num_distrib, rank_distrib

from ..errors import CifarFastaiError

try:  # fastai.distributed needs accelerate at import time (its `DistributedTrainer` is built on `Accelerator`)
    import fastai.distributed as fastai_distributed
except NameError:  # pragma: no cover - fastai raises NameError('Accelerator') when accelerate is missing
    fastai_distributed = None


def world_size() -> int:
    """Processes in the job (1 when not started by a launcher); fastai reads the same WORLD_SIZE variable."""
    return max(num_distrib(), 1)


def rank() -> int:
    return rank_distrib()


def is_main() -> bool:
    """True on the one process that writes files and prints: rank 0 (or a plain single-process run)."""
    return rank_distrib() == 0


def is_distributed() -> bool:
    return world_size() > 1


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def backend() -> str:
    """NCCL between GPUs, gloo between CPU processes (the only backend torch ships for CPU tensors everywhere)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(timeout_s: float) -> None:
    """Join the launcher's process group (env://) with the right backend; a no-op outside a launcher.

    `timeout_s` bounds every collective (broadcast, all-reduce, barrier): a rank stuck or gone makes the others fail
    after that long instead of hanging (torch's default is 30 min for gloo, 10 min for NCCL).
    """
    if not is_distributed() or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: cannot train on several processes")
    if torch.cuda.is_available():
        # one GPU per process: fastai's default_device() and accelerate both follow the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend(), init_method="env://", timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (the run folder's name, the final metrics); unchanged in one process."""
    if not (is_distributed() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and hand its result to every rank (rank 0 creates the run folder, the others learn its name)."""
    return broadcast_object(fn() if is_main() else None)


def describe(bs: int, lr: float) -> dict:
    """What config.json records about the processes: world size, backend, global batch and learning rate used."""
    n = world_size()
    return {
        "world_size": n,
        "backend": backend() if n > 1 else None,
        "bs_per_process": bs,
        "global_bs": bs * n,
        "lr": lr,
        "lr_scaling": "none: --lr is used as given for the global batch of bs x world_size",
    }


# ------------------------------------------------------------------------------------------- fastai, CPU-safe
if fastai_distributed is not None:

    class DistributedDL(fastai_distributed.DistributedDL):
        """fastai's `DistributedDL` (each rank a disjoint slice of rank 0's shuffled indices) without the CUDA-only broadcast.

        It wraps our `TensorDL` as it is: `create_batches`, `create_item`/`create_batch` and `after_batch` are the
        wrapped loader's, only the indices each rank draws change (`get_idxs`).
        """

        def _broadcast(self, t, rank):
            # Upstream: `t = LongTensor(t).cuda()  # nccl only works with cuda tensors`. Upstreamable patch:
            #   t = LongTensor(t).to('cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu')
            if not dist.is_initialized():  # one process (tests): nothing to agree on
                return list(t)
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            x = torch.as_tensor(list(t), dtype=torch.long, device=device)
            dist.broadcast(x, rank)
            return x.cpu().tolist()

    class DistributedTrainer(fastai_distributed.DistributedTrainer):
        """fastai's `DistributedTrainer` (DDP through accelerate) that wraps the loaders in the CPU-safe `DistributedDL`.

        `after_loss` also makes a NaN/inf loss on any rank a NaN on every rank, so `StopOnNaN` stops all of them at the
        same batch (one rank leaving `fit` alone would leave the others waiting in their next all-reduce).
        """

        def _wrap_dl(self, dl):
            # upstream passes device=self.learn.model.device, which a plain nn.Module lacks; the loader's own is right
            return dl if isinstance(dl, fastai_distributed.DistributedDL) else DistributedDL(dl)

        def after_loss(self):
            if not self.training:
                return
            bad = torch.tensor([0.0 if torch.isfinite(self.learn.loss).all() else 1.0], device=self.learn.loss.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() and torch.isfinite(self.learn.loss).all():
                self.learn.loss = self.learn.loss + float("nan")


@contextmanager
def distrib_ctx(learn) -> Iterator:
    """fastai's `Learner.distrib_ctx` for launcher runs on CPUs or GPUs; a no-op in a single process."""
    if not is_distributed():
        yield learn
        return
    if fastai_distributed is None:
        raise RuntimeError("distributed training needs accelerate: pip install accelerate")
    cb = DistributedTrainer(sync_bn=False, cpu=not torch.cuda.is_available())
    learn.add_cb(cb)
    progress = [c for c in learn.cbs if isinstance(c, ProgressCallback)]
    if rank():
        learn.remove_cbs(progress)  # one progress bar (rank 0's), as fastai's to_distributed does
    try:
        yield learn
    finally:
        learn.remove_cb(cb)
        if rank():
            learn.add_cbs(progress)


def rank_prefix() -> str:
    return f"rank {rank()}/{world_size()}: " if is_distributed() else ""


@contextmanager
def report_rank_failure() -> Iterator[None]:
    """Name the rank in the message of an error that ends this process (torchrun then stops the other ranks)."""
    try:
        yield
    except CifarFastaiError as e:  # the CLI prints it as `error: rank 1/2: <message>`
        if is_distributed():
            e.args = (f"{rank_prefix()}{e}",)
        raise
    except Exception as e:  # anything else keeps its traceback, after one line that names the rank
        if is_distributed():
            print(f"error: {rank_prefix()}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


def global_throughput(stats: dict[str, float]) -> dict[str, float]:
    """Rank 0's images/s times the number of ranks: DDP steps in lockstep, so every rank moves as many images."""
    n = world_size()
    return {k: v * n if k.endswith("images_per_s") else v for k, v in stats.items()}


def recorded(job: Callable[[], Any]) -> Any:
    """`job()` under torch's `record`, so torchrun's failure summary shows this rank's exception instead of
    "error_file: <N/A>"; the error file appears whole or not at all. torch writes it in place, and when another
    rank's failure makes the launcher stop this one mid-write, the launcher then reads an empty file and crashes
    with a JSONDecodeError instead of printing its summary (seen under load). So the file is written beside its
    path and moved there once complete."""
    from torch.distributed.elastic.multiprocessing.errors import record

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return record(job)()
    partial = f"{path}.{os.getpid()}.partial"
    os.environ["TORCHELASTIC_ERROR_FILE"] = partial
    try:
        return record(job)()
    finally:
        os.environ["TORCHELASTIC_ERROR_FILE"] = path
        if os.path.exists(partial):
            os.replace(partial, path)


def launch(job: Callable[[], Any]) -> Any:
    """Run a CLI job on this rank: errors name the rank; the process group is closed after a clean finish."""
    with report_rank_failure():
        result = recorded(job) if is_distributed() else job()
    shutdown()  # not on failure: the launcher stops the other ranks, and NCCL's teardown may wait for them
    return result
