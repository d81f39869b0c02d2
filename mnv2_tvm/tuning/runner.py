"""Where tuning measures candidates: the back-ends behind MetaSchedule's ``Runner``.

Tuning asks a back-end for three things (:class:`MeasureBackend`): which artifact the builder
makes (``so``, linked here, or ``tar``, linked where it runs), whether candidates run on this
machine (then its core count sizes their parallel loops), and a MetaSchedule ``Runner`` that
times them. :class:`RunnerSpec` describes the two back-ends there are: ``local`` (MetaSchedule's
``LocalRunner``) and ``rpc``, boards behind an RPC tracker measured by a runner with a deadline
on every candidate (a hung board never hangs the run). Another way of measuring is another class
with these three members, passed as ``tune(runner=...)``.

Over RPC, a failed measurement is either the candidate's (:func:`classify_failure`), which becomes a
failed record as MetaSchedule stores it, or the infrastructure's, which is no record and no trial:
the runner measures that candidate again once a board answers, and stops the run cleanly when none
has answered for the board wait. A result that is no measurement carries :data:`NOT_MEASURED`.
"""

from __future__ import annotations

import concurrent.futures

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .. import tvm_compat
from ..errors import UserError
from ..remote import RUNNER_MARGIN_S, one_line, request_board, session_lost
from .interrupt import Sigint

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
    # How long the run waits while no board answers (tracker gone, no board registered, the
    # server dead or unreachable) before it stops cleanly, everything measured kept.
    board_wait_sec: float = 300.0
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


def host_linked_upload(cross_compiler: str) -> HostLinkedUpload:
    """An ``f_upload_module`` for MetaSchedule's ``RPCRunner`` that links each candidate here.

    The stock upload sends the builder's ``.tar`` of object files and the board links it, which
    needs tar, gzip and a C++ compiler on the board (a stock Raspberry Pi OS has them; a minimal
    image or the virtual board does not). Linking with the cross compiler here and uploading the
    ``.so`` needs only the runtime there.
    """
    return HostLinkedUpload(cross_compiler)


@dataclass(frozen=True)
class HostLinkedUpload:
    """Link a candidate's objects here with ``cross_compiler``, upload the ``.so``, load it.

    Module-level and picklable, so the runner's worker processes unpickle it by reference; its two
    steps are separate so that a link error (the candidate's) is told from a lost upload (the
    link's)."""

    cross_compiler: str

    def link(self, local_path: str) -> str:
        """The ``.so`` for the builder's artifact (a ``.tar`` of objects; anything else is used as is)."""
        import tempfile

        from tvm.support import cc, tar

        if not local_path.endswith(".tar"):
            return local_path
        with tempfile.TemporaryDirectory(prefix="mnv2-link-") as tmp:
            tar.untar(local_path, tmp)
            objects = [os.path.join(tmp, f) for f in sorted(os.listdir(tmp))]
            so = local_path[:-4] + ".so"
            cc.create_shared(so, objects, cc=self.cross_compiler)
        return so

    @staticmethod
    def remote_name(local_path: str, remote_path: str) -> str:
        # The runner's cleanup removes remote_path and remote_path + ".so".
        return remote_path + ".so" if local_path.endswith(".tar") else remote_path

    def __call__(self, session: Any, local_path: str, remote_path: str) -> Any:
        so = self.link(local_path)
        remote_so = self.remote_name(local_path, remote_path)
        session.upload(so, remote_so)
        return session.load_module(remote_so)


#: Seconds the run waits while no board answers before it stops (``tune --board-wait``).
RUNNER_BOARD_WAIT_S = 300.0

#: The start of the error of a candidate that was not measured at all: the run stopped (Ctrl-C, or
#: no board answered within the board wait) before it was. Such a result is no record and no trial;
#: the candidate is measured on resume.
NOT_MEASURED = "not measured: "

