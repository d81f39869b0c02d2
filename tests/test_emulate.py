"""The emulated-core cost (mnv2_tvm.emulate): qemu-user + our TCG plugin + a core model.

Tests marked slow start guests under qemu (~15 s each): one shared single-thread aarch64 guest,
one 4-thread guest, and a second 4-thread guest under host load for the determinism check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mnv2_tvm.emulate import EmulatedCore, cost_from_record, load_core_model
from mnv2_tvm.emulate.core_model import loop_trips, mca_rewrite
from mnv2_tvm.emulate.core_model import FIELDS
from mnv2_tvm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BOARDS = ("rpi3b-aarch64", "rpi4b", "rpi5")


# ---------------------------------------------------------------------- core model (no qemu)


@pytest.mark.parametrize("target", [*BOARDS, "x86-64-avx2", "x86-64-avx2-nchw8c"])
def test_core_models_load_with_a_source_for_every_figure(target):
    core = load_core_model(target)
    assert core.clock_ghz > 0 and core.levels[0].kib > 0
    for key in ("clock_ghz", "issue_width", "vector_bits_per_cycle", "l1d_kib", "l2_latency", "dram_latency_ns"):
        assert core.sources[key].strip()


def test_board_core_models_are_the_boards_cores():
    assert [load_core_model(t).model for t in BOARDS] == ["Cortex-A53", "Cortex-A72", "Cortex-A76"]
    a72 = load_core_model("rpi4b")
    # 1 MB shared L2: each of 4 threads simulates a quarter.
    assert a72.plugin_args(4) == ["line=64", "l1=32768:2", "l2=262144:16"]
    assert a72.plugin_args(1) == ["line=64", "l1=32768:2", "l2=1048576:16"]
    a76 = load_core_model("rpi5")  # private L2, shared L3
    assert a76.plugin_args(4) == ["line=64", "l1=65536:4", "l2=524288:8", "l3=524288:16"]


def _without_core(tmp_path: Path, keep: str = "") -> Path:
    text = (REPO / "targets" / "rpi4b.toml").read_text()
    head = text.split("\n[core]")[0].rstrip().rsplit("\n#", 2)[0]
    path = tmp_path / "board.toml"
    path.write_text(head + "\n" + keep)
    return path


def test_target_without_core_model_is_one_line_naming_the_keys(tmp_path):
    path = _without_core(tmp_path)
    with pytest.raises(UserError) as e:
        load_core_model(path)
    msg = str(e.value)
    assert "\n" not in msg and "no core model" in msg
    for key in ("clock_ghz", "issue_width", "l1d_kib", "l2_latency", "dram_bandwidth_gbs", "sync_cycles"):
        assert key in msg
    with pytest.raises(UserError, match="no core model"):
        load_core_model("pixel2")  # a shipped target without one


def test_incomplete_core_model_names_exactly_the_missing_keys(tmp_path):
    core = textwrap.dedent("""
        [core]
        model = "Cortex-A72"
        qemu_cpu = "cortex-a72"
        clock_ghz = 1.5
        issue_width = 3
        vector_bits_per_cycle = 128
        loads_per_cycle = 1
        stores_per_cycle = 1
        memory_ops_per_cycle = 2
        line_bytes = 64
        l1d_kib = 32
        l1d_ways = 2
        l1d_latency = 4
        l2_kib = 1024
        l2_ways = 16
        l2_shared = true
        dram_latency_ns = 110
        miss_overlap = 0.5
        sequential_miss_cost = 0.1
        sync_cycles = 3000
        [core.sources]
        clock_ghz = "brief"
        """)
    with pytest.raises(UserError) as e:
        load_core_model(_without_core(tmp_path, core))
    msg = str(e.value)
    assert "\n" not in msg
    assert "core.l2_latency" in msg and "core.dram_bandwidth_gbs" in msg
    assert "core.sources.issue_width" in msg and "core.sources.clock_ghz" not in msg


def test_latency_is_the_slowest_thread_per_region_plus_sync():
    core = load_core_model("rpi4b")
    zero = dict.fromkeys(FIELDS, 0)

    def row(region: int, ints: int) -> list[int]:
        c = dict(zero, int=ints, ld_ops=0)
        return [region, *(c[f] for f in FIELDS)]

    record = {"regions": 3, "threads": [
        {"vcpu": 1, "regions": [row(0, 300), row(1, 3000), row(2, 300)]},
        {"vcpu": 2, "regions": [row(1, 600), row(2, 3000)]},
    ]}
    cost = cost_from_record(record, core, threads=2)
    issue = core.issue_width
    assert cost.cycles == pytest.approx((300 + 3000 + 3000) / issue + 2 * core.sync_cycles)
    assert cost.instructions == 300 + 3000 + 300 + 600 + 3000
    assert [t.vcpu for t in cost.per_thread] == [1, 2]
    single = cost_from_record(record, core, threads=1)  # no pool, no synchronisation
    assert single.cycles == pytest.approx((300 + 3000 + 3000) / issue)


FMA_LOOP = """vbroadcastss (%rsi), %ymm11
vfmadd231ps 0x20(%rsi), %ymm11, %ymm9
vfmadd231ps 0x40(%rsi), %ymm11, %ymm10
vbroadcastss 4(%rsi), %ymm11
vfmadd231ps 0x60(%rsi), %ymm11, %ymm10
vfmadd231ps 0x80(%rsi), %ymm11, %ymm9
vbroadcastss 8(%rsi), %ymm11
vfmadd231ps 0xa0(%rsi), %ymm11, %ymm9
vfmadd231ps 0xc0(%rsi), %ymm11, %ymm10
addq $1, %rdx
subq $1, %rcx
jne 0x1000
"""


def test_loops_overlap_their_chains_in_the_out_of_order_window():
    import dataclasses

    from mnv2_tvm.emulate.core_model import block_cycles

    core = load_core_model("x86-64-avx2")
    assert core.mca_cpu and core.ooo_window > 0
    lat, thr, uops = 12.0, 6.0, 12.0  # two 3-FMA chains per iteration, resource bound 6
    long = block_cycles(core, lat, thr, uops, executions=100_000, entries=10)      # 10,000 iterations a loop
    short = block_cycles(core, lat, thr, uops, executions=100_000, entries=50_000)  # 2 iterations a loop
    assert long == pytest.approx(100_000 * lat, rel=0.01)
    assert short == pytest.approx(100_000 * thr)
    mid = block_cycles(core, lat, thr, uops, executions=100_000, entries=5_000)    # 20: 1 + 160/240 in flight
    assert mid == pytest.approx(100_000 * lat / (1 + core.ooo_window / (20 * uops)))
    in_order = dataclasses.replace(core, ooo_window=0.0)
    assert block_cycles(in_order, lat, thr, uops, executions=100_000, entries=50_000) == 100_000 * lat


def test_lines_between_cache_levels_are_bounded_by_their_bandwidth():
    core = load_core_model("x86-64-avx2")
    assert core.l2_bytes_per_cycle > 0 and core.l3_bytes_per_cycle > 0
    c = dict.fromkeys(FIELDS, 0)
    c.update(int=1000, l1_miss=100_000, l1_wb=20_000, l2_miss=1_000)  # a stream through L2
    res = core.thread_cycles(c, block_cycles=1000.0)
    assert res["l2_bandwidth"] == pytest.approx(120_000 * 64 / core.l2_bytes_per_cycle)
    assert res["cycles"] == pytest.approx(max(res["core"] + res["stall"], res["l2_bandwidth"]))
    assert res["cycles"] == res["l2_bandwidth"]


def test_forward_branches_are_charged_their_minority_outcome():
    from mnv2_tvm.emulate.core_model import branch_mispredicts

    texts = {1: "vcmpltps %ymm12, %ymm15, %ymm13\ntestb $0x80, %r13b\njne 0x1100\n",  # if (x < 0)
             2: "movl $1, %ecx\n", 3: "movl $0, %ecx\n",
             4: "addq $1, %rax\ncmpq $0x40, %rax\njne 0x1000\n"}                  # a loop's back edge
    pcs = {1: 0x1000, 2: 0x1010, 3: 0x1100, 4: 0x1200}
    edges = [(1, 3, 300), (1, 2, 700), (2, 4, 700), (3, 4, 300), (4, 1, 990)]
    assert branch_mispredicts(edges, pcs, texts) == 300  # the branch taken 300 of 1000 times; loops free


def test_a_loop_entered_by_falling_into_it_counts_its_trips_by_exits():
    """QEMU starts a block where execution first reaches code: a loop fallen into runs its first
    iteration in a block that began before the head, so the head's executions are all back edges.
    Its entries are its exits: 1,000 entries of 7 iterations, not one loop of 6,000."""
    texts = {1: "movq %rax, %rcx\naddq $1, %rdx\n",               # before the loop, falls into it
             2: "addq $1, %rdx\n",                                # the head (reached by back edges only)
             3: "addq $1, %rax\ncmpq $7, %rax\njne 0x1010\n",    # the body, jumping back to the head
             4: "ret\n"}
    pcs = {1: 0x1000, 2: 0x1010, 3: 0x1020, 4: 0x1100}
    blocks = {1: 1000, 2: 6000, 3: 7000, 4: 1000}
    edges = [(1, 3, 1000), (2, 3, 6000), (3, 2, 6000), (3, 4, 1000)]
    trips = loop_trips(blocks, edges, pcs, texts)
    assert trips[2] == trips[3] == 7.0 and trips[4] == 1.0


def test_scalar_fma_is_costed_at_the_core_s_throughput():
    """LLVM 19's Zen 4 model gives a scalar FMA twice a packed one's pipe time; Zen 4 runs both
    at two a cycle (MCA_REWRITES)."""
    core = load_core_model("x86-64-avx2")
    try:
        blocks = core.blocks
    except UserError:
        pytest.skip("no llvm-mca with a Zen 4 model (scripts/setup_emulator.sh installs llvm-19)")
    fmas = lambda kind: "".join(f"vfmadd231{kind} %xmm1, %xmm2, %xmm{r}\n" for r in range(3, 11))
    (_, scalar, _), (_, packed, _) = (blocks.cycles([fmas(k)])[fmas(k)] for k in ("ss", "ps"))
    assert scalar == packed == 4.0  # 8 independent FMAs, 2 a cycle
    assert "vmovss (%rax), %xmm1" in mca_rewrite("vmovss (%rax), %xmm1\n", "znver4")  # loads stay


def test_optional_core_keys_need_a_source(tmp_path):
    text = (REPO / "targets" / "x86-64-avx2.toml").read_text()
    bad = tmp_path / "x86.toml"
    bad.write_text(text.replace('\nooo_window = "', '\nooo_window_was = "'))
    with pytest.raises(UserError, match="core.sources.ooo_window"):
        load_core_model(bad)
    bad.write_text(text.replace("ooo_window = 160", "ooo_window = -1"))
    with pytest.raises(UserError, match="malformed core.ooo_window"):
        load_core_model(bad)


def test_blocks_are_costed_by_the_scheduling_model():
    core = load_core_model("x86-64-avx2")
    try:
        assert core.blocks is not None
    except UserError:
        pytest.skip("no llvm-mca with a Zen 4 model (scripts/setup_emulator.sh installs llvm-19)")
    zero = dict.fromkeys(FIELDS, 0)
    row = [0, *(dict(zero, vec=3, fma=6, int=3)[f] for f in FIELDS)]
    def record(n_loops: int, tbs: dict | None = None, ids: tuple[int, int] = (7, 3)) -> dict:
        loop, outside = ids
        return {"regions": 1, "tbs": tbs or {str(loop): [0x2000, FMA_LOOP], str(outside): [0x1000, "movq %rax, %rcx\n"]},
                "threads": [{"vcpu": 1, "regions": [row],
                             "blocks": [[0, loop, 40_000], [0, outside, n_loops]],
                             "edges": [[0, outside, loop, n_loops], [0, loop, loop, 40_000 - n_loops],
                                       [0, loop, outside, n_loops - 1]]}]}

    cost = cost_from_record(record(10), core, threads=1)  # 10 loops of 4,000 iterations
    # Long loops: the two FMA chains (3 x 4 cycles an iteration on Zen 4) bound it.
    assert 11.5 * 40_000 <= cost.cycles <= 12.5 * 40_000
    short = cost_from_record(record(20_000), core, threads=1)  # 20,000 loops of 2 iterations: overlapped
    assert short.cycles < 0.6 * cost.cycles
    # A loop body split over two blocks (QEMU ends a block at every branch) is one loop.
    head, tail = FMA_LOOP.rsplit("addq", 1)
    split = {"regions": 1, "tbs": {"5": [0x2000, head + "jne 0x3000\n"], "6": [0x2040, "addq" + tail],
                                   "3": [0x1000, "movq %rax, %rcx\n"]},
             "threads": [{"vcpu": 1, "regions": [row], "blocks": [[0, 5, 40_000], [0, 6, 40_000], [0, 3, 10]],
                          "edges": [[0, 3, 5, 10], [0, 5, 6, 40_000], [0, 6, 5, 39_990], [0, 6, 3, 9]]}]}
    assert cost_from_record(split, core, threads=1).cycles > 0.9 * cost.cycles
    # Ids are translation order: the fingerprint goes by block text.
    renumbered = record(10, {"9": [0x2000, FMA_LOOP], "4": [0x1000, "movq %rax, %rcx\n"]}, ids=(9, 4))
    assert cost_from_record(renumbered, core, threads=1).fingerprint() == cost.fingerprint()


def test_the_32bit_pi3_target_shares_the_64bit_one_s_core():
    armv7, aarch64 = load_core_model("rpi3b"), load_core_model("rpi3b-aarch64")
    assert (armv7.arch, aarch64.arch) == ("arm", "aarch64")
    assert armv7.model == aarch64.model == "Cortex-A53" and armv7.levels == aarch64.levels


def test_32bit_arm_target_is_refused_with_a_reason():
    with pytest.raises(UserError, match="aarch64 and x86-64 guests only"):
        EmulatedCore("rpi3b")


def test_missing_qemu_names_the_setup_command(monkeypatch, tmp_path):
    import shutil

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name.startswith("qemu-") else real_which(name, *a, **k))
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/bin/python3").touch()
    (rootfs / "opt/tvm-site/tvm").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        EmulatedCore("rpi4b", rootfs=rootfs)
    assert "\n" not in str(e.value) and "scripts/setup_emulator.sh" in str(e.value)


def test_missing_plugin_header_names_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MNV2_TVM_EMULATE_DIR", str(tmp_path / "empty-cache"))
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/bin/python3").touch()
    (rootfs / "opt/tvm-site/tvm").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        EmulatedCore("rpi4b", rootfs=rootfs)
    assert "\n" not in str(e.value) and "plugin header" in str(e.value) and "setup_emulator.sh" in str(e.value)


def test_missing_guest_userland_names_the_board_setup(tmp_path):
    with pytest.raises(UserError, match="virtual_board.py setup"):
        EmulatedCore("rpi4b", rootfs=tmp_path / "nothing")


# ---------------------------------------------------------------------- under qemu


@pytest.fixture(scope="module")
def rootfs(virtual_board_setup):
    subprocess.run(["bash", str(REPO / "scripts" / "setup_emulator.sh")], check=True)
    return Path(virtual_board_setup) / "rootfs"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    from mnv2_tvm.emulate.kernels import build_kernel

    out = tmp_path_factory.mktemp("kernels")
    return {
        "vadd_small": build_kernel("vadd", "rpi4b", out, n=1024),
        "vadd": build_kernel("vadd", "rpi4b", out, n=4096),
        "vadd_l2": build_kernel("vadd", "rpi4b", out, n=65536),      # 768 KiB: > L1, < L2
        "vadd_dram": build_kernel("vadd", "rpi4b", out, n=262144),   # 3 MiB: > L2
        "matmul": build_kernel("matmul", "rpi4b", out, n=64),
        "x86_matmul": build_kernel("matmul", "x86-64-avx2", out, n=64),
    }


@pytest.fixture(scope="module")
def core(rootfs):
    with EmulatedCore("rpi4b", threads=1, rootfs=rootfs) as c:
        c.start()
        yield c


def measure(core: EmulatedCore, k):
    cost = core.measure(k.path, k.func, k.args)
    assert cost.ok, cost.error
    return cost


@pytest.mark.slow
def test_vector_add_retires_a_vector_add_per_four_floats(core, kernels):
    k = kernels["vadd"]
    n = k.args[0][0][0]
    cost = measure(core, k)
    (t,) = cost.per_thread
    # The loop: ldp q,q from A and B, two fadd .4s, stp q,q to C per 8 floats; the packed-call
    # wrapper adds a few dozen scalar loads and stores.
    assert n / 4 <= cost.classes["vec"] <= n / 4 * 1.02
    assert 2 * n / 4 <= t.counts["ld_ops"] <= 2 * n / 4 + 100
    assert n / 4 <= t.counts["st_ops"] <= n / 4 + 100
    assert cost.classes["fma"] == 0 and cost.classes["fp"] == 0
    assert cost.cycles > 0 and cost.ms == pytest.approx(cost.cycles / 1.5e6)


@pytest.mark.slow
def test_matmul_fmas_and_a_bigger_kernel_costs_more(core, kernels):
    small, big, mm = (measure(core, kernels[k]) for k in ("vadd_small", "vadd_l2", "matmul"))
    assert mm.classes["fma"] == 64 ** 3 // 4  # one fmla .4s per 4 multiply-adds
    assert big.instructions > 50 * small.instructions
    assert big.cycles > 50 * small.cycles
    assert mm.cycles > small.cycles


@pytest.mark.slow
def test_cache_misses_appear_when_the_working_set_exceeds_a_level(core, kernels):
    def lines(k):
        return 3 * k.args[0][0][0] * 4 // 64

    small, mid, big = (measure(core, kernels[k]) for k in ("vadd_small", "vadd_l2", "vadd_dram"))
    # 12 KiB stays in L1 after the warm-up run; 768 KiB misses L1 but stays in L2; 3 MiB misses both.
    assert small.cache[0]["miss"] < 0.05 * lines(kernels["vadd_small"])
    assert mid.cache[0]["miss"] > 0.9 * lines(kernels["vadd_l2"])
    assert mid.cache[1]["miss"] < 0.05 * lines(kernels["vadd_l2"])
    assert big.cache[1]["miss"] > 0.9 * lines(kernels["vadd_dram"])
    assert big.terms["dram"] > 0


@pytest.mark.slow
def test_same_candidate_same_cost_whatever_ran_before(core, kernels):
    first = measure(core, kernels["matmul"])
    measure(core, kernels["vadd_dram"])
    again = measure(core, kernels["matmul"])
    assert again.fingerprint() == first.fingerprint() and again.cycles == first.cycles


@pytest.mark.slow
def test_crashing_candidate_is_one_failed_measurement(core, kernels):
    starts = core.starts
    crashed = core.crash_for_test()
    assert not crashed.ok and "crashed" in crashed.error and "SIGABRT" in crashed.error
    wrong = core.measure(kernels["vadd"].path, kernels["vadd"].func, [((3,), "float32")] * 3)
    assert not wrong.ok and wrong.error  # the wrapper's shape check, reported as one failure
    missing = core.measure(kernels["vadd"].path, "no_such_function", kernels["vadd"].args)
    assert not missing.ok
    timeout, core.timeout_s = core.timeout_s, 3.0
    try:
        hung = core.crash_for_test(hang=True)
    finally:
        core.timeout_s = timeout
    assert not hung.ok and "did not finish" in hung.error
    assert measure(core, kernels["vadd"]).ok
    assert core.starts == starts  # the long-lived guest survived all of that


def _burn_cpus(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]


@pytest.mark.slow
def test_four_threads_bit_identical_across_processes_and_host_load(rootfs, kernels):
    from mnv2_tvm.emulate.kernels import build_kernel

    k = build_kernel("matmul", "rpi4b", kernels["matmul"].path.parent, n=128)
    with EmulatedCore("rpi4b", threads=4, rootfs=rootfs) as quiet:
        a = quiet.measure(k.path, k.func, k.args)
        assert a.ok, a.error
    assert len(a.per_thread) == 4 and a.regions == 2  # serial part + one parallel region
    work = [t.instructions for t in a.per_thread]
    assert max(work) < 1.01 * min(work)  # the runtime's static split of 128 rows
    burners = _burn_cpus(os.cpu_count() or 2)
    try:
        time.sleep(0.5)
        with EmulatedCore("rpi4b", threads=4, rootfs=rootfs) as loaded:
            loaded.measure(kernels["vadd"].path, kernels["vadd"].func, kernels["vadd"].args)
            b = loaded.measure(k.path, k.func, k.args)
    finally:
        for p in burners:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert b.ok, b.error
    assert b.fingerprint() == a.fingerprint()
    assert b.cycles == a.cycles and b.instructions == a.instructions


@pytest.mark.slow
def test_x86_64_guest_counts_avx2_fmas(rootfs, kernels):  # rootfs: runs setup_emulator.sh
    k = kernels["x86_matmul"]
    with EmulatedCore("x86-64-avx2", threads=1) as c:
        cost = c.measure(k.path, k.func, k.args)
    assert cost.ok, cost.error
    assert cost.classes["fma"] == 64 ** 3 // 8  # vfmadd231ps ymm: 8 multiply-adds
    assert cost.core.startswith("AMD Zen 4")


@pytest.mark.slow
def test_guest_that_dies_is_restarted_on_the_next_measurement(core, kernels):
    before = measure(core, kernels["vadd"])
    os.killpg(core._proc.pid, signal.SIGKILL)  # the long-lived guest itself, not a candidate
    core._proc.wait()
    after = measure(core, kernels["vadd"])
    assert after.fingerprint() == before.fingerprint()
