"""Persistent build workers: candidates built in processes that live across batches and runs.

MetaSchedule's LocalBuilder starts fresh processes per batch, and each first imports TVM's tensor
intrinsics (tens of seconds of CPU); these import them once, in the pool initializer. The worker
functions are pickled by value into the workers (cloudpickle), so the workers need not import
this package's tuning modules.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from ..kernels import loop_order


def _builder_worker_init(cpu_only: bool) -> None:
    """Runs once per builder worker: the slow import that LocalBuilder repeats per batch. SIGINT is
    left to the tuner: a Ctrl-C at the terminal reaches the whole process group, and a build it
    interrupted would be recorded as the candidate's build error (the tuner kills its workers)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tvm_compat.import_tensor_intrinsics(cpu_only)


def _builder_worker_noop() -> int:
    return os.getpid()


def _builder_worker_build(mod: Any, target: Any, fmt: str) -> str:
    """Build one candidate (as MetaSchedule's default_build) and export it; return the path."""
    import os as _os
    import tempfile as _tempfile

    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    if target.kind.name == "llvm":  # as default_build, with the pipeline compile uses
        import tvm.s_tir.tensor_intrin  # noqa: F401
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        rt_mod = tvm.tirx.build(mod, target=target, pipeline=loop_order.tir_pipeline())
    else:
        rt_mod = default_build(mod, target, None)
    out_dir = _tempfile.mkdtemp(prefix="mnv2tvm-build-")
    if fmt == "tar":
        from tvm.support import tar

        path = _os.path.join(out_dir, "tvm_tmp_mod.tar")
        rt_mod.export_library(path, fcompile=tar.tar)
    else:
        path = _os.path.join(out_dir, "tvm_tmp_mod.so")
        rt_mod.export_library(path)
    return path


def _build_one(args: tuple) -> str:
    return _builder_worker_build(*args)


_POOLS: dict[tuple[int, float, bool], Any] = {}
_POOLS_LOCK = threading.Lock()
#: Per pool (by id), the futures of its workers' first job: they have started once these are done.
_WARMUP: dict[int, list[Any]] = {}


def _shared_pool(max_workers: int, timeout_sec: float, cpu_only: bool) -> Any:
    """A process-wide builder pool per (workers, timeout): later tune() calls skip the warm-up."""
    import atexit

    import cloudpickle

    from tvm.support.popen_pool import PopenPoolExecutor

    key = (max_workers, float(timeout_sec), cpu_only)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            # Workers unpickle our functions by value, so they need not import this package.
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
            pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=_builder_worker_init,
                                     initargs=(cpu_only,))
            if not _POOLS:
                atexit.register(_shutdown_pools)
            _POOLS[key] = pool
            # Start every worker now so the slow import overlaps with task preparation.
            _WARMUP[id(pool)] = [pool.submit(_builder_worker_noop) for _ in range(max_workers)]
        return pool


def _kill_pool(pool: Any) -> None:
    """Stop a pool now, even with work in flight (see :func:`tvm_compat.kill_popen_pool`)."""
    tvm_compat.kill_popen_pool(pool, _WARMUP.pop(id(pool), ()))


def _shutdown_pools(key: tuple[int, float, bool] | None = None) -> None:
    """Kill builder workers (all pools, or one)."""
    with _POOLS_LOCK:
        keys = list(_POOLS) if key is None else [key]
        pools = [_POOLS.pop(k) for k in keys if k in _POOLS]
    for pool in pools:
        _kill_pool(pool)


@derived_object
class PersistentBuilder(ms.builder.PyBuilder):
    """Builder whose worker processes live across batches (and tune() calls) and import
    ``tvm.s_tir.tensor_intrin`` once, in the pool initializer."""

    def __init__(self, max_workers: int = 2, timeout_sec: float = 60.0, artifact_format: str = "so",
                 cpu_only: bool = False) -> None:
        super().__init__()
        self.max_workers = max(1, int(max_workers))
        self.timeout_sec = float(timeout_sec)
        self.artifact_format = artifact_format
        self.cpu_only = cpu_only
        self.pool = _shared_pool(self.max_workers, self.timeout_sec, cpu_only)

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        """Build the batch; once the run is stopping (Ctrl-C), the builds not done yet are left
        (:data:`.runner.NOT_MEASURED`: no record, built again on resume) rather than waited for."""
        import concurrent.futures

        from .interrupt import Sigint
        from .runner import NOT_MEASURED

        futures = [self.pool.submit(_build_one, (bi.mod, bi.target, self.artifact_format)) for bi in build_inputs]
        while not Sigint.stopping():
            if not concurrent.futures.wait(futures, timeout=0.2).not_done:
                break
        results = []
        for future in futures:
            if not future.done():
                results.append(ms.builder.BuilderResult(None, NOT_MEASURED + "the run stopped before it was built"))
                continue
            try:
                results.append(ms.builder.BuilderResult(future.result(), None))
            except TimeoutError:
                results.append(ms.builder.BuilderResult(None, f"PersistentBuilder: timeout after {self.timeout_sec} s"))
            except Exception as e:  # noqa: BLE001 - the candidate's build error
                results.append(ms.builder.BuilderResult(None, f"PersistentBuilder: {e!r}"))
        return results

    def discard(self) -> None:
        """Kill this builder's workers (after an interruption: they may be mid-build)."""
        _shutdown_pools((self.max_workers, self.timeout_sec, self.cpu_only))
