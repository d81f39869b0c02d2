"""Per-kernel times of a run and the model layers they belong to.

Per-layer times come from the Relax VM's instrument hook (TVM 0.27 has no VM profiler any more:
``VirtualMachine(..., profile=True)`` and ``vm.profile`` are gone): every kernel call is timed
on the host (:func:`profile_kernels`; on a board, ``bench`` times each kernel alone) and mapped
back to the model's conv/linear layers by output shape and MAdds (:func:`map_kernels`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..madds import LayerCount


@dataclass(frozen=True)
class KernelTime:
    """One kernel call of a run, in execution order."""

    name: str  # the PrimFunc symbol, e.g. fused_conv2d3_add2_tir_clip1
    output_shape: tuple[int, ...]  # shape of the last (destination) argument
    bytes: int  # all tensor arguments: inputs, weights and outputs
    ms: float  # median over the profiled runs
    madds: int | None = None  # derived from the argument shapes for conv2d / matmul kernels
    layer: str | None = None  # the model layer, where the kernel's engine names it (ONNX Runtime does)


def board_kernels(profile: list[dict[str, Any]]) -> list[KernelTime]:
    """``bench``'s per-kernel rows (one per kernel, with call positions) as one
    :class:`KernelTime` per call, in the order ``main`` makes them."""
    import numpy as np

    calls: list[tuple[int, KernelTime]] = []
    for row in profile:
        shapes = [tuple(int(d) for d in s) for s in row["args"]]
        dtypes = row.get("dtypes") or ["float32"] * len(shapes)
        nbytes = sum(math.prod(s) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes))
        k = KernelTime(row["name"], _nchw(shapes[-1]) if shapes else (), int(nbytes), float(row["ms_per_call"]),
                       _kernel_madds(row["name"], shapes))
        positions = row.get("at") or [len(calls) + i for i in range(row["calls"])]
        calls += [(p, k) for p in positions]
    calls.sort(key=lambda pk: pk[0])
    return [k for _, k in calls]


def is_kernel(symbol: str) -> bool:
    # PrimFuncs are plain identifiers; VM builtins and packed externs are dotted
    # (vm.builtin.alloc_tensor, vm.builtin.reshape, ...).
    return "." not in symbol


def _nchw(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel's output shape as the model's layer has it: blocked NCHW[b]c (5-D) → NCHW."""
    shape = tuple(shape)
    if len(shape) == 5:
        n, blocks, h, w, lanes = shape
        return (n, blocks * lanes, h, w)
    return shape


def _kernel_madds(name: str, shapes: list[tuple[int, ...]]) -> int | None:
    """MAdds of a conv2d / matmul kernel from its argument shapes (data, weight, ..., out)."""
    if len(shapes) < 3:
        return None
    out, weight = _nchw(shapes[-1]), shapes[1]
    numel = math.prod(out)
    # Tuned CPU kernels read their weights pre-packed (5-D and up): the element count is the
    # same, so weight elements per output channel still give k_h·k_w·C_in/groups.
    if "conv2d" in name and len(out) == 4 and len(weight) >= 4 and math.prod(weight) % out[1] == 0:
        return numel * (math.prod(weight) // out[1])
    if ("matmul" in name or "dense" in name) and len(shapes[0]) >= 2:
        return numel * shapes[0][-1]
    return None


def profile_kernels(vm: Any, device: Any, x: Any, runs: int = 5) -> list[KernelTime]:
    """Per-kernel wall time of ``vm["main"](x)`` through the VM's instrument hook.

    The hook runs in Python before and after every call instruction; only the interval between
    a kernel's two hooks is kept (a few µs of call overhead per kernel on the host). One
    untimed run records the kernels' shapes, then ``runs`` timed runs give a median per call.
    """
    import numpy as np
    import tvm
    import tvm_ffi

    shapes: list[tuple[str, list[tuple[int, ...]], int]] = []
    samples: list[list[int]] = []
    state = {"record": True, "t": 0}
    clock = time.perf_counter_ns

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if not is_kernel(symbol):
            return 0
        if before:
            if state["record"]:
                arg_shapes, nbytes = [], 0
                for a in args:
                    if hasattr(a, "shape") and hasattr(a, "dtype"):
                        s = tuple(int(d) for d in a.shape)
                        arg_shapes.append(s)
                        nbytes += math.prod(s) * np.dtype(str(a.dtype)).itemsize
                shapes.append((symbol, arg_shapes, nbytes))
            state["t"] = clock()  # last thing before the kernel runs
        else:
            dt = clock() - state["t"]  # first thing after it returns
            if not state["record"]:
                samples[-1].append(dt)
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        arg = tvm.runtime.tensor(x, device)
        vm["main"](arg)
        state["record"] = False
        for _ in range(runs):
            samples.append([])
            vm["main"](arg)
    finally:
        # Removed, not replaced by a no-op: a Python call around each of the ~70 kernels would
        # add ~1.7 ms to every later run of MobileNetV2 (measured).
        vm.set_instrument(None)
    n = len(shapes)
    if not samples or any(len(s) != n for s in samples):
        raise RuntimeError("the kernel sequence changed between profiled runs")
    per_call = np.median(np.array(samples, dtype=float), axis=0) / 1e6
    out = []
    for (symbol, arg_shapes, nbytes), ms in zip(shapes, per_call):
        out_shape = _nchw(arg_shapes[-1]) if arg_shapes else ()
        out.append(KernelTime(symbol, out_shape, int(nbytes), float(ms), _kernel_madds(symbol, arg_shapes)))
    return out


@dataclass(frozen=True)
class LayerTime:
    """One row of a per-layer profile: a model layer with its kernel, or a kernel of no layer."""

    layer: str  # the PyTorch module name, or the kernel name for kernels of no conv/linear layer
    kind: str  # conv, depthwise, pointwise, linear; "other" for pooling, resize, concat, ...
    madds: int
    bytes: int  # the layer's count (weights + activations in and out); the kernel's for "other"
    kernel: str | None
    ms: float | None  # None when no kernel was found for the layer
    output_shape: tuple[int, ...] = ()


@dataclass
class LayerMap:
    rows: list[LayerTime]  # in execution order; unmatched layers last (ms None)
    unmatched_layers: list[str]  # conv/linear layers no kernel was mapped to
    unmatched_kernels: list[str]  # conv2d/matmul kernels that matched no layer (kept as "other")

    @property
    def complete(self) -> bool:
        return not self.unmatched_layers and not self.unmatched_kernels

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "unmatched_layers": self.unmatched_layers,
                "unmatched_kernels": self.unmatched_kernels}


