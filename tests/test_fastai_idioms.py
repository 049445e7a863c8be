"""fastai's own idioms on the default tensor loader, as on a DataBlock: show_batch, show_results, the interpretation
(plot_top_losses), tta, predict(path), test_dl(files) + get_preds, export -> load_learner -> predict.

Each test asserts what a user would see: the figure's images and titles, labels from the vocab, probabilities, shapes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt  # conftest.py selects the Agg backend (MPLBACKEND)
import numpy as np
import pytest
import torch
from fastai.data.transforms import Category
from fastai.interpret import ClassificationInterpretation
from fastai.torch_core import TensorImage

from cifar_fastai import get_learner
from cifar_fastai.data.loaders import inference_dls
from cifar_fastai.data.tensor_loader import TensorDataLoaders, TensorDL, TensorImageSet
from cifar_fastai.data.transforms import cifar_stats, input_spec


@pytest.fixture(scope="module")
def learn(tiny_data):
    learn = get_learner(str(tiny_data), "tiny", bs=16)
    with learn.no_bar(), learn.no_logging():  # the fit and every idiom below: no progress bars or metric tables
        learn.fit(1, 1e-2)
        yield learn


@pytest.fixture(autouse=True)
def close_figures():
    plt.close("all")
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def test_files(tiny_data):
    return sorted((tiny_data / "test").glob("*/*.*"))[::5]  # 20 files: every class, JPEG and PNG


def drawn():
    """(title, HWC image array) of each axis of the current figure that shows an image."""
    return [(ax.get_title(), np.asarray(ax.images[0].get_array())) for ax in plt.gcf().axes if ax.images]


def cached(dl, k: int) -> np.ndarray:
    """The k-th image of a tensor loader's set, HWC uint8, straight from the image tensor."""
    ds = dl.dataset
    return ds.images[ds.idx[k]].permute(1, 2, 0).numpy()


def same_pixels(shown: np.ndarray, expected: np.ndarray) -> bool:
    """Normalize then decode (fastai's `IntToFloatTensor.decodes` truncates) may be off by one grey level."""
    return shown.shape == expected.shape and np.abs(shown.astype(int) - expected.astype(int)).max() <= 1


def test_the_default_loader_is_the_tensor_one(learn):
    assert isinstance(learn.dls, TensorDataLoaders) and isinstance(learn.dls.train, TensorDL)
    assert list(learn.dls.vocab)[:2] == ["airplane", "automobile"] and len(learn.dls.vocab) == 10


def test_decode_batch_gives_unnormalized_rgb_images_and_labels(learn):
    dl = learn.dls.valid
    x, y = dl.one_batch()
    decoded = dl.decode_batch((x, y), max_n=5)
    assert len(decoded) == 5
    for k, (img, label) in enumerate(decoded):
        assert isinstance(img, TensorImage) and isinstance(label, Category)
        assert label == dl.vocab[int(y[k])]
        assert same_pixels(img.permute(1, 2, 0).numpy(), cached(dl, k))  # back to the file's pixels, RGB order


def test_show_batch_draws_images_titled_with_their_classes(learn):
    learn.dls.show_batch(max_n=9)  # the training loader: augmented, shuffled
    shown = drawn()
    assert len(shown) == 9 and all(title in learn.dls.vocab for title, _ in shown)
    assert all(img.shape == (32, 32, 3) for _, img in shown)

    plt.close("all")
    dl = learn.dls.valid  # in order and not augmented: each picture is the image as stored, with its class
    dl.show_batch(max_n=6)
    shown = drawn()
    assert len(shown) == 6
    for k, (title, img) in enumerate(shown):
        assert title == dl.vocab[int(dl.dataset.labels[dl.dataset.idx[k]])]
        assert same_pixels(img, cached(dl, k))
        assert not same_pixels(img, cached(dl, k)[..., ::-1])  # not BGR (the colours differ per class)


def test_show_results_titles_each_image_with_target_and_prediction(learn):
    learn.show_results(max_n=4, shuffle=False)
    shown = drawn()
    assert len(shown) == 4
    dl = learn.dls.valid
    for k, (title, img) in enumerate(shown):
        target, pred = title.split("\n")
        assert target == dl.vocab[int(dl.dataset.labels[dl.dataset.idx[k]])] and pred in dl.vocab
        assert same_pixels(img, cached(dl, k))


def test_interpretation_plots_top_losses_and_confusion(learn):
    interp = ClassificationInterpretation.from_learner(learn)
    assert list(interp.vocab) == list(learn.dls.vocab)  # the whole vocab (a plain list would be cut to its last class)
    cm, ds = interp.confusion_matrix(), learn.dls.valid_ds
    assert cm.shape == (10, 10) and cm.sum() == len(ds)
    assert cm.sum(1).tolist() == torch.bincount(ds.labels[ds.idx], minlength=10).tolist()  # rows: the set's targets
    preds, _ = learn.get_preds(dl=learn.dls.valid)
    losses, idx, items = interp.top_losses(4, items=True)
    assert all(f.is_file() and f.parent.name in learn.dls.vocab for f in items)  # the files, as a DataBlock names them

    interp.plot_top_losses(4)
    shown = drawn()
    assert len(shown) == 4
    for (title, img), loss, k in zip(shown, losses, idx):
        head, shown_loss, prob = title.split(" / ")  # fastai's "prediction/actual / loss / probability"
        pred, actual = head.split("/")
        assert (
            pred in learn.dls.vocab
            and actual == learn.dls.vocab[int(learn.dls.valid_ds.labels[learn.dls.valid_ds.idx[k]])]
        )
        assert float(shown_loss) == pytest.approx(float(loss), abs=0.01)
        # the files re-read for the plot give the prediction the validation loader gave for the same image
        assert pred == learn.dls.vocab[int(preds[k].argmax())]
        assert float(prob) == pytest.approx(float(preds[k].max()), abs=0.01)
        assert same_pixels(img, cached(learn.dls.valid, int(k)))
    plt.close("all")
    interp.plot_confusion_matrix()
    assert [t.get_text() for t in plt.gcf().axes[0].get_xticklabels()] == list(learn.dls.vocab)


