"""Where tuning measures candidates: the back-ends behind MetaSchedule's ``Runner``.

Tuning asks a back-end for three things (:class:`MeasureBackend`): which artifact the builder
makes (``so``, linked here, or ``tar``, linked where it runs), whether candidates run on this
machine (then its core count sizes their parallel loops), and a MetaSchedule ``Runner`` that
times them. :class:`RunnerSpec` describes the two back-ends there are: ``local`` (MetaSchedule's
``LocalRunner``) and ``rpc``, boards behind an RPC tracker measured by a runner with a deadline
on every candidate (a hung or vanished board is a failed candidate, never a hung run). Another
way of measuring is another class with these three members, passed as ``tune(runner=...)``.
"""

from __future__ import annotations

import concurrent.futures

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .. import tvm_compat
from ..errors import UserError
from ..remote import RUNNER_MARGIN_S, one_line, request_board

if TYPE_CHECKING:
    from tvm.s_tir import meta_schedule as ms


@runtime_checkable
class MeasureBackend(Protocol):
    """What :func:`~mnv2_tvm.tuning.tune` needs of a way to measure candidates."""

    @property
    def artifact_format(self) -> str:
        """What the builder exports per candidate: ``so`` (a shared library) or ``tar`` (objects)."""
        ...

    @property
    def on_this_machine(self) -> bool:
        """Whether candidates run here; a target without ``num-cores`` then gets this machine's."""
        ...

    def make_runner(self) -> ms.runner.Runner:
        """A MetaSchedule runner for one tuning run (stopped with :func:`stop_runner`)."""
        ...


