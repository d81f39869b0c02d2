"""Fault injection (issue 6): real TVM trackers and RPC servers on 127.0.0.1, each in its own
process group, killed / stopped / restarted while MetaSchedule tunes a one-conv module through
them; a disk that fills up; a bad-input sweep over every CLI command; safe defaults.

Every fault test appends a row (fault, what happened, records before/after, time to recover) to
``/tmp/faults_table.json`` (written when the module ends).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from board_fixture import left_on
from mnv2_tvm import remote
from mnv2_tvm import tuning as T
from mnv2_tvm.tuning import search
from mnv2_tvm.bundle import write_atomic as atomic_write
from mnv2_tvm.tuning.row_order import ROW_ORDER_FILE

# Runs by default; `-m faults` selects this suite alone.
pytestmark = [pytest.mark.faults, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
HOST_CPU = tvm.target.codegen.llvm_get_system_cpu()
TARGET = {"kind": "llvm", "mcpu": HOST_CPU}
RPC_TARGET = {**TARGET, "num-cores": 2}
SMALL_SEARCH = {"population_size": 32, "init_min_unmeasured": 8, "genetic_num_iters": 1}
TABLE_PATH = Path("/tmp/faults_table.json")
FAILED = 1e10
ROWS: list[dict] = []
ARTIFACTS: dict[str, Path] = {}  # files written by the fault tests, scanned for secrets


# --------------------------------------------------------------------------- tiny module


class OneConv(torch.nn.Module):
    """One conv3x3+relu: a single tuning task, milliseconds per build and run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c(x))


def one_conv() -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    from tvm.relax.frontend.torch import from_exported_program

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(OneConv().eval(), (x,))
    mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = relax.frontend.detach_params(mod)
    names = [p.name for p in mod["main"].params[1:]]
    return mod, {n: v.numpy() for n, v in zip(names, params["main"])}


# --------------------------------------------------------------------------- helpers


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1] if path.exists() else []


def run_secs(line: bytes) -> list[float] | None:
    rec = json.loads(line)[1]  # [workload index, [trace, run_secs, target, args_info]]
    return rec[1]


def is_failed(line: bytes) -> bool:
    secs = run_secs(line)
    return not secs or all(float(s) >= FAILED for s in secs)


def stock_db(records_dir: Path) -> ms.database.JSONDatabase:
    return ms.database.JSONDatabase(str(records_dir / T.WORKLOAD_FILE), str(records_dir / T.RECORD_FILE),
                                    allow_missing=False)