#: The kinds :func:`classify_failure` returns.
CANDIDATE = "candidate"
INFRASTRUCTURE = "infrastructure"
LOST_DURING_RUN = "lost during run"
#: Longest pause, in seconds, before a candidate is measured again after an infrastructure failure.
RETRY_PAUSE_MAX_S = 5.0
#: How many times a candidate's run may coincide with its session being lost before the loss is
#: blamed on the candidate (a kernel that crashes or wedges the server) rather than on the board.
LOST_RUNS_BLAMED = 2

_log = logging.getLogger(__name__)


def measured(result: Any) -> bool:
    """Whether a ``RunnerResult`` or ``BuilderResult`` is a measurement to record (a time, or a
    candidate's failure), not a candidate the run stopped before measuring (:data:`NOT_MEASURED`)."""
    msg = getattr(result, "error_msg", None)
    return not (isinstance(msg, str) and msg.startswith(NOT_MEASURED))


def classify_failure(phase: str, message: str) -> str:
    """Whose fault a failed measurement on a board is, from the step it failed in and its error.

    Returns :data:`CANDIDATE` (a failed record, as MetaSchedule stores it: the schedule is at
    fault and measuring it again would fail again), :data:`INFRASTRUCTURE` (no record, no trial:
    the runner measures the candidate again once a board answers) or :data:`LOST_DURING_RUN`
    (the session was lost while the candidate's code was on the board; see below).

    - ``board`` (asking the tracker: tracker gone or restarting, no board registered or free
      within the wait) and ``connect`` (connection refused or reset, handshake failed, a match key
      that expired, a tunnel that is down): infrastructure. Nothing of the candidate reached a board.
    - ``link`` (linking the candidate here with the cross compiler): the candidate's, a build error.
    - ``upload``: infrastructure when the session was lost (:func:`~mnv2_tvm.remote.session_lost`:
      reset, closed, EOF, ``kShutdown``); any other error is the candidate's (e.g. the board's own
      linker refusing it).
    - ``load`` and ``run`` (loading the library, allocating its arguments, timing it): the server
      ending the session at its own timeout (``RPCSessionTimeoutError``) is a timeout inside the
      kernel, the candidate's; a lost session is :data:`LOST_DURING_RUN`; any other error (a
      crash reported as an error, a wrong result, a missing function) is the candidate's.
    - ``deadline`` (no answer by the session timeout + margin, although the server ends a slow
      session itself: the server or the link hung) and ``worker`` (the measuring process here
      died): :data:`LOST_DURING_RUN`.

    :data:`LOST_DURING_RUN` cannot be told apart from the client: a kernel that crashes the server
    (TVM's server dies with its session process) looks exactly like a server killed, or a link
    dropped, at that moment. The rule: the runner takes it as infrastructure and measures the
    candidate again; the second time a candidate's run coincides with its session being lost
    (:data:`LOST_RUNS_BLAMED`), it is the candidate's failure and becomes a record. A failure
    before the candidate's code reached the board never counts toward that.
    """
    if phase in ("board", "connect"):
        return INFRASTRUCTURE
    if phase == "link":
        return CANDIDATE
    if phase == "upload":
        return INFRASTRUCTURE if session_lost(message) else CANDIDATE
    if phase in ("load", "run"):
        return LOST_DURING_RUN if session_lost(message) else CANDIDATE
    if phase in ("deadline", "worker"):
        return LOST_DURING_RUN
    raise ValueError(f"unknown measuring phase {phase!r}")


