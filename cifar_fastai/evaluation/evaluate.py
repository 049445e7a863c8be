"""Evaluate a finished run: test accuracy and loss, per-class precision/recall/F1, confusion, TTA, robust accuracy."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from fastai.torch_core import set_seed

from ..config import TrainConfig
from ..data.index import READ_ERRORS, read_rgb
from ..data.loaders import get_data
from ..data.sources import resolve_data
from ..errors import CifarFastaiError, ConfigError, DataError, ModelFileError
from ..utils import write_json
from .attacks import robust_accuracy
from .report import Interpretation, tta_result


def load_run_learner(run_dir: Path, trust_pickle: bool = False):
    """The run's model: `model.json` + `model.safetensors` (no code runs on load) with its inference pipeline; a run
    that has only `export.pkl` needs `trust_pickle=True`, since unpickling runs whatever code the file holds."""
    from ..deploy.safe import load

    learn = load(run_dir, trust_pickle=trust_pickle)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])  # no bars in reports
    return learn


def run_config(run_dir: Path) -> tuple[TrainConfig, tuple[list[float], list[float]]]:
    """The settings and normalization the model trained with: a run folder's config.json, or, in a Hub-style folder
    (`scripts/export.py hub`: its config.json is timm's), the training settings model.json keeps."""
    from ..deploy.safe import find_model_json, read_model_json

    path = run_dir / "config.json"
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict) or "resolved" in info:  # a run's (from_json says what is wrong with a bad one)
            cfg = TrainConfig.from_json(path)
            return cfg, (info["resolved"]["normalize_mean"], info["resolved"]["normalize_std"])
    try:
        meta = read_model_json(find_model_json(run_dir))
    except ModelFileError:
        meta = {}
    if "train_config" not in meta:
        raise DataError(f"{run_dir}: no run config.json or model.json, so the run's data is unknown: pass --data PATH")
    stats = (meta["normalize"]["mean"], meta["normalize"]["std"])
    return TrainConfig.from_dict(meta["train_config"], source=f"{run_dir}/model.json"), stats


def labelled_images(folder: Path, vocab: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Readable images under `folder/<class>/`, where every class is one the model knows; unreadable ones listed."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = sorted(set(classes) - set(vocab))
    if not classes or unknown:
        raise DataError(
            f"{folder}: expected class folders named like the model's classes ({', '.join(vocab)})"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "; found none")
        )
    from fastai.data.transforms import image_extensions

    exts = {e.lower() for e in image_extensions}
    files, bad = [], []
    for cls in classes:
        for f in sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in exts):
            try:
                read_rgb(f)
                files.append(f)
            except READ_ERRORS as e:
                bad.append((str(f), f"{type(e).__name__}: {e}"))
    if not files:
        raise DataError(f"{folder}: no readable images in its class folders")
    return files, bad


def evaluation_dl(learn, run_dir: Path, data: str | None, bs: int):
    """(dl, description, skipped files): the run's own test set, or any CIFAR-layout folder/.tgz or class folders."""
    cfg, stats = run_config(run_dir)
    if data is None:  # the run's own test split, built exactly as in training (same loader, size, normalization)
        d = get_data(cfg.replace(bs=bs, workers=0), stats, verbose=False)
        if list(d.vocab) != list(learn.dls.vocab):
            raise DataError(f"{d.root}: its classes differ from the model's ({', '.join(learn.dls.vocab)})")
        return (
            d.test_dl,
            f"test set of {d.root}",
            [p for p, _ in d.bad if Path(p).relative_to(d.root).parts[0] == "test"],
        )
    path = Path(data).expanduser()
    try:
        folder = resolve_data(data) / "test"  # a CIFAR-layout folder or a .tgz of one: its test split
    except DataError:
        if not path.is_dir():
            raise
        folder = path  # a plain folder of class subfolders
    files, bad = labelled_images(folder, list(learn.dls.vocab))
    # the exported DataBlock pipeline: parent-folder labels, the run's resize and normalization, no augmentation
    return learn.dls.test_dl(files, with_labels=True, bs=bs, num_workers=0), str(folder), [p for p, _ in bad]


def classification_report(targs: torch.Tensor, decoded: torch.Tensor, vocab: list[str]) -> tuple[dict, str]:
    """Per-class precision/recall/F1 as fastai's `print_classification_report` computes them (sklearn)."""
    from sklearn.metrics import classification_report as report

    kw = {"labels": list(range(len(vocab))), "target_names": list(vocab), "zero_division": 0, "digits": 4}
    return report(targs, decoded, output_dict=True, **kw), report(targs, decoded, **kw)


