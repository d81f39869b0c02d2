"""Tests for mnv2_tvm.tuning: tiny modules and budgets (each test well under ~2 min on 2 cores).

The MetaSchedule search population is shrunk (``tuning.search.SEARCH_KWARGS``) to keep runs short; the
tuning path is otherwise the real one (PersistentBuilder, LocalRunner/RPCRunner, XGB model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms

REPO = Path(__file__).resolve().parents[1]
try:
    from mnv2_tvm import tuning as T
except ImportError:  # plain `pytest` without the repo on sys.path
    sys.path.insert(0, str(REPO))
    from mnv2_tvm import tuning as T
from mnv2_tvm.compile import compile_with_records
from mnv2_tvm.tuning import search, seeding
from mnv2_tvm.tuning.progress import PeakMemory
from mnv2_tvm.tuning.records import _record_json, trace_key
from mnv2_tvm.tuning.runner import stop_runner

PY = sys.executable
SMALL_SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 1}
HOST_CPU = tvm.target.codegen.llvm_get_system_cpu()
TARGET = {"kind": "llvm", "mcpu": HOST_CPU}  # no num-cores: tune() adds it for local runs
SUBPROCESS_TIMEOUT = 300


# --------------------------------------------------------------------------- tiny models


class TinyNet(torch.nn.Module):
    """conv3x3+relu -> depthwise conv3x3+relu -> pointwise conv (BN-free, like a folded block)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(x))
        return self.pw(x)


class OtherNet(torch.nn.Module):
    """Shares only the first layer's shape with TinyNet (different weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def to_relax(net: torch.nn.Module, x: torch.Tensor) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Relax module with params detached as a dict name -> numpy (what the package hands over)."""
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(net.eval(), (x,))
    mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = relax.frontend.detach_params(mod)
    names = [p.name for p in mod["main"].params[1:]]
    return mod, {n: v.numpy() for n, v in zip(names, params["main"])}


def tiny_module() -> tuple[tvm.IRModule, dict[str, np.ndarray], torch.nn.Module, torch.Tensor]:
    net = TinyNet().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mod, params = to_relax(net, x)
    return mod, params, net, x


# --------------------------------------------------------------------------- helpers


def record_lines(records_dir: Path) -> list[bytes]:
    """Complete (newline-terminated) lines of the record file."""
    return (records_dir / T.RECORD_FILE).read_bytes().split(b"\n")[:-1]


def snapshot(records_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(records_dir.iterdir()) if p.is_file()}


