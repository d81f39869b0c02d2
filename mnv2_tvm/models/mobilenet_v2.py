"""MobileNetV2 (Sandler et al., CVPR 2018), written from the paper's Table 2.

The module layout follows torchvision's (``features.N.conv.M``, ``classifier.1``) so
that state dicts saved from torchvision load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# Table 2 of the paper: expansion t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10 %."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU(nn.Sequential):
    """Conv → BatchNorm → ReLU6, with 'same' padding for odd kernels and atrous support."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, dilation: int = 1, activation: bool = True) -> None:
        padding = (kernel - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise (3×3) → linear project (1×1), residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def mobilenet_v2_features(width: float = 1.0, output_stride: int = 32,
                          last_channel: bool = True) -> nn.Sequential:
    """The feature extractor (``features`` in torchvision's layout).

    ``output_stride`` < 32 replaces the remaining strides by dilation (DeepLabv3's atrous
    backbone); ``last_channel=False`` drops the final 1×1 conv to 1280 channels.
    """
    cin = make_divisible(32 * width)
    layers: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
    current_stride, dilation = 2, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        cout = make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            block_dilation = dilation
            if stride > 1 and current_stride >= output_stride:
                # Keep the resolution; dilate this block's successors instead.
                dilation *= stride
                stride = 1
            elif stride > 1:
                current_stride *= stride
            layers.append(InvertedResidual(cin, cout, stride, t, dilation=block_dilation))
            cin = cout
    if last_channel:
        # The paper keeps the last layer at 1280 channels for multipliers below 1.
        layers.append(ConvBNReLU(cin, make_divisible(1280 * max(1.0, width)), kernel=1))
    return nn.Sequential(*layers)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = mobilenet_v2_features(width)
        self.last_channel = make_divisible(1280 * max(1.0, width))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def init_weights(module: nn.Module) -> None:
    """torchvision's initialisation, so random models have sensibly scaled activations."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
