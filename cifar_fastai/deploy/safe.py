"""A model format that loads without pickle: weights in safetensors + a JSON that says how to rebuild the Learner."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from ..config import TrainConfig
from ..errors import CifarFastaiError, ModelFileError
from ..models import get_arch
from ..utils import write_json

FORMAT = "cifar_fastai.safe-model"


FORMAT_VERSION = 1


JSON_NAME, WEIGHTS_NAME, PICKLE_NAME = "model.json", "model.safetensors", "export.pkl"


META_KEY = "cifar_fastai"  # the JSON (less its `weights` entry) is also stored in the safetensors header


MAX_JSON_BYTES = 1 << 20  # a model description is a few kB; anything near 1 MB is not ours


# Config fields that shape the model's tensors or its inputs; the rest (lr, epochs, ...) only say how it was trained.
REBUILD_FIELDS = ("arch", "width", "dropout", "size")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_model(cfg: TrainConfig, vocab: list[str], stats, size: int) -> dict:
    """Everything needed to rebuild the model and feed it, without the training data."""
    from ..data.index import NATIVE_SIZE
    from ..utils import versions

    arch = get_arch(cfg.arch)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": cfg.arch,
        "arch_kind": arch.kind,
        "model": {k: getattr(cfg, k) for k in REBUILD_FIELDS},
        "vocab": list(vocab),
        "normalize": {"mean": [float(v) for v in stats[0]], "std": [float(v) for v in stats[1]]},
        "input_size": int(size),
        "preprocessing": (
            f"RGB; centre-crop to a square and resize to {NATIVE_SIZE}x{NATIVE_SIZE} (CIFAR's size); "
            f"{'bilinear resize to ' + str(size) + 'x' + str(size) + '; ' if size != NATIVE_SIZE else ''}"
            "scale to [0, 1]; subtract mean, divide by std per channel; NCHW float32"
        ),
        "train_config": cfg.to_dict(),
        "versions": versions(),
    }


def save_model(learn, cfg: TrainConfig, vocab: list[str], stats, size: int, folder: str | Path) -> Path:
    """Write `model.safetensors` + `model.json` into `folder`; returns the JSON's path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    meta = describe_model(cfg, vocab, stats, size)
    sd = {k: v.detach().cpu().contiguous() for k, v in learn.model.state_dict().items()}
    weights = folder / WEIGHTS_NAME
    tmp = weights.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(weights)
    weights.chmod(0o644)  # safetensors writes 0600; the JSON beside it is readable, so is this
    meta["weights"] = {"file": WEIGHTS_NAME, "sha256": sha256(weights), "bytes": weights.stat().st_size}
    path = folder / JSON_NAME
    write_json(path, meta)
    return path


