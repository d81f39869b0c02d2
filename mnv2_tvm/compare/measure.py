"""How a compare run times a compiled configuration: on this machine, or on a board over RPC."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import UserError
from ..models import ModelConfig
from .profile import KernelTime, board_kernels, profile_kernels


@dataclass
class Measurement:
    """What a :class:`Measurer` returns for one compiled configuration."""

    latency_ms: float  # median of the repeats
    times_ms: list[float]  # one mean per repeat
    kernels: list[KernelTime] | None = None  # None when the measurer cannot profile
    settings: dict[str, Any] = field(default_factory=dict)  # how it was timed (for the report)


@runtime_checkable
class Measurer(Protocol):
    """Times a compiled bundle. An RPC/board adapter implements the same three members.

    ``name`` identifies where points were measured (a resumed run refuses points of another
    measurer); ``emulated`` makes the report say its timings are meaningless.
    """

    name: str
    emulated: bool

    def measure(self, bundle_dir: Path, cfg: ModelConfig, *, profile: bool = True) -> Measurement: ...


class HostMeasurer:
    """Runs bundles on this machine with the TVM runtime (``bundle.Runner``)."""

    emulated = False

    def __init__(self, repeat: int = 7, min_repeat_ms: int = 100, profile_budget_ms: float = 2000.0,
                 device: str = "cpu", threads: int | None = None) -> None:
        from ..targets import host_cores

        # TVM's runtime sizes its thread pool from TVM_NUM_THREADS when the pool first starts;
        # unset, it halves the logical CPUs on x86 (one thread on a 2-vCPU VM), while MetaSchedule
        # tuned for all the target's cores. Set it before anything runs (an explicit value wins).
        if threads is not None:
            os.environ["TVM_NUM_THREADS"] = str(threads)
        else:
            os.environ.setdefault("TVM_NUM_THREADS", str(host_cores()))
        self.repeat = repeat
        self.min_repeat_ms = min_repeat_ms
        self.profile_budget_ms = profile_budget_ms
        self.device = device
        self.name = f"host:{device}"

    def measure(self, bundle_dir: Path, cfg: ModelConfig, *, profile: bool = True) -> Measurement:
        import tvm

        from ..bundle import Runner, reference

        runner = Runner(bundle_dir, self.device)
        x, _ = reference(bundle_dir)
        t = time.perf_counter()
        runner.run(x)  # warm-up: first-touch allocations, thread pool start
        first_ms = (time.perf_counter() - t) * 1e3
        # A slow model (untuned DeepLab: seconds per run) gets fewer repeats; each repeat of a
        # fast one is stretched to min_repeat_ms so the timer's resolution does not matter.
        repeat = self.repeat if first_ms < 500 else max(3, self.repeat // 2)
        times = [s * 1e3 for s in runner.time(x, number=1, repeat=repeat, min_repeat_ms=self.min_repeat_ms)]
        latency = statistics.median(times)
        kernels = None
        runs = 0
        if profile:
            runs = int(max(3, min(10, self.profile_budget_ms // max(latency, 1e-3))))
            kernels = profile_kernels(runner.vm, runner.device, runner.check_input(x), runs)
        settings = {"repeat": repeat, "min_repeat_ms": self.min_repeat_ms, "profile_runs": runs,
                    "threads": tvm.runtime.num_threads()}  # what the pool really uses
        return Measurement(latency, times, kernels, settings)


class BoardMeasurer:
    """Runs bundles on a board over RPC, the way ``mnv2-tvm bench`` does (upload, parity against
    PyTorch on the board, ``time_evaluator``); per-kernel times come from ``bench``'s profile
    (each kernel of the bundle's kernel library timed alone on the board, times its calls).

    One session serves the whole grid (with ``--ssh``, one RPC server started on the board): it
    opens on the first point and closes with :meth:`close`; use the measurer as a context manager.
    """

    def __init__(self, where: Any, *, arch: str | None = None, repeat: int = 7, min_repeat_ms: int = 100,
                 number: int = 1, profile: bool = True, session_timeout: float = 0.0, rpc_timeout: float = 0.0,
                 tolerance: float | None = None) -> None:
        from ..bench import DEFAULT_TOLERANCE, BenchSettings

        where.check()
        if where.tracker and not where.key:
            raise UserError("--rpc-tracker needs --rpc-key KEY (the key the boards serve under)")
        self.where = where
        self.arch = arch  # with --ssh, a board of another architecture is refused before anything starts
        self.settings = BenchSettings(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                      tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
                                      session_timeout=session_timeout, rpc_timeout=rpc_timeout)
        self.profile = profile
        if where.rpc:
            self.name = f"rpc:{where.rpc[0]}:{where.rpc[1]}"
        elif where.tracker:
            self.name = f"tracker:{where.tracker[0]}:{where.tracker[1]}/{where.key}"
        else:
            self.name = f"ssh:{where.ssh}"
        # False until a board says otherwise; ``emulation`` tells "unknown" apart from "real".
        self.emulated = False
        self.emulation = "unknown"
        self.board: dict[str, Any] = {}
        self._stack: contextlib.ExitStack | None = None
        self._remote: Any = None

    def __enter__(self) -> BoardMeasurer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._remote = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()  # closes the session, stops the server started on the board, closes the SSH connection

    def _open(self) -> Any:
        if self._remote is not None:
            return self._remote
        from ..bench import open_remote

        def same_arch(info: dict[str, Any]) -> None:
            if self.arch and info["arch"] != self.arch:
                raise UserError(f"the target is {self.arch} but {self.where.ssh} is {info['uname_m']}: compare with "
                                "this board's target")

        stack = contextlib.ExitStack()
        try:
            sess, emulated = stack.enter_context(open_remote(self.where, self.settings, precheck=same_arch))
        except BaseException:
            stack.close()
            raise
        if emulated is not None:
            self.emulated = emulated
            self.emulation = "emulated" if emulated else "real"
        self._stack, self._remote = stack, sess
        self.board = {k: v for k, v in sess.identity().items() if v is not None}
        return sess

    def measure(self, bundle_dir: Path, cfg: ModelConfig, *, profile: bool = True) -> Measurement:
        from dataclasses import replace

        from ..bench import run_bench

        sess = self._open()
        settings = replace(self.settings, profile=profile and self.profile)
        chatter = io.StringIO()
        # run_bench's chatter stays out of a grid's output; keep only what a user must see.
        with contextlib.redirect_stderr(chatter):
            result = run_bench(bundle_dir, sess, settings, emulated=self.emulated)
        for line in chatter.getvalue().splitlines():
            if line.startswith(("warning", "profile: skipped")):
                print(line, file=sys.stderr)
        kernels = board_kernels(result.profile) if result.profile is not None else None
        threads = None
        with contextlib.suppress(Exception):  # a runtime without the function: the report says n/a
            threads = int(sess.session.get_function("runtime.NumThreads")())
        measured = {"number": settings.number, "repeat": settings.repeat, "min_repeat_ms": settings.min_repeat_ms,
                    "threads": threads, "max_abs_error": result.max_abs_error, "emulated": self.emulated,
                    "emulation": self.emulation, "profile_method": "board-kernels-alone" if kernels else None,
                    "board": self.board}
        return Measurement(statistics.median(result.samples_ms), result.samples_ms, kernels, measured)


class ModelledMeasurer:
    """Costs bundles on the target's emulated core (``[core]``, :mod:`mnv2_tvm.emulate`), without a
    board: one inference's modelled latency at the target's core count, per kernel each kernel
    alone. Deterministic, so one pass is all there is to measure; grids tune on the same core
    (:attr:`tune_runner`, records in the ``emulated/`` folder beside a board's).

    One guest serves the whole grid; use the measurer as a context manager.
    """

    emulated = False  # the figures are modelled, not timings of an emulator
    modelled = True

    def __init__(self, spec: Any, *, profile: bool = True) -> None:
        from ..emulate import EmulatedCore
        from ..tuning.emulated import backend_for

        self.spec = spec
        self.core_model = spec.core  # one line naming the missing keys
        self.name = f"modelled:{self.core_model.model}x{spec.cores}"
        self.profile = profile
        self._core = EmulatedCore(spec.path, threads=spec.cores)  # checks qemu, plugin, userland
        self._backend: Any = None
        self._backend_for = backend_for

    @property
    def tune_runner(self) -> Any:
        """The emulated core as a tuning backend (one guest, started when first needed)."""
        if self._backend is None:
            self._backend = self._backend_for(self.spec)
        return self._backend

    def __enter__(self) -> ModelledMeasurer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._core.close()
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def measure(self, bundle_dir: Path, cfg: ModelConfig, *, profile: bool = True) -> Measurement:
        cost = self._core.measure_bundle(bundle_dir)
        if not cost.ok:
            raise RuntimeError(f"the model failed under emulation: {cost.error}")
        kernels = None
        if profile and self.profile:
            from .. import bundle
            from ..bench import profile_modelled

            rows = profile_modelled(bundle.load_manifest(Path(bundle_dir)), self.spec, self._core, Path(bundle_dir))
            kernels = board_kernels(rows) if rows else None
        settings = {"modelled": True, "core": cost.core, "threads": self.spec.cores, "cycles": cost.cycles,
                    "instructions": cost.instructions, "fingerprint": cost.fingerprint(),
                    "profile_method": "modelled-kernels-alone" if kernels else None}
        return Measurement(cost.ms, [cost.ms], kernels, settings)
