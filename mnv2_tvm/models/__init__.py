"""The model registry: a name and a config in, a PyTorch model and its input/output contract out.

Torch is imported lazily so that commands which only need the registry's metadata stay fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

# Width multipliers the paper defines (Table 6a / Figure 5): the default grid. Any other
# multiplier in (0, MAX_WIDTH] builds too, channels rounded as torchvision rounds them.
WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MAX_WIDTH = 4.0


@dataclass(frozen=True)
class ModelInfo:
    default_resolution: int
    default_classes: int
    output_name: str
    # Input normalisation: x' = (x / 255 - mean) / std per channel.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Which residues of the resolution modulo 32 are accepted (513 = 16·32 + 1 for DeepLab).
    resolution_residues: tuple[int, ...] = (0,)
    class_choices: tuple[int, ...] = ()


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # x / 127.5 - 1

MODELS: dict[str, ModelInfo] = {
    "mobilenet_v2": ModelInfo(224, 1000, "logits", *IMAGENET),
    "ssdlite": ModelInfo(320, 81, "detections", *TF_INCEPTION, class_choices=(80, 81, 91)),
    "deeplabv3": ModelInfo(513, 21, "mask_logits", *TF_INCEPTION, resolution_residues=(0, 1)),
}


@dataclass(frozen=True)
class ModelConfig:
    """One buildable configuration. ``None`` fields take the model's default."""

    model: str = "mobilenet_v2"
    width: float = 1.0
    resolution: int | None = None
    num_classes: int | None = None
    output_stride: int = 16  # DeepLab only
    batch: int = 1

    def __post_init__(self) -> None:
        info = MODELS.get(self.model)
        if info is None:
            raise UserError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if not 0 < self.width <= MAX_WIDTH:  # also false for NaN
            raise UserError(f"width {self.width:g} is invalid: a multiplier must be in (0, {MAX_WIDTH:g}] "
                            f"(the paper's are {', '.join(f'{w:g}' for w in WIDTHS)})")
        if self.resolution is None:
            object.__setattr__(self, "resolution", info.default_resolution)
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", info.default_classes)
        r = self.resolution
        if r < 32 or r % 32 not in info.resolution_residues:
            allowed = "a multiple of 32" + (" (or one more, e.g. 513)" if 1 in info.resolution_residues else "")
            raise UserError(f"resolution {r} is invalid for {self.model}: it must be {allowed} and at least 32")
        if info.class_choices and self.num_classes not in info.class_choices:
            raise UserError(f"{self.model} supports {', '.join(map(str, info.class_choices))} classes, "
                            f"not {self.num_classes}")
        if self.num_classes < 1:
            raise UserError(f"num_classes must be positive, not {self.num_classes}")
        if self.model == "deeplabv3" and self.output_stride not in (8, 16):
            raise UserError(f"output stride {self.output_stride} is invalid: choose 8 or 16")
        if self.batch < 1:
            raise UserError(f"batch must be at least 1, not {self.batch}")

    @property
    def info(self) -> ModelInfo:
        return MODELS[self.model]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, self.resolution, self.resolution)

    @property
    def label(self) -> str:
        """A short stable name, e.g. ``mobilenet_v2-1.0-224`` or ``deeplabv3-1.0-513-os16``."""
        s = f"{self.model}-{float(self.width)}-{self.resolution}"
        if self.model == "deeplabv3":
            s += f"-os{self.output_stride}"
        if self.num_classes != self.info.default_classes:
            s += f"-c{self.num_classes}"
        if self.batch != 1:
            s += f"-b{self.batch}"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in ("model", "width", "resolution", "num_classes", "output_stride", "batch") if k in d}
        return cls(**known)