def copy_records(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def stock_db(records_dir: Path) -> ms.database.JSONDatabase:
    return ms.database.JSONDatabase(
        str(records_dir / T.WORKLOAD_FILE), str(records_dir / T.RECORD_FILE), allow_missing=False
    )


def wait_for_records(path: Path, proc: subprocess.Popen, n: int, timeout: float) -> int:
    """Wait until ``path`` has >= n complete lines; return the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            count = path.read_bytes().count(b"\n")
            if count >= n:
                return count
        if proc.poll() is not None:
            raise AssertionError(f"tuning subprocess exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"no records in {path} after {timeout} s")


def kill_group(proc: subprocess.Popen) -> None:
    """Stop exactly the process group we started (start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


TUNE_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from mnv2_tvm import tuning as T
from mnv2_tvm.tuning import search
from test_tune import tiny_module, TARGET, SMALL_SEARCH
search.SEARCH_KWARGS = SMALL_SEARCH
mod, params, _, _ = tiny_module()
rep = T.tune(mod, TARGET, sys.argv[1], int(sys.argv[2]), params=params, num_builder_workers=1, seed=3)
print("REPORT " + json.dumps({{"interrupted": rep.interrupted, "trials_run": rep.trials_run,
                              "after": rep.trials_in_db_after}}), flush=True)
"""


def start_tuner(tmp_path: Path, records_dir: Path, trials: int) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "tune_script.py"
    script.write_text(TUNE_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "tuner.out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [PY, str(script), str(records_dir), str(trials)],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def small_search():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "SEARCH_KWARGS", SMALL_SEARCH)
        yield


@pytest.fixture(scope="module")
def tiny():
    return tiny_module()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny):
    """8 trials of the tiny module into a fresh records dir (shared, read-only for tests)."""
    mod, params, _, _ = tiny
    records_dir = tmp_path_factory.mktemp("tuned") / "records"
    t0 = time.monotonic()
    report = T.tune(mod, TARGET, records_dir, 8, params=params, seed=1)
    print(f"\n[timing] first tune: {time.monotonic() - t0:.1f} s, first trial after {report.first_trial_s:.1f} s")
    return records_dir, report


# --------------------------------------------------------------------------- tests


def test_allocate_trials_min_share_and_monotone():
    imp = [100.0, 1.0, 25.0, 0.0]
    for total in range(0, 120):
        alloc = T.allocate_trials(total, imp, min_per_task=8)
        assert sum(alloc) == total
        if total >= 8 * len(imp):
            assert min(alloc) >= 8
        nxt = T.allocate_trials(total + 1, imp, min_per_task=8)
        assert all(b >= a for a, b in zip(alloc, nxt)), (total, alloc, nxt)
    assert T.allocate_trials(2, imp) == [1, 0, 1, 0]  # fewer trials than tasks: most important
    big = T.allocate_trials(200, imp, min_per_task=8)
    assert big[0] > big[2] > big[1] >= 8


def _holding(mb: int) -> subprocess.Popen:
    """A child process that holds ``mb`` MB of touched memory until killed (says so on stdout)."""
    code = f"b = bytearray({mb} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\n" \
           "import time\ntime.sleep(600)"
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    return proc


def test_peak_memory_counts_the_children_started_while_tuning_not_those_before():
    import psutil

    before = _holding(400)  # e.g. an RPC server the calling program keeps
    try:
        with PeakMemory(interval=0.05) as memory:
            during = _holding(150)  # e.g. a builder worker
            time.sleep(0.3)
            during.kill()
            during.wait()
        own = psutil.Process().memory_info().rss / 2**20
        assert memory.processes == 2
        assert own + 140 < memory.peak_bytes / 2**20 < own + 400, (own, memory.peak_bytes / 2**20)
    finally:
        before.kill()
        before.wait()


@pytest.mark.slow
def test_tune_writes_durable_stock_readable_records(tuned):
    records_dir, rep = tuned
    assert rep.trials_run == 8 and rep.trials_in_db_before == 0 and rep.trials_in_db_after == 8
    assert rep.tasks_covered_before == 0 and not rep.interrupted and not rep.already_done
    assert len(rep.tasks) == 3 and all(t.trials >= 2 for t in rep.tasks)
    assert all(t.best_us is not None and t.best_us > 0 for t in rep.tasks)
    assert rep.estimated_e2e_us == pytest.approx(sum(t.weight * t.best_us for t in rep.tasks))
    assert rep.first_trial_s is not None and rep.first_trial_s < rep.wall_time_s
    assert "best µs" in rep.table() and all(t.name in rep.table() for t in rep.tasks)
    # Memory in all: this process (torch, TVM) at least; its builder workers too unless an earlier tune
    # in this pytest process started the pool they belong to (pools are kept). No upper bound: this
    # process has grown with every test before it (README: a tune run's figures).
    assert rep.peak_rss_processes >= 1 and rep.peak_rss_mb > 100, rep
    assert f"peak RSS {rep.peak_rss_mb / 1024:.2f} GB in all ({rep.peak_rss_processes} processes)" in rep.table()
    # on disk: JSON lines, complete, readable by the stock JSONDatabase
    lines = record_lines(records_dir)
    assert len(lines) == 8 and all(isinstance(json.loads(ln), list) for ln in lines)
    assert len(stock_db(records_dir)) == 8
    # CPU kernels read pre-packed weights: traces that rewrite a layout (an IndexMap input the
    # stock Python serialiser cannot write) are on disk and read back to the same schedule.
    assert T.prepacks_weights(tvm.target.Target(TARGET))
    packed = [ln for ln in lines if b'"TransformLayout"' in ln]
    assert packed, "no record rewrote a weight layout"
    db = T.RecordsDatabase(str(records_dir), writable=False)
    for rec in db.get_all_tuning_records():
        again = ms.database.TuningRecord.from_json(json.loads(json.dumps(_record_json(rec))), rec.workload)
        a, b = (tvm.s_tir.Schedule(rec.workload.mod) for _ in range(2))
        rec.trace.apply_to_schedule(a, remove_postproc=False)
        again.trace.apply_to_schedule(b, remove_postproc=False)
        assert tvm_ffi.structural_equal(a.mod, b.mod)
    meta = json.loads((records_dir / T.META_FILE).read_text())
    assert meta["tvm_version"] == tvm.__version__ and meta["target"]["mcpu"] == HOST_CPU
    log = (records_dir / T.LOG_FILE).read_text()
    assert "evolutionary_search" in log and "Trial #1" in log


@pytest.mark.slow
def test_rerun_same_total_measures_nothing(tuned, tiny, tmp_path):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    mod, params, _, _ = tiny
    before = snapshot(records_dir)
    t0 = time.monotonic()
    rep = T.tune(mod, TARGET, records_dir, 8, params=params)
    assert rep.already_done and rep.trials_run == 0 and "already" in rep.message
    assert rep.tasks_covered_before == 3 and rep.trials_in_db_before == rep.trials_in_db_after == 8
    assert time.monotonic() - t0 < 30
    after = snapshot(records_dir)
    assert after[T.RECORD_FILE] == before[T.RECORD_FILE]
    assert after[T.WORKLOAD_FILE] == before[T.WORKLOAD_FILE]


@pytest.mark.slow
def test_rerun_bigger_total_runs_only_the_difference(tuned, tiny, tmp_path, capfd):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    mod, params, _, _ = tiny
    rep = T.tune(mod, TARGET, records_dir, 12, params=params, seed=2)
    assert rep.trials_run == 4 and rep.trials_in_db_before == 8 and rep.trials_in_db_after == 12
    assert rep.tasks_covered_before == 3
    assert len(record_lines(records_dir)) == 12
    err = capfd.readouterr().err
    # the console gets our bar and table only; TVM's logging went to tune.log
    assert "[tune] 4/4 trials" in err and "best µs" in err
    assert "evolutionary_search" not in err and "[INFO]" not in err
    assert "evolutionary_search" in (records_dir / T.LOG_FILE).read_text()


def records_held(records_dir: Path, mod: tvm.IRModule, params: dict) -> list[int]:
    """Records the database holds for each task of ``mod``."""
    opened = T.open_records(records_dir, None, writable=False)
    try:
        return [opened.db.workload_stats(t.mod)[0] for t in T.extract_tasks(mod, tvm.target.Target(TARGET), params)]
    finally:
        opened.close()


@pytest.mark.slow
def test_shared_layer_reuses_records_of_another_model(tuned, tmp_path, capfd):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    x = torch.randn(1, 3, 16, 16)
    mod, params = to_relax(OtherNet(), x)
    # conv 3->8 on 16x16 (+bias+relu) was tuned for TinyNet; how many trials it got there depends
    # on measured times, so the total asked for here is twice that: each task's minimum is then
    # exactly what the shared one already holds.
    held = records_held(records_dir, mod, params)
    assert sorted(held)[0] == 0 and sorted(held)[1] >= 2, held
    n = max(held)
    rep = T.tune(mod, TARGET, records_dir, 2 * n, params=params, seed=4)
    assert len(rep.tasks) == 2
    assert rep.tasks_covered_before == 1
    shared = [t for t in rep.tasks if t.trials_total > t.trials]
    assert len(shared) == 1 and shared[0].trials == 0  # its share is already in the db
    assert rep.trials_run == n and rep.trials_in_db_before == n
    assert "[tune] 1 of 2 tasks already have records" in capfd.readouterr().err


@pytest.mark.slow
def test_a_total_no_larger_than_the_shared_records_still_tunes_the_unshared_task(tuned, tmp_path):
    # The shared conv already holds at least the 2 trials asked for (TinyNet's tuning gave it 2 or
    # more): the unshared task must still get its minimum (here 1), not be starved by another
    # model's records.
    records_dir = copy_records(tuned[0], tmp_path / "r")
    mod, params = to_relax(OtherNet(), torch.randn(1, 3, 16, 16))
    rep = T.tune(mod, TARGET, records_dir, 2, params=params, seed=4)
    assert rep.trials_run == 1 and sorted(t.trials for t in rep.tasks) == [0, 1]
    again = T.tune(mod, TARGET, records_dir, 2, params=params, seed=4)
    assert again.trials_run == 0 and again.already_done


class ConvThenPermute(torch.nn.Module):
    """A conv task and a transpose task (a data-movement kernel with only a few schedules)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.c = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x).permute(0, 2, 3, 1).reshape(1, -1, 4)


@pytest.mark.slow
def test_a_task_whose_search_space_is_used_up_gives_its_share_to_the_others(tmp_path):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mod, params = to_relax(ConvThenPermute().eval(), x)
    rep = T.tune(mod, TARGET, tmp_path / "records", 40, params=params, seed=3)
    by_kind = {("conv" if "conv" in t.name else "move"): t for t in rep.tasks}
    assert set(by_kind) == {"conv", "move"}, [t.name for t in rep.tasks]
    move, conv = by_kind["move"], by_kind["conv"]
    # the transpose has fewer distinct schedules than its phase-1 minimum: one round well short of it ends it
    assert move.exhausted and 1 <= move.trials < search.MIN_TRIALS_PER_TASK, rep.table()
    # without the move's share the conv would get at most 40 - MIN (the move's phase-1 minimum);
    # a round of the conv may come back a candidate short, which does not stop it
    assert not conv.exhausted and 40 - search.MIN_TRIALS_PER_TASK < conv.trials <= 40 - move.trials, rep.table()
    assert "search space used up" in rep.table()


@pytest.mark.slow
def test_transfer_trains_the_cost_model_on_every_workload_in_the_database(tuned):
    from tvm.s_tir import meta_schedule as ms

    db = T.RecordsDatabase(str(tuned[0]), writable=False)
    valid = sum(1 for r in db.get_all_tuning_records() if r.run_secs and min(float(x) for x in r.run_secs) < 1e9)
    model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=1)
    used, workloads = seeding.warm_start(model, [db], TARGET, 1)
    assert used == valid > 0 and workloads == 3
    assert model.data_size == used and model.booster is not None  # trained once, at the end
    assert model.last_train_size == used and model.adaptive_training  # tuning retrains as before