@dataclass(frozen=True)
class RunnerSpec:
    """Where candidates are measured: ``local`` (this machine) or ``rpc`` (via an RPC tracker).

    A :class:`MeasureBackend`."""

    kind: Literal["local", "rpc"] = "local"
    tracker_host: str | None = None
    tracker_port: int | None = None
    key: str | None = None
    session_timeout_sec: int = 60
    number: int = 3
    repeat: int = 1
    min_repeat_ms: int = 100
    enable_cpu_cache_flush: bool = False
    timeout_sec: float = 30.0  # local runs
    max_workers: int = 1  # parallel RPC sessions (boards under the key)
    # Link candidates here with this compiler and upload the .so, so a board needs only the
    # TVM runtime (no tar, gzip or C++ compiler there).
    cross_compiler: str | None = None
    # How long a candidate waits for a free board (or for a restarted tracker) before it is
    # recorded as failed; the tracker itself would make it wait for ever.
    board_wait_sec: float = 120.0
    # MetaSchedule's f_run_evaluator (session, rt_mod, device, evaluator_config, args) -> secs.
    f_run_evaluator: Callable[..., list[float]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("local", "rpc"):
            raise ValueError(f"runner kind must be 'local' or 'rpc', not {self.kind!r}")
        if self.kind == "rpc" and not (self.tracker_host and self.tracker_port and self.key):
            raise ValueError("an RPC runner needs tracker_host, tracker_port and key")

    @classmethod
    def rpc(cls, tracker_host: str, tracker_port: int, key: str, **kw: Any) -> RunnerSpec:
        """RPC-tracker runner spec."""
        return cls(kind="rpc", tracker_host=tracker_host, tracker_port=int(tracker_port), key=key, **kw)

    @property
    def on_this_machine(self) -> bool:
        """Whether candidates run here (``local``)."""
        return self.kind == "local"

    @property
    def artifact_format(self) -> str:
        """``tar`` for RPC (the server links it), ``so`` locally."""
        return "tar" if self.kind == "rpc" else "so"

    def evaluator_config(self) -> ms.runner.EvaluatorConfig:
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.EvaluatorConfig(
            number=self.number,
            repeat=self.repeat,
            min_repeat_ms=self.min_repeat_ms,
            enable_cpu_cache_flush=self.enable_cpu_cache_flush,
        )

    def make_runner(self) -> ms.runner.Runner:
        """Create the MetaSchedule runner."""
        from tvm.s_tir import meta_schedule as ms

        if self.kind == "rpc":
            # Not the stock RPCRunner: it has no client-side deadline, so a hung board hangs the run.
            return bounded_rpc_runner(
                self.tracker_host, self.tracker_port, self.key,
                session_timeout_sec=self.session_timeout_sec,
                evaluator_config=self.evaluator_config(),
                max_workers=self.max_workers,
                f_upload_module=host_linked_upload(self.cross_compiler) if self.cross_compiler else None,
                f_run_evaluator=self.f_run_evaluator,
                board_wait_s=self.board_wait_sec,
            )
        return ms.runner.LocalRunner(timeout_sec=self.timeout_sec, evaluator_config=self.evaluator_config())


def stop_runner(run: Any) -> None:
    """Stop a runner's worker processes now (after a run, or on Ctrl-C with candidates in flight)."""
    pool = getattr(run, "pool", None)
    if pool is not None:
        tvm_compat.kill_popen_pool(pool)
    close = getattr(run, "close", None)  # the emulated runner's measuring thread
    if callable(close):
        close()


# --------------------------------------------------------------------------- boards over RPC


def host_linked_upload(cross_compiler: str) -> Callable[[Any, str, str], Any]:
    """An ``f_upload_module`` for MetaSchedule's ``RPCRunner`` that links each candidate here.

    The stock upload sends the builder's ``.tar`` of object files and the board links it, which
    needs tar, gzip and a C++ compiler on the board (a stock Raspberry Pi OS has them; a minimal
    image or the virtual board does not). Linking with the cross compiler here and uploading the
    ``.so`` needs only the runtime there. Module-level (via partial) so the runner's worker
    processes can unpickle it by reference.
    """
    import functools

    return functools.partial(_upload_linked_here, cross_compiler)


def _upload_linked_here(cross_compiler: str, session: Any, local_path: str, remote_path: str) -> Any:
    import tempfile

    from tvm.support import cc, tar

    if local_path.endswith(".tar"):
        with tempfile.TemporaryDirectory(prefix="mnv2-link-") as tmp:
            tar.untar(local_path, tmp)
            objects = [os.path.join(tmp, f) for f in sorted(os.listdir(tmp))]
            local_path = local_path[:-4] + ".so"
            cc.create_shared(local_path, objects, cc=cross_compiler)
        # The runner's cleanup removes remote_path and remote_path + ".so".
        remote_path += ".so"
    session.upload(local_path, remote_path)
    return session.load_module(remote_path)


#: Seconds a candidate waits for a free board behind the tracker before it is recorded as failed.
RUNNER_BOARD_WAIT_S = 120.0


def bounded_rpc_runner(tracker_host: str, tracker_port: int, key: str, *, session_timeout_sec: float,
                       evaluator_config: Any, max_workers: int = 1,
                       f_upload_module: Callable[[Any, str, str], Any] | None = None,
                       f_run_evaluator: Callable[..., list[float]] | None = None,
                       board_wait_s: float = RUNNER_BOARD_WAIT_S, margin_s: float = RUNNER_MARGIN_S) -> Any:
    """A MetaSchedule runner over an RPC tracker in which no candidate can hang the run.

    MetaSchedule's stock ``RPCRunner`` has no client-side deadline at all: its pool has no timeout,
    its futures wait without one, ``TrackerSession.request`` waits for ever, and the RPC client's
    socket has none. ``session_timeout_sec`` is enforced by the *server* process, so a board that
    is stopped, hung or cut off (no FIN/RST ever arrives) blocks tuning for ever. Here each
    candidate runs in a pool worker that is killed ``session_timeout_sec + margin_s`` after it got
    its board, and the candidate is recorded as failed (``run_secs`` None, ``error_msg`` set); the
    wait for a board (reconnecting to a restarted tracker) is bounded by ``board_wait_s``.
    ``f_run_evaluator`` has the signature of MetaSchedule's ``default_run_evaluator``.
    """
    return _runner_class()(tracker_host, int(tracker_port), key, float(session_timeout_sec), evaluator_config,
                           max(1, int(max_workers)), f_upload_module, f_run_evaluator, float(board_wait_s),
                           float(margin_s))


_FUTURE_CLASS: Any = None


def result_future(future: concurrent.futures.Future, who: str) -> Any:
    """A MetaSchedule runner future over ``future``, which yields ``(run_secs, error)``: an
    exception from it is one failed candidate (its message prefixed with ``who``), never a crashed
    tuner; Ctrl-C still stops. Shared by every measuring backend that runs candidates in a pool."""
    global _FUTURE_CLASS
    if _FUTURE_CLASS is None:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.runner import PyRunnerFuture, RunnerResult

        @derived_object
        class ResultFuture(PyRunnerFuture):
            def __init__(self, future: Any, who: str) -> None:
                super().__init__()
                self.future, self.who = future, who

            def done(self) -> bool:
                return self.future.done()

            def result(self) -> Any:
                try:
                    run_secs, error = self.future.result()
                except Exception as e:  # noqa: BLE001 - a failed candidate (Ctrl-C still stops)
                    run_secs, error = None, f"{self.who}: {one_line(e)}"
                return RunnerResult(run_secs, error)

        _FUTURE_CLASS = ResultFuture
    return _FUTURE_CLASS(future, who)


_RUNNER_CLASS: Any = None


def _runner_class() -> Any:
    """Defined on first use so that importing this module does not import TVM (``board`` commands)."""
    global _RUNNER_CLASS
    if _RUNNER_CLASS is not None:
        return _RUNNER_CLASS

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    @derived_object
    class BoundedRPCRunner(PyRunner):
        def __init__(self, tracker_host: str, tracker_port: int, key: str, session_timeout_sec: float,
                     evaluator_config: Any, max_workers: int, f_upload_module: Any, f_run_evaluator: Any,
                     board_wait_s: float, margin_s: float) -> None:
            super().__init__()
            self.tracker_host, self.tracker_port, self.key = tracker_host, tracker_port, key
            self.session_timeout_sec, self.margin_s, self.board_wait_s = session_timeout_sec, margin_s, board_wait_s
            self.evaluator_config = evaluator_config
            self.f_upload_module, self.f_run_evaluator = f_upload_module, f_run_evaluator
            # `pool` (a PopenPoolExecutor) is what stop_runner kills after a run or on Ctrl-C.
            self.pool = _make_deadline_pool_class()(max_workers)

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            return [result_future(self.pool.submit_candidate(self, str(ri.artifact_path), str(ri.device_type),
                                                             tuple(a.as_json() for a in ri.args_info)),
                                  "BoundedRPCRunner")
                    for ri in runner_inputs]

    _RUNNER_CLASS = BoundedRPCRunner
    return BoundedRPCRunner


def _measure_on_board(url: str, port: int, matchkey: str, session_timeout_sec: float, config: Any,
                      f_upload_module: Any, f_run_evaluator: Any, artifact_path: str, device_type: str,
                      args_info: tuple) -> list[float]:
    """One candidate on one board, in a pool worker (MetaSchedule's RPCRunner steps)."""
    from tvm import rpc
    from tvm.s_tir.meta_schedule.runner import rpc_runner as R

    session = rpc.connect(url, port, matchkey, session_timeout=session_timeout_sec)
    remote_path = os.path.basename(artifact_path)
    try:
        device = session.device(device_type, 0)
        rt_mod = (f_upload_module or R.default_upload_module)(session, artifact_path, remote_path)
        args = R.default_alloc_argument(session, device, args_info, 1)
        return list((f_run_evaluator or R.default_run_evaluator)(session, rt_mod, device, config, args))
    finally:
        # On a dead session this fails too; the measurement's own error is the one to report.
        with contextlib.suppress(Exception):
            R.default_cleanup(session, remote_path)


def _runner_worker_init() -> None:
    """Import TVM before the clock starts: a cold start is not the board's fault."""
    import tvm.rpc  # noqa: F401
    import tvm.s_tir.meta_schedule.runner  # noqa: F401


def _runner_worker_ready() -> int:
    return os.getpid()


_DEADLINE_POOL: Any = None


def _make_deadline_pool_class() -> type:
    global _DEADLINE_POOL
    if _DEADLINE_POOL is not None:
        return _DEADLINE_POOL
    from tvm.support.popen_pool import kill_child_processes

    from ..tvm_compat import popen_worker_process, thread_worker_pool

    class DeadlinePool(thread_worker_pool()):
        """A PopenPoolExecutor whose caller, not the worker, enforces the deadline.

        The pool's own ``timeout`` is a timer thread inside the worker; a worker blocked in TVM's
        C++ socket code may never let it answer. Here the waiting thread kills the worker process
        at the deadline, which ends its blocked read of the pipe at once.
        """

        def __init__(self, max_workers: int) -> None:
            super().__init__(max_workers=max_workers, initializer=_runner_worker_init)

        def submit_candidate(self, runner: Any, artifact_path: str, device_type: str, args_info: tuple) -> Any:
            return self.submit_on_thread(self._candidate, runner, artifact_path, device_type, args_info)

        def _candidate(self, runner: Any, artifact_path: str, device_type: str,
                       args_info: tuple) -> tuple[list[float] | None, str | None]:
            worker = self.thread_worker()
            # Start the worker before taking a board: a board handed out by the tracker drops its
            # match key if no client arrives within a few seconds, and a cold worker imports TVM.
            worker.send(_runner_worker_ready)
            worker.recv()
            try:
                url, port, matchkey = request_board(runner.tracker_host, runner.tracker_port, runner.key,
                                                    runner.board_wait_s, lambda: self.is_shut_down)
            except UserError as e:
                return None, f"BoundedRPCRunner: {e}"
            board = f"board {url}:{port} (key {runner.key!r})"
            worker.send(_measure_on_board, (url, port, matchkey, runner.session_timeout_sec, runner.evaluator_config,
                                            runner.f_upload_module, runner.f_run_evaluator, artifact_path,
                                            device_type, args_info))
            limit = runner.session_timeout_sec + runner.margin_s
            state = {"done": False, "killed": False}
            lock = threading.Lock()

            def kill() -> None:
                with lock:
                    if state["done"]:
                        return
                    state["killed"] = True
                    proc = popen_worker_process(worker)
                    if proc is not None:
                        with contextlib.suppress(Exception):
                            kill_child_processes(proc.pid)
                            proc.kill()

            timer = threading.Timer(limit, kill)
            timer.daemon = True
            timer.start()
            result: list[float] | None = None
            error: BaseException | None = None
            try:
                result = worker.recv()
            except BaseException as e:  # noqa: BLE001 - reported as a failed candidate
                error = e
            finally:
                timer.cancel()
                with lock:
                    state["done"] = True
            if state["killed"]:
                worker.kill()  # reset it: the next send starts a fresh process
            if error is None:
                return result, None
            if state["killed"]:
                return None, (f"BoundedRPCRunner: {board} gave no result within {limit:.0f} s "
                              f"(session_timeout_sec {runner.session_timeout_sec:.0f} + {runner.margin_s:.0f} s): "
                              "hung or unreachable; its worker was killed")
            return None, f"BoundedRPCRunner: {board}: {one_line(error)}"

    _DEADLINE_POOL = DeadlinePool
    return DeadlinePool