class BoardWatch:
    """Whether boards answer, shared by the runner's candidates: the time since none has, why,
    and whether the run gave up waiting (``board_wait_s`` passed without an answer).

    Any infrastructure failure starts the clock (:meth:`failed`); any measurement a board
    completes, a candidate's failure included, stops it (:meth:`answered`). Giving up stops the
    run as a first Ctrl-C does (:meth:`Sigint.stop`), with the reason.
    """

    def __init__(self, board_wait_s: float) -> None:
        self.board_wait_s = board_wait_s
        self.down_since: float | None = None
        self.reason = ""
        self.gave_up: str | None = None
        self._lock = threading.Lock()

    def failed(self, reason: str, since: float | None = None) -> None:
        """No board answered, because of ``reason`` (since ``since``, a monotonic time, if earlier)."""
        from .progress import fmt_duration

        with self._lock:
            now = time.monotonic()
            start = min(now, since if since is not None else now)
            if self.down_since is None or start < self.down_since:
                self.down_since = start
            self.reason = reason
            if self.gave_up is None and now - self.down_since >= self.board_wait_s:
                self.gave_up = (f"no board answered for {fmt_duration(now - self.down_since)} (--board-wait "
                                f"{self.board_wait_s:.0f} s); last: {reason}")
                gave_up = self.gave_up
            else:
                return
        _log.warning("giving up: %s", gave_up)
        Sigint.stop(gave_up)

    def answered(self) -> None:
        """A board completed a measurement: boards answer again."""
        with self._lock:
            self.down_since = None
            self.reason = ""

    def remaining(self) -> float:
        """Seconds left of the board wait (all of it while boards answer)."""
        with self._lock:
            if self.down_since is None:
                return self.board_wait_s
            return max(0.0, self.board_wait_s - (time.monotonic() - self.down_since))

    def waiting(self) -> str | None:
        """For the progress line while no board answers: what it waits for and how long it has."""
        from .progress import fmt_duration

        with self._lock:
            if self.down_since is None or self.gave_up is not None:
                return None
            waited = time.monotonic() - self.down_since
            return (f"waiting for a board: {_short(self.reason)}, {fmt_duration(waited)} of "
                    f"{fmt_duration(self.board_wait_s)}")


def _short(reason: str, n: int = 70) -> str:
    reason = reason.split(" within ")[0]
    return reason if len(reason) <= n else reason[: n - 1] + "…"