def test_fit_tile_keeps_inner_factors_and_multiplies_to_the_extent():
    assert seeding._fit_tile(56, [2, 7, 4], 64) == [2, 7, 4]  # fits as it is
    assert seeding._fit_tile(112, [2, 7, 4], 64) == [4, 7, 4]  # only the outer factor grows
    assert seeding._fit_tile(14, [1, 8, 4], 64) == [1, 2, 7]  # nearest divisors (log scale) from the inside
    assert seeding._fit_tile(14, [1, 8, 4], 4) == [1, 7, 2]  # ... the innermost within its bound
    for extent in (1, 7, 12, 96, 1280):
        for old in ([1, 1, 1, 1], [4, 2, 8, 16], [3, 64]):
            new = seeding._fit_tile(extent, old, 16)
            assert len(new) == len(old) and int(np.prod(new)) == extent
            assert new[-1] <= 16


def test_kernel_kind_ignores_sizes_but_not_what_is_computed(tiny):
    mod, params, net, _ = tiny
    tasks = {t.name: t for t in T.extract_tasks(mod, TARGET, params)}
    big_mod, big_params = to_relax(net, torch.randn(1, 3, 24, 24))
    bigger = {t.name: t for t in T.extract_tasks(big_mod, TARGET, big_params)}
    kinds = {n: seeding._kernel_kind(seeding._sblocks(t.mod)) for n, t in tasks.items()}
    assert len(set(kinds.values())) == len(kinds)  # conv3x3, depthwise and 1x1 all differ
    for name, task in bigger.items():
        assert seeding._kernel_kind(seeding._sblocks(task.mod)) == kinds[name]
        assert not tvm_ffi.structural_equal(task.mod, tasks[name].mod)
        assert seeding._shape_distance(seeding._sblocks(task.mod), seeding._sblocks(tasks[name].mod)) > 0