# ---------------------------------------------------------------------------------------------------- loading
def find_model_json(path: str | Path) -> Path:
    """A run folder, its `model.json` or its `model.safetensors` -> the JSON."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / JSON_NAME
    elif path.suffix == ".safetensors":
        path = path.with_name(JSON_NAME)
    if path.suffix == ".pkl":
        raise ModelFileError(
            f"{path} is a pickle: loading it runs whatever code it holds. Use the safe model.json beside it, "
            "or load it with trust_pickle=True / --trust-pickle only if you made it yourself"
        )
    if not path.is_file():
        raise ModelFileError(
            f"{path}: no such model file. A run folder from `python scripts/train.py` holds model.json + "
            "model.safetensors"
        )
    return path


def read_model_json(path: Path) -> dict:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelFileError(f"{path}: {path.stat().st_size:,} bytes is too large for a model description")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a cifar_fastai model description (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: format_version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    checks = {
        "arch": lambda v: isinstance(v, str),
        "model": lambda v: isinstance(v, dict) and set(REBUILD_FIELDS) <= set(v),
        "vocab": lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c for c in v),
        "normalize": lambda v: isinstance(v, dict)
        and all(isinstance(v.get(k), list) and len(v[k]) == 3 for k in ("mean", "std"))
        and all(isinstance(x, (int, float)) for x in v["mean"] + v["std"])
        and all(x > 0 for x in v["std"]),
        "input_size": lambda v: isinstance(v, int) and 8 <= v <= 1024,
        "weights": lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("file"), str),
    }
    for key, ok in checks.items():
        if key not in meta or not ok(meta[key]):
            raise ModelFileError(f"{path}: missing or malformed field {key!r}")
    return meta


def read_weights(json_path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Tensors from the safetensors file named in the JSON, after checking its sha256 and embedded description."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = meta["weights"]["file"]
    if Path(name).name != name:  # only a file beside the JSON: a description may not point elsewhere on disk
        raise ModelFileError(f"{json_path}: weights file {name!r} must be a plain file name beside the JSON")
    weights = json_path.with_name(name)
    if not weights.is_file():
        raise ModelFileError(f"{weights}: weights file named in {json_path.name} is missing")
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights"]["sha256"]:
        raise ModelFileError(
            f"{weights}: sha256 {digest[:12]}... does not match {meta['weights']['sha256'][:12]}... recorded in "
            f"{json_path.name}: the weights were changed, truncated or replaced"
        )
    try:
        sd = load(data)
        embedded = header_metadata(data).get(META_KEY)
    except (SafetensorError, ValueError) as e:
        raise ModelFileError(f"{weights}: not a readable safetensors file ({e})") from None
    described = {k: v for k, v in meta.items() if k != "weights"}
    if embedded is None or json.loads(embedded) != described:
        raise ModelFileError(
            f"{json_path}: does not match the description stored inside {weights.name}: the JSON was edited "
            "(architecture, vocab or normalization no longer fit these weights)"
        )
    return sd


def header_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file: an 8-byte little-endian length, then that many bytes of JSON."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def inference_data(vocab: list[str], size: int, stats):
    """fastai DataLoaders with only the inference pipeline (as `export.pkl` ships), built from a blank image.

    The DataBlock reads one item while it sets itself up; any image does, and none of the training data is needed.
    """
    from ..data.index import NATIVE_SIZE
    from ..data.loaders import inference_dls

    with tempfile.TemporaryDirectory(prefix="cifar_fastai_model_") as tmp:
        example = Path(tmp) / vocab[0] / "blank.png"
        example.parent.mkdir()
        Image.new("RGB", (NATIVE_SIZE, NATIVE_SIZE)).save(example)
        dls = inference_dls(vocab, size, stats, example)
    # create_learner only reads `.dls` and `.vocab` of a CifarData
    return SimpleNamespace(dls=dls, vocab=vocab)


def load_model(path: str | Path, data: str | None = None, cpu: bool = True):
    """Rebuild the fastai `Learner` of a run from `model.json` + `model.safetensors`; no pickle is read.

    `path`: a run folder, its model.json or its model.safetensors. `data`: optionally any `--data` value (e.g.
    'sample' or a folder): the learner then gets training DataLoaders for `lr_find`, `fit_one_cycle` or
    `fine_tune`; without it, it has the inference pipeline for `predict` and `tta(dl=learn.dls.test_dl(...))`.
    `path` may also be `hf-hub:owner/name`: a folder from `scripts/export.py hub` on the Hugging Face Hub.
    """
    from ..training.learner import create_learner
    from .hub import HF_HUB_PREFIX, download

    if str(path).startswith(HF_HUB_PREFIX):  # fetched into huggingface_hub's cache, then read as a local folder
        path = download(str(path))
    json_path = find_model_json(path)
    meta = read_model_json(json_path)
    sd = read_weights(json_path, meta)
    stats = (meta["normalize"]["mean"], meta["normalize"]["std"])
    # Rebuild from scratch: no download, no --weights; the safetensors file holds every tensor.
    cfg = TrainConfig(**meta["model"], pretrained=False, weights=None)
    try:
        if data is not None:
            from ..data.loaders import get_data

            cfg = cfg.replace(data=data)
            dataset = get_data(cfg, stats, verbose=False)
            if dataset.vocab != meta["vocab"]:
                raise ModelFileError(f"--data {data}: classes {dataset.vocab} differ from the model's {meta['vocab']}")
        else:
            dataset = inference_data(meta["vocab"], meta["input_size"], stats)
        learn = create_learner(cfg, dataset, path=json_path.parent)
    except ModelFileError:
        raise
    except CifarFastaiError as e:
        raise ModelFileError(f"{json_path}: cannot rebuild the model it describes ({e})") from None
    try:
        learn.model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise ModelFileError(f"{json_path}: the weights do not fit {meta['arch']!r} as described ({first})") from None
    if cpu:
        learn.dls.cpu()
        learn.model.cpu()
    learn.model.eval()
    return learn


def load(path: str | Path, trust_pickle: bool = False, data: str | None = None):
    """A run folder, model.json/.safetensors (safe) or export.pkl (only with `trust_pickle=True`) -> `Learner`."""
    path = Path(path).expanduser()
    pkl = path / PICKLE_NAME if path.is_dir() else path
    if path.is_dir() and not (path / JSON_NAME).is_file() and pkl.is_file():
        path = pkl  # an older run with only export.pkl
    if path.suffix == ".pkl":
        if not trust_pickle:
            find_model_json(path)  # raises the explanation
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file")
        from fastai.learner import load_learner

        return load_learner(path, cpu=True)
    return load_model(path, data=data)


def convert_pickle(path: str | Path, trust_pickle: bool = False) -> Path:
    """Write the safe format for an older run that has only `export.pkl` (unpickling it needs explicit trust)."""
    from ..data.transforms import input_spec

    path = Path(path).expanduser()
    pkl = path / PICKLE_NAME if path.is_dir() else path
    learn = load(pkl, trust_pickle=trust_pickle)
    folder = pkl.parent
    cfg_file = folder / "config.json"
    cfg = TrainConfig.from_json(cfg_file) if cfg_file.is_file() else None
    if cfg is None:
        raise ModelFileError(f"{folder}: no config.json to say which architecture {pkl.name} holds")
    spec = input_spec(learn.dls)
    return save_model(learn, cfg, spec["vocab"], (spec["mean"], spec["std"]), spec["input_size"], folder)
