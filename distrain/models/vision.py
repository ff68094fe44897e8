"""Image and tabular models: the seeds' nets, an MLP and a CIFAR-friendly ResNet-18."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def mlp(in_shape, num_classes: int = 10, hidden: list = (256, 256)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class MnistCNN(nn.Module):
    """conv 1->32->64 3x3, max-pool, fc 128, fc 10 (PyTorch's MNIST example net)."""

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class LeNet(nn.Module):
    """conv 3->6->16 5x5 with pooling, fc 120-84-10 (PyTorch's CIFAR-10 tutorial net)."""

    def __init__(self, in_shape=(3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * h2 * w2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


def cnn(in_shape=(1, 28, 28), num_classes: int = 10) -> nn.Module:
    return MnistCNN(tuple(in_shape), num_classes)


def lenet(in_shape=(3, 32, 32), num_classes: int = 10) -> nn.Module:
    return LeNet(tuple(in_shape), num_classes)


def regression(in_shape=(10,), hidden: int = 5) -> nn.Module:
    """The seeds' SimpleNet: 10 -> 5 -> 5 -> 1."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1),
    )


def resnet18(in_shape=(3, 32, 32), num_classes: int = 10, small_stem: bool = True,
             activation_checkpointing: bool = False) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    class ResNet18(ResNet):
        def _forward_impl(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                # recompute each stage in backward: memory for compute, same numbers
                x = checkpoint(stage, x, use_reentrant=False) if activation_checkpointing and self.training else stage(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    model = ResNet18(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if in_shape[0] != 3 or small_stem:
        # small images: a 3x3 stride-1 stem without max-pool keeps 32x32 inputs from shrinking to 1x1
        model.conv1 = nn.Conv2d(in_shape[0], 64, 3 if small_stem else 7, 1 if small_stem else 2,
                                1 if small_stem else 3, bias=False)
        if small_stem:
            model.maxpool = nn.Identity()
    return model