@pytest.mark.slow
def test_transfer_seeds_a_new_resolution_with_refitted_schedules_of_the_old(tuned, tiny, tmp_path, capfd):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    _, _, net, _ = tiny
    mod, params = to_relax(net, torch.randn(1, 3, 24, 24))  # same layers, other shapes: no record applies
    rep = T.tune(mod, TARGET, records_dir, 6, params=params, seed=6, transfer=True)
    assert rep.tasks_covered_before == 0 and rep.trials_run == 6 and rep.trials_in_db_after == 6
    err = capfd.readouterr().err
    assert "schedules of similar workloads refitted to the tasks and measured" in err
    seeds = _seeds_in(err)
    assert 3 <= seeds <= 6  # each of the 3 tasks got at least one carried-over schedule
    assert all(t.best_us is not None for t in rep.tasks)
    # the seeds are real measurements, kept like any trial and applied by compile
    exe, report = compile_with_records(mod, TARGET, records_dir, params=params)
    assert not report.untuned and not report.fallback


def _seeds_in(err: str) -> int:
    if " schedules of similar workloads" not in err:
        return 0
    return int(err.split(" schedules of similar workloads")[0].rsplit("] ", 1)[-1])


@pytest.mark.slow
def test_transfer_seeds_tuned_tasks_too_within_the_budget_and_never_twice(tuned, tiny, tmp_path, capfd):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    _, _, net, _ = tiny
    mod, params = to_relax(net, torch.randn(1, 3, 24, 24))
    rep = T.tune(mod, TARGET, records_dir, 3, params=params, seed=6)  # one random schedule a task
    assert rep.trials_run == 3 and all(t.trials == 1 for t in rep.tasks)
    capfd.readouterr()
    # two trials to spend: both go to neighbours' schedules on the tasks with the most time
    rep = T.tune(mod, TARGET, records_dir, 5, params=params, seed=6, transfer=True)
    assert rep.trials_run == 2 and _seeds_in(capfd.readouterr().err) == 2
    assert sorted(t.trials for t in rep.tasks) == [0, 1, 1]
    # the seeds measured before are not measured again: only the third task's is new
    rep = T.tune(mod, TARGET, records_dir, 9, params=params, seed=6, transfer=True)
    assert rep.trials_run == 4 and _seeds_in(capfd.readouterr().err) == 1
    assert rep.trials_in_db_after - rep.trials_in_db_before == 4