def kill_group(proc: subprocess.Popen) -> None:
    """Stop exactly the group we started (start_new_session=True); SIGCONT first in case it was stopped."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


def row(fault: str, happened: str, before: int | None, after: int | None, recover_s: float | None,
        **extra) -> None:
    ROWS.append({"fault": fault, "what happened": happened, "records before": before, "records after": after,
                 "time to recover s": None if recover_s is None else round(recover_s, 1), **extra})


class Farm:
    """A tracker and N host RPC servers under one key, all on 127.0.0.1, each in its own group."""

    def __init__(self, tmp: Path, n: int, key: str = "faults") -> None:
        self.tmp, self.key = tmp, key
        self.tracker = remote.LocalTracker().start()
        self.servers: list[subprocess.Popen] = []
        self.ports: list[int] = []
        try:
            for _ in range(n):
                self.add_server()
            remote.wait_registered(self.tracker.host, self.tracker.port, key, n, timeout=90)
        except BaseException:
            self.stop()
            raise

    def add_server(self) -> subprocess.Popen:
        port = remote.free_port()
        log = open(self.tmp / f"rpc-{port}.log", "wb")
        proc = subprocess.Popen(
            [PY, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end",
             str(port + 1), "--tracker", self.tracker.address, "--key", self.key],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.servers.append(proc)
        self.ports.append(port)
        return proc

    def registered(self) -> int:
        return remote.boards_under(remote.tracker_summary(self.tracker.host, self.tracker.port, timeout=10), self.key)

    def restart_tracker(self) -> None:
        port = self.tracker.port
        self.tracker.stop()
        time.sleep(1.0)
        self.tracker = remote.LocalTracker(port=port).start()

    def runner(self, timeout: int) -> T.RunnerSpec:
        return T.RunnerSpec.rpc(self.tracker.host, self.tracker.port, self.key, session_timeout_sec=timeout,
                                number=1, repeat=1, min_repeat_ms=0)

    def stop(self) -> None:
        for p in self.servers:
            kill_group(p)
        self.servers = []
        self.tracker.stop()


class Injector(threading.Thread):
    """Waits until the record file has ``n`` lines, snapshots it, runs ``fault()``; then notes when
    the first valid record after the fault lands (recovery). At ``deadline`` it sends SIGINT to
    this process, which tune() turns into a clean ``interrupted`` report: a hang fails the test
    instead of blocking it."""

    def __init__(self, path: Path, n: int, fault: Callable[[], None], deadline_s: float) -> None:
        super().__init__(daemon=True)
        self.path, self.n, self.fault = path, n, fault
        self.deadline = time.monotonic() + deadline_s
        self.prefix: bytes | None = None
        self.t_fault: float | None = None
        self.t_recovered: float | None = None
        self.fired_watchdog = False
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                if time.monotonic() > self.deadline:
                    self.fired_watchdog = True
                    os.kill(os.getpid(), signal.SIGINT)  # tune() stops after the batch in flight...
                    if not self.done.wait(30):
                        os.kill(os.getpid(), signal.SIGINT)  # ...or, hung in it, at a second one
                    return
                data = self.path.read_bytes() if self.path.exists() else b""
                lines = data.split(b"\n")[:-1]
                if self.prefix is None and len(lines) >= self.n:
                    self.prefix = data[: data.rfind(b"\n") + 1]
                    self.n_before = len(lines)
                    self.t_fault = time.monotonic()
                    self.fault()
                elif self.prefix is not None and self.t_recovered is None:
                    if any(not is_failed(ln) for ln in lines[self.n_before:]):
                        self.t_recovered = time.monotonic()
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=10)
        if self.error:
            raise self.error

    @property
    def recover_s(self) -> float | None:
        return None if self.t_recovered is None else self.t_recovered - self.t_fault


def proc_listen(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(name) as f:
            for line in list(f)[1:]:
                parts = line.split()
                addr, p = parts[1].split(":")
                if parts[3] == "0A" and int(p, 16) == port:
                    found.append(addr)
    return found


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def small_tuning():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "SEARCH_KWARGS", SMALL_SEARCH)
        mp.setattr(search, "TRIALS_PER_ITER", 2)
        yield
    TABLE_PATH.write_text(json.dumps(ROWS, indent=2) + "\n")
    print("\n[faults table]")
    for r in ROWS:
        print(f"  {r['fault']:<34} | {r['what happened'][:90]:<90} | {r['records before']} -> "
              f"{r['records after']} | recover {r['time to recover s']} s")


@pytest.fixture(scope="module")
def conv():
    return one_conv()


def tune_with(conv, records: Path, trials: int, runner: T.RunnerSpec | None = None, seed: int = 0) -> T.TuneReport:
    mod, params = conv
    target = RPC_TARGET if runner is not None and runner.kind == "rpc" else TARGET
    return T.tune(mod, target, records, trials, params=params, runner=runner, num_builder_workers=1,
                  progress=False, seed=seed)


# --------------------------------------------------------------------------- 1. server killed


def test_server_killed_mid_tuning_run_goes_on(tmp_path, conv):
    farm = Farm(tmp_path, 2)
    records = tmp_path / "records"
    logs = [tmp_path / f"rpc-{p}.log" for p in farm.ports]
    killed: dict[str, object] = {}

    def kill_the_busy_server() -> None:
        # Kill the server that next opens a session, while it measures (each run lasts >= 300 ms).
        seen = [log.read_text().count("connected from") for log in logs]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for i, log in enumerate(logs):
                text = log.read_text()
                if text.count("connected from") > seen[i]:
                    kill_group(farm.servers[i])
                    killed["mid_session"] = text.count("finish serving") < text.count("connected from")
                    killed["server"] = i
                    return
            time.sleep(0.01)

    inj = Injector(records / T.RECORD_FILE, 2, kill_the_busy_server, deadline_s=300)
    try:
        inj.start()
        t0 = time.monotonic()
        spec = T.RunnerSpec.rpc(farm.tracker.host, farm.tracker.port, farm.key, session_timeout_sec=20, number=1,
                                repeat=1, min_repeat_ms=300)
        rep = tune_with(conv, records, 6, spec, seed=1)
        wall = time.monotonic() - t0
        inj.finish()
        if inj.fired_watchdog or rep.interrupted:
            row("RPC server SIGKILLed mid-tuning", f"HUNG: killed {killed}; run not done after "
                f"{time.monotonic() - t0:.0f} s; stopped by the test's watchdog", inj.n_before,
                len(lines_of(records / T.RECORD_FILE)), None)
        assert not inj.fired_watchdog and not rep.interrupted, "tuning hung after the server was killed"
        assert inj.prefix is not None, "the fault was never injected"
        data = (records / T.RECORD_FILE).read_bytes()
        assert data.startswith(inj.prefix), "a record measured before the kill was lost or changed"
        lines = lines_of(records / T.RECORD_FILE)
        assert len(lines) == rep.trials_in_db_after == 6 and rep.trials_run == 6
        failed = [ln for ln in lines if is_failed(ln)]
        errors = sum(t.run_errors + t.build_errors for t in rep.tasks)
        assert len(failed) == errors, (len(failed), errors)  # every failed trial is stored as failed (1e10)
        # The kill is the infrastructure's fault: the candidate it cut short is measured again on the
        # other server, never recorded failed.
        assert not failed, f"{len(failed)} record(s) failed by a killed server"
        assert "server" in killed, "no session started after the first records"
        after_kill = lines[inj.n_before:]
        assert any(not is_failed(ln) for ln in after_kill), "nothing was measured on the remaining server"
        assert rep.tasks[0].best_us is not None and rep.tasks[0].best_us < 1e9  # a failure never looks fast
        assert len(stock_db(records)) == 6
        assert farm.registered() == 1
        ARTIFACTS["rpc_records"] = records
        retried = (records / T.LOG_FILE).read_text(errors="replace").count("infrastructure failure, measuring")
        row("RPC server SIGKILLed mid-tuning", f"killed {'mid-measurement' if killed['mid_session'] else 'between sessions'}; "
            f"{retried} candidate(s) measured again on the other server, none recorded failed; {wall:.0f} s total",
            inj.n_before, len(lines), inj.recover_s)
    finally:
        inj.done.set()
        farm.stop()


# --------------------------------------------------------------------------- 2. tuner SIGKILLed


TUNER = """
import json, sys
sys.path.insert(0, {tests!r})
from mnv2_tvm import tuning as T
from mnv2_tvm.tuning import search
import test_faults as F
search.SEARCH_KWARGS = F.SMALL_SEARCH
search.TRIALS_PER_ITER = 2
mod, params = F.one_conv()
spec = T.RunnerSpec.rpc("127.0.0.1", int(sys.argv[3]), sys.argv[4], session_timeout_sec=20, number=1, repeat=1,
                        min_repeat_ms=0)
rep = T.tune(mod, F.RPC_TARGET, sys.argv[1], int(sys.argv[2]), params=params, runner=spec, num_builder_workers=1,
             progress=False, seed=3)
