"""Register-tiled schedules written by hand for the kernels MetaSchedule's search tiles poorly on CPUs: the
convolutions over blocked channels (``NCHW8c``), 1×1 (~90 % of MobileNetV2's MAdds) and depthwise.

A fast CPU kernel (MLAS, oneDNN) keeps a tile of outputs in vector registers and runs the whole
reduction inside it. For the 1×1 convolution that is a few pixels × a few channel blocks: per
input channel one vector load of weights per channel block, one broadcast of the input per pixel,
one FMA per accumulator. With 16 AVX2 registers that is at most 14 accumulators. MetaSchedule's
multi-level tiling can express this, but its search seldom lands on it: on the AVX2 host its tuned
1×1 convs ran at 53 % of the FMA peak where ONNX Runtime's ran at 81 %, and these schedules,
timed alone, at 65–80 %.

For the depthwise convolution the tile is a run of pixels of one output row in one channel block:
per window tap one weight vector, then one load and one FMA per pixel. The padding is read in
place (a bounds check per load) rather than copied: the copy costs more than the checks. The
search's best depthwise schedules accumulated in memory, with the padding copied per tile; these
ran 1.3–4.2× faster than them, timed alone (AVX2 code, on a Zen 4 host).

The stem that writes blocks gets the 1×1's tile with its 27 taps as the reduction, and the
classifier's one-row matmul a few vectors of classes with the whole input row inside.

:func:`candidates` writes such schedules for each register tile that fits. Tuning measures them
as trials and records them like its own (``tuning.seeding``), so the database keeps whichever is faster
per workload, ours or MetaSchedule's; compile needs nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from ..targets import vector_registers

if TYPE_CHECKING:
    import tvm

#: The blocks the blocked convolutions' lowering (``lower.py``) names their reductions.
CONV_BLOCK = "conv2d_nchwc"
DEPTHWISE_BLOCK = "depthwise_conv2d_nchwc"
STEM_BLOCK = "conv2d_into_nchwc"
#: The classifier: TOPI's matmul of a single row (batch 1) by the weights, a matrix-vector product.
MATMUL_BLOCK = "matmul"
#: fp32 lanes of the classifier's accumulators: 8 (AVX2's width; AVX-512 code holds them in halves
#: of its registers), as 1000 classes are a multiple of 8 and not of 16.
GEMV_LANES = 8
#: Candidates per workload: the largest register tiles first (more FMAs per load).
MAX_CANDIDATES = 6
#: 1×1 and stem tiles beyond these whose weights do not fit the registers (see :func:`_tiles`).
SPILLED_CANDIDATES = 2


def _tiles(height: int, width: int, channel_blocks: int, registers: int) -> list[tuple[int, int, int]]:
    """(rows, columns, channel blocks) register tiles of a map. The pixels are a rectangle of it
    (the tile the epilogue writes back: a run of pixels crossing a row end would write back its
    bounding box, other threads' outputs included), the widest one for each pixel count.

    Two register budgets. Accumulators, a weight vector per block and the broadcast input in
    registers: loads per FMA fall as the tile grows towards square (4 px × 3 blocks: 7 loads for
    12 FMAs), the best tiles on maps whose rows 4 divides. With ``SPILLED_CANDIDATES`` more whose
    weights are read from memory by the FMAs, only the accumulators and two vectors in registers:
    on 7×7 maps the tile is a row (7 px) or one pixel, and 7 px × 2 blocks beat the best of the
    first kind on all 5 of MobileNetV2's 7×7 1×1 kernels by 5–11 %; 2 × 2 px × 3 blocks beat the
    best row tile on its 14×14 ones by up to 3 % (timed alone, 1 thread, AVX2 code, Zen 1)."""
    rectangles: dict[int, tuple[int, int]] = {}
    for ty in _divisors(height, 1, height):
        for tx in _divisors(width, 1, width):
            if ty * tx not in rectangles or tx > rectangles[ty * tx][1]:
                rectangles[ty * tx] = (ty, tx)
    held, spilled = [], []
    for tp, (ty, tx) in rectangles.items():
        for tc in _divisors(channel_blocks, 1, channel_blocks):
            acc = tp * tc
            if acc < 4:
                continue
            if acc + tc + 1 <= registers:
                held.append((ty, tx, tc))
            elif acc + 2 <= registers:
                spilled.append((ty, tx, tc))

    def largest_first(tiles: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        return sorted(tiles, key=lambda t: (-t[0] * t[1] * t[2], t[2]))

    return largest_first(held)[:MAX_CANDIDATES] + largest_first(spilled)[:SPILLED_CANDIDATES]


#: Iterators of each reduction block: (b, o, y, x, lane) then (rc, rl, rh, rw) for the 1×1,
#: (rh, rw) for the depthwise, (rc, rh, rw) for the stem; (row, column, k) for the matmul.
_ITERATORS = {CONV_BLOCK: 9, DEPTHWISE_BLOCK: 7, STEM_BLOCK: 8, MATMUL_BLOCK: 3}


def _reduction(mod: "tvm.IRModule") -> tuple[str, list[int]] | None:
    """The hand-written kind a workload is (its reduction block's name) with that block's iterator
    extents, or None when it is none of them."""
    import tvm

    sch = tvm.s_tir.Schedule(mod, debug_mask=0)
    for block, n in _ITERATORS.items():
        try:
            found = sch.get(sch.get_sblock(block))
        except tvm.s_tir.ScheduleError:
            continue
        extents = [int(iv.dom.extent) for iv in found.iter_vars]
        # The blocked dense conv is written by hand only as a 1×1 (rh = rw = 1), the matmul only
        # for one row.
        if len(extents) == n and (block != CONV_BLOCK or extents[7] == extents[8] == 1) \
                and (block != MATMUL_BLOCK or extents[0] == 1):
            return block, extents
    return None


def kind(mod: "tvm.IRModule") -> str | None:
    """Which hand-written kind a workload is, by its reduction block (``CONV_BLOCK`` for a 1×1,
    ``DEPTHWISE_BLOCK``, ``STEM_BLOCK``, ``MATMUL_BLOCK``), or None for a workload
    :func:`candidates` leaves alone."""
    found = _reduction(mod)
    return found[0] if found else None


@dataclass
class _Tile:
    """A register tile's loops: fused into the parallel loop, unrolled, the one under which the
    tile is written back (None: the parallel loop), the vector lane, the first reduction loop."""

    parallel: list
    unrolled: list
    write_back: Any
    lane: Any
    reduction: Any


def _register_tile(mod: "tvm.IRModule", block: str, tile: Callable[["tvm.s_tir.Schedule", list], "_Tile"],
                   accumulators: str = "global") -> "tvm.s_tir.Schedule":
    """The schedule all kinds share: what comes before the reduction (padding) read in place, the
    element-wise ops after it (bias, clip, residual) as one epilogue that reads the accumulators
    from registers, the register tile's loops unrolled and the channel lane vectorised.

    ``tile(sch, loops)`` splits and reorders the reduction's loops and says which loop is which.
    ``accumulators`` is the storage scope of the tile's buffer. TVM puts a small ``global`` one on
    the stack, where LLVM keeps it in registers; a ``local`` one it takes from the workspace pool
    at every tile (a call, and the tile stored and reloaded around it): with ``global``, 1×1
    convolutions ran 1.05–1.3× faster, the stem 1.7× (AVX2 code, Zen 1). Depthwise tiles ran 1.1×
    slower so, and keep ``local``."""
    import tvm

    sch = tvm.s_tir.Schedule(mod, debug_mask=0)
    conv = sch.get_sblock(block)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    at = [sch.get(b).name_hint for b in blocks].index(block)
    for b in blocks[:at]:  # padding: read in place
        sch.compute_inline(b)
    for b in blocks[at + 1:-1]:  # bias, clip, residual: one epilogue
        sch.compute_inline(b)
    epilogue = blocks[-1] if len(blocks) > at + 1 else None
    loops = tile(sch, sch.get_loops(conv))
    outer = sch.fuse(*loops.parallel)
    sch.parallel(outer)
    acc = sch.cache_write(conv, 0, accumulators)  # the register tile
    sch.reverse_compute_at(acc, loops.write_back or outer)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, loops.write_back or outer)
        sch.compute_inline(acc)  # the epilogue reads the registers, no full-size intermediate
        store = epilogue
    else:
        store = acc
    for loop in loops.unrolled:
        sch.unroll(loop)
    sch.vectorize(loops.lane)
    sch.vectorize(sch.get_loops(store)[-1])
    sch.decompose_reduction(conv, loops.reduction)
    return sch


def _pixels_by_blocks(mod: "tvm.IRModule", block: str, ty: int, tx: int, tc: int) -> "tvm.s_tir.Schedule":
    """ty × tx pixels × tc output channel blocks of accumulators, the whole reduction (input
    channels, window taps) inside: the 1×1 convolution, and the stem's, which reads 3 unblocked
    channels.

    The pixels are split off the map's own axes. Split off the fused rows × columns instead, each
    accumulator's index was a division LLVM could not resolve to a register, and it kept 3 of a
    4×3 tile's 12 in memory, a load and a store around each of their FMAs (16→96 at 112² ran 1.2×
    slower, 14×14 maps up to 1.25×). Per input channel, each pixel's broadcast then meets every
    block's weights in turn."""
    def tile(sch: "tvm.s_tir.Schedule", loops: list) -> _Tile:
        b, o, y, x, lane, *reduction = loops
        oo, oi = sch.split(o, [None, tc])
        outer, pixels = [], []
        for axis, size in ((y, ty), (x, tx)):
            if size == 1:
                outer.append(axis)
            elif size == int(sch.get(axis).extent):
                pixels.append(axis)
            else:
                axis_outer, axis_inner = sch.split(axis, [None, size])
                outer.append(axis_outer)
                pixels.append(axis_inner)
        sch.reorder(b, oo, *outer, *reduction, *pixels, oi, lane)
        # Written back per parallel task: a task is one tile.
        return _Tile(parallel=[b, oo, *outer], unrolled=[*pixels, oi], write_back=None, lane=lane,
                     reduction=reduction[0])

    return _register_tile(mod, block, tile)


def _depthwise(mod: "tvm.IRModule", tw: int, ty: int) -> "tvm.s_tir.Schedule":
    """tw pixels of a row in one channel block as accumulators, the window's taps inside; each
    parallel task takes ty rows of one channel block."""
    def tile(sch: "tvm.s_tir.Schedule", loops: list) -> _Tile:
        b, o, y, x, lane, rh, rw = loops
        yo, yi = sch.split(y, [None, ty])
        xo, xi = sch.split(x, [None, tw])
        sch.reorder(b, o, yo, yi, xo, rh, rw, xi, lane)
        return _Tile(parallel=[b, o, yo], unrolled=[rh, rw, xi], write_back=xo, lane=lane, reduction=rh)

    return _register_tile(mod, DEPTHWISE_BLOCK, tile, accumulators="local")


def _gemv(mod: "tvm.IRModule", vectors: int) -> "tvm.s_tir.Schedule":
    """``vectors`` × ``GEMV_LANES`` outputs as accumulators, the whole row of inputs inside: per
    input one broadcast and one FMA per vector, the weights streamed once (their layout is left to
    MetaSchedule's ``RewriteLayout``, which packs them in the order this tile reads them). The
    search's schedule split the 1000 classes into 5 parallel chunks (3 against 2 on two threads)
    and took 0.37 ms on one thread in place where ONNX Runtime's took 0.20."""
    def tile(sch: "tvm.s_tir.Schedule", loops: list) -> _Tile:
        row, column, k = loops
        chunk, vector, lane = sch.split(column, [None, vectors, GEMV_LANES])
        sch.reorder(row, chunk, k, vector, lane)
        return _Tile(parallel=[row, chunk], unrolled=[vector], write_back=None, lane=lane, reduction=k)

    return _register_tile(mod, MATMUL_BLOCK, tile)


def _divisors(n: int, low: int, high: int) -> list[int]:
    """Divisors of n in [low, high], largest first."""
    return [d for d in range(min(n, high), low - 1, -1) if n % d == 0]


def _depthwise_tiles(rows: int, row: int, registers: int) -> list[tuple[int, int]]:
    """(pixels, rows per task) tiles of a depthwise convolution. About half the registers as
    accumulators: on the AVX2 host 7 pixels ran 1.4–2.3× faster than 14 (which spills) and 8.
    The width divides the row: a last tile cut short by a bounds check ran 2× slower, so a row
    that no width divides (DeepLab's 257, a prime) is left to the search. A task takes a few rows,
    so a small map still splits over the threads."""
    widths = _divisors(row, 2, max(2, registers // 2 - 1))[:2]
    heights = _divisors(rows, 1, 14)[:2]
    return [(tw, ty) for tw in widths for ty in heights][:MAX_CANDIDATES]


def candidates(mod: "tvm.IRModule", target: "tvm.target.Target") -> list["tvm.s_tir.Schedule"]:
    """Register-tiled schedules of a blocked 1×1, depthwise or stem convolution or a one-row matmul
    workload (before MetaSchedule's postprocessing), the largest tiles first; none for any other."""
    found = _reduction(mod)
    if found is None:
        return []
    block, extents = found
    registers = vector_registers(target)
    if block == MATMUL_BLOCK:
        columns = extents[1]
        vectors = _divisors(columns // GEMV_LANES, 1, registers // 2)[:2] if columns % GEMV_LANES == 0 else []
        plans = [partial(_gemv, mod, v) for v in vectors]
    elif block == DEPTHWISE_BLOCK:
        plans = [partial(_depthwise, mod, *tile) for tile in _depthwise_tiles(extents[2], extents[3], registers)]
    else:
        _, cout_blocks, h, w = extents[:4]
        plans = [partial(_pixels_by_blocks, mod, block, *tile) for tile in _tiles(h, w, cout_blocks, registers)]
    return _built(plans)


def _built(plans: list[Callable[[], "tvm.s_tir.Schedule"]]) -> list["tvm.s_tir.Schedule"]:
    import tvm

    out = []
    for schedule in plans:
        try:
            out.append(schedule())
        except tvm.s_tir.ScheduleError:  # an epilogue that does not inline: leave it to the search
            continue
    return out
