"""A torchvision model by import path (`model.name: examples.userpkg.vision:torchvision_model`)."""
from __future__ import annotations

from torch import nn


def torchvision_model(arch: str = "resnet18", num_classes: int = 10, in_shape: tuple = (3, 32, 32)) -> nn.Module:
    """Any torchvision classifier by name, untrained; a 1x1 convolution adapts other channel
    counts (the 8x8 grey digits) to the three it expects."""
    from torchvision.models import get_model

    model = get_model(arch, weights=None, num_classes=num_classes)
    channels = in_shape[0]
    return model if channels == 3 else nn.Sequential(nn.Conv2d(channels, 3, kernel_size=1), model)
