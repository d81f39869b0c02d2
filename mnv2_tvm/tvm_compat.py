"""Every private TVM API and every patch of TVM that mnv2-tvm relies on, in one place.

Written against apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.14.post1 (``pyproject.toml`` pins
both). None of what follows is public API: another TVM release may rename, move or drop any of
it. Each accessor looks up what it reaches for and, where it is missing, raises
:class:`TvmCompatError` naming the TVM version it was written for, rather than an AttributeError
deep inside a tuning run. :func:`check` runs all the cheap checks at once; the tuning package
runs it when it is imported (it imports TVM anyway).

This module imports TVM only inside its functions: light modules (``lower``, ``remote``) import
it, and ``mnv2-tvm --help``, ``madds`` and ``targets`` must not load TVM.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

    import tvm
    from tvm.s_tir import meta_schedule as ms

#: The TVM and tvm-ffi releases every entry here was checked against.
TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post1"

#: MetaSchedule's run time of a failed measurement (C++ ``kMaxMeanTime`` in
#: ``meta_schedule/utils.h``): records carry it, and the record order mirrors the C++ rule.
FAILED_RUN_SECS = 1e10


class TvmCompatError(RuntimeError):
    """A private TVM API this package uses is not there (another TVM release)."""


def _installed() -> str:
    try:
        import tvm

        return tvm.__version__
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _require(owner: Any, name: str, where: str, why: str) -> Any:
    """``owner.name``, or a :class:`TvmCompatError` saying what it was for."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise TvmCompatError(
            f"{where}.{name} is missing: mnv2-tvm uses this private TVM API ({why}); it was written for "
            f"TVM {TVM_VERSION} with tvm-ffi {TVM_FFI_VERSION}, this is TVM {_installed()}. Install the "
            f"pinned versions (pip install -e .)") from None


# --------------------------------------------------------------------------- MetaSchedule


def tuning_record_as_json(record: ms.database.TuningRecord) -> Any:
    """``meta_schedule._ffi_api.TuningRecordAsJSON``: a record as TVM objects ready for JSON.

    Why: the public ``TuningRecord.as_json`` converts the result with a Python helper that raises
    on traces rewriting a layout (their IndexMap inputs); the records database converts those
    itself (``tuning.records``).
    """
    from tvm.s_tir.meta_schedule import _ffi_api

    return _require(_ffi_api, "TuningRecordAsJSON", "tvm.s_tir.meta_schedule._ffi_api",
                    "writing tuning records with layout rewrites")(record)


def normalize_workload(func: tvm.tirx.PrimFunc | tvm.IRModule) -> tvm.IRModule:
    """``meta_schedule.tune_context._normalize_mod``: a kernel as the module TuneContext tunes.

    Why: the records key a workload by this module's structural hash; task extraction and the
    loop-order table must compute the same key MetaSchedule commits (no public function does).
    """
    from tvm.s_tir.meta_schedule import tune_context

    return _require(tune_context, "_normalize_mod", "tvm.s_tir.meta_schedule.tune_context",
                    "keying workloads as TuneContext does")(func)


def initialize_search_strategy(strategy: Any, context: ms.TuneContext) -> None:
    """``SearchStrategy._initialize_with_tune_context``, for a Python strategy that wraps another.

    Why: a ``PySearchStrategy`` is initialised through this hook only; a wrapper must pass it on
    to the strategy it wraps (``tuning.search``), which has no public way to take it.
    """
    _require(strategy, "_initialize_with_tune_context", type(strategy).__name__,
             "delegating from a wrapping search strategy")(context)


def device_type_name(target: tvm.target.Target) -> str:
    """``runtime.Device._DEVICE_TYPE_TO_NAME``: the device name a ``RunnerInput`` wants for a target.

    Why: candidates measured outside MetaSchedule's task scheduler (hand-written, refitted, loop
    orders) need the name MetaSchedule itself derives with this private table.
    """
    import tvm

    table = _require(tvm.runtime.Device, "_DEVICE_TYPE_TO_NAME", "tvm.runtime.Device",
                     "naming the device of a runner input")
    return table[target.get_target_device_type()]


_COST_MODEL_STATE = ("adaptive_training", "last_train_size", "data_size")