def evaluate(
    run_dir: str | Path,
    data: str | None = None,
    attack: str = "none",
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
    attack_n: int | None = 1000,
    tta: bool = True,
    bs: int = 256,
    trust_pickle: bool = False,
    verbose: bool = True,
    tta_select: float = 1.0,
) -> dict:
    """Evaluate `runs/<name>` and write `evaluation.json`, `evaluation.md`, a confusion matrix PNG and a top-losses
    PNG (each image beside its Grad-CAM heat map) into it. `tta_select`: the share of the least certain images that
    get the extra TTA views (`selective_tta_preds`; 1: all)."""
    t0 = time.perf_counter()
    if not 0.0 <= tta_select <= 1.0:
        raise ConfigError(f"--tta-select {tta_select}: give a fraction of the test images between 0 and 1")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelFileError(f"{run_dir}: no such run folder")
    learn = load_run_learner(run_dir, trust_pickle)
    vocab = list(learn.dls.vocab)
    dl, source, skipped = evaluation_dl(learn, run_dir, data, bs)
    stem = "evaluation" if data is None else f"evaluation-{slug(source)}"
    log = print if verbose else (lambda *a, **k: None)
    log(f"evaluating {run_dir} on {source} ({len(dl.dataset)} images)")

    interp = Interpretation.from_dl(learn, dl, vocab)
    summary = interp.summary()
    per_class, report_text = classification_report(interp.targs, interp.decoded, vocab)
    png = interp.save_confusion_matrix(run_dir / f"{stem}_confusion_matrix.png", title=f"{run_dir.name}: {source}")
    try:
        cam = interp.save_top_losses_cam(run_dir / f"{stem}_top_losses.png", title=f"{run_dir.name}: top losses")
    except (CifarFastaiError, ImportError) as e:  # no conv feature map (a timm ViT), an unreadable image: the rest holds
        cam = None
        log(f"no Grad-CAM figure: {e}")
    result = {
        "run": str(run_dir),
        "data": source,
        "n": summary["n"],
        "accuracy": summary["accuracy"],
        "loss": summary["loss"],
        "per_class": {c: {k: round(float(v), 4) for k, v in per_class[c].items()} for c in vocab},
        "macro_f1": round(float(per_class["macro avg"]["f1-score"]), 4),
        "most_confused": summary["most_confused"],
        "confusion_matrix": interp.confusion_matrix().tolist(),
        "confusion_matrix_png": png.name,
        "top_losses_png": cam.name if cam else None,
        "skipped_files": skipped,
    }
    if tta:
        result["tta_accuracy"], result["tta_extra_view_images"] = tta_result(
            learn, dl, tta_select, plain=interp.logits, targs=interp.targs
        )
    if attack != "none":
        set_seed(0)  # the attacked subset and PGD's random starts are reproducible
        sub = dl.new(shuffle=True) if attack_n else dl  # a random subset: the test loader is ordered by class
        result["attack"] = {
            "attack": attack,
            "eps": eps,
            "eps_255": round(eps * 255, 3),
            **({"steps": steps, "alpha": alpha} if attack == "pgd" else {}),
            **robust_accuracy(learn.model, sub, attack, eps, alpha, steps, limit=attack_n),
        }
    result["wall_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(run_dir / f"{stem}.json", result)
    (run_dir / f"{stem}.md").write_text(markdown(result, report_text))
    log(summary_line(result))
    log(f"wrote {run_dir / (stem + '.json')}, {stem}.md, {png.name}" + (f", {cam.name}" if cam else ""))
    return result


def slug(source: str) -> str:
    """'evaluation-<slug>' names: the folder's last two parts, e.g. 'cifar10-test' for a CIFAR layout's test/."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(Path(source).parts[-2:])).strip("-")[:60] or "data"


def summary_line(r: dict) -> str:
    parts = [f"accuracy {r['accuracy']:.4f}", f"loss {r['loss']:.4f}"]
    if "tta_accuracy" in r:
        parts.append(f"TTA accuracy {r['tta_accuracy']:.4f}")
    if "attack" in r:
        a = r["attack"]
        parts.append(
            f"{a['attack'].upper()} eps {a['eps_255']:g}/255: robust accuracy {a['robust_accuracy']:.4f} "
            f"(clean {a['clean_accuracy']:.4f} on the same {a['n']} images)"
        )
    return "  ".join(parts)


def markdown(r: dict, report_text: str) -> str:
    lines = [
        f"# Evaluation of `{r['run']}`",
        "",
        f"Data: {r['data']} ({r['n']} images)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [
        f"| accuracy | {r['accuracy']:.4f} |",
        f"| loss | {r['loss']:.4f} |",
        f"| macro F1 | {r['macro_f1']:.4f} |",
    ]
    if "tta_accuracy" in r:
        lines.append(f"| TTA accuracy | {r['tta_accuracy']:.4f} |")
    if "attack" in r:
        a = r["attack"]
        name = f"{a['attack'].upper()} eps {a['eps_255']:g}/255" + (
            f", {a['steps']} steps of {a['alpha'] * 255:g}/255" if "steps" in a else ""
        )
        lines += [
            f"| clean accuracy ({a['n']} images) | {a['clean_accuracy']:.4f} |",
            f"| robust accuracy, {name} | {a['robust_accuracy']:.4f} |",
        ]
    lines += [
        "",
        "## Per class",
        "",
        "```",
        report_text.rstrip(),
        "```",
        "",
        "## Most confused (actual, predicted, count)",
        "",
    ]
    lines += [f"- {a} -> {b}: {k}" for a, b, k in r["most_confused"]] or ["- none"]
    lines += ["", f"![confusion matrix]({r['confusion_matrix_png']})", ""]
    if r.get("top_losses_png"):
        lines += [
            "## Top losses: where the model looked",
            "",
            (
                "The test images with the highest loss; beside each, the Grad-CAM heat map of the class the model "
                "predicted (red: the regions that raised that class's score most)."
            ),
            "",
            f"![top losses with Grad-CAM]({r['top_losses_png']})",
            "",
        ]
    if r["skipped_files"]:
        lines += ["Skipped unreadable files: " + ", ".join(r["skipped_files"]), ""]
    return "\n".join(lines)
