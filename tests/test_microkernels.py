"""Tests for mnv2_tvm.kernels: the hand-written register-tiled schedules of blocked 1×1 and
depthwise convolutions, alone (each one computes what the unscheduled kernel computes) and inside tuning
(measured first, within the budget, never twice, compiled with parity against PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from mnv2_tvm import targets
from mnv2_tvm import tuning as T
from mnv2_tvm.compile import compile_with_records
from mnv2_tvm.kernels import loop_order, schedules
from mnv2_tvm.tuning import search
from mnv2_tvm.tuning.records import trace_key
from mnv2_tvm.tuning.row_order import ROW_ORDER_FILE, ROW_ORDER_TOLERANCE
from mnv2_tvm.tuning.tasks import with_num_cores, workload_key
from mnv2_tvm.lower import to_blocked_layout
from test_tune import SMALL_SEARCH, TARGET


class BlockedNet(torch.nn.Module):
    """A MobileNetV2-like block on a 14×14 map: expansion (1×1, ReLU6), depthwise 3×3 (ReLU6),
    projection (1×1) with the residual; the stem's 3 channels stay NCHW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.expand = torch.nn.Conv2d(16, 48, 1)
        self.dw = torch.nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.project = torch.nn.Conv2d(48, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.nn.functional.relu6(self.expand(x))
        y = torch.nn.functional.relu6(self.dw(y))
        return x + self.project(y)


@pytest.fixture(scope="module")
def blocked():
    from tvm.relax.frontend.torch import from_exported_program

    net = BlockedNet().eval()
    x = torch.randn(1, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ep = torch.export.export(net, (x,))
    mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
    mod = to_blocked_layout(relax.transform.DecomposeOpsForInference()(mod), 8)
    return mod, net, x


@pytest.fixture(autouse=True)
def small_search(monkeypatch):
    monkeypatch.setattr(search, "SEARCH_KWARGS", SMALL_SEARCH)


def _run(mod: tvm.IRModule, args: list[np.ndarray]) -> np.ndarray:
    lib = tvm.compile(mod, target=tvm.target.Target(TARGET))
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    lib.mod["main"](*tensors)
    return tensors[-1].numpy()


def test_tiles_fit_the_registers_and_write_back_rectangles():
    for height, width, blocks, regs in [(14, 14, 6, 16), (7, 7, 20, 16), (56, 56, 3, 16), (28, 28, 4, 32)]:
        tiles = schedules._tiles(height, width, blocks, regs)
        assert tiles and len(tiles) == len(set(tiles))
        spilled = 0
        for ty, tx, tc in tiles:
            # A rectangle of the map: a run of pixels across a row end would write back its
            # bounding box, its neighbours' outputs included (a wrong result under threads, seen).
            assert height % ty == 0 and width % tx == 0 and blocks % tc == 0
            acc = ty * tx * tc
            assert acc + 2 <= regs  # the accumulators, the broadcast and a weight vector
            spilled += acc + tc + 1 > regs  # not a weight vector per block as well
        assert len(tiles) - spilled <= schedules.MAX_CANDIDATES and spilled <= schedules.SPILLED_CANDIDATES
    # 14×14: 4 pixels as 2 × 2 (rows of 14 take no run of 4), 4 px × 3 blocks as on larger maps.
    assert (2, 2, 3) in schedules._tiles(14, 14, 6, 16)
    # 7×7: a row by 2 blocks (weights from memory) besides the row by 1 block.
    assert {(1, 7, 1), (1, 7, 2)} <= set(schedules._tiles(7, 7, 20, 16))
    assert max(ty * tx * tc for ty, tx, tc in schedules._tiles(28, 28, 4, 32)) > 14  # AVX-512 / NEON: 32 registers
    assert targets.vector_registers(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})) == 16
    assert targets.vector_registers(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})) == 32
    assert targets.vector_registers(tvm.target.Target("raspberry-pi/4b-aarch64")) == 32


def _hand_written(task) -> bool:
    return schedules.kind(task.mod) is not None


