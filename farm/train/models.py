"""Model architectures: a small CNN (digits, fashion-mnist) and ResNet-18 adapted to 32x32 inputs (cifar10).

Initialization draws from torch's global generator, so ``torch.manual_seed(s)`` before ``build_model``
gives identical initial parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from farm.spec import ARCHS, ModelSpec, SpecError


class SmallCNN(nn.Module):
    """conv3x3(in, w) ReLU maxpool2, conv3x3(w, 2w) ReLU maxpool2, flatten, linear(4w) ReLU, linear(n_classes).

    The classic small image CNN: at width 32 on 28x28 inputs it has 0.42M parameters and a forward pass of
    8.5 MFLOP (as scripts/bench_stacked_step.py counts), and reaches 88.7% test accuracy on Fashion-MNIST
    with the fashion-mnist preset's 5 epochs (docs/benchmarks.md). No BatchNorm and no buffers: many
    copies train at once over stacked parameters (farm.train.stacked), which running statistics would break.
    A max-pool is only applied while the feature map is at least 4 pixels wide, so 8x8 digits still work
    (8 -> 4 -> 2).
    """

    def __init__(self, in_channels: int, n_classes: int, image_size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for out in (width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 4 * width), nn.ReLU(),
                                        nn.Linear(4 * width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(in_channels: int, n_classes: int) -> nn.Module:
    from torchvision.models import resnet18  # torchvision only for resnet18

    model = resnet18(weights=None, num_classes=n_classes)
    # The usual CIFAR adaptation: a 3x3 stride-1 stem and no max-pool keep 32x32 inputs from shrinking to 1x1.
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # torchvision initializes its convs with Kaiming-normal (fan_out); keep the replaced stem consistent.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_model(spec: ModelSpec, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
    """A freshly initialized model for images of shape [in_channels, image_size, image_size]."""
    for name, value in (("in_channels", in_channels), ("n_classes", n_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"build_model: {name} must be a positive integer, got {value!r}")
    if n_classes < 2:
        raise ValueError(f"build_model: n_classes must be at least 2, got {n_classes}")
    if spec.arch == "small-cnn":
        if isinstance(spec.width, bool) or not isinstance(spec.width, int) or spec.width <= 0:
            raise SpecError(f"model.width must be a positive integer, got {spec.width!r}")
        return SmallCNN(in_channels, n_classes, image_size, spec.width)
    if spec.arch == "resnet18":
        return _resnet18(in_channels, n_classes)
    raise SpecError(f"model.arch {spec.arch!r} is unknown; allowed: {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
