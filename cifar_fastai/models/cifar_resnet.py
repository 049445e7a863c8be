"""ResNets built for 32x32 inputs: CIFAR-stem ResNet-18...152, He et al.'s ResNet-20...110 and a DAWNBench ResNet-9."""

from __future__ import annotations

from collections import OrderedDict
from itertools import pairwise

import torch
from fastai.torch_core import params
from fastcore.foundation import L
from torch import nn
from torch.nn import functional as F

from ._registry import register_cifar_model
from .tiny import classifier_head, conv_bn


def channels(c: int, width: float) -> int:
    """Width-multiplied channel count, at least 4 so `--width 0.125` still builds."""
    return max(4, round(c * width))


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """He et al. (2015) option A: identity shortcut, subsampled by the stride, zero-padded to the new channel count.

    Parameter-free, which is why ResNet-20 has 0.27M parameters and not more.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def projection(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Option B: 1x1 conv + BN where the shape changes, identity elsewhere (torchvision's ResNets do the same)."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2015, fig. 2)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1, self.bn1 = conv3x3(c_in, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, c_out), nn.BatchNorm2d(c_out)
        needs = stride != 1 or c_in != c_out
        self.shortcut = PadShortcut(c_in, c_out, stride) if needs and shortcut == "A" else projection(c_in, c_out, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (stride here, as torchvision's "ResNet v1.5") - 1x1 expand x4, plus a projection shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = projection(c_in, c_out, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class Residual(nn.Module):
    """`x + branch(x)`: the DAWNBench ResNet-9's residual block (two conv-BN-ReLU, no projection)."""

    def __init__(self, c: int):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.branch[-1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Scale(nn.Module):
    """Multiply the logits by a constant (Page's ResNet-9 scales them by 0.125, airbench by 1 / width).

    The factor is a buffer: `fold_head_scale` moves it into the linear layer before, and a folded model must reload
    as folded, so a changed factor is saved with the weights; weights without it load with the built-in factor.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.default = float(factor)
        self.register_buffer("factor", torch.tensor(self.default))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # saved only once folded: unfolded weights stay readable by versions without the buffer, and those refuse
        # (unexpected key) folded ones, which they would misread
        if float(self.factor) == self.default:
            del destination[prefix + "factor"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "factor"
        if key not in state_dict:  # an older file: its linear weights were trained with the built-in factor
            self.factor.fill_(self.default)
            if key in missing_keys:
                missing_keys.remove(key)


@torch.no_grad()
def fold_head_scale(model: nn.Module) -> int:
    """Fold every `Scale` into the linear layer before it (same outputs); returns how many were folded.

    Why: the scale suits SGD, whose step on the weights shrinks with the gradient. Adam's step is about the learning
    rate per weight whatever the gradient's size, so logits scaled by 1/256 after a unit-std layer move 256x slower
    than any other layer's outputs: fine-tuning's frozen phase (head only) then learns next to nothing. Folded, the
    head is a plain linear layer with small initial weights, which Adam trains at the rate it trains the rest.
    """
    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for prev, layer in pairwise(seq):
            if isinstance(layer, Scale) and isinstance(prev, nn.Linear) and float(layer.factor) != 1.0:
                prev.weight.mul_(layer.factor)
                if prev.bias is not None:
                    prev.bias.mul_(layer.factor)
                layer.factor.fill_(1.0)
                folded += 1
    return folded


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal convs (fan_out, ReLU: He et al. 2015 "Delving deep into rectifiers"), BN gamma 1 / beta 0.

    The same init torchvision's ResNets use; Linear layers keep PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def zero_init_residual(model: nn.Module) -> int:
    """Zero the last BN gamma of every residual branch, so each block starts as the identity; returns how many.

    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", sec. 5.1: it eases
    optimisation early in training. Works on our blocks, on timm's (`zero_init_last`) and on torchvision's.
    """
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    n = 0
    for m in model.modules():
        if hasattr(m, "zero_init_last"):
            m.zero_init_last()
        elif isinstance(m, TvBasic):
            nn.init.zeros_(m.bn2.weight)
        elif isinstance(m, TvBottleneck):
            nn.init.zeros_(m.bn3.weight)
        else:
            continue
        n += 1
    return n


def cifar_split(model: nn.Module) -> list:
    """Three fastai layer groups like torchvision's ResNet split: stem + early stages / late stages / head.

    `model` is `Sequential(body, head)` and `body` is `Sequential(stem, stage1, ...)`, so `freeze()` trains only the
    head, `freeze_to(-2)` adds the late stages, and `slice(lo, hi)` spreads learning rates over the three.
    """
    body, head = model[0], model[1]
    cut = (len(body) + 1) // 2
    return L(body[:cut], body[cut:], head).map(params)


def make_stage(block: type, c_in: int, planes: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers.append(block(c_in, planes, stride if i == 0 else 1, shortcut))
        c_in = planes * block.expansion
    return nn.Sequential(*layers)


def resnet(
    block: type, layers: list[int], planes: list[int], n_out: int, width: float, dropout: float, shortcut: str
) -> nn.Sequential:
    """3x3 stride-1 stem (no max-pool), then one stage per entry of `layers`, halving the size from stage 2 on."""
    planes = [channels(p, width) for p in planes]
    stages = OrderedDict(stem=conv_bn(3, planes[0]))
    c_in = planes[0]
    for i, (n, p) in enumerate(zip(layers, planes)):
        stages[f"layer{i + 1}"] = make_stage(block, c_in, p, n, 1 if i == 0 else 2, shortcut)
        c_in = p * block.expansion
    model = nn.Sequential(nn.Sequential(stages), classifier_head(c_in, n_out, dropout))
    return init_weights(model)


# ---- CIFAR-stem versions of the ImageNet ResNets: four stages at 32/16/8/4 px, option-B shortcuts
_IMAGENET_PLANES = [64, 128, 256, 512]


def _cifar_resnet(block: type, layers: list[int]):
    def build(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
        return resnet(block, layers, _IMAGENET_PLANES, n_out, width, dropout, shortcut="B")

    return build


_DESCRIBE = "ResNet-{d} with a CIFAR stem (3x3 stride 1, no max-pool), {b}, option-B shortcuts"


for _depth, _block, _layers in (
    (18, BasicBlock, [2, 2, 2, 2]),
    (34, BasicBlock, [3, 4, 6, 3]),
    (50, Bottleneck, [3, 4, 6, 3]),
    (101, Bottleneck, [3, 4, 23, 3]),
    (152, Bottleneck, [3, 8, 36, 3]),
):
    _build = _cifar_resnet(_block, _layers)
    _build.__name__ = _build.__qualname__ = f"cifar_resnet{_depth}"
    _build.__doc__ = _DESCRIBE.format(d=_depth, b=_block.__name__)
    register_cifar_model(f"cifar_resnet{_depth}", splitter=cifar_split)(_build)


# ---- He et al. (2015) sec. 4.2: 6n+2 layers, three stages of 16/32/64 channels, option-A (parameter-free) shortcuts
def _he_resnet(n: int):
    def build(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
        return resnet(BasicBlock, [n] * 3, [16, 32, 64], n_out, width, dropout, shortcut="A")

    return build


_HE_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M"}  # He et al. 2015, table 6


for _depth, _p in _HE_PARAMS.items():
    _build = _he_resnet((_depth - 2) // 6)
    _build.__name__ = _build.__qualname__ = f"resnet{_depth}"
    _build.__doc__ = f"He et al. CIFAR ResNet-{_depth} (16/32/64 channels, option-A shortcuts, {_p} parameters)"
    register_cifar_model(f"resnet{_depth}", splitter=cifar_split)(_build)


# ---- DAWNBench ResNet-9: David Page (myrtle.ai), "How to train your ResNet" (2018), the 94%-in-minutes network
@register_cifar_model("resnet9", splitter=cifar_split)
def resnet9(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
    """DAWNBench ResNet-9 (Page 2018): prep conv, 3 stages (conv+pool), 2 residual blocks, 6.6M parameters."""
    c = [channels(x, width) for x in (64, 128, 256, 512)]
    body = nn.Sequential(
        OrderedDict(
            prep=conv_bn(3, c[0]),
            layer1=nn.Sequential(conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1])),
            layer2=nn.Sequential(conv_bn(c[1], c[2]), nn.MaxPool2d(2)),
            layer3=nn.Sequential(conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3])),
        )
    )
    # Global max-pool, bias-free linear and logits x0.125: Page's choices ("scaling the final layer").
    head = nn.Sequential(
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c[3], n_out, bias=False), Scale(0.125)
    )
    return init_weights(nn.Sequential(body, head))


# ---- A residual net shaped like the CIFAR-10 speed record's (the fast CPU recipes)
class ConvGroup(nn.Module):
    """conv - max-pool - BN - GELU, then a residual conv-BN-GELU branch.

    airbench94's ConvGroup (Keller Jordan 2024, github.com/KellerJordan/cifar10-airbench): pooling right after the
    first conv, so BN and the activation run on a quarter of the pixels (Page 2018, "How to train your ResNet 4");
    its second conv is made residual here, as in Page's ResNet-9 (`x + branch(x)`), which keeps the net a ResNet.
    airbench's BatchNorm: scale frozen at 1 (only the bias trains), eps 1e-12, running-stat momentum 0.4 (its
    "momentum 0.6" in the other convention); its convs start as Dirac (identity) on the first c_in filters.
    """

    def __init__(self, c_in: int, c_out: int, residual: bool = True, convs: int = 2):
        super().__init__()
        self.residual = residual  # False: airbench94's plain conv - conv (the `airbench94` baseline)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool, self.bn1 = nn.MaxPool2d(2), airbench_bn(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), airbench_bn(c_out)
        # airbench96's group: a third conv, the residual over the last two, the activation after the sum (its
        # 06/13/24 update); its BatchNorm keeps torch's running-stat momentum
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False) if convs == 3 else None
        if self.conv3 is not None:
            self.bn3 = airbench_bn(c_out, momentum=0.1)
            self.bn1.momentum = self.bn2.momentum = 0.1
        self.act = nn.GELU()

    def dirac_init(self) -> None:
        for conv in (self.conv1, self.conv2, self.conv3):
            if conv is not None:
                nn.init.dirac_(conv.weight.data[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        y = self.act(self.bn2(self.conv2(x)))
        if self.conv3 is not None:
            return self.act(x + self.bn3(self.conv3(y)))
        return x + y if self.residual else y


def airbench_bn(c: int, momentum: float = 0.4) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=momentum)
    bn.weight.requires_grad_(False)  # the scale stays 1; the bias trains
    return bn


class PatchWhiten(nn.Conv2d):
    """2x2 stride-1 conv (3 -> 24 channels, no padding) that `whiten()` sets to the ZCA-style whitening of the
    training images' 2x2 patches and freezes (airbench94's first layer; Page 2018, "How to train your ResNet 8")."""

    def __init__(self, width: int = 24):
        super().__init__(3, width, 2, padding=0, bias=True)
        # saved with the weights (checkpoints, safetensors), so a trained or reloaded layer is never whitened again
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weight.requires_grad_(not bool(self.whitened))

    @torch.no_grad()
    def whiten(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Weights from the eigenvectors of the patch covariance of `images` (normalized N x 3 x H x W)."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        patches = patches - patches.mean(0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        w = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).reshape(12, 3, 2, 2).flip(0)
        n = self.out_channels // 2
        self.weight.copy_(torch.cat([w[:n], -w[:n]]))  # +/- pairs: the GELU after it keeps both signs
        self.weight.requires_grad_(False)  # frozen, as airbench94 does; the bias still trains
        self.whitened.fill_(True)


def _airbench(
    n_out: int, width: float, dropout: float, residual: bool, widths: tuple[int, int, int] = (64, 256, 256), convs: int = 2
) -> nn.Sequential:
    c = [channels(x, width) for x in widths]
    body = nn.Sequential(
        OrderedDict(
            whiten=nn.Sequential(PatchWhiten(24), nn.GELU()),
            layer1=ConvGroup(24, c[0], residual, convs),
            layer2=ConvGroup(c[0], c[1], residual, convs),
            layer3=ConvGroup(c[1], c[2], residual, convs),
        )
    )
    # airbench94_muon's head: max-pool of the final 3x3 map (31 -> 15 -> 7 -> 3 px), bias-free linear with unit-std
    # weights, logits divided by the feature count
    head = nn.Sequential(
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c[2], n_out, bias=False), Scale(1 / c[2])
    )
    model = init_weights(nn.Sequential(body, head))
    for group in (body.layer1, body.layer2, body.layer3):
        group.dirac_init()
    with torch.no_grad():
        head[3].weight.div_(head[3].weight.std())
    return model


@register_cifar_model("airbench_resnet", splitter=cifar_split)
def airbench_resnet(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
    """airbench94-shaped residual net (Jordan 2024): 2x2 whitening stem, 3 conv groups of 64/256/256, 1.97M parameters."""
    return _airbench(n_out, width, dropout, residual=True)


@register_cifar_model("airbench94", splitter=cifar_split)
def airbench94(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
    """The CIFAR-10 speed record's net as published (airbench94, Jordan 2024): `airbench_resnet` without the residual
    adds; the `--recipe record` baseline."""
    return _airbench(n_out, width, dropout, residual=False)


# airbench's larger rungs (Jordan 2024, github.com/KellerJordan/cifar10-airbench): the shapes, trained here with the
# recipes' Muon and head (the logits divided by the feature count, as airbench94_muon's), not their SGD settings:
# airbench95 (95% on the original images in 15 epochs of SGD) widens the groups to 128/384/384; airbench96 (96% in
# 31 epochs, with 4-px translation and 12-px cutout) also adds a third conv per group. `--width` scales both.
@register_cifar_model("airbench95", splitter=cifar_split)
def airbench95(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
    """airbench95's net (Jordan 2024): airbench94's plain conv groups widened to 128/384/384."""
    return _airbench(n_out, width, dropout, residual=False, widths=(128, 384, 384))


@register_cifar_model("airbench96", splitter=cifar_split)
def airbench96(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
    """airbench96's net (Jordan 2024): conv groups of 128/512/512, three convs each with a residual over the last two;
    at `--width 0.5`, airbench94's widths with the third conv."""
    return _airbench(n_out, width, dropout, residual=True, widths=(128, 512, 512), convs=3)