def _check_candidates(mod: tvm.IRModule) -> int:
    """Every candidate of every task computes what the unscheduled kernel computes; returns how
    many tasks had candidates."""
    target = tvm.target.Target(TARGET)
    rng = np.random.default_rng(0)
    fitted = 0
    for task in T.extract_tasks(mod, target):
        cands = schedules.candidates(task.mod, target)
        if not _hand_written(task):
            assert cands == [], task.name  # layout transforms and the like: the search's
            continue
        assert cands, task.name
        fitted += 1
        info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
        args = [rng.standard_normal(a.shape).astype(a.dtype) for a in info]
        want = _run(task.mod, args)
        for sch in cands:
            np.testing.assert_allclose(_run(sch.mod, args), want, rtol=1e-4, atol=1e-4, err_msg=task.name)
    return fitted


def test_each_candidate_computes_what_the_unscheduled_kernel_computes(blocked):
    mod, _, _ = blocked
    # the stem writing blocks (with its bias), the expansion (ReLU6), the depthwise (ReLU6) and
    # the projection (with the residual)
    assert _check_candidates(mod) == 4


@pytest.mark.parametrize("stride,dilation,size", [(2, 1, 28), (1, 2, 20), (2, 1, 15)])
def test_depthwise_candidates_with_stride_dilation_and_odd_maps(stride, dilation, size):
    """Strided (MobileNetV2's downsampling), dilated (DeepLab's atrous) and odd-sized maps (the
    padding read in place at a ragged edge) compute what the unscheduled kernel computes."""
    from tvm.relax.frontend.torch import from_exported_program

    net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, stride=stride, padding=dilation, dilation=dilation,
                                              groups=16), torch.nn.ReLU6()).eval()
    x = torch.randn(1, 16, size, size)
    with torch.no_grad():
        ep = torch.export.export(net, (x,))
    mod = to_blocked_layout(relax.transform.DecomposeOpsForInference()(
        from_exported_program(ep, unwrap_unit_return_tuple=True)), 8)
    assert _check_candidates(mod) == 1


@pytest.mark.parametrize("classes", [40, 1000, 21])
def test_classifier_candidates_compute_the_matrix_vector_product(classes):
    """The one-row matmul of a classifier (pooled features × weights + bias): tiles of whole
    8-lane vectors that divide the classes, each computing what the unscheduled kernel does;
    none where 8 does not divide them (the search's alone)."""
    from tvm.relax.frontend.torch import from_exported_program

    net = torch.nn.Linear(64, classes).eval()
    with torch.no_grad():
        ep = torch.export.export(net, (torch.randn(1, 64),))
    mod = relax.transform.DecomposeOpsForInference()(from_exported_program(ep, unwrap_unit_return_tuple=True))
    if classes % schedules.GEMV_LANES:
        assert all(schedules.candidates(t.mod, tvm.target.Target(TARGET)) == [] for t in T.extract_tasks(mod, TARGET))
        return
    assert _check_candidates(mod) == 1
    (task,) = [t for t in T.extract_tasks(mod, TARGET) if _hand_written(t)]
    assert schedules.kind(task.mod) == schedules.MATMUL_BLOCK


def _parallel_loop(func: tvm.tirx.PrimFunc) -> tvm.tirx.For:
    todo = [func.body]
    while todo:
        s = todo.pop()
        if isinstance(s, tvm.tirx.For) and s.kind == tvm.tirx.ForKind.PARALLEL:
            return s
        if isinstance(s, tvm.tirx.SeqStmt):
            todo.extend(s.seq)
        elif isinstance(s, tvm.s_tir.SBlockRealize):
            todo.append(s.block.body)
        elif hasattr(s, "body"):
            todo.append(s.body)
    raise AssertionError("no parallel loop")