def _compute_kernel(name: str) -> bool:
    return any(k in name for k in ("conv2d", "matmul", "dense"))


def _padded(layer: Sequence[int], kernel: Sequence[int]) -> bool:
    """Whether a blocked kernel's output is the layer's with channels padded to its block
    (ONNX Runtime's NCHWc convs write 488 channels for a head's 486)."""
    if len(layer) != 4 or len(kernel) != 4:
        return False
    (n, c, h, w), (kn, kc, kh, kw) = layer, kernel
    return (n, h, w) == (kn, kh, kw) and c < kc < c + 16 and kc % 8 == 0


def same_module(layer: str, named: str) -> bool:
    """Whether a kernel named after module ``named`` computes ``layer``: the module itself or a
    sibling in the same parent (``features.0.2``, the ReLU6 a conv was fused with, for ``features.0.0``)."""
    return layer == named or layer.rsplit(".", 1)[0] == named.rsplit(".", 1)[0]


def map_kernels(kernels: Sequence[KernelTime], layers: Sequence[LayerCount]) -> LayerMap:
    """Map fused TIR kernels to the model's conv and linear layers.

    A kernel that names its layer (``KernelTime.layer``) takes it, or the first free layer of the
    same parent module (a conv fused with the ReLU6 beside it is named after the ReLU6): shapes and
    MAdds mislead where an engine pads channels (ONNX Runtime's NCHW16c kernels pad 24 channels to
    32 on AVX-512).

    Relax fuses each conv (or matmul) with its bias, clip and residual add into one kernel, so a
    conv2d/matmul kernel is one layer. A kernel takes the first free layer with its output shape,
    preferring one with the MAdds its argument shapes imply and one at or after the previous
    match (execution follows PyTorch's order; parallel branches may swap); failing the shape, one
    whose channels a blocked kernel padded. Other kernels (pooling,
    resize, concat, box decoding) become rows of kind ``other``.
    """
    free = list(range(len(layers)))
    by_layer: dict[int, KernelTime] = {}
    rows_order: list[tuple[str, Any]] = []
    unmatched_kernels: list[str] = []
    cursor = 0
    for k in kernels:
        named = []
        if k.layer is not None:
            named = ([i for i in free if layers[i].name == k.layer]
                     or [i for i in free if same_module(layers[i].name, k.layer)])
        if named:
            free.remove(named[0])
            by_layer[named[0]] = k
            cursor = named[0] + 1
            rows_order.append(("layer", named[0]))
            continue
        if _compute_kernel(k.name):
            cands = ([i for i in free if tuple(layers[i].output_shape) == tuple(k.output_shape)]
                     or [i for i in free if _padded(layers[i].output_shape, k.output_shape)])
            if cands:
                exact = [i for i in cands if k.madds is not None and layers[i].madds == k.madds]
                pool = exact or cands
                after = [i for i in pool if i >= cursor]
                i = (after or pool)[0]
                free.remove(i)
                by_layer[i] = k
                cursor = i + 1
                rows_order.append(("layer", i))
                continue
            unmatched_kernels.append(k.name)
        rows_order.append(("kernel", k))
    rows: list[LayerTime] = []
    for what, ref in rows_order:
        if what == "layer":
            lc, k = layers[ref], by_layer[ref]
            rows.append(LayerTime(lc.name, lc.kind, lc.madds, lc.bytes, k.name, k.ms, tuple(lc.output_shape)))
        else:
            label = ref.name if len(ref.name) <= 40 else ref.name[:39] + "…"  # fused names run to pages
            rows.append(LayerTime(label, "other", 0, ref.bytes, ref.name, ref.ms, tuple(ref.output_shape)))
    for i in free:
        lc = layers[i]
        rows.append(LayerTime(lc.name, lc.kind, lc.madds, lc.bytes, None, None, tuple(lc.output_shape)))
    return LayerMap(rows, [layers[i].name for i in free], unmatched_kernels)