print("REPORT", rep.trials_in_db_after, flush=True)
"""


def test_tuner_sigkilled_over_rpc_resumes_without_remeasuring(tmp_path, conv):
    # test_tune.py covers SIGKILL with the local runner; this is the RPC runner (its pool workers
    # hold sessions with the server when the whole group dies).
    farm = Farm(tmp_path, 1)
    records = tmp_path / "records"
    script = tmp_path / "tuner.py"
    script.write_text(TUNER.format(tests=str(Path(__file__).parent)))
    out = open(tmp_path / "tuner.out", "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([PY, str(script), str(records), "6", str(farm.tracker.port), farm.key], cwd=REPO,
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    try:
        path = records / T.RECORD_FILE
        deadline = time.monotonic() + 240
        while len(lines_of(path)) < 2:
            assert proc.poll() is None, (tmp_path / "tuner.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "the tuner measured nothing"
            time.sleep(0.1)
        kill_group(proc)
        t_kill = time.monotonic()
        before_bytes = path.read_bytes()
        n = before_bytes.count(b"\n")
        assert 2 <= n < 6
        # a kill between write() and the newline would leave a torn tail: it is cut on reopen
        whole = before_bytes[: before_bytes.rfind(b"\n") + 1]
        assert len(stock_db(records)) == n
        # the server is free again once its session socket closed
        remote.wait_registered(farm.tracker.host, farm.tracker.port, farm.key, 1, timeout=60)
        inj = Injector(path, 10 ** 9, lambda: None, deadline_s=300)  # watchdog only
        inj.start()
        rep = tune_with(conv, records, 6, farm.runner(timeout=20), seed=4)
        inj.finish()
        assert not rep.interrupted and not inj.fired_watchdog
        assert rep.trials_in_db_before == n and rep.trials_run == 6 - n and rep.trials_in_db_after == 6
        assert path.read_bytes().startswith(whole)
        assert len(stock_db(records)) == 6
        row("tuning process SIGKILLed (RPC runner)", f"records on disk and stock-readable; rerun measured only "
            f"the {6 - n} missing trials", n, rep.trials_in_db_after, (rep.first_trial_s or 0) + (time.monotonic() - t_kill
            - rep.wall_time_s), note="recover = time from kill to the rerun's first measured batch")
    finally:
        kill_group(proc)
        farm.stop()


# --------------------------------------------------------------------------- 3. board hangs


def test_hung_server_times_out_within_bound(tmp_path, conv):
    farm = Farm(tmp_path, 2)
    records = tmp_path / "records"
    hung = farm.servers[1]
    log = tmp_path / f"rpc-{farm.ports[1]}.log"
    timeout = 8

    def stop_it_while_free() -> None:
        # Stopped between sessions, once it has offered itself to the tracker again: the tracker then
        # hands it out (stopped just after answering, it would never be handed out at all).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log.read_text()
            if text.count("connected from") == text.count("finish serving"):
                time.sleep(0.3)
                if log.read_text().count("connected from") == text.count("connected from"):
                    break
            time.sleep(0.02)
        os.killpg(hung.pid, signal.SIGSTOP)

    inj = Injector(records / T.RECORD_FILE, 2, stop_it_while_free, deadline_s=150)
    try:
        inj.start()
        t0 = time.monotonic()
        rep = tune_with(conv, records, 6, farm.runner(timeout=timeout), seed=2)
        inj.finish()
        if inj.fired_watchdog or rep.interrupted:
            row("RPC server hangs (SIGSTOP group)", f"HUNG: run not done {time.monotonic() - t0:.0f} s after start "
                f"(session_timeout_sec={timeout}); stopped by the test's watchdog (SIGINT)", inj.n_before,
                len(lines_of(records / T.RECORD_FILE)), None)
        assert not inj.fired_watchdog and not rep.interrupted
        assert inj.prefix is not None and (records / T.RECORD_FILE).read_bytes().startswith(inj.prefix)
        lines = lines_of(records / T.RECORD_FILE)
        assert len(lines) == 6 and rep.trials_run == 6
        failed = [ln for ln in lines if is_failed(ln)]
        errors = sum(t.run_errors + t.build_errors for t in rep.tasks)
        assert len(failed) == errors
        log = (records / T.LOG_FILE).read_text(errors="replace")
        timeouts = len(re.findall(r"gave no result within \d+ s \(session_timeout_sec " + str(timeout), log))
        # The stopped server is handed out at most once (it never re-registers): one bounded timeout,
        # and its candidate is measured again on the other server, not recorded failed.
        assert 1 <= timeouts <= 2, timeouts
        assert not failed, f"{len(failed)} record(s) failed by a hung server"
        assert any(not is_failed(ln) for ln in lines[inj.n_before:])
        assert inj.recover_s is not None and inj.recover_s < timeout + 60
        row("RPC server hangs (SIGSTOP group)", f"{timeouts} measurement(s) gave no answer within the session timeout "
            f"({timeout} s) + 10 s: measured again on the other server, none recorded failed", inj.n_before,
            len(lines), inj.recover_s)
    finally:
        inj.done.set()
        farm.stop()  # SIGCONT, then SIGKILL, by group


# --------------------------------------------------------------------------- 3b. candidate crashes the server


def crash_lib(path: Path) -> Path:
    """Host functions that kill (SIGSEGV) or hang (sleep an hour) whichever process runs them."""
    from tvm.script import tirx as Tx

    @Tx.prim_func
    def segv():
        Tx.evaluate(Tx.call_extern("int32", "raise", 11))

    @Tx.prim_func
    def spin():
        Tx.evaluate(Tx.call_extern("int32", "sleep", 3600))

    mod = tvm.IRModule({"segv": segv.with_attr("global_symbol", "segv"),
                        "spin": spin.with_attr("global_symbol", "spin")})
    tvm.compile(mod, target="llvm").export_library(str(path))
    return path


def evaluator_that_misbehaves(counter: str, lib: str, plan: dict[int, str], session, rt_mod, device, config,
                              args) -> list[float]:
    """MetaSchedule's evaluator, except that the candidates numbered in ``plan`` run a function of
    ``lib`` in the server's session process first (as a schedule that segfaults or never ends would)."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_run_evaluator

    with open(counter, "a+") as f:
        f.write("x")
        f.seek(0)
        n = len(f.read())
    if n in plan:
        session.upload(lib, "misbehave.so")
        session.load_module("misbehave.so")[plan[n]]()
    return default_run_evaluator(session, rt_mod, device, config, args)


