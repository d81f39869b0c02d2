"""SSDLite with a MobileNetV2 backbone (paper §6.2), TF Object Detection API conventions.

Feature maps: the expansion output of layer 15 (stride 16) and the last layer (stride 32),
then extra layers (1×1 → depthwise 3×3 stride 2 → 1×1) down to 1×1. Every prediction
conv is depthwise-separable. Box decoding happens inside the graph, so the compiled
library returns one tensor ``[1, anchors, 4 + classes]`` (boxes as ymin, xmin, ymax, xmax
in [0, 1], then sigmoid class scores); thresholding and NMS run on the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .mobilenet_v2 import ConvBNReLU, init_weights, make_divisible, mobilenet_v2_features

# Extra feature layers of SSDLite: (1×1 bottleneck channels, output channels).
EXTRA_LAYERS: list[tuple[int, int]] = [(256, 512), (128, 256), (128, 256), (64, 128)]
ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
MIN_SCALE, MAX_SCALE = 0.2, 0.95
# TF's box coder scale factors for (y, x, h, w).
BOX_SCALES = (10.0, 10.0, 5.0, 5.0)


class SeparableHead(nn.Sequential):
    """Depthwise 3×3 (+BN+ReLU6) followed by a 1×1 prediction conv with bias."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(ConvBNReLU(cin, cin, groups=cin), nn.Conv2d(cin, cout, 1))


def _feature_sizes(resolution: int) -> list[int]:
    size = math.ceil(resolution / 16)
    sizes = [size]
    for _ in range(1 + len(EXTRA_LAYERS)):
        size = math.ceil(size / 2)
        sizes.append(size)
    return sizes


def anchors_per_location() -> list[int]:
    # TF's reduce_boxes_in_lowest_layer: 3 anchors on the first map, 6 elsewhere.
    return [3] + [len(ASPECT_RATIOS) + 1] * (1 + len(EXTRA_LAYERS))


def make_anchors(resolution: int) -> np.ndarray:
    """TF-style multiple-grid anchors as (ycenter, xcenter, h, w), normalised to [0, 1]."""
    sizes = _feature_sizes(resolution)
    n_maps = len(sizes)
    scales = [MIN_SCALE + (MAX_SCALE - MIN_SCALE) * i / (n_maps - 1) for i in range(n_maps)] + [1.0]
    out = []
    for k, size in enumerate(sizes):
        if k == 0:
            shapes = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            shapes = [(scales[k], ar) for ar in ASPECT_RATIOS]
            shapes.append((math.sqrt(scales[k] * scales[k + 1]), 1.0))
        centers = (np.arange(size) + 0.5) / size
        cy, cx = np.meshgrid(centers, centers, indexing="ij")
        per_loc = [(scale / math.sqrt(ar), scale * math.sqrt(ar)) for scale, ar in shapes]
        grid = np.empty((size, size, len(per_loc), 4), dtype=np.float32)
        for a, (h, w) in enumerate(per_loc):
            grid[:, :, a] = np.stack([cy, cx, np.full_like(cy, h), np.full_like(cx, w)], axis=-1)
        out.append(grid.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


class SSDLite(nn.Module):
    def __init__(self, width: float = 1.0, resolution: int = 320, num_classes: int = 91) -> None:
        super().__init__()
        self.num_classes = num_classes
        features = mobilenet_v2_features(width)
        # Layer 15 of the paper is features[14]; its expansion conv (conv[0]) feeds the first map.
        self.stem = features[:14]
        self.expand15 = features[14].conv[0]
        self.rest15 = nn.Sequential(*list(features[14].conv)[1:])
        self.tail = features[15:]
        channels = [features[14].conv[0][0].out_channels, make_divisible(1280 * max(1.0, width))]
        self.extras = nn.ModuleList()
        cin = channels[-1]
        for mid, cout in EXTRA_LAYERS:
            self.extras.append(nn.Sequential(
                ConvBNReLU(cin, mid, kernel=1),
                ConvBNReLU(mid, mid, stride=2, groups=mid),
                ConvBNReLU(mid, cout, kernel=1),
            ))
            channels.append(cout)
            cin = cout
        counts = anchors_per_location()
        self.box_heads = nn.ModuleList(SeparableHead(c, a * 4) for c, a in zip(channels, counts))
        self.cls_heads = nn.ModuleList(SeparableHead(c, a * num_classes) for c, a in zip(channels, counts))
        self.register_buffer("anchors", torch.from_numpy(make_anchors(resolution)), persistent=False)
        init_weights(self)
        # TF's box predictors start near zero (truncated normal, stddev 0.03): boxes start at the anchors.
        for head in [*self.box_heads, *self.cls_heads]:
            nn.init.normal_(head[1].weight, 0, 0.03)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        f15 = self.expand15(x)
        x = self.tail(self.rest15(f15))
        maps = [f15, x]
        for extra in self.extras:
            x = extra(x)
            maps.append(x)
        n = x.shape[0]
        boxes = torch.cat([h(m).permute(0, 2, 3, 1).reshape(n, -1, 4) for h, m in zip(self.box_heads, maps)], 1)
        logits = torch.cat([h(m).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes)
                            for h, m in zip(self.cls_heads, maps)], 1)
        return torch.cat([decode_boxes(boxes, self.anchors), torch.sigmoid(logits)], dim=2)


def decode_boxes(rel: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """TF FasterRcnnBoxCoder decode: offsets relative to anchors → (ymin, xmin, ymax, xmax)."""
    ya, xa, ha, wa = anchors.unbind(-1)
    ty, tx, th, tw = rel.unbind(-1)
    yc = ty / BOX_SCALES[0] * ha + ya
    xc = tx / BOX_SCALES[1] * wa + xa
    h = torch.exp(th / BOX_SCALES[2]) * ha
    w = torch.exp(tw / BOX_SCALES[3]) * wa
    return torch.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], dim=-1)