def _rows_visited(before: tvm.tirx.PrimFunc, after: tvm.tirx.PrimFunc) -> list[tuple[int, int]]:
    """(iteration of the original parallel loop, output row it writes) for each iteration of the
    rewritten loop, in order, the rows as the original loop's variable gives them."""
    sch = tvm.s_tir.Schedule(before)
    (rows_in,) = [f for b in sch.get_output_blocks(sch.get_sblock("root")) if (f := loop_order._rows_in(sch, b))]
    loop = _parallel_loop(loop_order.reorder_marked(after))
    (bind,) = [s for s in loop.body.seq if isinstance(s, tvm.tirx.Bind)]
    out = []
    for q in range(int(loop.extent)):
        ana = tvm.sym.Analyzer()
        ana.bind(loop.loop_var, tvm.tirx.IntImm(str(loop.extent.ty), q))
        p = int(ana.simplify(bind.value))
        out.append((p, p // rows_in.lower_factor % rows_in.rows))
    return out


def test_rows_outermost_hands_each_thread_a_band_of_rows_and_keeps_every_kernel(blocked):
    """The hand-written schedules' parallel loops run over channel blocks first (the depthwise's
    and the expansion's here), as many of the search's do. Marked and rewritten (late, by the
    pipeline compile uses), the loop visits each of its original iterations once, in row order,
    so the runtime's contiguous chunk per thread is a band of rows; the kernel's output is
    bit-identical (run on the host's threads). The classifier, which has no rows, a depthwise
    kernel whose rows are a serial loop (each task a whole channel block) and a loop already in
    row order are left alone."""
    target = tvm.target.Target(TARGET)
    rng = np.random.default_rng(0)
    rewritten, left = set(), set()
    net = torch.nn.Linear(64, 40).eval()
    with torch.no_grad():
        ep = torch.export.export(net, (torch.randn(1, 64),))
    from tvm.relax.frontend.torch import from_exported_program

    classifier = relax.transform.DecomposeOpsForInference()(from_exported_program(ep, unwrap_unit_return_tuple=True))
    tasks = T.extract_tasks(blocked[0], target) + T.extract_tasks(classifier, target)
    whole_maps = 0
    for task in tasks:
        for sch in schedules.candidates(task.mod, target):
            before = tvm.IRModule({"main": sch.mod["main"].with_attr("tirx.is_scheduled", True)})
            after, changed = loop_order.rows_outermost(before)
            if not changed:
                left.add(schedules.kind(task.mod))
                assert after.same_as(before)
                whole_maps += schedules.kind(task.mod) == schedules.DEPTHWISE_BLOCK
                continue
            assert changed == ["main"] and loop_order.ROWS_ANNOTATION in after["main"].script()
            rewritten.add(schedules.kind(task.mod))
            order = _rows_visited(before["main"], after["main"])
            assert sorted(i for i, _ in order) == list(range(len(order))), task.name  # each once
            rows = [r for _, r in order]
            assert rows == sorted(rows) and rows[0] < rows[-1], task.name
            info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
            args = [rng.standard_normal(a.shape).astype(a.dtype) for a in info]
            # The mark survives lowering to where the pipeline rewrites it, and is gone after.
            lowering, _, _ = tvm.tirx.get_tir_pipeline(loop_order.tir_pipeline())
            entry = tvm.IRModule({"main": after["main"].with_attr("global_symbol", "main")})
            lowered = lowering(tvm.tirx.transform.BindTarget(target.with_host(target))(entry))["main"]
            assert len(loop_order._marked_loops(lowered.body)) == 1 and not loop_order._marked_loops(loop_order.reorder_marked(lowered).body)
            lib = tvm.tirx.build(after, target=target, pipeline=loop_order.tir_pipeline())
            tensors = [tvm.runtime.tensor(a) for a in args]
            lib["main"](*tensors)
            np.testing.assert_array_equal(tensors[-1].numpy(), _run(before, args), err_msg=task.name)
    assert {schedules.DEPTHWISE_BLOCK, schedules.CONV_BLOCK} <= rewritten
    assert schedules.MATMUL_BLOCK in left and schedules.MATMUL_BLOCK not in rewritten and whole_maps >= 1


def test_depthwise_tiles_divide_the_row_and_fit_the_registers():
    for rows, row, regs in [(112, 112, 16), (56, 56, 16), (14, 14, 16), (7, 7, 16), (33, 33, 16), (28, 28, 32)]:
        tiles = schedules._depthwise_tiles(rows, row, regs)
        assert tiles and len(tiles) <= schedules.MAX_CANDIDATES, (rows, regs)
        for tw, ty in tiles:
            assert row % tw == 0 and rows % ty == 0
            assert tw <= regs // 2 - 1  # about half the register file as accumulators
    assert max(tw for tw, _ in schedules._depthwise_tiles(56, 56, 16)) == 7  # 14 spills, 8 ran slower than 7
    assert max(tw for tw, _ in schedules._depthwise_tiles(28, 28, 32)) == 14
    # A prime row (DeepLab's 257): a cut-short last tile ran 2× slower, so none (the search's).
    assert schedules._depthwise_tiles(257, 257, 16) == []


@pytest.mark.slow
def test_tuning_measures_them_first_within_budget_never_twice_and_compiles_with_parity(blocked, tmp_path):
    mod, net, x = blocked
    records = tmp_path / "records"
    tasks = T.extract_tasks(mod, with_num_cores(tvm.target.Target(TARGET), True))
    hand = [t for t in tasks if _hand_written(t)]
    assert len(hand) == 4 and all(len(schedules.candidates(t.mod, t.target)) >= 3 for t in hand)
    # 3 trials a task: the other tasks' minimum (3) is kept back, the stem, 1×1 and depthwise
    # tasks get 3 hand-written schedules each and so need no search.
    trials = 3 * len(tasks)
    rep = T.tune(mod, TARGET, records, trials, seed=1, num_builder_workers=1, progress=False)
    by_name = {t.name: t for t in rep.tasks}
    assert rep.trials_run == trials, rep.table()
    assert all(t.trials >= 1 for t in rep.tasks), [(t.name, t.trials) for t in rep.tasks]

    def written(records_dir):
        opened = T.open_records(records_dir, None, writable=False)
        try:
            out = {}
            for task in hand:
                mine = {trace_key(s.trace) for s in schedules.candidates(task.mod, task.target)}
                out[task.name] = [r for r in opened.db.records_of(task.mod) if trace_key(r.trace) in mine]
            return out
        finally:
            opened.close()

    first = written(records)
    for name, recs in first.items():
        keys = [trace_key(r.trace) for r in recs]
        assert len(keys) == len(set(keys)) == 3, (name, by_name[name].trials)
    # Compiled from the hand-written records alone (the other kernels untuned): the hand-written
    # schedules, with the weights packed by MetaSchedule's RewriteLayout, match PyTorch.
    only = T.open_records(tmp_path / "hand-written", tvm.target.Target(TARGET), writable=True)
    try:
        for task in hand:
            workload = only.db.commit_workload(task.mod)
            for r in first[task.name]:
                only.db.commit_tuning_record(ms.database.TuningRecord(r.trace, workload, r.run_secs, r.target,
                                                                      r.args_info))
    finally:
        only.close()
    ex, applied = compile_with_records(mod, TARGET, tmp_path / "hand-written")
    assert sorted(applied.tuned) == sorted(t.name for t in hand), applied.tuned
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), rtol=1e-4, atol=1e-4)

    T.tune(mod, TARGET, records, 40, seed=2, num_builder_workers=1, progress=False)
    again = written(records)
    for name, recs in again.items():
        keys = [trace_key(r.trace) for r in recs]
        assert len(keys) == len(set(keys)), f"{name}: a hand-written schedule measured twice"
        assert {trace_key(r.trace) for r in first[name]} <= set(keys)


