"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient), as a user would run it."""

from __future__ import annotations

import json
import re
import shutil

import nbclient
import nbformat

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend draws the figures, as in Jupyter
    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    # the notebook as shipped, smaller: a tenth of the sample's training images, one epoch, one TTA view
    for cell, old, new in [(1, 'bs=128)', 'bs=128, train_per_class=20)'), (7, "fit_one_cycle(3,", "fit_one_cycle(1,"),
                           (17, "learn.tta()", "learn.tta(n=1)")]:  # fmt: skip
        assert old in nb.cells[cell].source, (cell, old)
        nb.cells[cell].source = nb.cells[cell].source.replace(old, new)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(work)}}, allow_errors=False
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 5  # show_batch, lr_find, show_results, the confusion matrix and the top losses

    predicted = re.search(r"^predicted: (\S+) \((\d\.\d\d)\)$", text, re.MULTILINE)
    reloaded = re.search(r"^reloaded: (\S+) \((\d\.\d\d)\)$", text, re.MULTILINE)
    accuracy = re.search(r"validation accuracy ([01]\.\d{3}), with TTA [01]\.\d{3}", text)
    assert predicted and reloaded and accuracy, text

    run = work / "runs" / "quickstart"
    assert {"export.pkl", "model.json", "model.safetensors"} <= {p.name for p in run.iterdir()}
    # what the notebook printed is what its saved model does, here, in another process
    from cifar_fastai import get_learner, load_model, resolve_data

    learn = load_model(run)
    label, idx, probs = learn.predict(resolve_data("sample") / "test" / "cat" / "0000.jpg")
    assert predicted.groups() == reloaded.groups() == (str(label), f"{float(probs[idx]):.2f}")
    same = get_learner("sample", "tiny", bs=128, train_per_class=20)  # the notebook's validation images
    same.model.load_state_dict(learn.model.state_dict())
    plain, targs = same.get_preds()
    assert accuracy.group(1) == f"{(plain.argmax(1) == targs).float().mean():.3f}"
