"""`scripts/train.py` with one rank crashing at its first training batch: how a failed worker looks under torchrun.

    torchrun --nproc_per_node 2 tests/fail_on_rank.py RANK [train options]
"""

import sys

from fastai.callback.core import Callback

from cifar_fastai.cli import train_app
from cifar_fastai.training import distributed, run


class FailOnRank(Callback):
    def __init__(self, fail_rank: int):
        self.fail_rank = fail_rank

    def before_batch(self):
        if self.training and distributed.rank() == self.fail_rank:
            raise RuntimeError(f"simulated failure on rank {self.fail_rank}")


if __name__ == "__main__":
    fail_rank = int(sys.argv.pop(1))
    callbacks = run.run_callbacks
    run.run_callbacks = lambda *a, **k: [*callbacks(*a, **k), FailOnRank(fail_rank)]
    train_app()