def test_candidate_that_crashes_or_hangs_the_server_is_isolated(tmp_path, conv):
    """A segfaulting candidate looks, from the client, like a server killed under it: it is measured
    again once, and the second crash makes it the candidate's failure (one record). A candidate
    that never returns is ended by the server's own session timeout: the candidate's, at once."""
    import functools

    import cloudpickle

    farm = Farm(tmp_path, 3)
    records = tmp_path / "records"
    logs = [tmp_path / f"rpc-{p}.log" for p in farm.ports]
    timeout = 6
    # Evaluator calls 3 and 4 are one candidate (measured again after its first crash); 5 the next one.
    plan = {3: "segv", 4: "segv", 5: "spin"}
    evaluator = functools.partial(evaluator_that_misbehaves, str(tmp_path / "counter"),
                                  str(crash_lib(tmp_path / "misbehave.so")), plan)
    # The runner's worker cannot import this test module: send the evaluator by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inj = Injector(records / T.RECORD_FILE, 10 ** 9, lambda: None, deadline_s=300)  # watchdog only
    try:
        inj.start()
        t0 = time.monotonic()
        spec = T.RunnerSpec.rpc(farm.tracker.host, farm.tracker.port, farm.key, session_timeout_sec=timeout,
                                number=1, repeat=1, min_repeat_ms=0, f_run_evaluator=evaluator)
        rep = tune_with(conv, records, 6, spec, seed=9)
        wall = time.monotonic() - t0
        inj.finish()
        assert not inj.fired_watchdog and not rep.interrupted
        lines = lines_of(records / T.RECORD_FILE)
        assert len(lines) == 6 and rep.trials_run == 6
        # Every candidate went to a board once, the crashing one twice; then, if the best schedule has
        # a loop to reorder, a warm-up and the best schedule in both loop orders (row_order.json).
        order = json.loads((records / ROW_ORDER_FILE).read_text())
        timed = sum("as_tuned_us" in v for v in order.values())
        assert (tmp_path / "counter").read_text() == "x" * (7 + (1 + 2 * timed if timed else 0)), order
        failed = [i for i, ln in enumerate(lines) if is_failed(ln)]
        assert len(failed) == 2 == rep.tasks[0].run_errors, (failed, rep.tasks[0].run_errors)
        assert rep.tasks[0].best_us is not None and rep.tasks[0].best_us < 1e9
        log = (records / T.LOG_FILE).read_text(errors="replace")
        assert "RPCSessionTimeoutError" in log  # the hanging one: ended by the server's own session timeout
        assert log.count("the session was lost while this candidate ran, 2 times") == 1, log[-3000:]
        texts = [log.read_text(errors="replace") for log in logs]
        # A session child that dies by a signal ends TVM's server loop (RuntimeError in _listen_loop):
        # that server never registers again, so the tracker skips it; the hung session is ended by the
        # last server's own session timeout, and that server goes on serving.
        crashed = [i for i, t in enumerate(texts) if "exited unsuccessfully with error code -11" in t]
        assert len(crashed) == 2, [t[-600:] for t in texts]
        survivor = ({0, 1, 2} - set(crashed)).pop()
        assert "timeout in RPC session" in texts[survivor]
        assert farm.registered() == 1 and farm.servers[survivor].poll() is None
        assert texts[survivor].count("connected from") >= 2  # it measured after the hang as well
        ARTIFACTS.setdefault("rpc_records", records)
        row("candidate crashes / hangs the server", "a candidate raised SIGSEGV in its session process: taken as "
            "the server lost, measured again on another server, crashed it too: recorded failed (two crashes are "
            "the candidate's); each crashed server's loop ended (TVM) and the tracker skipped it; the next "
            f"candidate slept: the third server ended the session after {timeout} s, recorded failed, that server "
            f"kept serving; {wall:.0f} s total", None, len(lines), None, failed_lines=failed)
    finally:
        inj.done.set()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        farm.stop()


# --------------------------------------------------------------------------- 4. tracker restarts


def test_tracker_restart_mid_run_recovers_without_hanging(tmp_path, conv):
    farm = Farm(tmp_path, 1)
    records = tmp_path / "records"
    inj = Injector(records / T.RECORD_FILE, 2, farm.restart_tracker, deadline_s=300)
    try:
        inj.start()
        t0 = time.monotonic()
        rep = tune_with(conv, records, 6, farm.runner(timeout=15), seed=5)
        wall = time.monotonic() - t0
        inj.finish()
        assert not inj.fired_watchdog and not rep.interrupted, "tuning hung after the tracker restarted"
        assert inj.prefix is not None and (records / T.RECORD_FILE).read_bytes().startswith(inj.prefix)
        lines = lines_of(records / T.RECORD_FILE)
        assert len(lines) == 6
        failed = [ln for ln in lines if is_failed(ln)]
        assert len(failed) == sum(t.run_errors + t.build_errors for t in rep.tasks)
        assert not failed, "a tracker restart failed a record: candidates wait for it instead"
        recovered = any(not is_failed(ln) for ln in lines[inj.n_before:])
        # the server re-registers with the new tracker by itself (TVM retries every few seconds)
        remote.wait_registered(farm.tracker.host, farm.tracker.port, farm.key, 1, timeout=60)
        row("RPC tracker restarted mid-run", ("server re-registered, tuning resumed" if recovered else
            "nothing measured after the restart") + f"; {len(failed)} failed; {wall:.0f} s total",
            inj.n_before, len(lines), inj.recover_s)
        assert recovered, "no trial succeeded after the tracker came back"
    finally:
        inj.done.set()
        farm.stop()


# --------------------------------------------------------------------------- 4b. no board any more


def test_no_board_within_the_board_wait_stops_cleanly(tmp_path, conv):
    """The only server is killed for good: what it had in flight and what comes after is no record;
    once no board has answered for the board wait the run stops as at a first Ctrl-C, saying why,
    with everything measured kept."""
    import dataclasses

    farm = Farm(tmp_path, 1)
    records = tmp_path / "records"
    wait = 8
    inj = Injector(records / T.RECORD_FILE, 2, lambda: kill_group(farm.servers[0]), deadline_s=240)
    try:
        inj.start()
        spec = dataclasses.replace(farm.runner(timeout=15), board_wait_sec=wait)
        rep = tune_with(conv, records, 6, spec, seed=6)
        stopped_after = time.monotonic() - (inj.t_fault or 0)
        inj.finish()
        assert not inj.fired_watchdog and inj.prefix is not None
        assert rep.interrupted and rep.stop_reason and "no board answered" in rep.stop_reason, rep.message
        assert (records / T.RECORD_FILE).read_bytes().startswith(inj.prefix)
        lines = lines_of(records / T.RECORD_FILE)
        assert len(lines) == rep.trials_in_db_after < 6 and len(stock_db(records)) == len(lines)
        assert not [ln for ln in lines if is_failed(ln)], "a dead board failed a record"
        # The wait, and at most one candidate's measurement and one batch's build before it.
        assert stopped_after < wait + 45, stopped_after
        row("the only RPC server killed for good", f"no record failed; the run stopped {stopped_after:.0f} s after "
            f"the kill (board wait {wait} s) with the reason, {len(lines)} records kept", inj.n_before, len(lines),
            None)
    finally:
        inj.done.set()
        farm.stop()


