"""`--augment trivial|rand|augmix`: torchvision's policies per training image, on both loaders, never on validation."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cifar_fastai import TrainConfig, get_data
from cifar_fastai.cli import train_app
from cifar_fastai.data.augment import POLICIES, PolicyAugment, apply_per_image
from cifar_fastai.training.run import train

N = 16  # images compared per check


def raw_items(d, split: str) -> torch.Tensor:
    """The uint8 images of a split's first N positions as the loader makes them, before the float conversion."""
    dl = getattr(d.dls, split)
    if d.loader == "tensor":
        return dl.create_batch(list(range(N)))[0]
    dl.before_iter()  # fastai sets the item pipeline's split_idx here: what makes the policy train-only
    return torch.stack([dl.do_item(i)[0] for i in range(N)])


@pytest.fixture(scope="module")
def plain(tiny_data):
    """The loaders without a policy, one per loader kind."""
    return {
        k: get_data(TrainConfig(data=str(tiny_data), bs=16, loader=k, workers=0), verbose=False)
        for k in ("tensor", "datablock")
    }


@pytest.mark.parametrize("loader", ["tensor", "datablock"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_changes_training_images_only_and_keeps_uint8(tiny_data, plain, loader, policy):
    d = get_data(TrainConfig(data=str(tiny_data), bs=16, loader=loader, workers=0, augment=policy), verbose=False)
    base = plain[loader]
    torch.manual_seed(0)
    before, after = raw_items(base, "train"), raw_items(d, "train")
    assert after.dtype == torch.uint8 and after.shape == before.shape, "uint8 CHW in, uint8 CHW out (0-255)"
    changed = (after != before).flatten(1).any(1)
    assert changed.float().mean() > 0.5, f"--augment {policy} should change most training images"
    torch.manual_seed(0)
    assert torch.equal(raw_items(d, "train"), after), "the same seed gives the same augmented images"
    # validation: the very same pixels as without a policy, and the normalized batches too
    assert torch.equal(raw_items(d, "valid"), raw_items(base, "valid"))
    assert torch.equal(d.dls.valid.one_batch()[0], base.dls.valid.one_batch()[0])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_draws_per_image_not_per_batch(policy):
    """One image repeated: called on the whole batch every copy would get the same op; per image they differ."""
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = apply_per_image(POLICIES[policy](), img.expand(N, -1, -1, -1))
    assert len({o.numpy().tobytes() for o in out}) > N // 2


def test_item_transform_is_training_only():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    from fastai.torch_core import TensorImage

    tfm = PolicyAugment("augmix")
    torch.manual_seed(0)
    assert not torch.equal(tfm(TensorImage(img), split_idx=0), img)
    assert torch.equal(tfm(TensorImage(img), split_idx=1), img)


@pytest.mark.parametrize(("loader", "policy"), [("tensor", "augmix"), ("datablock", "trivial")])
def test_trains_end_to_end_with_policy_on_training_images(tiny_data, tmp_path, monkeypatch, loader, policy):
    calls = []
    forward = POLICIES[policy].forward

    def counted(self, *inputs):
        calls.append(1)
        return forward(self, *inputs)

    monkeypatch.setattr(POLICIES[policy], "forward", counted)
    cfg = TrainConfig(
        data=str(tiny_data), arch="tiny", epochs=1, bs=16, lr=1e-2, loader=loader, workers=0, augment=policy,
        train_per_class=6, checkpoint=False, out=str(tmp_path), name="aug",
    )  # fmt: skip
    res = train(cfg, verbose=False)
    config = json.loads((res.run_dir / "config.json").read_text())
    n_train = config["resolved"]["n_train"]
    # the tensor loader skips the images of the dropped last partial batch; fastai's loop makes those items too
    epoch = n_train // 16 * 16 if loader == "tensor" else n_train
    # one call per training image of the epoch (none for validation or test), and at most one more: fastai's TfmdDL
    # sends one item through its pipeline when it is made, to learn the types of a batch
    assert len(calls) - epoch in (0, 1), f"{len(calls)} policy calls for {epoch} training images"
    assert config["config"]["augment"] == policy and config["resolved"]["loader"] == loader
    assert (res.run_dir / "model.safetensors").is_file()


def test_cli_rejects_unknown_policy():
    res = CliRunner().invoke(train_app, ["--augment", "autoaugment", "--data", "sample"])
    assert res.exit_code == 2 and "--augment" in res.output
