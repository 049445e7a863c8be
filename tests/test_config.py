"""The one config: the Python API and the command line accept and refuse exactly the same settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from cifar_fastai import TrainConfig
from cifar_fastai.cli import train_app
from cifar_fastai.config import field_type, option
from cifar_fastai.errors import ConfigError


def bad_values() -> list[tuple[str, object]]:
    """One refused value per rule in the field metadata: a wrong choice, a value below min / above max / at gt."""
    cases = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if "choices" in meta:
            cases.append((f.name, "nosuch"))
        if "min" in meta:
            cases.append((f.name, meta["min"] - (1 if field_type(f.name) is int else 0.5)))
        if "max" in meta:
            cases.append((f.name, meta["max"] + 1))
        if "gt" in meta:
            cases.append((f.name, meta["gt"]))
    return cases


CASES = bad_values()


def test_every_rule_in_the_metadata_has_a_case():
    names = {name for name, _ in CASES}
    assert {"valid", "loader", "freeze", "adv", "epochs", "lr", "valid_pct", "width", "recipe"} <= names


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_python_api_and_cli_refuse_the_same_value_with_the_same_message(name, value):
    with pytest.raises(ConfigError) as raised:
        TrainConfig(**{name: value})
    message = str(raised.value)
    assert message.startswith(option(name)), message
    res = CliRunner().invoke(train_app, ["--data", "sample", option(name), str(value)])
    assert res.exit_code == 2, res.output
    assert f"error: {message}" in res.output


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"arch": "resnt18"}, "unknown architecture 'resnt18'"),
        ({"eps": "9/0"}, "--eps: '9/0' is not a number"),
        ({"optimizer": "muon"}, "--optimizer muon is for the airbench nets"),
        ({"mixup": 0.4, "cutmix": 1.0}, "--mixup and --cutmix cannot be used together"),
        ({"alt_flip": True, "loader": "datablock"}, "--alt-flip needs the tensor loader"),
        ({"progressive": 40}, "--progressive 40: the start size"),
        ({"progressive": 20, "progressive_shares": "1,2"}, "--progressive-shares 1,2"),
        ({"time_budget": 60, "pretrained": True}, "--time-budget plans a from-scratch run"),
        ({"folds": 3, "fold": 3}, "--fold 3: choose one of 0 ... 2"),
        ({"epochs": "5"}, "--epochs '5': expected a whole number"),
    ],
)
def test_cross_field_rules_and_types_are_checked_on_construction(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        TrainConfig(**settings)


def test_replace_checks_too_and_names_a_typo():
    with pytest.raises(ConfigError, match="--epochs 0"):
        TrainConfig().replace(epochs=0)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): epoch \(did you mean epochs\?\)"):
        TrainConfig().replace(epoch=3)


def test_config_file_with_unknown_keys_is_an_error_that_names_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {**TrainConfig().to_dict(), "lrate": 0.1, "epochs": 3}}))
    with pytest.raises(ConfigError, match="unknown setting.*lrate"):
        TrainConfig.from_json(path)
    path.write_text(json.dumps({"config": {**TrainConfig().to_dict(), "epochs": 3}}))
    assert TrainConfig.from_json(tmp_path).epochs == 3, "a run folder reads its config.json"


def test_the_public_api_exports_the_names_the_docs_use():
    import cifar_fastai

    for name in ("TrainConfig", "train", "get_learner", "load_model", "load", "save_model", "get_data",
                 "resolve_data", "get_arch", "list_archs", "ConfigError"):  # fmt: skip
        assert callable(getattr(cifar_fastai, name)), name
        assert name in cifar_fastai.__all__