# --------------------------------------------------------------------------- 5. disk full, read-only


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); disk-full needs root")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> Path:
    """Write until ENOSPC; return the filler file."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    return filler


def test_disk_full_stops_with_clear_error_and_keeps_records(tmp_path, conv):
    from mnv2_tvm import bundle

    with tmpfs(tmp_path / "small", "2m") as mnt:
        records = mnt / "records"
        inj = Injector(records / T.RECORD_FILE, 2, lambda: fill(mnt), deadline_s=300)
        inj.start()
        t0 = time.monotonic()
        with pytest.raises(T.RecordsError) as err:
            tune_with(conv, records, 4, seed=6)
        stopped = time.monotonic() - t0
        inj.finish()
        msg = str(err.value)
        assert "\n" not in msg and "No space left on device" in msg and str(records) in msg, msg
        assert inj.prefix is not None
        data = (records / T.RECORD_FILE).read_bytes()
        assert data.startswith(inj.prefix) and data.endswith(b"\n"), "a torn line was left behind"
        n_full = data.count(b"\n")
        assert len(stock_db(records)) == n_full
        # atomic writes on a full disk: the old file stays whole, no temporary is left behind
        meta = (records / T.META_FILE).read_bytes()
        with pytest.raises(OSError):
            atomic_write(records / T.META_FILE, b"x" * (1 << 20))
        with pytest.raises(OSError):
            bundle.write_atomic(records / T.META_FILE, b"y" * (1 << 20))
        assert (records / T.META_FILE).read_bytes() == meta
        assert not [p for p in records.iterdir() if p.name.startswith(".meta.json.")]
        # space back: the same call resumes from what was kept
        (mnt / "filler").unlink()
        t1 = time.monotonic()
        rep = tune_with(conv, records, 4, seed=7)
        assert rep.trials_in_db_before == n_full and rep.trials_in_db_after == 4
        assert (records / T.RECORD_FILE).read_bytes().startswith(data)
        row("disk full while tuning (2 MB tmpfs)", f"RecordsError after {stopped:.0f} s: {msg[:80]}...; "
            "rerun after freeing space resumed", inj.n_before, n_full, rep.first_trial_s,
            note=f"records after the rerun: {rep.trials_in_db_after}; rerun {time.monotonic() - t1:.0f} s")

        # read-only records folder (root ignores mode bits: a read-only bind mount)
        ro = mnt / "records"
        snap = {p.name: p.read_bytes() for p in ro.iterdir() if p.is_file()}
        subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            with pytest.raises(T.RecordsError, match="not writable") as err:
                tune_with(conv, ro, 12, seed=8)
            assert "\n" not in str(err.value)
            assert {p.name: p.read_bytes() for p in ro.iterdir() if p.is_file()} == snap
            row("read-only records folder", f"RecordsError at once: {str(err.value)[:80]}", len(snap and
                lines_of(ro / T.RECORD_FILE)), len(lines_of(ro / T.RECORD_FILE)), None)
        finally:
            subprocess.run(["umount", str(ro)], capture_output=True)


# --------------------------------------------------------------------------- 6. bad-input sweep


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, host_bundles):
    root = tmp_path_factory.mktemp("sweep")
    good = host_bundles("mobilenet_v2")
    shutil.copytree(good, root / "good")

    def variant(name: str, edit: Callable[[Path], None]) -> None:
        d = root / name
        shutil.copytree(good, d)
        edit(d)

    variant("no_manifest", lambda d: (d / "manifest.json").unlink())
    variant("garbage_manifest", lambda d: (d / "manifest.json").write_bytes(b"\x00\xff{not json"))
    variant("list_manifest", lambda d: (d / "manifest.json").write_text("[1, 2]"))
    variant("manifest_lacks_fields", lambda d: (d / "manifest.json").write_text('{"model": "mobilenet_v2"}'))

    def truncate_lib(d: Path) -> None:
        lib = d / "model.so"
        lib.write_bytes(lib.read_bytes()[:4096])
    variant("truncated_lib", truncate_lib)

    def arm_lib(d: Path) -> None:
        from mnv2_tvm import bundle
        lib = bytearray((d / "model.so").read_bytes())
        lib[18:20] = (0xB7).to_bytes(2, "little")  # an aarch64 ELF header
        (d / "model.so").write_bytes(bytes(lib))
        m = json.loads((d / "manifest.json").read_text())
        m["library_sha256"] = bundle.sha256(d / "model.so")
        (d / "manifest.json").write_text(json.dumps(m))
    variant("arm_lib", arm_lib)

    def bad_fields(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        m["input"] = "nonsense"
        m["config"] = {"model": "resnet"}
        (d / "manifest.json").write_text(json.dumps(m))
    variant("bad_fields", bad_fields)

    (root / "existing.onnx").write_bytes(b"keep me")
    (root / "junk.pth").write_bytes(b"\x80\x04 not a torch file")
    (root / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "bad_grid.json").write_text("{ this is not json")
    (root / "grid_wrong.json").write_text(json.dumps([{"model": "mobilenet_v2", "width": 4.5}]))
    (root / "bad.toml").write_text("name = [unterminated\n")
    rec = root / "records_bad_meta"
    rec.mkdir()
    (rec / "meta.json").write_text("{oops")
    rec2 = root / "records_bad_lines"
    rec2.mkdir()
    (rec2 / "meta.json").write_text(json.dumps({"format": T.RECORDS_FORMAT, "tvm_version": tvm.__version__,
                                                "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
                                                "target_str": "aarch64"}))
    (rec2 / T.WORKLOAD_FILE).write_text('["not a workload"\n')
    (rec2 / T.RECORD_FILE).write_text("garbage line\n[0,[[\n")
    (root / "empty_known_hosts").write_text("")
    out_bundle = root / "out_bundle"
    shutil.copytree(good, out_bundle)  # a bundle folder a failed compile must not touch
    (root / "compare_out").mkdir()
    (root / "compare_out" / "summary.md").write_text("old report\n")
    return root


def sweep_cases(root: Path, closed: int) -> list[tuple[str, list[str]]]:
    g = str(root / "good")
    model_small = ["mobilenet_v2", "--width", "0.35", "--resolution", "32"]
    ssh = ["--ssh", f"root@127.0.0.1:{closed}", "--known-hosts", str(root / "empty_known_hosts")]
    return [
        # madds
        ("madds no model", ["madds"]),
        ("madds bad width type", ["madds", "mobilenet_v2", "--width", "abc"]),
        ("madds unknown model", ["madds", "resnet"]),
        ("madds bad width", ["madds", "mobilenet_v2", "--width", "0"]),
        ("madds negative res", ["madds", "mobilenet_v2", "--resolution", "-32"]),
        ("madds bad classes", ["madds", "mobilenet_v2", "--num-classes", "0"]),
        # targets
        ("targets extra arg", ["targets", "--bogus"]),
        # export
        ("export no -o", ["export", "mobilenet_v2"]),
        ("export missing weights", ["export", "mobilenet_v2", "--weights", str(root / "nope.pth"), "-o",
                                    str(root / "existing.onnx")]),
        ("export corrupt weights", ["export", "mobilenet_v2", "--weights", str(root / "junk.pth"), "-o",
                                    str(root / "existing.onnx")]),
        ("export unknown model", ["export", "resnet", "-o", str(root / "existing.onnx")]),
        # compile
        ("compile unknown target", ["compile", *model_small, "--target", "nosuchboard", "-o", str(root / "out_bundle")]),
        ("compile broken target toml", ["compile", *model_small, "--target", str(root / "bad.toml"), "-o",
                                        str(root / "out_bundle")]),
        ("compile bad frontend", ["compile", *model_small, "--frontend", "tf"]),
        ("compile corrupt records meta", ["compile", *model_small, "--records", str(root / "records_bad_meta"), "-o",
                                          str(root / "out_bundle")]),
        ("compile records of other target", ["compile", *model_small, "--records", str(root / "records_bad_lines"),
                                             "-o", str(root / "out_bundle")]),
        ("compile output is a file", ["compile", *model_small, "-o", str(root / "existing.onnx")]),
        # run
        ("run missing bundle", ["run", str(root / "missing")]),
        ("run no manifest", ["run", str(root / "no_manifest")]),
        ("run garbage manifest", ["run", str(root / "garbage_manifest")]),
        ("run manifest is a list", ["run", str(root / "list_manifest")]),
        ("run manifest lacks fields", ["run", str(root / "manifest_lacks_fields")]),
        ("run truncated library", ["run", str(root / "truncated_lib")]),
        ("run wrong-arch library", ["run", str(root / "arm_lib")]),
        ("run bad manifest fields", ["run", str(root / "bad_fields")]),
        ("run missing image", ["run", g, "--input", str(root / "missing.png")]),
        ("run corrupt image", ["run", g, "--input", str(root / "junk.png")]),
        ("run bad --top", ["run", g, "--top", "abc"]),
        # tune
        ("tune negative trials", ["tune", *model_small, "--trials", "-5"]),
        ("tune bad tracker", ["tune", *model_small, "--trials", "4", "--rpc-tracker", "nonsense"]),
        ("tune target without a core model or board", ["tune", *model_small, "--trials", "4", "--target", "pixel2"]),
        ("tune corrupt records meta", ["tune", *model_small, "--trials", "4", "--records",
                                       str(root / "records_bad_meta")]),
        ("tune records of other target", ["tune", *model_small, "--trials", "4", "--records",
                                          str(root / "records_bad_lines")]),
        ("tune ssh and tracker", ["tune", *model_small, "--trials", "4", "--target", "rpi4b", *ssh,
                                  "--rpc-tracker", "127.0.0.1:1"]),
        # check-opencl
        ("check-opencl cpu target", ["check-opencl", *model_small, "--target", "x86-64-avx2"]),
        ("check-opencl no target", ["check-opencl", *model_small]),
        # bench
        ("bench nowhere", ["bench", g]),
        ("bench bad --rpc", ["bench", g, "--rpc", "nonsense"]),
        ("bench closed port", ["bench", g, "--rpc", f"127.0.0.1:{closed}"]),
        ("bench corrupt manifest", ["bench", str(root / "garbage_manifest"), "--rpc", f"127.0.0.1:{closed}"]),
        ("bench truncated lib", ["bench", str(root / "truncated_lib"), "--rpc", f"127.0.0.1:{closed}"]),
        ("bench unknown source", ["bench", "resnet", "--rpc", f"127.0.0.1:{closed}"]),
        ("bench repeat 0", ["bench", g, "--rpc", f"127.0.0.1:{closed}", "--repeat", "0"]),
        ("bench tracker w/o key", ["bench", str(root / "bad_fields"), "--rpc-tracker", f"127.0.0.1:{closed}"]),
        # board
        ("board no action", ["board"]),
        ("board status no --ssh", ["board", "status"]),
        ("board bad --ssh", ["board", "status", "--ssh", "nobody"]),
        ("board ssh port refused", ["board", "status", *ssh]),
        ("board run missing bundle", ["board", "run", str(root / "missing"), *ssh]),
        ("board tunnel tracker w/o key", ["board", "tunnel", *ssh, "--rpc-tracker", "127.0.0.1:1"]),
        # prune
        ("prune top-k 0", ["prune", "--records", str(root / "records_bad_lines"), "--top-k", "0"]),
        ("prune corrupt meta", ["prune", "--records", str(root / "records_bad_meta")]),
        ("prune missing dir", ["prune", "--records", str(root / "missing_records")]),
        # compare
        ("compare negative budget", ["compare", "--tune-trials", "-1", "-o", str(root / "compare_out")]),
        ("compare zero passes", ["compare", "--passes", "0", "-o", str(root / "compare_out")]),
        ("compare missing grid", ["compare", "--grid", str(root / "nogrid.json"), "-o", str(root / "compare_out")]),
        ("compare corrupt grid", ["compare", "--grid", str(root / "bad_grid.json"), "-o", str(root / "compare_out")]),
        ("compare invalid grid config", ["compare", "--grid", str(root / "grid_wrong.json"), "-o",
                                         str(root / "compare_out")]),
        ("compare unknown target", ["compare", "--target", "nosuchboard", "-o", str(root / "compare_out")]),
        ("compare board without a core model", ["compare", "--target", "rk3399-mali", "-o", str(root / "compare_out")]),
    ]


def test_bad_input_sweep_every_command(sweep_dir, monkeypatch, capsys):
    """Every subcommand: exit 2, one line (argparse: usage + one error line), no traceback, nothing
    existing touched. Run in-process (one import of torch/TVM) with the cwd in the sweep folder."""
    from mnv2_tvm.cli import build_parser, main

    monkeypatch.chdir(sweep_dir)
    closed = remote.free_port()
    cases = sweep_cases(sweep_dir, closed)
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert commands <= {c[1][0] for c in cases}, commands - {c[1][0] for c in cases}
    problems = []
    t0 = time.monotonic()
    for name, argv in cases:
        before = tree_state(sweep_dir)
        old_term = signal.getsignal(signal.SIGTERM)
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - an escaped exception is a traceback for a user
            rc = f"raised {type(e).__name__}: {str(e)[:200]}"
        finally:
            signal.signal(signal.SIGTERM, old_term)
        cap = capsys.readouterr()
        err = [ln for ln in cap.err.splitlines() if ln.strip()]
        usage = bool(err) and err[0].startswith("usage:")
        errors = [ln for ln in err if "error:" in ln]
        bad = []
        if rc != 2:
            bad.append(f"exit {rc}")
        if "Traceback" in cap.err or "Traceback" in cap.out:
            bad.append("traceback")
        if usage:
            if len(errors) != 1 or not err[-1].startswith("mnv2-tvm") or ": error:" not in err[-1]:
                bad.append(f"usage without one error line: {err[-2:]}")
        elif len(err) != 1 or not err[0].startswith("mnv2-tvm: error:"):
            bad.append(f"stderr is not one error line: {err[:4]}")
        after = tree_state(sweep_dir)
        touched = [k for k in before if after.get(k) != before[k]]
        created = [k for k in after if k not in before]
        if touched or created:
            bad.append(f"touched {touched[:3]} created {created[:3]}")
        if bad:
            problems.append(f"{name}: {'; '.join(bad)} | stderr: {' / '.join(err)[:300]}")
    row("bad-input sweep (CLI)", f"{len(cases)} cases over {len(commands)} commands; {len(problems)} problem(s)",
        None, None, None, seconds=round(time.monotonic() - t0, 1))
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- 7. safe defaults


def test_servers_bind_to_loopback_and_no_bind_option(tmp_path):
    from mnv2_tvm.cli import build_parser

    # the tracker mnv2-tvm starts (tune --ssh) and the host servers of these tests
    with remote.LocalTracker() as tr:
        addrs = proc_listen(tr.port)
        assert addrs and all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), addrs
    # the server `board start` launches on a board: --host 127.0.0.1 in its command line
    import inspect

    from mnv2_tvm import board
    src = inspect.getsource(board.start_server)
    assert '"--host", "127.0.0.1"' in src
    # No CLI option binds anything to another interface; reaching a server on the network warns
    # (test_cli_warns_once_when_the_rpc_server_is_on_the_network).
    parser = build_parser()
    opts = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for a in p._actions:  # noqa: SLF001
            opts.update(a.option_strings)
            if isinstance(a, type(parser._subparsers._group_actions[0])):  # noqa: SLF001
                stack.extend(a.choices.values())
    assert not opts & {"--host", "--bind", "--listen", "--address"}, opts
    row("safe defaults: bind address", "tracker listens on 127.0.0.1 only; board servers get --host 127.0.0.1; "
        "no CLI option binds elsewhere", None, None, None)


def test_cli_warns_once_when_the_rpc_server_is_on_the_network(host_bundles, capsys):
    """`bench --rpc` / `--rpc-tracker` at a non-loopback address (no tunnel): one warning line, then
    the command goes on (here: to a closed port, so a one-line error)."""
    from mnv2_tvm.cli import main

    bundle = str(host_bundles("mobilenet_v2"))
    closed = remote.free_port()
    seen = {}
    for name, argv in (("network --rpc", ["--rpc", f"0.0.0.0:{closed}"]),
                       ("network --rpc-tracker", ["--rpc-tracker", f"0.0.0.0:{closed}", "--rpc-key", "k"]),
                       ("loopback --rpc", ["--rpc", f"127.0.0.1:{closed}"])):
        assert main(["bench", bundle, *argv]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        warnings_ = [ln for ln in err if ln.startswith("mnv2-tvm: warning:")]
        assert "Traceback" not in "\n".join(err) and err[-1].startswith("mnv2-tvm: error:"), err
        seen[name] = len(warnings_)
        if name.startswith("network"):
            assert len(err) == 2 and len(warnings_) == 1 and "unauthenticated" in warnings_[0], err
        else:
            assert len(err) == 1, err
    row("safe defaults: network RPC warning", f"one warning line per network RPC address, none for loopback: {seen}",
        None, None, None)


def test_no_secrets_in_written_files(tmp_path, host_bundles):
    patterns = [rb"PRIVATE KEY", rb"(?i)password\s*[=:]", rb"(?i)passphrase", rb"ssh-(rsa|ed25519) AAAA"]
    secrets = []
    for key in list(Path.home().glob(".ssh/id_*")) + list(Path.home().glob(".cache/mnv2-tvm/virtual-board/keys/*")):
        if key.is_file() and not key.name.endswith(".pub"):
            body = b"".join(key.read_bytes().splitlines()[1:3])
            if body:
                secrets.append(body[:40])
    files = [p for p in host_bundles("mobilenet_v2").iterdir() if p.suffix in (".json", ".py")]
    if "rpc_records" in ARTIFACTS:
        files += [p for p in ARTIFACTS["rpc_records"].iterdir() if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        for pat in patterns:
            if p.suffix == ".py":
                continue  # runner.py is code (it may mention the word)
            assert not re.search(pat, data), f"{p}: matches {pat!r}"
        for s in secrets:
            assert s not in data, f"{p} contains private key material"
    manifest = json.loads((host_bundles("mobilenet_v2") / "manifest.json").read_text())
    assert not {"identity", "key_path", "password", "known_hosts"} & set(manifest)
    row("safe defaults: secrets", f"no key material/password in {len(files)} manifest/meta/log files", None, None, None)


# --------------------------------------------------------------------------- SSH tunnel drops mid-benchmark


class Relay:
    """A TCP relay 127.0.0.1:``port`` → ``dest`` in threads of this process, standing for the
    network between this host and the board's sshd.

    ``blackhole()`` silently stops the open connections: bytes are read and dropped both ways and
    nothing is closed, as when a NAT forgets the mapping or a cable is pulled (no FIN, no RST:
    TCP itself never notices). New connections still go through. ``drop()`` closes the open
    connections and stops listening (new ones are refused); ``listen()`` opens the port again.
    """

    def __init__(self, dest: tuple[str, int]) -> None:
        self.dest = dest
        self.port = remote.free_port()
        self.links: list[dict] = []
        self.lock = threading.Lock()
        self.srv: socket.socket | None = None
        self.listen()

    def listen(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self.srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                down, _ = srv.accept()
            except OSError:  # closed by drop()/stop()
                return
            up = socket.create_connection(self.dest)
            link = {"socks": (down, up), "silent": False, "closed": False}
            with self.lock:
                self.links.append(link)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(link, a, b), daemon=True).start()

    def _pump(self, link: dict, a: socket.socket, b: socket.socket) -> None:
        a.settimeout(0.5)
        while not link["closed"]:
            try:
                data = a.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if link["silent"]:
                continue  # swallowed: the sender's TCP sees its bytes acknowledged, nothing more
            try:
                b.sendall(data)
            except OSError:
                break
        self._close(link)

    def _close(self, link: dict) -> None:
        link["closed"] = True
        for s in link["socks"]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def blackhole(self) -> int:
        with self.lock:
            live = [ln for ln in self.links if not ln["closed"]]
        for ln in live:
            ln["silent"] = True
        return len(live)

    def drop(self) -> int:
        if self.srv is not None:
            # shutdown, not only close: a close does not wake the thread blocked in accept(),
            # and the port would go on accepting.
            with contextlib.suppress(OSError):
                self.srv.shutdown(socket.SHUT_RDWR)
            self.srv.close()
            self.srv = None
        with self.lock:
            live = [ln for ln in self.links if not ln["closed"]]
        for ln in live:
            self._close(ln)
        return len(live)

    def stop(self) -> None:
        self.drop()




@pytest.fixture(scope="module")
def tunnel_board(virtual_board):
    b = virtual_board()
    yield b
    virtual_board.stop(b)


@pytest.fixture(scope="module")
def rpi_mobilenet(tmp_path_factory, virtual_board_setup) -> Path:
    """A small MobileNetV2 cross-compiled (untuned) for the Raspberry Pi 4 target."""
    from conftest import SMALL
    from mnv2_tvm import targets
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.models import ModelConfig

    root = tmp_path_factory.mktemp("rpi4b-faults")
    compile_bundle(ModelConfig(**SMALL["mobilenet_v2"]), targets.load("rpi4b"), root / "mnv2",
                   records_dir=root / "no-records")
    return root / "mnv2"


KEEPALIVE_S = 6.0  # --ssh-keepalive of the runs below: a silent link is given up after this long
CLEANUP_S = 60.0  # reconnect + stop the server group + rm under qemu, on a loaded 2-core machine


def bench_through_relay(board, bundle_dir: Path, tmp: Path, fault: Callable[[Relay], int],
                        extra: list[str]) -> dict:
    """`mnv2-tvm bench BUNDLE --ssh` (a subprocess, own group) to the board through a Relay;
    ``fault(relay)`` strikes ~3 s after the board's server loaded the library, i.e. during the
    parity run or the timing loop (600 runs, about a minute under qemu)."""
    relay = Relay((board.host, board.ssh_port))
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(Path(board.known_hosts).read_text().replace(f"]:{board.ssh_port} ", f"]:{relay.port} "))
    ssh = [f"{board.user}@127.0.0.1:{relay.port}", "-i", str(board.key_path), "--known-hosts", str(known_hosts)]
    proc = subprocess.Popen([PY, "-m", "mnv2_tvm.cli", "bench", str(bundle_dir), "--ssh", *ssh,
                             "--number", "20", "--repeat", "30", *extra],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    base = Path(board.root) / "root/.cache/mnv2-tvm"
    out: dict = {"relay": relay, "ssh": ssh, "pid": proc.pid}
    try:
        deadline = time.monotonic() + 300
        while "t_fault" not in out and time.monotonic() < deadline and proc.poll() is None:
            for state in base.glob(f"rpc-session-*-{proc.pid}-*/state.json"):
                log = state.parent / "rpc.log"
                if log.exists() and "load_module" in log.read_text():
                    time.sleep(3)
                    out["name"] = json.loads(state.read_text())["name"]
                    out["links"] = fault(relay)
                    out["t_fault"] = time.monotonic()
                    break
            time.sleep(0.2)
        assert "t_fault" in out, f"the benchmark never reached the board's server: {proc.communicate(timeout=60)}"
        try:
            out["stdout"], out["stderr"] = proc.communicate(timeout=KEEPALIVE_S + CLEANUP_S + 60)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            pytest.fail("bench hung after the SSH link dropped")
        out["rc"], out["elapsed"] = proc.returncode, time.monotonic() - out["t_fault"]
        return out
    finally:
        if proc.poll() is None:
            kill_group(proc)


def one_clean_error(out: dict) -> str:
    lines = [ln for ln in out["stderr"].splitlines() if ln.strip()]
    assert out["rc"] == 2 and len(lines) == 1 and lines[0].startswith("mnv2-tvm: error: "), out["stderr"]
    assert "Traceback" not in out["stderr"] and not out["stdout"].strip()
    return lines[0]


def test_ssh_tunnel_goes_silent_mid_benchmark(tunnel_board, rpi_mobilenet, tmp_path):
    """The link to the board black-holes mid-benchmark (no FIN/RST): the keepalive gives it up within
    its bound, bench ends with one line saying so, and the server it started is stopped over a
    new connection (the board is reachable again)."""
    out = bench_through_relay(tunnel_board, rpi_mobilenet, tmp_path, Relay.blackhole,
                              ["--ssh-keepalive", str(KEEPALIVE_S)])
    try:
        line = one_clean_error(out)
        assert "went silent" in line and f"{KEEPALIVE_S:.0f} s" in line, line
        assert "stopped the RPC server started there over a new connection" in line, line
        assert out["elapsed"] < KEEPALIVE_S + CLEANUP_S, out["elapsed"]
        assert left_on(tunnel_board.root, out["pid"]) == []
    finally:
        out["relay"].stop()
    row("SSH tunnel silently black-holed mid-benchmark (bench --ssh, --ssh-keepalive 6)",
        f"{out['links']} SSH connections stopped forwarding without closing; the keepalive gave the link up, "
        f"exit 2 with one line ({line[len('mnv2-tvm: error: '):][:90]}...); the board's RPC server was stopped over "
        f"a fresh connection, nothing left on the board; {out['elapsed']:.1f} s from fault to exit",
        None, None, out["elapsed"])


def test_ssh_tunnel_hard_drop_mid_benchmark(tunnel_board, rpi_mobilenet, tmp_path):
    """Both sides of every SSH connection are closed mid-benchmark and the board stays unreachable:
    one line at once, naming the server that may still run and the command that stops it, which
    works once the board is back."""
    from mnv2_tvm.cli import main

    out = bench_through_relay(tunnel_board, rpi_mobilenet, tmp_path, Relay.drop, [])
    relay = out["relay"]
    try:
        line = one_clean_error(out)
        assert "was closed by the board or the network" in line and "may still run" in line, line
        assert f"--name {out['name']}`" in line, line
        assert out["elapsed"] < CLEANUP_S, out["elapsed"]
        assert left_on(tunnel_board.root, out["pid"]), "expected the unreachable board to keep its server"
        relay.listen()  # the board is back
        t0 = time.monotonic()
        assert main(["board", "stop", "--ssh", *out["ssh"], "--name", out["name"]]) == 0
        stop_s = time.monotonic() - t0
        assert left_on(tunnel_board.root, out["pid"]) == []
    finally:
        relay.stop()
        for path in (Path(tunnel_board.root) / "root/.cache/mnv2-tvm").glob(f"rpc-*-{out['pid']}-*/state.json"):
            with contextlib.suppress(Exception):  # never leave a server behind, even when an assert failed
                main(["board", "stop", "--ssh", f"{tunnel_board.user}@{tunnel_board.host}:{tunnel_board.ssh_port}",
                      "-i", str(tunnel_board.key_path), "--known-hosts", str(tunnel_board.known_hosts),
                      "--name", json.loads(path.read_text())["name"]])
    row("SSH tunnel hard-dropped mid-benchmark (both sides closed, board unreachable)",
        f"{out['links']} SSH connections closed; exit 2 with one line after {out['elapsed']:.1f} s naming the server "
        f"left on the board and `board stop --name ...`; that command stopped it in {stop_s:.1f} s once the board "
        "was reachable again", None, None, out["elapsed"] + stop_s)