@pytest.mark.slow
def test_transfer_from_another_core_starts_each_task_from_that_core_s_best(tuned, tiny, tmp_path, capfd):
    """The same model for another core of the architecture: every task's first measurement is the
    schedule that won on the source core, and the source folder is only read."""
    source = copy_records(tuned[0], tmp_path / "source")
    before = {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()}
    mod, params, _, _ = tiny
    other_core = {"kind": "llvm", "mcpu": "haswell"}  # runs here; another target, so another database
    capfd.readouterr()
    rep = T.tune(mod, other_core, tmp_path / "new", 3, params=params, seed=6, transfer_from=[source])
    assert rep.tasks_covered_before == 0 and rep.trials_run == 3
    assert _seeds_in(capfd.readouterr().err) == 3
    src = T.RecordsDatabase(str(source), writable=False)
    new = T.RecordsDatabase(str(tmp_path / "new"), writable=False)
    for task in T.extract_tasks(mod, TARGET, params):
        best = min(src.records_of(task.mod), key=lambda r: min(float(x) for x in r.run_secs))
        assert [trace_key(r.trace) for r in new.records_of(task.mod)] == [trace_key(best.trace)]
    assert {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()} == before


@pytest.mark.slow
def test_sigkill_keeps_records_and_rerun_resumes(tmp_path, tiny):
    records_dir = tmp_path / "records"
    proc, out = start_tuner(tmp_path, records_dir, 12)
    try:
        wait_for_records(records_dir / T.RECORD_FILE, proc, 1, SUBPROCESS_TIMEOUT)
    finally:
        kill_group(proc)
    lines = record_lines(records_dir)
    assert 1 <= len(lines) < 12, out.read_text()[-2000:]
    if (records_dir / T.RECORD_FILE).read_bytes().endswith(b"\n"):
        assert len(stock_db(records_dir)) == len(lines)  # whole lines only: stock-readable
        # a write torn by a kill leaves an incomplete last line: it is skipped, then cut off
        with open(records_dir / T.RECORD_FILE, "ab") as f:
            f.write(b'[0,[[["GetSBlock"')
    with pytest.warns(T.RecordsWarning, match=r"database_tuning_record\.json:\d+: incomplete last line"):
        db = T.RecordsDatabase(str(records_dir), writable=False)
    assert len(db) == len(lines)
    mod, params, _, _ = tiny
    with pytest.warns(T.RecordsWarning):
        rep = T.tune(mod, TARGET, records_dir, 12, params=params, seed=5)
    assert rep.trials_in_db_before == len(lines)
    assert rep.trials_run == 12 - len(lines) and rep.trials_in_db_after == 12
    assert (records_dir / T.RECORD_FILE).read_bytes().endswith(b"\n")
    assert len(stock_db(records_dir)) == 12


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_reports_interrupted(tmp_path):
    records_dir = tmp_path / "records"
    proc, out = start_tuner(tmp_path, records_dir, 16)
    try:
        n = wait_for_records(records_dir / T.RECORD_FILE, proc, 1, SUBPROCESS_TIMEOUT)
        os.kill(proc.pid, signal.SIGINT)  # the main process only, as a terminal's ^C would be
        proc.wait(timeout=120)
    finally:
        kill_group(proc)
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:]
    report = json.loads(text.split("REPORT ", 1)[1].splitlines()[0])
    assert report["interrupted"] is True and n <= report["after"] < 16
    assert "interrupted" in text
    assert len(stock_db(records_dir)) == report["after"] == len(record_lines(records_dir))


