"""Output rows outermost in the parallel loops of tuned kernels, and the TIR pipeline that does it.

TVM's runtime splits a parallel loop into equal contiguous chunks, one per thread. A tuned
kernel's parallel loop is its outer tiles fused in whatever order the schedule has them, often
channel blocks first: then one thread computes the first half of the channels of every row. The
next kernel, split by rows, finds half of each of its inputs in the other core's cache. Timed in
pairs on the 2-core host, MobileNetV2's kernels took 0.58 ms more after their producer than
alone (3.24 ms at 2 threads); on 1 thread nothing. Iterating every kernel's parallel loop with
the output rows outermost gives each thread the same band of rows through the whole network, so
only the rows a 3×3 window reaches across the band edge change cores. Each iteration's work is
untouched: the loop's variable is recomputed from the new one, and the output is bit-identical.
The code around it is not always as fast: SSDLite's tuned stem ran 1.4× slower alone on one
thread, MobileNetV2's 1.5× faster (a depthwise kernel whose rows are a serial loop would have to
move them into the parallel one and lose its peeled border rows, 2–4× slower: left alone). So
tuning times each kernel both ways (``tuning.row_order``, ``ROW_ORDER_FILE``) and compile
reorders those not much slower alone (``ROW_ORDER_TOLERANCE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection

if TYPE_CHECKING:
    import tvm


def _realize_of(loop: "tvm.tirx.For", block: Any) -> Any:
    """The SBlockRealize of ``block`` under ``loop``."""
    from tvm import s_tir, tirx

    todo = [loop.body]
    while todo:
        s = todo.pop()
        if isinstance(s, s_tir.SBlockRealize):
            if s.block.same_as(block):
                return s
        elif isinstance(s, tirx.SeqStmt):
            todo.extend(s.seq)
        elif hasattr(s, "body"):
            todo.append(s.body)
    return None


def _splits_of(expr: Any, var: "tvm.tirx.Var") -> list | None:
    """The splits of ``var`` in an iter-map sum (through whole-range outer splits); None when
    ``var`` hides inside a partial split, which this does not unpick."""
    from tvm import tirx
    from tvm.sym import IterSumExpr

    out = []
    for arg in expr.args:
        source = arg.source.source
        if isinstance(source, tirx.Var):
            if source.same_as(var):
                out.append(arg)
        elif isinstance(source, IterSumExpr):
            inner = _splits_of(source, var)
            if inner is None:
                return None
            if inner and not (int(arg.lower_factor) == 1 and int(arg.extent) == int(arg.source.extent)):
                return None
            out.extend(inner)
    return out


@dataclass
class _RowsIn:
    """A parallel loop of extent ``extent`` whose digit (``lower_factor``, ``rows``) picks the
    output row: iteration p writes row ``p // lower_factor % rows`` (of its tile)."""
    loop: "tvm.tirx.For"
    extent: int
    lower_factor: int
    rows: int


def _rows_in(sch: "tvm.s_tir.Schedule", block: Any) -> _RowsIn | None:
    """How the parallel loop around an output block of a 4-D/5-D (N, C, H, W[, c]) output picks
    the row, if through one digit of it."""
    from tvm import ir, tirx
    from tvm.sym import detect_iter_map

    stmts = [sch.get(loop) for loop in sch.get_loops(block)]
    parallel = [s for s in stmts if s.kind == tirx.ForKind.PARALLEL]
    blk = sch.get(block)
    if len(parallel) != 1 or len(blk.writes) != 1 or len(blk.writes[0].region) not in (4, 5):
        return None
    row = blk.writes[0].region[2].min
    index = [i for i, v in enumerate(blk.iter_vars) if v.var.same_as(row)]
    realize = _realize_of(stmts[-1], blk)
    if len(index) != 1 or realize is None:
        return None
    domain = {s.loop_var: ir.Range.from_min_extent(s.min, s.extent) for s in stmts}
    found = detect_iter_map([realize.iter_values[index[0]]], domain, realize.predicate, "nocheck")
    if not found.indices:
        return None
    # Rows in a serial loop under the parallel one (a depthwise kernel parallel over channel
    # blocks) would have to join the parallel loop: the rows at the map's border are then no
    # longer peeled off, and such kernels ran 2-4× slower alone. Left as they are.
    splits = _splits_of(found.indices[0], parallel[0].loop_var)
    if not splits or len(splits) > 1:
        return None
    return _RowsIn(parallel[0], int(parallel[0].extent), int(splits[0].lower_factor), int(splits[0].extent))


def _replaced(stmt: Any, old: Any, new: Any) -> Any:
    """``stmt`` with the statement ``old`` replaced by ``new`` (through the statements that hold
    kernels' loops: sequences, loops, attributes, branches, blocks)."""
    from tvm import s_tir, tirx

    if stmt.same_as(old):
        return new
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_replaced(s, old, new) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.IfThenElse):
        then = _replaced(stmt.then_case, old, new)
        other = _replaced(stmt.else_case, old, new) if stmt.else_case is not None else None
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other)
    if isinstance(stmt, (tirx.For, tirx.AttrStmt, s_tir.SBlockRealize)):
        body = stmt.block.body if isinstance(stmt, s_tir.SBlockRealize) else stmt.body
        new_body = _replaced(body, old, new)
        if new_body.same_as(body):
            return stmt
        if isinstance(stmt, tirx.For):
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, new_body, stmt.thread_binding,
                            stmt.annotations, stmt.step)
        if isinstance(stmt, tirx.AttrStmt):
            return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, new_body)
        b = stmt.block
        block = s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, new_body, b.init, b.alloc_buffers,
                             b.match_buffers, b.annotations)
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    return stmt


