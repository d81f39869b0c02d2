"""PyTorch model → Relax IRModule, through ``torch.export`` or ONNX.

Batch norm is folded first (Relax keeps it as a separate op). Weights are bound as
constants, so the compiled library is self-contained: one file to ship to a board.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .models import ModelConfig, fold_batchnorm

if TYPE_CHECKING:
    import torch
    import tvm

FRONTENDS = ("torch", "onnx")
INPUT_NAME = "input"


def export_onnx(model: "torch.nn.Module", cfg: ModelConfig, path: Path) -> Path:
    """Write the (BN-folded) model as ONNX, opset 17, static shapes."""
    import torch

    fold_batchnorm(model)
    x = torch.zeros(cfg.input_shape)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=[INPUT_NAME], output_names=[cfg.info.output_name])
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


def to_relax(model: "torch.nn.Module", cfg: ModelConfig, frontend: str = "torch") -> "tvm.IRModule":
    """The model as a Relax module with one function ``main(input) -> output``."""
    import torch
    from tvm import relax

    if frontend not in FRONTENDS:
        raise UserError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    fold_batchnorm(model)
    if frontend == "torch":
        from tvm.relax.frontend.torch import from_exported_program

        # torch.export warns about its own internals (pytree API changes); nothing a user can act on.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ep = torch.export.export(model, (torch.zeros(cfg.input_shape),))
        mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
    else:
        import onnx
        from tvm.relax.frontend.onnx import from_onnx

        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, cfg, Path(d) / "model.onnx")
            mod = from_onnx(onnx.load(str(path)), shape_dict={INPUT_NAME: list(cfg.input_shape)})
    return relax.transform.DecomposeOpsForInference()(mod)