def test_predict_on_a_file(learn, test_files):
    f = test_files[7]
    img, label, idx, probs = learn.predict(str(f), with_input=True)  # a path as a string, as users type it
    vocab = learn.dls.vocab
    assert label in vocab and int(idx) == list(vocab).index(label)
    assert (
        probs.shape == (10,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5) and int(probs.argmax()) == int(idx)
    )
    # the decoded input is the picture as an RGB image (0-255); the model on it, re-normalized, says the same
    assert isinstance(img, TensorImage) and img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 255
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in cifar_stats)
    with torch.no_grad():
        out = learn.model.eval()((img[None].float() / 255 - mean) / std).softmax(1)[0]
    assert int(out.argmax()) == int(idx) and torch.allclose(out, probs, atol=0.02)

    # the DataBlock inference path (what export.pkl ships) gives the same prediction for the same file
    spec, tensor_dls = input_spec(learn.dls), learn.dls
    learn.dls = inference_dls(spec["vocab"], spec["input_size"], (spec["mean"], spec["std"]), f)
    try:
        ref_label, _, ref_probs = learn.predict(f)
    finally:
        learn.dls = tensor_dls
    assert ref_label == label and torch.allclose(ref_probs, probs, atol=1e-6)


def test_test_dl_on_files_batches_them_and_get_preds_matches_predict(learn, test_files):
    dl = learn.dls.test_dl(test_files)
    batches = list(dl)
    assert [b[0].shape for b in batches] == [(16, 3, 32, 32), (4, 3, 32, 32)]  # the loaders' batch size
    assert batches[0][0].device.type == learn.dls.device.type
    probs, _ = learn.get_preds(dl=dl)
    assert probs.shape == (20, 10)
    for k in (0, 7, 19):
        _, idx, p = learn.predict(test_files[k])
        assert int(probs[k].argmax()) == int(idx) and torch.allclose(probs[k], p, atol=1e-5)

    labelled = learn.dls.test_dl(test_files, with_labels=True)  # labels from the class folders
    probs, targs = learn.get_preds(dl=labelled)
    assert [learn.dls.vocab[int(t)] for t in targs] == [f.parent.name for f in test_files]
    assert (probs.argmax(1) == targs).float().mean() > 0.5  # classes separable by colour: learnt in one epoch


def test_tta_on_the_validation_set_and_on_files(learn, test_files):
    plain, _ = learn.get_preds()
    aug, targs = learn.tta(n=2, beta=0)  # beta=0: the augmented views' mean alone
    assert aug.shape == (len(learn.dls.valid_ds), 10) and torch.allclose(aug.sum(1), torch.ones(len(aug)), atol=1e-4)
    assert not torch.allclose(aug, plain), "the views went through the training augmentation"
    assert torch.equal(learn.get_preds()[0], plain), "and the validation loader is unaugmented again"
    dl = learn.dls.test_dl(test_files, with_labels=True)
    plain, _ = learn.get_preds(dl=dl)
    aug, targs = learn.tta(dl=dl, n=2, beta=0)
    assert aug.shape == (20, 10) and targs.shape == (20,)
    assert not torch.allclose(aug, plain), "files are augmented too"


def test_export_and_load_learner_predict_the_same(learn, test_files, tmp_path):
    from fastai.learner import load_learner

    f = test_files[3]
    learn.export(tmp_path / "export.pkl")  # the tensor loader exported as fastai does: no images kept
    loaded = load_learner(tmp_path / "export.pkl")
    assert len(loaded.dls.train_ds) == 0 and loaded.dls.vocab == learn.dls.vocab
    with loaded.no_bar():
        label, _, probs = loaded.predict(f)
    ref_label, _, ref_probs = learn.predict(f)
    assert label == ref_label and torch.allclose(probs, ref_probs, atol=1e-6)


def test_positions_stand_in_for_files_when_the_set_has_none():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    ds = TensorImageSet(images, torch.tensor([0, 1, 1, 0]), np.array([3, 1]), ["a", "b"], 1)
    assert list(ds.items) == [3, 1]
    dls = TensorDataLoaders(TensorDL(ds, bs=2), TensorDL(ds, bs=2))
    x, y = dls.test_dl([2, 0]).one_batch()
    assert torch.equal(x, images[[2, 0]]) and y.tolist() == [1, 0]
    img, label = ds.decode((x[0], y[0]))
    assert torch.equal(img, x[0]) and isinstance(label, Category) and label == "b"