def rows_outermost(mod: "tvm.IRModule", names: "Collection[str] | None" = None) -> tuple["tvm.IRModule", list[str]]:
    """``mod`` with the parallel loop of each scheduled kernel (of those in ``names``, if given)
    marked to iterate output rows outermost (see above; the loop is rewritten late in lowering,
    by :func:`tir_pipeline`, after buffers are compacted to what one iteration touches), and the
    names of the kernels marked. Kernels without rows (the classifier), with rows inside a
    reduction (pooling) or a serial loop, already in row order or in a form not recognised are
    left as they are."""
    from tvm import s_tir, tirx

    out, changed = mod, []
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or not (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
            continue
        if names is not None and gv.name_hint not in names:
            continue
        sch = s_tir.Schedule(func)
        body, done = func.body, []
        for block in sch.get_output_blocks(sch.get_sblock("root")):
            found = _rows_in(sch, block)
            if found is None or any(found.loop.same_as(d) for d in done):
                continue
            if found.extent // (found.lower_factor * found.rows) == 1:
                continue  # rows are the outermost digit already
            loop = found.loop
            marked = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, loop.body, loop.thread_binding,
                              {**dict(loop.annotations), ROWS_ANNOTATION: [found.lower_factor, found.rows]},
                              loop.step)
            body = _replaced(body, loop, marked)
            done.append(loop)
        if done:
            if out is mod:
                out = mod.clone()
            out[gv] = func.with_body(body)
            changed.append(gv.name_hint)
    return out, changed


#: The loop annotation :func:`rows_outermost` marks a parallel loop with: [lower factor, rows].
ROWS_ANNOTATION = "mnv2.rows_outermost"
#: The TIR pipeline CPU kernels are built with: TVM's default (what relax.build and MetaSchedule's
#: builder use), then the marked loops rewritten.
TIR_PIPELINE = "mnv2"


def _reordered(loop: "tvm.tirx.For") -> "tvm.tirx.For":
    """A marked parallel loop iterating its row digit outermost: the original loop variable is
    recomputed from the new one (a bijection of the same range), the body is untouched."""
    from tvm import tirx

    lf, rows = (int(v) for v in loop.annotations[ROWS_ANNOTATION])
    extent = int(loop.extent)
    dtype = str(loop.extent.ty)
    q = tirx.Var(loop.loop_var.name + "_rows", dtype)

    def const(v: int) -> "tvm.tirx.IntImm":
        return tirx.IntImm(dtype, v)

    rest = extent // rows  # the digits above and below the row digit, in their order
    row, other = tirx.floordiv(q, const(rest)), tirx.floormod(q, const(rest))
    old = tirx.floordiv(other, const(lf)) * const(rows * lf) + row * const(lf) + tirx.floormod(other, const(lf))
    annotations = {k: v for k, v in loop.annotations.items() if k != ROWS_ANNOTATION}
    return tirx.For(q, loop.min, loop.extent, loop.kind, tirx.SeqStmt([tirx.Bind(loop.loop_var, old), loop.body]),
                    loop.thread_binding, annotations, loop.step)


def _marked_loops(stmt: Any) -> list:
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        return [stmt] if ROWS_ANNOTATION in stmt.annotations else _marked_loops(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return [m for s in stmt.seq for m in _marked_loops(s)]
    if isinstance(stmt, tirx.IfThenElse):
        return _marked_loops(stmt.then_case) + (_marked_loops(stmt.else_case) if stmt.else_case is not None else [])
    if isinstance(stmt, s_tir.SBlockRealize):
        return _marked_loops(stmt.block.body)
    if isinstance(stmt, tirx.AttrStmt):
        return _marked_loops(stmt.body)
    return []


def reorder_marked(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":
    """``func`` with every loop :func:`rows_outermost` marked rewritten (:func:`_reordered`)."""
    body = func.body
    for loop in _marked_loops(body):
        body = _replaced(body, loop, _reordered(loop))
    return func if body.same_as(func.body) else func.with_body(body)


def tir_pipeline() -> str:
    """The name of :data:`TIR_PIPELINE`, registered with TVM on first use (in each process)."""
    from tvm import tirx
    from tvm.tirx import compilation_pipeline

    if TIR_PIPELINE in compilation_pipeline.PIPELINE_MAP:
        return TIR_PIPELINE

    @tirx.transform.prim_func_pass(opt_level=0, name="mnv2.ReorderMarkedLoops")
    def reorder(func: "tvm.tirx.PrimFunc", _mod: Any, _ctx: Any) -> "tvm.tirx.PrimFunc":
        return reorder_marked(func)

    def factory() -> tuple:
        main, host, device = compilation_pipeline.get_tir_pipeline("default")
        return main, (lambda: __import__("tvm").transform.Sequential([reorder, host()])), device

    compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, factory)
    return TIR_PIPELINE
