"""Hub-style model folders: write one from a run, push it to the Hugging Face Hub, fetch an `hf-hub:` id back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import ConfigError, HubError, ModelFileError
from .safe import JSON_NAME, WEIGHTS_NAME, find_model_json, load_model, read_model_json

HF_HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hub model id, so one id reads the same in both libraries


CONFIG_NAME, CARD_NAME = "config.json", "README.md"  # the names the Hub and timm look for


# What a Hub folder holds, and so what a download fetches (nothing else of a repo is read).
HUB_FILES = (WEIGHTS_NAME, JSON_NAME, CONFIG_NAME, CARD_NAME, "confusion_matrix.png")


def timm_config(learn, meta: dict) -> dict:
    """`config.json` in the shape timm's `save_for_hf` writes and `load_model_config_from_hf` reads.

    timm's `PretrainedCfg` makes `pretrained_cfg`, so its field names and defaults are timm's own. The values are the
    ones `model.json` records: tools that read timm configs (its `resolve_data_config`) then feed the model as
    training did. Our models are not timm modules, so `save_config_for_hf` itself (which reads timm attributes
    off the model) does not apply.
    """
    from fastai.callback.hook import num_features_model
    from timm.models import PretrainedCfg
    from torch import nn

    size, vocab = meta["input_size"], meta["vocab"]
    names = [(n, m) for n, m in learn.model.named_modules() if n]
    convs = [n for n, m in names if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in names if isinstance(m, nn.Linear)]
    pretrained_cfg = PretrainedCfg(
        input_size=(3, size, size),
        # fixed: the head pools globally, but the weights were fitted to this one size
        fixed_input_size=True,
        # bilinear and crop_pct 1.0: the inference pipeline resizes bilinearly and crops nothing beyond a square
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        mean=tuple(meta["normalize"]["mean"]),
        std=tuple(meta["normalize"]["std"]),
        num_classes=len(vocab),
        first_conv=convs[0] if convs else None,
        classifier=linears[-1] if linears else None,
    ).to_dict(remove_source=True)
    config = {"architecture": meta["arch"], "num_classes": len(vocab)}
    try:  # every model here is Sequential(body, head): the body's output channels are what the head pools
        config["num_features"] = int(num_features_model(learn.model[0]))
    except (TypeError, IndexError, RuntimeError):
        pass  # not that shape: timm treats num_features as informational, so it is left out
    config["label_names"] = list(vocab)
    config["pretrained_cfg"] = pretrained_cfg
    return config


def check_repo_id(repo_id: str, what: str = "--push") -> str:
    """An `owner/name` the Hub accepts, checked offline by huggingface_hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{what} {repo_id!r}: not a Hub repo id ({str(e).splitlines()[0]})") from None
    if "/" not in repo_id:
        raise ConfigError(f"{what} {repo_id!r}: give owner/name, e.g. your-name/cifar10-resnet18")
    return repo_id


def export_hub(
    run: str | Path, out: str | Path | None = None, repo_id: str | None = None, base_model: str | None = None
) -> Path:
    """Write a Hub-style folder for `run` (default `<run>/hub`): weights, `model.json`, timm `config.json`, card."""
    from .card import model_card

    run = Path(run).expanduser()
    json_path = find_model_json(run)
    run = json_path.parent
    out = Path(out).expanduser() if out is not None else run / "hub"
    if out.resolve() == run.resolve():  # the run's own config.json (its training settings) would be overwritten
        raise ConfigError(f"--out {out}: that is the run folder itself; choose another folder")
    learn = load_model(json_path)  # checks the weights against model.json before anything is published
    meta = read_model_json(json_path)
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, JSON_NAME, "confusion_matrix.png"):  # byte for byte: model.json's sha256 still holds
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    (out / CONFIG_NAME).write_text(json.dumps(timm_config(learn, meta), indent=2))
    model_card(run, meta, repo_id=repo_id, base_model=base_model).save(out / CARD_NAME)
    return out


# ------------------------------------------------------------------------------------------------ the Hub itself
def offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it once at import, which may precede the user setting it."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises offline, unreachable, unauthorised or for a missing repo: huggingface_hub's errors are
    OSErrors, and the bases of its HTTP error include its HTTP client's own (a refused or dropped connection)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, ValueError, *HfHubHTTPError.__bases__)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the model repo `repo_id` (created if missing); returns the commit's URL."""
    import huggingface_hub

    folder = Path(folder)
    later = f"the folder {folder} is kept: upload it later with `hf upload {repo_id} {folder}`"
    if offline():
        raise HubError(f"--push {repo_id}: HF_HUB_OFFLINE is set, so nothing is uploaded; {later}")
    if huggingface_hub.get_token() is None:
        raise HubError(f"--push {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {later}")
    api = huggingface_hub.HfApi(library_name="cifar_fastai")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message="Add cifar_fastai model")
    except hub_errors() as e:
        raise HubError(
            f"--push {repo_id}: the Hub refused or could not be reached ({first_line(e)}); {later}"
        ) from None
    return commit.commit_url


def download(model_id: str) -> Path:
    """`hf-hub:owner/name[@revision]` -> a local folder with the model's files (huggingface_hub's cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = model_id.removeprefix(HF_HUB_PREFIX).partition("@")  # timm's '@revision' spelling
    try:
        check_repo_id(repo_id, what="hf-hub id")
    except ConfigError as e:
        raise HubError(str(e)) from None
    is_offline = offline()
    try:  # offline, the cache still serves a model downloaded before
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=list(HUB_FILES), local_files_only=is_offline
        )
    except (RepositoryNotFoundError, GatedRepoError):
        raise HubError(
            f"{model_id}: no such model on the Hub, or it is private or gated (log in: `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if is_offline else "the Hub cannot be reached"
        raise HubError(
            f"{model_id}: {why} and the model is not in the local Hugging Face cache; download it once online, "
            "or load a local folder written by `scripts/export.py hub`"
        ) from None
    except hub_errors() as e:
        raise HubError(f"{model_id}: cannot download ({first_line(e)})") from None
    folder = Path(folder)
    if not (folder / JSON_NAME).is_file():
        raise ModelFileError(f"{model_id}: the repo has no {JSON_NAME}: it is not a cifar_fastai model folder")
    return folder
