"""Multiply-adds, parameters and bytes moved, per layer and in total.

Counted the paper's way: every conv and linear layer costs k_h·k_w·C_in/groups multiply-adds
per output element; element-wise ops, pooling and resizing are free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

from .models import ModelConfig

if TYPE_CHECKING:
    import torch

BYTES_PER_ELEMENT = 4  # fp32


@dataclass(frozen=True)
class LayerCount:
    name: str
    kind: str  # conv, depthwise, pointwise, linear
    output_shape: tuple[int, ...]
    madds: int
    params: int
    bytes: int  # weights + input and output activations


@dataclass(frozen=True)
class ModelCount:
    config: ModelConfig
    madds: int
    params: int
    layers: list[LayerCount]

    def to_dict(self, per_layer: bool = False) -> dict:
        d = {"model": self.config.model, "width": self.config.width, "resolution": self.config.resolution,
             "num_classes": self.config.num_classes, "madds": self.madds, "params": self.params}
        if self.config.model == "deeplabv3":
            d["output_stride"] = self.config.output_stride
        if per_layer:
            d["layers"] = [asdict(layer) for layer in self.layers]
        return d


def layer_kind(module) -> str:
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if module.kernel_size == (1, 1) and module.groups == 1:
        return "pointwise"
    return "conv"


def count(cfg: ModelConfig, model: "torch.nn.Module | None" = None) -> ModelCount:
    """Run the model once on a zero input with hooks on every conv and linear layer.

    ``model`` reuses one already built for ``cfg`` (before batch-norm folding, which would
    change the parameter count); without it an uncalibrated one is built.
    """
    import torch
    from torch import nn

    from .models import build

    if model is None:
        model = build(cfg, calibrate=False)
    layers: list[LayerCount] = []

    def hook(name: str):
        def record(module, inputs, output) -> None:
            weight = module.weight
            if isinstance(module, nn.Linear):
                per_output = module.in_features
            else:
                per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]
            params = sum(p.numel() for p in module.parameters(recurse=False))
            moved = params + inputs[0].numel() + output.numel()
            layers.append(LayerCount(name, layer_kind(module), tuple(output.shape), output.numel() * per_output,
                                     params, moved * BYTES_PER_ELEMENT))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(cfg.input_shape))
    for h in handles:
        h.remove()
    total_params = sum(p.numel() for p in model.parameters())
    return ModelCount(cfg, sum(layer.madds for layer in layers), total_params, layers)
