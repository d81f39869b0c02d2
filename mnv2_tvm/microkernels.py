"""Schedules written by hand for the kernel MetaSchedule's search tiles poorly on CPUs: the 1×1
convolution over blocked channels (``NCHW8c``), ~90 % of MobileNetV2's MAdds.

A fast CPU GEMM (MLAS, oneDNN) keeps a tile of outputs in vector registers, a few pixels × a few
channel blocks, and runs the whole reduction inside it: per input channel one vector load of
weights per channel block, one broadcast of the input per pixel, one FMA per accumulator. With 16
AVX2 registers that is at most 14 accumulators. MetaSchedule's multi-level tiling can express
this, but its search seldom lands on it: on the AVX2 host its tuned 1×1 convs ran at 53 % of the
FMA peak where ONNX Runtime's ran at 81 %, and these schedules, timed alone, at 65–80 %.

:func:`candidates` writes that schedule for each register tile that fits. Tuning measures them
as trials and records them like its own (``tune.py``), so the database keeps whichever is faster
per workload, ours or MetaSchedule's; compile needs nothing new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm

#: The block the blocked convolution's lowering (``lower.py``) names its reduction.
CONV_BLOCK = "conv2d_nchwc"
#: Candidates per workload: the largest register tiles first (more FMAs per load).
MAX_CANDIDATES = 6


def vector_registers(target: "tvm.target.Target") -> int:
    """Architectural vector registers of a CPU target: 32 on AArch64 and with AVX-512, else 16."""
    text = str(target.export()).lower()
    return 32 if any(k in text for k in ("aarch64", "arm64", "avx512", "x86-64-v4")) else 16


def _tiles(pixels: int, row: int, channel_blocks: int, registers: int) -> list[tuple[int, int]]:
    """(pixels, channel blocks) register tiles: accumulators plus a weight vector per channel
    block plus the broadcast input must fit the registers; pixel tiles are whole rows or divide a
    row, so the tile the epilogue writes back is a rectangle of the map (a tile crossing a row
    end would write back its bounding box, other threads' outputs included)."""
    tiles = []
    for tp in range(1, pixels + 1):
        if pixels % tp or (tp % row and row % tp):
            continue
        for tc in range(1, channel_blocks + 1):
            if channel_blocks % tc:
                continue
            acc = tp * tc
            if 4 <= acc and acc + tc + 1 <= registers:
                tiles.append((tp, tc))
    return sorted(tiles, key=lambda t: (-t[0] * t[1], t[1]))[:MAX_CANDIDATES]


def _conv_extents(mod: "tvm.IRModule") -> list[int] | None:
    """Iterator extents of a workload's blocked 1×1 convolution (b, o, y, x, lane | rc, rl, rh, rw),
    or None when it has none."""
    import tvm

    sch = tvm.s_tir.Schedule(mod, debug_mask=0)
    try:
        block = sch.get(sch.get_sblock(CONV_BLOCK))
    except tvm.s_tir.ScheduleError:
        return None
    extents = [int(iv.dom.extent) for iv in block.iter_vars]
    # A 1×1 kernel has rh = rw = 1.
    return extents if len(extents) == 9 and extents[7] == 1 and extents[8] == 1 else None


def is_blocked_pointwise(mod: "tvm.IRModule") -> bool:
    """Whether a workload is a 1×1 convolution over blocked channels (what :func:`candidates` schedules)."""
    return _conv_extents(mod) is not None


def _schedule(mod: "tvm.IRModule", tp: int, tc: int) -> "tvm.s_tir.Schedule":
    import tvm

    sch = tvm.s_tir.Schedule(mod, debug_mask=0)
    conv = sch.get_sblock(CONV_BLOCK)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    at = [sch.get(b).name_hint for b in blocks].index(CONV_BLOCK)
    for b in blocks[:at]:  # padding and the like: read in place
        sch.compute_inline(b)
    for b in blocks[at + 1:-1]:  # bias, clip, residual: one epilogue
        sch.compute_inline(b)
    epilogue = blocks[-1] if len(blocks) > at + 1 else None
    b, o, y, x, lane, rc, rl, rh, rw = sch.get_loops(conv)
    oo, oi = sch.split(o, [None, tc])
    po, pi = sch.split(sch.fuse(y, x), [None, tp])
    sch.reorder(b, oo, po, rc, rl, rh, rw, oi, pi, lane)
    outer = sch.fuse(b, oo, po)
    sch.parallel(outer)
    acc = sch.cache_write(conv, 0, "local")  # the register tile
    sch.reverse_compute_at(acc, outer)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, outer)
        sch.compute_inline(acc)  # the epilogue reads the registers, no full-size intermediate
        store = epilogue
    else:
        store = acc
    sch.unroll(oi)
    sch.unroll(pi)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(store)[-1])
    sch.decompose_reduction(conv, rc)
    return sch


def candidates(mod: "tvm.IRModule", target: "tvm.target.Target") -> list["tvm.s_tir.Schedule"]:
    """Register-tiled schedules of a blocked 1×1 convolution workload (before MetaSchedule's
    postprocessing), the largest tiles first; none for any other workload."""
    extents = _conv_extents(mod)
    if extents is None:
        return []
    import tvm

    _, cout_blocks, h, w = extents[:4]
    out = []
    for tp, tc in _tiles(h * w, w, cout_blocks, vector_registers(target)):
        try:
            out.append(_schedule(mod, tp, tc))
        except tvm.s_tir.ScheduleError:  # an epilogue that does not inline: leave it to the search
            continue
    return out
