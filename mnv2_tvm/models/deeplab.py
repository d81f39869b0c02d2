"""Mobile DeepLabv3 (paper §6.3): atrous MobileNetV2 backbone and the on-device head.

The paper's efficient row (2.11M params, 2.75B MAdds at 513², OS 16) takes the 320-channel
second-to-last feature map, no ASPP and no multi-scale: a 1×1 conv branch beside an
image-pooling branch, a 1×1 projection, the classifier, then bilinear upsampling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .mobilenet_v2 import ConvBNReLU, init_weights, mobilenet_v2_features

HEAD_CHANNELS = 256


class DeepLabV3(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 21, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError("output_stride must be 8 or 16")
        self.backbone = mobilenet_v2_features(width, output_stride=output_stride, last_channel=False)
        cin = self.backbone[-1].out_channels
        self.branch_1x1 = ConvBNReLU(cin, HEAD_CHANNELS, kernel=1)
        self.branch_pool = ConvBNReLU(cin, HEAD_CHANNELS, kernel=1)
        self.project = ConvBNReLU(2 * HEAD_CHANNELS, HEAD_CHANNELS, kernel=1)
        self.classifier = nn.Conv2d(HEAD_CHANNELS, num_classes, 1)
        init_weights(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        f = self.backbone(x)
        pooled = self.branch_pool(F.adaptive_avg_pool2d(f, 1))
        pooled = pooled.expand(-1, -1, f.shape[2], f.shape[3])
        y = self.project(torch.cat([self.branch_1x1(f), pooled], dim=1))
        # align_corners=True matches TF's resize_bilinear for the odd 513 input.
        return F.interpolate(self.classifier(y), size=size, mode="bilinear", align_corners=True)