@pytest.mark.slow
def test_corrupt_lines_are_skipped_with_file_and_line(tuned, tiny, tmp_path):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    path = records_dir / T.RECORD_FILE
    lines = path.read_bytes().split(b"\n")[:-1]
    lines.insert(2, b'{"this is": not json')
    path.write_bytes(b"\n".join(lines) + b"\n" + b"[1,[[")  # + a torn tail
    with pytest.warns(T.RecordsWarning) as caught:
        db = T.RecordsDatabase(str(records_dir), writable=False)
    msgs = [str(w.message) for w in caught]
    assert any(f"{path}:3: unreadable tuning record" in m for m in msgs), msgs
    assert any(f"{path}:10: incomplete last line" in m for m in msgs), msgs
    assert len(db) == 8
    # a writable open (tune) cuts the torn tail and keeps working; the bad line stays skipped
    mod, params, _, _ = tiny
    with pytest.warns(T.RecordsWarning):
        rep = T.tune(mod, TARGET, records_dir, 8, params=params)
    assert rep.already_done and rep.trials_in_db_after == 8
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 9
    with pytest.warns(T.RecordsWarning) as caught:
        T.RecordsDatabase(str(records_dir), writable=False)
    assert [str(w.message).split(": ")[0] for w in caught] == [f"{path}:3"]


@pytest.mark.slow
def test_record_with_unparsable_trace_is_dropped_when_queried(tuned, tiny, tmp_path):
    # Traces are parsed only when a workload is asked for, so a line that is well-formed JSON
    # but holds a bogus trace is caught then: warned about by file and line, and the next best
    # record of that workload is used.
    records_dir = copy_records(tuned[0], tmp_path / "r")
    path = records_dir / T.RECORD_FILE
    lines = path.read_bytes().split(b"\n")[:-1]
    idx = json.loads(lines[0])[0]
    bogus = json.dumps([idx, [[[["NoSuchInstruction", [], [], []]], []], [1e-9], None, None]]).encode()
    path.write_bytes(b"\n".join([*lines, bogus]) + b"\n")
    db = T.RecordsDatabase(str(records_dir), writable=False)
    assert len(db) == len(lines) + 1
    good = T.RecordsDatabase(str(tuned[0]), writable=False)
    wkl = db._workloads[idx]
    with pytest.warns(T.RecordsWarning) as caught:
        top = db.get_top_k(wkl, 1)
    assert [str(w.message).split(": ")[0] for w in caught] == [f"{path}:{len(lines) + 1}"]
    assert len(top) == 1 and len(db) == len(lines)
    expected = good.get_top_k(good._workloads[idx], 1)[0]
    assert str(top[0].trace) == str(expected.trace)
    # compile (its own open of the folder) warns likewise and still gets a schedule for every task
    mod, params, _, _ = tiny
    with pytest.warns(T.RecordsWarning, match=f"{path}:{len(lines) + 1}: unreadable tuning record"):
        _, report = compile_with_records(mod, TARGET, records_dir, params=params)
    assert not report.untuned and not report.fallback