def update_cost_model_once(cost_model: Any, updates: Sequence[tuple[Any, list, list]]) -> None:
    """Feed ``updates`` (tune context, candidates, results) to an XGBoost cost model and train it
    once, at the last one.

    Why: ``XGBModel.update`` retrains from scratch whenever its data grew enough
    (``adaptive_training``, ``last_train_size``, internal state); warming it with records of a
    few dozen workloads would train it as many times. Both are switched off for all but the last
    update and restored after.
    """
    for name in _COST_MODEL_STATE:
        _require(cost_model, name, type(cost_model).__name__, "training the cost model once on many workloads")
    adaptive = cost_model.adaptive_training
    try:
        for k, (ctx, cands, results) in enumerate(updates):
            last = k == len(updates) - 1
            cost_model.adaptive_training = not last
            if not last:
                cost_model.last_train_size = 1 << 40
            cost_model.update(ctx, cands, results)
    finally:
        cost_model.adaptive_training = adaptive
        cost_model.last_train_size = cost_model.data_size


# --------------------------------------------------------------------------- tensor intrinsics

#: Tensor intrinsics no CPU schedule uses; parsing them is most of ``tvm.s_tir.tensor_intrin``'s
#: import (measured: CUDA's 54 s, ROCm's 10 s, Hexagon's 4 s of 80 s; x86 and Arm 6 s).
GPU_INTRINSICS = ("cuda", "rocm", "hexagon")
_INTRINSICS_PKG = "tvm.s_tir.tensor_intrin"


def import_tensor_intrinsics(cpu_only: bool) -> None:
    """Register TVM's tensor intrinsics, which MetaSchedule (TuneContext) and every builder
    process import before anything else.

    Patch: for CPU targets the GPU intrinsic modules are replaced by empty stand-ins in
    ``sys.modules`` before the package is imported, so its ``__init__`` (``from . import cuda``
    and, with LLVM, ``rocm, hexagon``) finds them loaded: each of a tuning run's three processes
    would otherwise spend about a minute of CPU parsing them for nothing. The stand-ins stay for
    the life of the process.
    """
    import importlib
    import types

    if cpu_only and _INTRINSICS_PKG not in sys.modules:
        for name in GPU_INTRINSICS:
            sys.modules.setdefault(f"{_INTRINSICS_PKG}.{name}", types.ModuleType(f"{_INTRINSICS_PKG}.{name}"))
    importlib.import_module(_INTRINSICS_PKG)


def _check_intrinsic_modules() -> None:
    """The GPU intrinsic modules the stand-ins replace exist as files (the package is not imported:
    that would parse them)."""
    import tvm.s_tir

    folder = os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")
    for name in GPU_INTRINSICS:
        if not os.path.isfile(os.path.join(folder, f"{name}.py")):
            raise TvmCompatError(
                f"{_INTRINSICS_PKG}.{name} is missing: mnv2-tvm stands in for it to skip parsing GPU "
                f"intrinsics on CPU targets; it was written for TVM {TVM_VERSION} with tvm-ffi "
                f"{TVM_FFI_VERSION}, this is TVM {_installed()}")


# --------------------------------------------------------------------------- legalizers


def topi_conv2d_legalizer() -> Callable[[Any, Any], Any]:
    """``relax.transform.legalize_ops.nn._nn_conv2d``: Relax's stock conv2d legalisation.

    Why: ``lower.legalize_conv2d`` replaces it for blocked layouts only and hands every other
    conv2d back to it; LegalizeOps takes one function per op, and the stock one is not exported.
    """
    from tvm.relax.transform.legalize_ops import nn

    return _require(nn, "_nn_conv2d", "tvm.relax.transform.legalize_ops.nn", "legalising plain conv2d")


def topi_resize2d_legalizer() -> Callable[[Any, Any], Any]:
    """``relax.transform.legalize_ops.image._image_resize2d``: Relax's stock resize2d legalisation.

    Why: ``lower.legalize_resize2d`` splits bilinear NCHW resizes into two passes and hands every
    other resize back to it (not exported).
    """
    from tvm.relax.transform.legalize_ops import image

    return _require(image, "_image_resize2d", "tvm.relax.transform.legalize_ops.image",
                    "legalising other resizes")


# --------------------------------------------------------------------------- popen pools

_POOL_ATTRS = ("_threadpool", "_worker_map", "_lock", "_initializer", "_initargs", "_shutdown")


def popen_worker_process(worker: Any) -> subprocess.Popen | None:
    """``PopenWorker._proc``: a pool worker's process, or None before it started.

    Why: a worker blocked in TVM's C++ socket code or mid-import cannot answer the pool's own
    timeout or shutdown; the only way to stop it at once is to kill its process.
    """
    return _require(worker, "_proc", "tvm.support.popen_pool.PopenWorker", "killing a stuck worker")


