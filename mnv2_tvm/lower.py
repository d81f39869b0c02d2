"""PyTorch model → Relax IRModule, through ``torch.export`` or ONNX.

Batch norm is folded first (Relax keeps it as a separate op). Weights are bound as
constants, so the compiled library is self-contained: one file to ship to a board.

A target may ask for blocked activations (``NCHW8c``: channels in blocks of the CPU's vector
width, innermost), as x86 libraries such as oneDNN and ONNX Runtime's MLAS use: every
convolution then vectorises over a block of 8 channels whatever its spatial size, where in
NCHW the vector runs along a row (7 or 14 wide in the late stages, or strided). It is also
what the hand-written register-tiled 1×1 schedules need (``kernels.schedules``). It stays a
per-target choice (``[build] layout``): ``x86-64-avx2-nchw8c`` uses it.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .models import ModelConfig, fold_batchnorm
from .targets import LAYOUTS

if TYPE_CHECKING:
    import torch
    import tvm
    from tvm import relax, te

FRONTENDS = ("torch", "onnx")
INPUT_NAME = "input"


def layout_block(layout: str) -> int:
    """Channels per block of a layout name (1 for plain NCHW); a clear error for any other."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return 1 if layout == "NCHW" else int(layout[4:-1])


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


def to_relax(model: "torch.nn.Module", cfg: ModelConfig, frontend: str = "torch",
             layout: str = "NCHW") -> "tvm.IRModule":
    """The model as a Relax module with one function ``main(input) -> output`` (NCHW in and
    out; inside, convolutions in ``layout``)."""
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
    mod = relax.transform.DecomposeOpsForInference()(mod)
    block = layout_block(layout)
    return mod if block == 1 else to_blocked_layout(mod, block)