def build(cfg: ModelConfig, seed: int = 0, weights: Path | None = None,
          calibrate: bool = True) -> "torch.nn.Module":
    """The model in eval mode, randomly initialised from ``seed`` or loaded from ``weights``.

    ``calibrate=False`` skips the batch-norm calibration of random models (for counting).
    """
    import torch

    from .deeplab import DeepLabV3
    from .mobilenet_v2 import MobileNetV2
    from .ssdlite import SSDLite

    torch.manual_seed(seed)
    if cfg.model == "mobilenet_v2":
        model = MobileNetV2(cfg.width, cfg.num_classes)
    elif cfg.model == "ssdlite":
        model = SSDLite(cfg.width, cfg.resolution, cfg.num_classes)
    else:
        model = DeepLabV3(cfg.width, cfg.num_classes, cfg.output_stride)
    if weights is not None:
        load_weights(model, weights)
    elif calibrate:
        calibrate_batchnorm(model, cfg)
    return model.eval()


def calibrate_batchnorm(model: "torch.nn.Module", cfg: ModelConfig) -> None:
    """Give a randomly initialised model batch-norm statistics from one random batch.

    With torchvision's initialisation and fresh running statistics, activations shrink at
    every depthwise conv until the logits are ~1e-8, which would make any parity check
    vacuous. Statistics measured on a random batch (plus random affine terms) keep
    activations at unit scale and give the BN folding real numbers to fold.
    """
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        nn.init.uniform_(bn.weight, 0.2, 0.6)
        nn.init.uniform_(bn.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *cfg.input_shape[1:]))
    for bn in bns:
        bn.momentum = 0.1
        # Channels that the random batch left (nearly) dead would get a 1/sqrt(eps) gain that
        # no trained network has; floor them at a small share of the layer's mean variance.
        bn.running_var.clamp_(min=0.01 * float(bn.running_var.mean()))


def load_weights(model: "torch.nn.Module", path: Path) -> None:
    """Load a state dict file (torchvision's layout for MobileNetV2), checking names and shapes."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except Exception as e:  # torch raises many kinds for a file that is not a state dict
        raise UserError(f"weights file {path} is not a readable PyTorch state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise UserError(f"weights file {path} does not fit this model: " + "; ".join(parts))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"weights file {path} does not fit this model: {k} has shape "
                            f"{tuple(state[k].shape)}, the model needs {tuple(v.shape)} (wrong width or classes?)")
    model.load_state_dict(state)


def fold_batchnorm(model: "torch.nn.Module") -> "torch.nn.Module":
    """Fold every Conv2d → BatchNorm2d pair into the conv (in place, eval mode).

    Relax keeps batch norm as a separate op; folding halves the number of tuning tasks.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


def example_input(cfg: ModelConfig, seed: int = 0) -> "np.ndarray":
    """A fixed random input in the model's normalised range."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.uniform(-2.0, 2.0, size=cfg.input_shape).astype("float32")


def read_image(path: Path) -> "Image.Image":
    """An image file decoded to RGB, or one line saying why it cannot be.

    Images come from users and the web: a small file may declare billions of pixels and take
    all memory to decode. Pillow refuses more than ``Image.MAX_IMAGE_PIXELS`` pixels only with a
    warning, and twice that with an error; both are refused here before anything is decoded.
    """
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"image {path} is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        size = f"{int(m.group(1)):,} pixels, over the limit of {int(m.group(2)):,}" if m else str(e).rstrip(".")
        raise UserError(f"image {path} is refused as a possible decompression bomb ({size}); "
                        "scale it down first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise UserError(f"image {path} cannot be read as an image ({e.__class__.__name__})") from None


def preprocess_image(path: Path, cfg: ModelConfig) -> "np.ndarray":
    """Read an image, resize to the model's square input, normalise, NCHW float32."""
    import numpy as np
    from PIL import Image

    img = read_image(path).resize((cfg.resolution, cfg.resolution), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(cfg.info.mean, np.float32)) / np.array(cfg.info.std, np.float32)
    x = np.repeat(x.transpose(2, 0, 1)[None], cfg.batch, axis=0)
    return np.ascontiguousarray(x, dtype=np.float32)