@pytest.mark.slow
def test_other_target_or_tvm_version_refused_and_nothing_written(tuned, tiny, tmp_path):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    mod, params, _, _ = tiny
    other_cpu = "skylake" if HOST_CPU != "skylake" else "haswell"
    before = snapshot(records_dir)
    with pytest.raises(T.RecordsError, match="target"):
        T.tune(mod, {"kind": "llvm", "mcpu": other_cpu}, records_dir, 16, params=params)
    with pytest.raises(T.RecordsError, match="target"):
        compile_with_records(mod, {"kind": "llvm", "mcpu": other_cpu}, records_dir, params=params)
    assert snapshot(records_dir) == before
    meta = json.loads(before[T.META_FILE])
    meta["tvm_version"] = "0.26.0"
    (records_dir / T.META_FILE).write_text(json.dumps(meta))
    before = snapshot(records_dir)
    with pytest.raises(T.RecordsError, match="TVM 0.26.0"):
        T.tune(mod, TARGET, records_dir, 16, params=params)
    with pytest.raises(T.RecordsError, match="TVM"):
        compile_with_records(mod, TARGET, records_dir, params=params)
    with pytest.raises(T.RecordsError, match="TVM"):
        T.prune(records_dir)
    assert snapshot(records_dir) == before


@pytest.mark.slow
def test_dir_without_meta_is_adopted_only_for_its_own_target(tuned, tiny, tmp_path):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    (records_dir / T.META_FILE).unlink()  # like a stock MetaSchedule work dir
    mod, params, _, _ = tiny
    before = snapshot(records_dir)
    with pytest.raises(T.RecordsError, match="another target"):
        T.tune(mod, {"kind": "llvm", "mcpu": "skylake" if HOST_CPU != "skylake" else "haswell"}, records_dir, 8)
    assert snapshot(records_dir) == before
    rep = T.tune(mod, TARGET, records_dir, 8, params=params)
    assert rep.already_done and json.loads((records_dir / T.META_FILE).read_text())["target"]["mcpu"] == HOST_CPU


@pytest.mark.slow
def test_unwritable_or_busy_records_dir(tmp_path, tiny):
    mod, params, _, _ = tiny
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(T.RecordsError, match="cannot create records dir"):
        T.tune(mod, TARGET, blocker / "records", 4, params=params)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(T.RecordsError, match="not writable"):
                T.tune(mod, TARGET, ro, 4, params=params)
        finally:
            ro.chmod(0o700)
    held = T.open_records(tmp_path / "busy", TARGET, writable=True)
    try:
        with pytest.raises(T.RecordsError, match="in use"):
            T.tune(mod, TARGET, tmp_path / "busy", 4, params=params)
    finally:
        held.close()


