"""The model card (README.md) of a Hub folder: the YAML the Hub indexes, and what a user of the model should know."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import TrainConfig, train_command
from ..models import get_arch
from ..utils import read_json

# Not "timm" or "fastai": the weights are this package's Sequential(body, head) state dict. timm.create_model builds
# timm's own module (other key names) and fastai's from_pretrained_fastai unpickles a Learner, so the Hub's "use this
# model" snippet for either would fail; `cifar_fastai.load_model` is what rebuilds it.
LIBRARY_NAME = "cifar_fastai"


TASK = "image-classification"


def base_model_id(cfg: TrainConfig) -> str | None:
    """The Hub id of the weights a run was fine-tuned from, where they have one: timm's pretrained weights do (its
    registry names them offline); torchvision's ImageNet weights, a --weights file or an --init-from run do not."""
    arch = get_arch(cfg.arch)
    if cfg.pretrained and arch.kind == "timm":
        import timm

        return timm.get_pretrained_cfg(arch.builder).hf_hub_id
    return None


def fine_tuned_from(cfg: TrainConfig, base_model: str | None) -> str | None:
    """What the card's text says the run started from, or None for a run trained from scratch."""
    if not cfg.fine_tuning:
        return None
    if base_model:
        return f"[{base_model}](https://huggingface.co/{base_model})"
    if cfg.pretrained:
        return f"torchvision's ImageNet-1k weights of `{cfg.arch}`"
    if cfg.weights:
        return f"the weights file `{Path(cfg.weights).name}`"
    return f"the cifar_fastai run `{Path(cfg.init_from).name}` (its body; a new head)"


def dataset_name(cfg: TrainConfig) -> str:
    if cfg.data == "sample":
        return "CIFAR-10 (cifar_fastai's sample)"
    return "CIFAR-10" if cfg.data == "cifar10" else "CIFAR-10 (local copy)"


def eval_results(metrics: dict, evaluation: dict, name: str) -> list:
    """The model-index entries: test accuracy, with TTA and under attack where the run measured them."""
    from huggingface_hub import EvalResult

    def result(value: float, metric_name: str):
        return EvalResult(task_type=TASK, task_name="Image Classification", dataset_type="cifar10", dataset_name=name,
                          dataset_split="test", metric_type="accuracy", metric_value=round(float(value), 4),
                          metric_name=metric_name)  # fmt: skip

    out = []
    if "test_accuracy" in metrics:
        out.append(result(metrics["test_accuracy"], "Test accuracy"))
    tta = metrics.get("test_accuracy_tta", evaluation.get("tta_accuracy"))
    if tta is not None:
        out.append(result(tta, "Test accuracy (TTA)"))
    if attack := evaluation.get("attack"):
        out.append(result(attack["robust_accuracy"], f"Robust accuracy ({attack_name(attack)})"))
    return out


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an accuracy measured on n images; Wilson's, as the normal one collapses at 0% and 100%."""
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def attack_name(a: dict) -> str:
    steps = f", {a['steps']} steps" if "steps" in a else ""
    return f"{a['attack'].upper()} L-inf eps {a['eps_255']:g}/255{steps}"