@pytest.mark.slow
def test_tuning_times_both_loop_orders_and_compile_reorders_what_stayed_as_fast(blocked, tmp_path):
    """After its search, tuning times each task's best schedule with the parallel loop as tuned
    and with output rows outermost, alone, and keeps both times (``row_order.json``); a rerun
    times nothing again. Compile reorders exactly the kernels within ``ROW_ORDER_TOLERANCE`` whose
    best schedule is the one timed, and the output still matches PyTorch whichever it reorders.
    An unreadable file is a warning, and nothing is reordered."""
    import json
    import shutil

    mod, net, x = blocked
    with torch.no_grad():
        want = net(x).numpy()
    tasks = T.extract_tasks(mod, TARGET)
    records = tmp_path / "records"
    # One trial per task: the hand-written schedules (channel blocks outermost) come first.
    T.tune(mod, TARGET, records, len(tasks), seed=1, num_builder_workers=1, progress=False)
    order = json.loads((records / ROW_ORDER_FILE).read_text())
    assert set(order) == {workload_key(t.mod) for t in tasks}  # a verdict for every task
    timed = {v["task"]: v for v in order.values() if "as_tuned_us" in v}
    assert schedules.CONV_BLOCK in {schedules.kind(t.mod) for t in tasks if t.name in timed}, order
    assert all(v["as_tuned_us"] > 0 and v["rows_outermost_us"] > 0 for v in timed.values())

    def reordered(records_dir):
        ex, rep = compile_with_records(mod, TARGET, records_dir)
        out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        return set(rep.rows_outermost)

    assert reordered(records) == {n for n, v in timed.items()
                                  if v["rows_outermost_us"] <= ROW_ORDER_TOLERANCE * v["as_tuned_us"]}
    forced = tmp_path / "forced"
    shutil.copytree(records, forced)
    for slower, expected in ((1.0, set(timed)), (2 * ROW_ORDER_TOLERANCE, set())):
        edited = {k: {**v, "rows_outermost_us": v["as_tuned_us"] * slower} if "as_tuned_us" in v else v
                  for k, v in order.items()}
        (forced / ROW_ORDER_FILE).write_text(json.dumps(edited))
        assert reordered(forced) == expected
    # A verdict about another schedule than the workload's best does not apply.
    stale = {k: {**v, "rows_outermost_us": v["as_tuned_us"], "schedule": "0" * 16} if "as_tuned_us" in v else v
             for k, v in order.items()}
    (forced / ROW_ORDER_FILE).write_text(json.dumps(stale))
    assert reordered(forced) == set()
    (forced / ROW_ORDER_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match=ROW_ORDER_FILE):
        assert reordered(forced) == set()

    before = (records / ROW_ORDER_FILE).read_bytes()
    rep = T.tune(mod, TARGET, records, len(tasks), seed=1, num_builder_workers=1, progress=False)
    assert rep.already_done and (records / ROW_ORDER_FILE).read_bytes() == before