def _rewrite_functions(mod: "tvm.IRModule", mutator_cls: type) -> "tvm.IRModule":
    """``mod`` with every Relax function passed through a ``PyExprMutator`` subclass."""
    from tvm import relax

    rewriter = mutator_cls(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def to_blocked_layout(mod: "tvm.IRModule", block: int) -> "tvm.IRModule":
    """Convolutions over channel blocks of ``block``; layout transforms remain only where a
    tensor leaves the blocked region (pooling, heads whose channels ``block`` does not divide).
    The stem's 3 input channels stay NCHW, but it writes blocks itself."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    # ConvertLayout carries blocked layouts through binary element-wise ops but not through
    # clip, so ReLU6 as clip would convert back to NCHW after every convolution.
    @mutator
    class ClipAsMinMax(PyExprMutator):
        def visit_call_(self, call: "relax.Call") -> "relax.Expr":
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip":
                x, lo, hi = call.args
                dtype = x.ty.dtype
                return relax.op.minimum(relax.op.maximum(x, relax.const(lo.value, dtype)),
                                        relax.const(hi.value, dtype))
            return call

    mod = _rewrite_functions(mod, ClipAsMinMax)
    mod = _pad_outputs_to_blocks(mod, block)
    # Convolutions whose channels the block still does not divide stay NCHW (the pass checks).
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}o"]})(mod)
    return _stem_writes_blocks(mod, block)


def _is_dense_nchw(attrs: "tvm.ir.Attrs") -> bool:
    """Whether conv2d attributes are those of a plain dense NCHW/OIHW → NCHW convolution."""
    return (attrs.data_layout, attrs.kernel_layout, attrs.out_layout, int(attrs.groups)) == ("NCHW", "OIHW", "NCHW", 1)


def _dense_conv_as(attrs: "tvm.ir.Attrs", data: "relax.Expr", weight: "relax.Expr", out_layout: str) -> "relax.Expr":
    """The dense NCHW convolution ``attrs`` describe, over ``data`` and ``weight``, writing ``out_layout``."""
    from tvm import relax

    return relax.op.nn.conv2d(data, weight, attrs.strides, attrs.padding, attrs.dilation, 1, "NCHW", "OIHW",
                              out_layout, attrs.out_dtype or None)


def _pad_outputs_to_blocks(mod: "tvm.IRModule", block: int) -> "tvm.IRModule":
    """A dense convolution over blocked inputs whose output channels the block does not divide
    (SSDLite's heads: 6 anchors × 81 classes = 486; DeepLab's 21 classes) computes zero filters
    up to the next multiple and drops them after. Left NCHW, such a conv read its input through
    a layout transform and got only the search's schedules: SSDLite's 1280→486 head ran at 2.9×
    ONNX Runtime's time (1 thread); blocked, it gets the register-tiled 1×1 of ``kernels.schedules``.
    """
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Pad(PyExprMutator):
        def visit_call_(self, call: "relax.Call") -> "relax.Expr":
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            weight = call.args[1]
            if not _is_dense_nchw(call.attrs) or not isinstance(weight, tvm.ir.expr.Constant):
                return call
            w = weight.value.numpy()
            cout, cin = w.shape[:2]
            if cout % block == 0 or cin % block:
                return call
            padded = np.zeros((-(-cout // block) * block, *w.shape[1:]), w.dtype)
            padded[:cout] = w
            conv = _dense_conv_as(call.attrs, call.args[0], relax.const(padded), "NCHW")
            return relax.op.strided_slice(conv, axes=[1], begin=[0], end=[cout])

    return _rewrite_functions(mod, Pad)


def _stem_writes_blocks(mod: "tvm.IRModule", block: int) -> "tvm.IRModule":
    """The stem (3 input channels: not blocked) writes blocks itself, with its bias and
    activation, instead of writing NCHW for a layout transform to rewrite (measured on
    MobileNetV2 1.0/224: 0.21 ms of transform, and an NCHW stem at 2.7× ONNX Runtime's).

    Rewrites ``layout_transform(NCHW→NCHW[b]c)`` of ``conv2d(NCHW)`` followed by element-wise
    ops with a per-channel or scalar operand (bias, ReLU6 as max/min) into one conv2d with
    ``out_layout=NCHW[b]c`` followed by the same ops on blocked operands.
    """
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    elementwise = {"relax.add", "relax.multiply", "relax.maximum", "relax.minimum"}

    def shape(e: "relax.Expr") -> tuple | None:
        shp = getattr(getattr(e, "ty", None), "shape", None)  # TVM 0.27: a TensorType's ShapeExpr
        try:
            return tuple(int(v) for v in shp.values)
        except (AttributeError, TypeError, ValueError):  # not a tensor, or a symbolic dimension
            return None

    def to_blocks(e: "relax.Expr") -> "relax.Expr":
        return relax.op.layout_transform(e, index_map=lambda n, c, h, w: (n, c // block, h, w, c % block))

    @mutator
    class Rewrite(PyExprMutator):
        def visit_call_(self, call: "relax.Call") -> "relax.Expr":
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.layout_transform"):
                return call
            src, dst = shape(call.args[0]), shape(call)
            if src is None or dst is None or len(src) != 4 or src[1] % block:
                return call
            if dst != (src[0], src[1] // block, src[2], src[3], block):
                return call  # another transform (or the same shapes reached another way)
            chain, cur = [], call.args[0]
            while True:
                bound = self.lookup_binding(cur) if isinstance(cur, relax.Var) else cur
                if not isinstance(bound, relax.Call) or not isinstance(bound.op, tvm.ir.Op):
                    return call
                if bound.op.name == "relax.nn.conv2d":
                    break
                if bound.op.name not in elementwise:
                    return call
                full = [k for k, a in enumerate(bound.args) if shape(a) == src]
                if len(full) != 1:
                    return call  # e.g. a residual add: both operands are full tensors
                other = bound.args[1 - full[0]]
                oshape = shape(other)
                if oshape not in ((), (1, src[1], 1, 1)):
                    return call
                chain.append((bound.op, other, full[0]))
                cur = bound.args[full[0]]
            if not _is_dense_nchw(bound.attrs):
                return call
            out = _dense_conv_as(bound.attrs, bound.args[0], bound.args[1], f"NCHW{block}c")
            for op, other, k in reversed(chain):
                other = other if len(shape(other)) == 0 else to_blocks(other)
                out = relax.Call(op, [out, other] if k == 0 else [other, out])
            return out

    return relax.transform.DeadCodeElimination()(_rewrite_functions(mod, Rewrite))


def _window(data: "te.Tensor", kh: int, kw: int, strides: tuple, padding: tuple,
            dilation: tuple) -> tuple["te.Tensor", int, int, tuple[int, int], tuple[int, int]]:
    """A kh×kw window over axes 2 and 3 (H, W of NCHW or NCHW[b]c): the padded data, the output
    height and width, strides and dilation as ints."""
    from tvm import topi

    h, w = int(data.shape[2]), int(data.shape[3])
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    top, left, bottom, right = (int(v) for v in padding)
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    if top or left or bottom or right:
        rest = [0] * (len(data.shape) - 4)
        data = topi.nn.pad(data, [0, 0, top, left, *rest], [0, 0, bottom, right, *rest], name="pad")
    return data, oh, ow, (sh, sw), (dh, dw)


def _blocked_conv2d(data: "te.Tensor", kernel: "te.Tensor", strides: tuple, padding: tuple,
                    dilation: tuple, groups: int, out_dtype: str) -> "te.Tensor":
    """conv2d over NCHW[b]c data and OIHW[b]o weights, dense (groups 1) or depthwise."""
    from tvm import te

    n, cin_blocks, _, _, cb = (int(v) for v in data.shape)
    cout_blocks, cin_per_group, kh, kw, ob = (int(v) for v in kernel.shape)
    data, oh, ow, (sh, sw), (dh, dw) = _window(data, kh, kw, strides, padding, dilation)
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    if groups == 1:
        # Input channels as (block, lane): the lane is contiguous in memory, so tiling it
        # never needs a division in the index.
        rc, rl = te.reduce_axis((0, cin_blocks), "rc"), te.reduce_axis((0, cb), "rl")
        return te.compute(
            (n, cout_blocks, oh, ow, ob),
            lambda b, o, y, x, lane: te.sum(
                data[b, rc, y * sh + rh * dh, x * sw + rw * dw, rl].astype(out_dtype)
                * kernel[o, rc * cb + rl, rh, rw, lane].astype(out_dtype), axis=[rc, rl, rh, rw]),
            name="conv2d_nchwc")
    if cin_per_group != 1 or groups != cin_blocks * cb or cb != ob or cout_blocks != cin_blocks:
        raise NotImplementedError(f"blocked grouped conv2d with {groups} groups of {cin_per_group}")
    return te.compute(
        (n, cout_blocks, oh, ow, ob),
        lambda b, o, y, x, lane: te.sum(
            data[b, o, y * sh + rh * dh, x * sw + rw * dw, lane].astype(out_dtype)
            * kernel[o, 0, rh, rw, lane].astype(out_dtype), axis=[rh, rw]),
        name="depthwise_conv2d_nchwc")


def _conv2d_into_blocks(data: "te.Tensor", kernel: "te.Tensor", strides: tuple, padding: tuple,
                        dilation: tuple, block: int, out_dtype: str) -> "te.Tensor":
    """conv2d over NCHW data and OIHW weights writing NCHW[b]c (the stem: see _stem_writes_blocks)."""
    from tvm import te

    n, cin, _, _ = (int(v) for v in data.shape)
    cout, _, kh, kw = (int(v) for v in kernel.shape)
    data, oh, ow, (sh, sw), (dh, dw) = _window(data, kh, kw, strides, padding, dilation)
    rc, rh, rw = te.reduce_axis((0, cin), "rc"), te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, cout // block, oh, ow, block),
        lambda b, o, y, x, lane: te.sum(
            data[b, rc, y * sh + rh * dh, x * sw + rw * dw].astype(out_dtype)
            * kernel[o * block + lane, rc, rh, rw].astype(out_dtype), axis=[rc, rh, rw]),
        name="conv2d_into_nchwc")


def legalize_conv2d(bb: "relax.BlockBuilder", call: "relax.Call") -> "relax.Expr":
    """TOPI's conv2d legalisation, plus blocked layouts (which TOPI's leaves unlowered)."""
    from .tvm_compat import topi_conv2d_legalizer

    attrs = call.attrs
    out_dtype = attrs.out_dtype or call.args[0].ty.dtype
    if len(attrs.data_layout) == 4:
        if attrs.out_layout == attrs.data_layout:
            return topi_conv2d_legalizer()(bb, call)
        block = int(call.ty.shape.values[-1])
        return bb.call_te(_conv2d_into_blocks, call.args[0], call.args[1], attrs.strides, attrs.padding,
                          attrs.dilation, block, out_dtype, primfunc_name_hint="conv2d")
    return bb.call_te(_blocked_conv2d, call.args[0], call.args[1], attrs.strides, attrs.padding,
                      attrs.dilation, int(attrs.groups), out_dtype, primfunc_name_hint="conv2d")


#: Resize coordinate modes :func:`legalize_resize2d` lowers separably: output index → source coordinate.
_SOURCE_COORDINATE = {
    "align_corners": lambda o, n_in, n_out: o * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0),
    "half_pixel": lambda o, n_in, n_out: (o + 0.5) * (n_in / n_out) - 0.5,
    "asymmetric": lambda o, n_in, n_out: o * (n_in / n_out),
}
#: FuseOps' pattern kind that is never fused (``relax.transform.AnnotateTIROpPattern``).
OPAQUE = 8


def _linear_taps(o: "tvm.tirx.PrimExpr", n_in: int, n_out: int, mode: str) -> tuple:
    """The two source indices of output index ``o`` along one axis and the second one's weight,
    as TOPI's linear resize computes them (floor, then both indices clamped to the input)."""
    from tvm import te, tirx

    src = _SOURCE_COORDINATE[mode](o.astype("float32"), n_in, n_out)
    low = te.floor(src)
    first = low.astype("int32")
    clamp = lambda i: tirx.max(tirx.min(i, n_in - 1), 0)  # noqa: E731
    return clamp(first), clamp(first + 1), src - low


def _resize_axis(data: "te.Tensor", axis: int, size: int, mode: str, name: str) -> "te.Tensor":
    """``data`` resized to ``size`` along ``axis`` only: a lerp of the two taps each output reads."""
    from tvm import te

    shape = [int(v) for v in data.shape]
    n_in, shape[axis] = shape[axis], size

    def value(*index):
        first, second, t = _linear_taps(index[axis], n_in, size, mode)
        at = lambda i: data[(*index[:axis], i, *index[axis + 1:])]  # noqa: E731
        return at(first) * (1.0 - t) + at(second) * t
    return te.compute(shape, value, name=name)


def legalize_resize2d(bb: "relax.BlockBuilder", call: "relax.Call") -> "relax.Expr":
    """Bilinear resize in two passes, along rows and then along columns, each a kernel.

    TOPI's resize computes every output from four input pixels with the source coordinates and
    weights worked out per output element, and MetaSchedule has almost nothing to choose in it
    (its search space was used up after 2 trials): DeepLab's 21×513×513 upsample took 11.4 ms
    on one thread against ONNX Runtime's 7.5. Separated, the first pass is small (input rows ×
    output width) and the second reads two whole rows per output row with one weight each,
    contiguous along x. The arithmetic is TOPI's (lerp along x, then along y), so the results
    are the same. The row pass is kept out of fusion (``OPAQUE``): fused, it would be inlined
    into the second and every output would interpolate four pixels again. Other methods,
    layouts and coordinate modes keep TOPI's lowering."""
    from .tvm_compat import topi_resize2d_legalizer

    a = call.attrs
    data_shape = [getattr(v, "value", v) for v in call.args[0].ty.shape.values]
    out_shape = [getattr(v, "value", v) for v in call.ty.shape.values]
    if (a.method != "linear" or a.layout != "NCHW" or a.coordinate_transformation_mode not in _SOURCE_COORDINATE
            or not all(isinstance(v, int) for v in data_shape + out_shape)):
        return topi_resize2d_legalizer()(bb, call)
    mode = a.coordinate_transformation_mode
    rows = bb.emit(bb.call_te(_resize_axis, call.args[0], 3, int(out_shape[3]), mode, "resize_rows",
                              primfunc_name_hint="resize_rows", primfunc_attrs={"op_pattern": OPAQUE}))
    return bb.call_te(_resize_axis, rows, 2, int(out_shape[2]), mode, "resize_columns",
                      primfunc_name_hint="resize_columns")