def per_class_table(vocab: list[str], metrics: dict, evaluation: dict) -> list[str]:
    """Per-class accuracy (metrics.json), with precision and F1 where `scripts/evaluate.py` wrote them."""
    acc, report = metrics.get("per_class_test_accuracy", {}), evaluation.get("per_class", {})
    if not acc and not report:
        return []
    cols = ["accuracy (recall)"] + (["precision", "F1"] if report else [])
    lines = [f"| class | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for c in vocab:
        r = report.get(c, {})
        a = acc.get(c, r.get("recall"))
        cells = [f"{a:.2%}" if a is not None else "-"]
        if report:
            cells += [
                f"{r['precision']:.2%}" if "precision" in r else "-",
                f"{r['f1-score']:.4f}" if "f1-score" in r else "-",
            ]
        lines.append(f"| {c} | {' | '.join(cells)} |")
    return lines


def model_card(run: Path, meta: dict, repo_id: str | None = None, base_model: str | None = None):
    """A `huggingface_hub.ModelCard` for the run: YAML from `ModelCardData`, text from the run's own files."""
    from huggingface_hub import ModelCard, ModelCardData

    info, metrics, evaluation = (read_json(run / n) for n in ("config.json", "metrics.json", "evaluation.json"))
    cfg = TrainConfig.from_dict(info["config"] if "config" in info else meta["train_config"])
    base_model = base_model or base_model_id(cfg)
    name = repo_id.split("/")[-1] if repo_id else run.name
    data = dataset_name(cfg)
    arch = get_arch(cfg.arch)
    tags = [TASK, "cifar10", "fastai", "pytorch", LIBRARY_NAME, *(["resnet"] if "resnet" in cfg.arch else [])]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME, pipeline_tag=TASK, tags=tags, datasets=["cifar10"], metrics=["accuracy"],
        base_model=base_model, model_name=name, eval_results=eval_results(metrics, evaluation, data) or None,
    )  # fmt: skip
    vocab, size, resolved = meta["vocab"], meta["input_size"], info.get("resolved", {})
    model_id = f"hf-hub:{repo_id}" if repo_id else "hf-hub:<owner>/<name>"
    started = fine_tuned_from(cfg, base_model)
    lines = [
        f"# {name}",
        "",
        (
            f"`{cfg.arch}`: {arch.description.rstrip('.')}, {'fine-tuned' if started else 'trained from scratch'} "
            f"on {data} with cifar_fastai ([fastai](https://docs.fast.ai) + PyTorch)"
            f"{f', starting from {started}' if started else ''}. "
            f"It sorts {size}x{size} RGB images into {len(vocab)} classes: {', '.join(vocab)}."
        ),
        "",
        "## Intended use",
        "",
        (
            "Classifying small natural images into the classes above: a reproducible CIFAR-10 baseline, and a model to "
            "learn and teach image classification with. Not for decisions about people, nor for images outside these "
            "classes."
        ),
        "",
        "```python",
        "from cifar_fastai import load_model",
        "",
        f'learn = load_model("{model_id}")  # or the folder itself; model.safetensors + model.json, no pickle',
        'label, idx, probs = learn.predict("image.jpg")',
        "```",
        "",
        f"Preprocessing (model.json): {meta.get('preprocessing', '')}. `config.json` holds the same in timm's "
        "`pretrained_cfg` (input size, mean, std, bilinear, crop_pct 1.0), so "
        "`timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=...))` builds the transform"
        + (f" for {size}x{size} input (timm resizes the image directly to that size)." if size != 32 else "."),
        "",
        "## Training",
        "",
        f"Data: {data}"
        + (f", {resolved['n_train']:,} training images" if "n_train" in resolved else "")
        + (f"; validation: {resolved['validation']}" if "validation" in resolved else "")
        + (f"; {resolved['n_test']:,} test images, used once at the end." if "n_test" in resolved else "."),
        "",
        "The exact command (the run's config.json, every setting that differs from the defaults):",
        "",
        "```bash",
        train_command(cfg),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "",
        "## Evaluation",
        "",
    ]
    n = metrics.get("n_test") or evaluation.get("n")
    figures = [(r.metric_name, r.metric_value) for r in card_data.eval_results or []]
    if "valid_accuracy" in metrics:
        figures.insert(
            0, (f"Validation accuracy ({metrics.get('validation', 'validation')})", metrics["valid_accuracy"])
        )
    if figures:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.2%} |" for k, v in figures), ""]
        lines += [f"On the {n:,} test images of {data}." if n else "", ""]
    else:
        lines += ["The run recorded no test figures.", ""]
    if attack := evaluation.get("attack"):
        lines += [
            (
                f"Robust accuracy: {attack['robust_accuracy']:.2%} under {attack_name(attack)} on {attack['n']:,} test "
                f"images (clean accuracy on the same images {attack['clean_accuracy']:.2%}; `scripts/evaluate.py "
                f"--attack {attack['attack']}`)."
            ),
            "",
        ]
    if table := per_class_table(vocab, metrics, evaluation):
        lines += ["Per class, on the test set:", "", *table, ""]
    if (run / "confusion_matrix.png").is_file():
        lines += ["![Confusion matrix on the test set](confusion_matrix.png)", ""]
    lines += ["## Limitations", ""]
    if n and "test_accuracy" in metrics:
        low, high = wilson_interval(metrics["test_accuracy"], n)
        lines.append(
            f"- The test set has {n:,} images: the test accuracy is known to lie within {low:.1%} ... {high:.1%} "
            "(95% Wilson interval)."
        )
    lines += [
        (
            f'- Every image gets one of the {len(vocab)} classes, with no "none of these": pictures of anything else '
            "are still labelled, often confidently."
        ),
        (
            f"- Trained on {size}x{size} CIFAR-10 images: larger photos are shrunk to that size first, and accuracy on "
            "photos unlike CIFAR-10's (other viewpoints, cameras, styles) is lower than on its test set."
        ),
        (
            "- Not hardened against adversarial perturbations unless trained with `--adv`; small crafted changes to an "
            "image can change its label."
        ),
        "- `model.json` records every training setting, including the `--data` path on the machine that trained it.",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
