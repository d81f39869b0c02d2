"""Tuning without a board: candidates measured on the emulated core (:mod:`mnv2_tvm.emulate`).

:class:`EmulatedBackend` is a :class:`~mnv2_tvm.tuning.runner.MeasureBackend`. The builder exports
each candidate as a ``.tar`` of objects for the target; the runner links it here with the
target's cross compiler (as the RPC path's :func:`~.runner.host_linked_upload` does), calls its
``main`` once (after a warm-up call) with arguments of the candidate's shapes and dtypes inside
one long-lived :class:`~mnv2_tvm.emulate.EmulatedCore` guest at the target's core count, and
reports the modelled seconds as the run time: MetaSchedule's cost model learns modelled cost.
A candidate that crashes, hangs or fails to link under emulation is one failed candidate (its
record carries the error, as a build error's does), never a failed run.

Records measured this way are labelled in the folder's ``meta.json`` (``measurement``:
``emulated:<core> (model <version>)``) and kept apart from a board's and from another version
of the core model's (see :mod:`.records`).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError


def measurement_label(core: Any) -> str:
    """The ``measurement`` a records folder's meta gets for this core model (a
    :class:`~mnv2_tvm.emulate.CoreModel`): its name and version, because costs of another
    version of the model, or of other figures, are not comparable."""
    return f"emulated:{core.model} (model {core.version})"


@dataclass
class EmulatedBackend:
    """Measure candidates on ``target``'s emulated core (its ``[core]`` table), ``threads`` wide.

    Construction checks everything a run needs (core model, qemu, plugin, guest userland, cross
    compiler) and raises a one-line :class:`UserError` naming what is missing.
    """

    target: str                       # a targets/ name or a TOML path
    threads: int
    cross_compiler: str | None = None
    timeout_s: float = 120.0          # per candidate, enforced in the guest
    rootfs: str | None = None
    _core: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from ..emulate import EmulatedCore

        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise UserError(f"the target's cross compiler {self.cross_compiler} is missing "
                            "(sudo apt install g++-aarch64-linux-gnu)")
        # Checks the core model, qemu, plugin and guest userland; the guest starts on first use.
        self._core = EmulatedCore(self.target, threads=self.threads, timeout_s=self.timeout_s,
                                  rootfs=self.rootfs)

    @property
    def core_model(self) -> str:
        return self._core.core.model

    @property
    def measurement(self) -> str:
        """What the records folder's meta says of these measurements."""
        return measurement_label(self._core.core)

    @property
    def description(self) -> str:
        """For the progress line: where candidates are measured."""
        return f"emulated {self.core_model} x{self.threads}"

    @property
    def artifact_format(self) -> str:
        return "tar"  # objects for the target, linked here by the runner

    @property
    def on_this_machine(self) -> bool:
        return False  # the target's num-cores sizes parallel loops

    @property
    def core(self) -> Any:
        return self._core

    def make_runner(self) -> Any:
        return _runner_class()(self)

    def close(self) -> None:
        self._core.close()


def measure_artifact(core: Any, cross_compiler: str | None, artifact_path: str,
                     args: list[tuple[list[int], str]]) -> tuple[list[float] | None, str | None]:
    """Link one candidate's artifact and cost one call of its ``main``: (run secs, error)."""
    from tvm.support import cc, tar

    work = tempfile.mkdtemp(prefix="mnv2-emu-cand-")
    try:
        lib = artifact_path
        if artifact_path.endswith(".tar"):
            objs = os.path.join(work, "objs")
            os.mkdir(objs)
            tar.untar(artifact_path, objs)
            lib = os.path.join(work, "candidate.so")
            try:
                cc.create_shared(lib, [os.path.join(objs, f) for f in sorted(os.listdir(objs))],
                                 cc=cross_compiler or "g++")
            except Exception as e:  # noqa: BLE001 - a failed candidate
                return None, f"EmulatedRunner: linking failed: {str(e).strip().splitlines()[0] if str(e).strip() else e}"
        cost = core.measure(lib, "main", args)
        if not cost.ok:
            return None, f"EmulatedRunner: {cost.error}"
        return [cost.ms / 1e3], None
    except UserError as e:
        return None, f"EmulatedRunner: {e}"
    except Exception as e:  # noqa: BLE001 - a failed candidate, never a failed run
        return None, f"EmulatedRunner: {type(e).__name__}: {str(e).strip()[:300]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


_RUNNER_CLASS: Any = None


def _runner_class() -> Any:
    """Defined on first use (TVM imported late, as in :mod:`.runner`)."""
    global _RUNNER_CLASS
    if _RUNNER_CLASS is not None:
        return _RUNNER_CLASS

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    from .runner import result_future

    @derived_object
    class EmulatedRunner(PyRunner):
        """Candidates one at a time through the backend's guest (a second thread: MetaSchedule
        builds the next batch meanwhile)."""

        def __init__(self, backend: EmulatedBackend) -> None:
            super().__init__()
            self.backend = backend
            self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mnv2-emulated")
            self.executor.submit(self._start)  # the guest's start-up overlaps the first builds

        def _start(self) -> tuple[None, str | None]:
            from ..emulate import EmulatorError

            try:
                self.backend.core.start()
            except EmulatorError as e:  # each candidate then tries (and reports) again
                return None, str(e)
            return None, None

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = []
            for ri in runner_inputs:
                args = [([int(d) for d in j[2]], str(j[1])) for j in (a.as_json() for a in ri.args_info)]
                futures.append(result_future(self.executor.submit(
                    measure_artifact, self.backend.core, self.backend.cross_compiler, str(ri.artifact_path), args),
                    "EmulatedRunner"))
            return futures

        def close(self) -> None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    _RUNNER_CLASS = EmulatedRunner
    return EmulatedRunner


def backend_for(spec: Any, *, threads: int | None = None) -> EmulatedBackend:
    """The emulated backend of a target spec (its ``[core]`` table, its core count)."""
    return EmulatedBackend(str(spec.path), threads=threads or spec.cores, cross_compiler=spec.cross_compiler)