@pytest.mark.slow
def test_compile_with_records_runs_and_matches_torch(tuned, tiny, tmp_path):
    records_dir = tuned[0]
    mod, params, net, x = tiny
    ref = net(x).detach().numpy()
    ex, rep = compile_with_records(mod, TARGET, records_dir, params=params)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert not rep.untuned and len(rep.tuned) == 3 and rep.fallback == []
    digest = hashlib.sha256(
        (records_dir / T.WORKLOAD_FILE).read_bytes() + b"\0" + (records_dir / T.RECORD_FILE).read_bytes()
    ).hexdigest()
    assert rep.records_digest == digest
    # params bound up front instead of passed: same workloads, same records apply
    bound = relax.transform.BindParams("main", params)(mod)
    ex_b, rep_b = compile_with_records(bound, TARGET, records_dir)
    assert rep_b.tuned == rep.tuned
    out_b = relax.VirtualMachine(ex_b, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(out_b, ref, rtol=1e-4, atol=1e-5)
    # no records: still legalised/fused, compiled untuned
    for empty in (None, tmp_path / "nothing"):
        ex_u, rep_u = compile_with_records(mod, TARGET, empty, params=params)
        assert rep_u.untuned and rep_u.tuned == [] and sorted(rep_u.fallback) == sorted(rep.tuned)
        out_u = relax.VirtualMachine(ex_u, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
        np.testing.assert_allclose(out_u, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_prune_keeps_best_per_workload(tuned, tmp_path):
    records_dir = copy_records(tuned[0], tmp_path / "r")
    full = T.RecordsDatabase(str(records_dir), writable=False)
    wkl_before = (records_dir / T.WORKLOAD_FILE).read_bytes()
    assert T.prune(records_dir, top_k=1) == (8, 3)
    wkl_after = (records_dir / T.WORKLOAD_FILE).read_bytes()
    # Same workloads line for line (record indices stay valid), stored unindented: smaller.
    assert wkl_after.count(b"\n") == wkl_before.count(b"\n") and len(wkl_after) < 0.7 * len(wkl_before)
    assert [ln.split(b",")[0] for ln in wkl_after.splitlines()] == [ln.split(b",")[0] for ln in wkl_before.splitlines()]
    stock = stock_db(records_dir)
    assert len(stock) == 3
    pruned = T.RecordsDatabase(str(records_dir), writable=False)
    for rec in stock.get_all_tuning_records():
        n_full, best_full = full.workload_stats(rec.workload.mod)
        n_pruned, best_pruned = pruned.workload_stats(rec.workload.mod)
        assert n_pruned == 1 and n_full >= 1 and best_pruned == pytest.approx(best_full)
    assert not list(records_dir.glob(".*.tmp"))
    with pytest.raises(ValueError):
        T.prune(records_dir, top_k=0)


def test_runner_spec():
    assert T.RunnerSpec().kind == "local" and T.RunnerSpec().artifact_format == "so"
    spec = T.RunnerSpec.rpc("127.0.0.1", 9190, "pi4", number=5, repeat=2, min_repeat_ms=50)
    assert spec.artifact_format == "tar" and spec.tracker_port == 9190 and spec.number == 5
    with pytest.raises(ValueError):
        T.RunnerSpec(kind="rpc", tracker_host="h")
    with pytest.raises(ValueError):
        T.RunnerSpec(kind="ssh")
    runner = spec.make_runner()  # no connection is made until something is measured
    assert runner.key == "pi4" and runner.evaluator_config.repeat == 2
    assert runner.session_timeout_sec == spec.session_timeout_sec and runner.board_wait_s == spec.board_wait_sec
    stop_runner(runner)
    with pytest.raises(ValueError, match="num-cores"):
        T.tune(tvm.IRModule(), {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "/nonexistent", 1, runner=spec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rpc_runner_through_local_tracker_and_server(tmp_path, tiny):
    from tvm import rpc

    tp, sp = _free_port(), _free_port()
    log = open(tmp_path / "rpc.log", "wb")
    tracker = subprocess.Popen(
        [PY, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tp), "--port-end", str(tp + 1)],
        stdout=log, stderr=log, start_new_session=True,
    )
    server = None
    try:
        server = subprocess.Popen(
            [PY, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sp), "--port-end", str(sp + 1),
             "--tracker", f"127.0.0.1:{tp}", "--key", "mnv2-test"],
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                summary = rpc.connect_tracker("127.0.0.1", tp).summary()
                if any(s["key"].endswith(":mnv2-test") for s in summary["server_info"]):
                    break
            except Exception:  # noqa: BLE001 - tracker not up yet
                pass
            if time.monotonic() > deadline:
                pytest.skip("local RPC tracker/server did not come up")
            time.sleep(0.5)
        mod, params, _, _ = tiny
        spec = T.RunnerSpec.rpc("127.0.0.1", tp, "mnv2-test", session_timeout_sec=60, number=2, min_repeat_ms=10)
        rep = T.tune(mod, {**TARGET, "num-cores": 2}, tmp_path / "records", 3, params=params, runner=spec, seed=6)
        assert rep.trials_run == 3
        assert all(t.build_errors == 0 and t.run_errors == 0 and t.best_us for t in rep.tasks)
        assert len(stock_db(tmp_path / "records")) == 3
    finally:
        for p in (server, tracker):
            if p is not None:
                kill_group(p)
        log.close()


@pytest.mark.slow
def test_continuing_never_measures_a_schedule_the_database_holds(tuned, tiny, tmp_path):
    # Evolutionary search starts from the database's best schedules and would measure them again
    # unchanged; each rerun (and each round of a run) is a new search, so every one is a chance.
    records_dir = copy_records(tuned[0], tmp_path / "r")
    mod, params, _, _ = tiny
    for total in (24, 40, 56):
        T.tune(mod, TARGET, records_dir, total, params=params, seed=total, progress=False)
    opened = T.open_records(records_dir, None, writable=False)
    try:
        for task in T.extract_tasks(mod, tvm.target.Target(TARGET), params):
            keys = [trace_key(r.trace) for r in opened.db.records_of(task.mod)]
            assert len(keys) == len(set(keys)), f"{task.name}: {len(keys) - len(set(keys))} measured twice"
        assert len(opened.db) == 56
    finally:
        opened.close()
