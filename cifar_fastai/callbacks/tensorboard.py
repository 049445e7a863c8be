"""TensorBoard logging of a run: fastai's `TensorBoardCallback` plus a grid of sample validation predictions."""

from __future__ import annotations

from pathlib import Path

import torch
from fastai.callback.tensorboard import TensorBoardCallback
from fastai.data.transforms import Normalize

N_SAMPLES = 9  # fastai's TensorBoardCallback default n_preds: a 3x3 grid


class TensorBoardLogger(TensorBoardCallback):
    """fastai's callback: train loss and lr/mom/wd per step, validation metrics per epoch, the model graph.

    fastai's own `log_preds` goes through `dls.valid.show_results`, which needs the DataBlock's decode pipeline and
    fails on our tensor loader ("'TensorCategory' object has no attribute 'show'"), so the sample predictions are
    drawn here from the batch itself; this works for both loaders.
    """

    def __init__(self, log_dir: str | Path):
        super().__init__(str(log_dir), trace_model=True, log_preds=False)

    def after_batch(self):
        if self.training:  # fastai's logs train_loss on validation batches too, as repeated points at the same step
            super().after_batch()

    def after_epoch(self):
        super().after_epoch()
        self.writer.add_figure("valid_predictions", self.sample_figure(), self.train_iter)
        self.writer.flush()  # a killed run still leaves readable logs

    def sample_figure(self):
        import matplotlib.pyplot as plt

        dl = self.dls.valid
        x, y = dl.one_batch()
        x, y = x[:N_SAMPLES], y[:N_SAMPLES]
        with torch.no_grad():
            pred = self.model.eval()(x).argmax(-1)
        for tfm in dl.after_batch.fs:
            if isinstance(tfm, Normalize):
                x = tfm.decode(x)  # back to [0, 1] pixels for display
        vocab = list(self.dls.vocab)
        fig, axs = plt.subplots(3, 3, figsize=(6, 6))
        for ax, img, p, t in zip(axs.flat, x.clamp(0, 1).cpu(), pred.cpu(), y.cpu()):
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_title(f"{vocab[p]} / {vocab[t]}", fontsize=8, color="green" if p == t else "red")
        for ax in axs.flat:
            ax.axis("off")
        fig.suptitle("predicted / true (validation)")
        return fig
