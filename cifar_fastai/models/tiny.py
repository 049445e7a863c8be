"""A tiny CNN registered for fast CPU tests (timm keeps one for the same reason)."""

from __future__ import annotations

from torch import nn

from ._registry import register_cifar_model


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def classifier_head(n_features: int, n_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Global average pool + optional dropout + linear: the head every project model shares."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_features, n_out))


@register_cifar_model("tiny")
def tiny(n_out: int = 10, width: float = 1.0, dropout: float = 0.0) -> nn.Sequential:
    """Tiny 3-conv CNN (~25k parameters) for tests."""
    c = max(4, int(16 * width))
    body = nn.Sequential(conv_bn(3, c), conv_bn(c, 2 * c, 2), conv_bn(2 * c, 4 * c, 2))
    return nn.Sequential(body, classifier_head(4 * c, n_out, dropout))
