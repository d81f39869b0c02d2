"""What a tuning task is: the model's fused kernels, keyed as the records store them.

The one place that decides how a Relax module is legalised and fused (:func:`fuse`), for task
extraction and compilation alike, and whether kernels read pre-packed weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from ..lower import OPAQUE, legalize_conv2d, legalize_resize2d
from .records import as_target, target_config


def prepare(mod: tvm.IRModule, params: dict[str, Any] | None) -> tvm.IRModule:
    """Bind params (name -> numpy/Tensor) and decompose inference ops; same for tune and compile."""
    if params:
        bound = {
            k: v if isinstance(v, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(v))
            for k, v in params.items()
        }
        mod = relax.transform.BindParams("main", bound)(mod)
    return relax.transform.DecomposeOpsForInference()(mod)


@dataclass
class Task:
    """One kernel to tune: its name, how often the model calls it, its FLOPs and its workload."""

    name: str
    weight: int
    flops: float
    mod: tvm.IRModule  # normalized workload module (what MetaSchedule commits)
    target: tvm.target.Target


def prepacks_weights(target: tvm.target.Target) -> bool:
    """Whether kernels for ``target`` read their weights in a layout chosen by tuning.

    On CPUs a tuned conv reads its weights tile by tile; with the weights marked layout-free,
    MetaSchedule may pick a packed layout (RewriteLayout) and compile folds the repacking into
    the constants once, instead of the kernel gathering strided weights on every call.
    """
    return as_target(target).kind.name == "llvm"


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalise and fuse as MetaSchedule's ``zero`` pipeline does; the one place that decides
    what a tuning task is, for extraction and compilation alike."""
    legal = tvm.transform.Sequential([
        relax.transform.LegalizeOps({"relax.nn.conv2d": legalize_conv2d, "relax.image.resize2d": legalize_resize2d}),
        relax.transform.AnnotateTIROpPattern(),
    ])(mod)
    fused = tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(_gathers_unfused(legal))
    if prepacks_weights(target):
        fused = relax.transform.AttachAttrLayoutFreeBuffers()(fused)
    return fused


#: A concatenation of at least this many tensors is a kernel of its own.
GATHER_INPUTS = 3


def _gathers_unfused(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each concatenation of ``GATHER_INPUTS`` or more tensors kept out of fusion.

    Fused, SSDLite's output (six heads, each transposed and reshaped, concatenated, boxes
    decoded, scores through a sigmoid, concatenated again) was one kernel in which every output
    element walked a chain of selects over all heads with 64-bit index arithmetic: 5.3 ms of
    28 per inference on one thread, where ONNX Runtime's separate ops take 0.4 ms. Apart, each
    piece is a plain copy or element-wise kernel (4.8 ms less before any tuning). Two-way
    concatenations (DeepLab's ASPP) stay fusable: nothing slow came of them.
    """
    gathers = [(gv, func) for gv, func in mod.functions.items()
               if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith("concatenate")
               and len(func.params) > GATHER_INPUTS]  # params: the inputs, then the output
    if not gathers:
        return mod
    out = mod.clone()  # an IRModule is changed in place
    for gv, func in gathers:
        out[gv] = func.with_attr("op_pattern", OPAQUE)
    return out


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target, params: dict | None = None) -> list[Task]:
    """The tuning tasks of ``mod`` for ``target``, keyed as the records store them."""
    fused = fuse(prepare(mod, params), as_target(target))
    tasks = []
    for t in ms.relax_integration.extract_tasks(fused, target):
        wmod = tvm_compat.normalize_workload(t.dispatched[0])
        if wmod["main"].attrs and wmod["main"].attrs.get("tirx.is_scheduled", False):
            continue
        try:
            flops = float(tvm.s_tir.analysis.estimate_tir_flops(wmod))
        except Exception:  # noqa: BLE001 - flops only steer the budget split
            flops = 1.0
        tasks.append(Task(t.task_name, int(t.weight), max(flops, 1.0), wmod, t.target))
    return tasks


def workload_key(func: tvm.tirx.PrimFunc | tvm.IRModule) -> str:
    """A kernel's workload as the records key it: the structural hash MetaSchedule's
    ApplyDatabase and :func:`extract_tasks` look it up by."""
    mod = func if isinstance(func, tvm.IRModule) else tvm_compat.normalize_workload(func)
    return str(tvm_ffi.structural_hash(mod))


def task_importance(tasks: list[Task], best: list[float | None]) -> list[float]:
    """A task's share of the end-to-end time once measured (weight × best time), else its
    FLOPs converted at the median measured rate: depthwise and memory-bound kernels take far
    more time than their FLOPs say, and time is what tuning can win back."""
    rates = sorted(b / t.flops for t, b in zip(tasks, best) if b is not None)
    if not rates:
        return [t.weight * t.flops for t in tasks]
    rate = rates[len(rates) // 2]
    return [t.weight * (b if b is not None else t.flops * rate) for t, b in zip(tasks, best)]


def with_num_cores(target: tvm.target.Target, local: bool) -> tvm.target.Target:
    """MetaSchedule needs ``num-cores``; add this machine's count for local runs."""
    cfg = target_config(target)
    if "num-cores" in cfg:
        return target
    if not local:
        raise ValueError(
            f"target {target} has no 'num-cores'; MetaSchedule needs the board's core count, "
            'e.g. add "num-cores": 4 to the target'
        )
    cfg["num-cores"] = ms.utils.cpu_count(logical=False)
    return tvm.target.Target(cfg)