def _parallel_bodies(asm: str) -> list[str]:
    """The assembly of each parallel loop body (TVM emits each as a function of its own)."""
    bodies, current = [], None
    for line in asm.splitlines():
        if line.endswith(":") and "parallel_lambda" in line and not line.startswith("\t"):
            current = []
        elif current is not None and line.strip().startswith(".Lfunc_end"):
            bodies.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return bodies


def test_pointwise_and_stem_tiles_take_nothing_from_the_workspace_pool(blocked):
    """The 1×1 and stem tiles' accumulators are a stack buffer LLVM keeps in registers. As a
    ``local`` buffer TVM took them from the workspace pool at every tile (a call, and the tile
    stored and reloaded around it; 1.3× slower on the AVX2 host): no parallel loop body calls it."""
    mod, _, _ = blocked
    target = tvm.target.Target(TARGET)
    checked = 0
    for task in T.extract_tasks(mod, target):
        if schedules.kind(task.mod) not in (schedules.CONV_BLOCK, schedules.STEM_BLOCK):
            continue
        for sch in schedules.candidates(task.mod, target):
            lib = tvm.tirx.build(sch.mod, target=target, pipeline=loop_order.tir_pipeline())
            bodies = _parallel_bodies(lib.inspect_source("asm"))
            assert bodies, task.name
            assert not any("TVMBackendAllocWorkspace" in b for b in bodies), task.name
            checked += 1
    assert checked >= 3