def kill_popen_pool(pool: Any, pending: Sequence[Any] = (), settle_sec: float = 0.5) -> None:
    """Stop a ``PopenPoolExecutor`` now, even with work in flight.

    ``PopenPoolExecutor.shutdown()`` closes each worker's pipe while a pool thread may be blocked
    reading it (e.g. during a 20 s warm-up import), and leaves its lock held if a worker is
    half-started, which hangs interpreter exit. So the worker processes (``_worker_map``,
    ``PopenWorker._proc``) are killed until the futures in ``pending`` have seen them die (at most
    5 s past ``settle_sec``); then ``_shutdown`` is set so the pool's ``__del__`` skips the fragile
    shutdown, and its thread pool (``_threadpool``) is dropped without waiting.
    """
    import contextlib
    import time

    from tvm.support.popen_pool import kill_child_processes

    for name in ("_worker_map", "_threadpool", "_shutdown"):
        _require(pool, name, "tvm.support.popen_pool.PopenPoolExecutor", "stopping a pool with work in flight")
    pending = [f for f in pending if not f.done()]
    deadline = time.monotonic() + settle_sec
    while True:
        for worker in list(pool._worker_map.values()):
            proc = popen_worker_process(worker)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(Exception):
                    kill_child_processes(proc.pid)
                    proc.kill()
        pending = [f for f in pending if not f.done()]
        if time.monotonic() >= deadline and not pending:
            break
        if time.monotonic() >= deadline + 5.0:
            break
        time.sleep(0.05)
    pool._shutdown = True
    with contextlib.suppress(Exception):
        pool._threadpool.shutdown(wait=False, cancel_futures=True)


_THREAD_POOL: type | None = None


def thread_worker_pool() -> type:
    """A ``PopenPoolExecutor`` subclass whose callers drive its workers themselves.

    Why: the stock pool sends a job to a worker and waits inside its own thread pool, with a
    timeout enforced by a timer thread in the worker, which a worker blocked in TVM's C++ socket
    code may never answer. The RPC runner (``tuning.runner``) instead waits in the pool's thread
    and kills the worker process at the deadline; for that it needs the pool's thread pool
    (``_threadpool``), its per-thread workers (``_worker_map``, ``_lock``, ``_initializer``,
    ``_initargs``) and its shutdown flag (``_shutdown``). This class is the one place that
    touches them.
    """
    global _THREAD_POOL
    if _THREAD_POOL is not None:
        return _THREAD_POOL
    import threading

    from tvm.support.popen_pool import PopenPoolExecutor, PopenWorker

    class ThreadWorkerPool(PopenPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for name in _POOL_ATTRS:
                _require(self, name, "tvm.support.popen_pool.PopenPoolExecutor",
                         "measuring with caller-side deadlines")

        def submit_on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
            """Run ``fn(*args)`` on one of the pool's threads (it may use :meth:`thread_worker`)."""
            return self._threadpool.submit(fn, *args)

        def thread_worker(self) -> PopenWorker:
            """The worker process that belongs to the calling pool thread (created on first use)."""
            with self._lock:
                tid = threading.get_ident()
                if tid not in self._worker_map:
                    self._worker_map[tid] = PopenWorker(self._initializer, self._initargs)
                return self._worker_map[tid]

        @property
        def is_shut_down(self) -> bool:
            return bool(self._shutdown)

    _THREAD_POOL = ThreadWorkerPool
    return ThreadWorkerPool


# --------------------------------------------------------------------------- all at once


@functools.cache
def check() -> None:
    """Check the private APIs above that can be checked without side effects (cached).

    Raises :class:`TvmCompatError` naming the first one missing.
    """
    import tvm
    from tvm.relax.transform.legalize_ops import image, nn
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import _ffi_api, tune_context
    from tvm.support import popen_pool

    why = "see mnv2_tvm/tvm_compat.py"
    _require(_ffi_api, "TuningRecordAsJSON", "tvm.s_tir.meta_schedule._ffi_api", why)
    _require(tune_context, "_normalize_mod", "tvm.s_tir.meta_schedule.tune_context", why)
    _require(ms.search_strategy.EvolutionarySearch, "_initialize_with_tune_context",
             "tvm.s_tir.meta_schedule.search_strategy.EvolutionarySearch", why)
    _require(tvm.runtime.Device, "_DEVICE_TYPE_TO_NAME", "tvm.runtime.Device", why)
    _require(nn, "_nn_conv2d", "tvm.relax.transform.legalize_ops.nn", why)
    _require(image, "_image_resize2d", "tvm.relax.transform.legalize_ops.image", why)
    _require(popen_pool, "kill_child_processes", "tvm.support.popen_pool", why)
    _require(popen_pool.PopenWorker(), "_proc", "tvm.support.popen_pool.PopenWorker", why)
    _check_intrinsic_modules()
