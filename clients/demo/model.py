"""A small CNN for grayscale images (8x8 digits, 28x28 Fashion-MNIST or folders)."""

from __future__ import annotations

from typing import Any


def make_model(image_size: int, classes: int, *, dp: bool = False, seed: int = 0) -> Any:
    """Conv-BN-ReLU x2 with pooling, two linear layers. With ``dp``, Opacus's ModuleValidator
    replaces BatchNorm (which mixes samples, so DP-SGD cannot clip per sample) by GroupNorm."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if image_size <= 8:  # digits: both convolutions at full resolution, one pooling
        side = image_size // 2
        layers: list[nn.Module] = [
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        ]
    else:  # 28x28: pool after each convolution (about 1M multiply-adds per image: CPU-sized)
        side = image_size // 4
        layers = [
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        ]
    layers += [nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, classes)]
    model = nn.Sequential(*layers)
    if dp:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model