def bounded_rpc_runner(tracker_host: str, tracker_port: int, key: str, *, session_timeout_sec: float,
                       evaluator_config: Any, max_workers: int = 1,
                       f_upload_module: Callable[[Any, str, str], Any] | None = None,
                       f_run_evaluator: Callable[..., list[float]] | None = None,
                       board_wait_s: float = RUNNER_BOARD_WAIT_S, margin_s: float = RUNNER_MARGIN_S) -> Any:
    """A MetaSchedule runner over an RPC tracker in which no candidate can hang the run and no
    board failure costs a trial.

    MetaSchedule's stock ``RPCRunner`` has no client-side deadline at all: its pool has no timeout,
    its futures wait without one, ``TrackerSession.request`` waits for ever, and the RPC client's
    socket has none. ``session_timeout_sec`` is enforced by the *server* process, so a board that
    is stopped, hung or cut off (no FIN/RST ever arrives) blocks tuning for ever. Here each
    candidate runs in a pool worker that is killed ``session_timeout_sec + margin_s`` after it got
    its board. A failure is classified (:func:`classify_failure`): the candidate's is returned as
    its result (a failed record); the infrastructure's is retried by the worker itself, waiting
    for a board, so MetaSchedule never sees it. When no board has answered for ``board_wait_s``
    the run is stopped (:meth:`Sigint.stop`) and the candidates left are :data:`NOT_MEASURED`; so
    are those in flight at a Ctrl-C, which stops them at once (their worker is killed).
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
            self.watch = BoardWatch(board_wait_s)
            # `pool` (a PopenPoolExecutor) is what stop_runner kills after a run or on Ctrl-C.
            self.pool = _make_deadline_pool_class()(max_workers)

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            return [result_future(self.pool.submit_candidate(self, str(ri.artifact_path), str(ri.device_type),
                                                             tuple(a.as_json() for a in ri.args_info)),
                                  "BoundedRPCRunner")
                    for ri in runner_inputs]

        def waiting(self) -> str | None:
            """What the progress line says while no board answers (None while boards answer)."""
            return self.watch.waiting()

    _RUNNER_CLASS = BoundedRPCRunner
    return BoundedRPCRunner


def _measure_on_board(url: str, port: int, matchkey: str, session_timeout_sec: float, config: Any,
                      f_upload_module: Any, f_run_evaluator: Any, artifact_path: str, device_type: str,
                      args_info: tuple) -> tuple:
    """One candidate on one board, in a pool worker (MetaSchedule's RPCRunner steps): ``("ok",
    run_secs)``, or ``("failed", phase, message)`` naming the step that failed, for
    :func:`classify_failure`."""
    from tvm import rpc
    from tvm.s_tir.meta_schedule.runner import rpc_runner as R

    try:
        session = rpc.connect(url, port, matchkey, session_timeout=session_timeout_sec)
    except Exception as e:  # noqa: BLE001 - TVM raises InternalError/TVMError with a C++ trace
        return "failed", "connect", one_line(e)
    remote_path = os.path.basename(artifact_path)
    phase = "upload"
    try:
        device = session.device(device_type, 0)
        if isinstance(f_upload_module, HostLinkedUpload):
            phase = "link"
            so = f_upload_module.link(artifact_path)
            phase = "upload"
            remote_so = f_upload_module.remote_name(artifact_path, remote_path)
            session.upload(so, remote_so)
            phase = "load"
            rt_mod = session.load_module(remote_so)
        else:
            rt_mod = (f_upload_module or R.default_upload_module)(session, artifact_path, remote_path)
        phase = "run"
        args = R.default_alloc_argument(session, device, args_info, 1)
        return "ok", list((f_run_evaluator or R.default_run_evaluator)(session, rt_mod, device, config, args))
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return "failed", phase, one_line(e)
    finally:
        # On a dead session this fails too; the measurement's own error is the one to report.
        with contextlib.suppress(Exception):
            R.default_cleanup(session, remote_path)


def _runner_worker_init() -> None:
    """Import TVM before the clock starts (a cold start is not the board's fault), and leave
    SIGINT to the tuner: a Ctrl-C at the terminal reaches the whole process group, and a worker
    it interrupted would look like a board that failed. The tuner kills workers it stops."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        at the deadline, or as soon as the run stops, which ends its blocked read of the pipe at once.
        """

        def __init__(self, max_workers: int) -> None:
            super().__init__(max_workers=max_workers, initializer=_runner_worker_init)

        def submit_candidate(self, runner: Any, artifact_path: str, device_type: str, args_info: tuple) -> Any:
            return self.submit_on_thread(self._candidate, runner, artifact_path, device_type, args_info)

        def _stopped(self, runner: Any) -> str | None:
            """Why this candidate is not to be measured now (the run stops), or None."""
            if self.is_shut_down:
                return "the runner was stopped"
            if runner.watch.gave_up is not None:
                return runner.watch.gave_up
            if Sigint.stopping():
                return "the run was interrupted"
            return None

        def _candidate(self, runner: Any, artifact_path: str, device_type: str,
                       args_info: tuple) -> tuple[list[float] | None, str | None]:
            """Measure one candidate; an infrastructure failure is retried here, never returned."""
            watch: BoardWatch = runner.watch
            lost = retries = 0
            while True:
                stop = self._stopped(runner)
                if stop is not None:
                    return None, NOT_MEASURED + stop
                worker = self.thread_worker()
                # Start the worker before taking a board: a board handed out by the tracker drops its
                # match key if no client arrives within a few seconds, and a cold worker imports TVM.
                worker.send(_runner_worker_ready)
                worker.recv()
                asked = time.monotonic()
                try:
                    url, port, matchkey = request_board(
                        runner.tracker_host, runner.tracker_port, runner.key, max(1.0, watch.remaining()),
                        lambda: self._stopped(runner) is not None, lambda why: watch.failed(why, since=asked))
                except UserError as e:
                    if self._stopped(runner) is None:
                        watch.failed(str(e), since=asked)
                        self._pause(runner, 1.0)
                    continue
                board = f"board {url}:{port} (key {runner.key!r})"
                outcome = self._measure(worker, runner, (url, port, matchkey), artifact_path, device_type,
                                        args_info)
                if outcome[0] == "ok":
                    watch.answered()
                    return outcome[1], None
                _, phase, message = outcome
                if phase == "stopped":
                    continue
                kind = classify_failure(phase, message)
                if kind == CANDIDATE:
                    watch.answered()
                    return None, f"BoundedRPCRunner: {board}: {message}"
                if kind == LOST_DURING_RUN:
                    lost += 1
                    if lost >= LOST_RUNS_BLAMED:
                        return None, (f"BoundedRPCRunner: {board}: the session was lost while this candidate ran, "
                                      f"{lost} times (taken as the candidate crashing or hanging the server): "
                                      f"{message}")
                _log.info("infrastructure failure, measuring the candidate again once a board answers: %s: %s",
                          board, message)
                watch.failed(f"{board}: {message}")
                retries += 1
                self._pause(runner, min(RETRY_PAUSE_MAX_S, 0.5 * 2 ** retries))

        def _pause(self, runner: Any, seconds: float) -> None:
            """Wait before measuring again (a board that refuses at once would be asked in a tight
            loop), unless the run stops."""
            end = time.monotonic() + seconds
            while time.monotonic() < end and self._stopped(runner) is None:
                time.sleep(0.1)

        def _measure(self, worker: Any, runner: Any, board: tuple[str, int, str], artifact_path: str,
                     device_type: str, args_info: tuple) -> tuple:
            """One attempt in ``worker``, killed at the deadline or when the run stops: the
            outcome of :func:`_measure_on_board`, or ``("failed", "deadline" | "worker" |
            "stopped", message)``."""
            worker.send(_measure_on_board, (*board, runner.session_timeout_sec, runner.evaluator_config,
                                            runner.f_upload_module, runner.f_run_evaluator, artifact_path,
                                            device_type, args_info))
            limit = runner.session_timeout_sec + runner.margin_s
            end = time.monotonic() + limit
            state: dict[str, Any] = {"done": False, "killed": None}
            lock = threading.Lock()
            finished = threading.Event()

            def watchdog() -> None:
                while not finished.wait(0.2):
                    why = ("deadline" if time.monotonic() >= end else
                           "stopped" if self._stopped(runner) is not None else None)
                    if why is None:
                        continue
                    with lock:
                        if state["done"]:
                            return
                        state["killed"] = why
                        proc = popen_worker_process(worker)
                        if proc is not None:
                            with contextlib.suppress(Exception):
                                kill_child_processes(proc.pid)
                                proc.kill()
                    return

            guard = threading.Thread(target=watchdog, name="candidate deadline", daemon=True)
            guard.start()
            outcome: Any = None
            error: BaseException | None = None
            try:
                outcome = worker.recv()
            except BaseException as e:  # noqa: BLE001 - the worker died or was killed
                error = e
            finally:
                with lock:
                    state["done"] = True
                finished.set()
            if state["killed"]:
                worker.kill()  # reset it: the next send starts a fresh process
            if state["killed"] == "stopped":
                return "failed", "stopped", "the run stopped"
            if state["killed"] == "deadline":
                return "failed", "deadline", (
                    f"gave no result within {limit:.0f} s (session_timeout_sec {runner.session_timeout_sec:.0f} + "
                    f"{runner.margin_s:.0f} s): hung or unreachable; its worker was killed")
            if error is not None:
                worker.kill()
                return "failed", "worker", f"the measuring process here died ({one_line(error)})"
            return outcome

    _DEADLINE_POOL = DeadlinePool
    return DeadlinePool
