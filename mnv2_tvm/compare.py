"""Grid runs: measure configurations untuned and tuned, fit MAdd predictors, write the report.

One call, :func:`run_compare`, does the whole job for one target:

1. the grid (:func:`default_grid` or :func:`load_grid`) is counted (MAdds, bytes per layer);
   a configuration that cannot be built stops the run before anything is measured;
2. with ``tune_trials_per_config > 0`` every configuration is tuned into the records first
   (``tuning.tune`` only runs what the records lack), so all tuned points see one records state;
3. every configuration is compiled untuned (an empty records folder) and tuned (the target's
   records) and measured by a :class:`Measurer`; each finished point is appended to
   ``REPORT_DIR/points.jsonl`` (flushed and fsynced), which is what makes a run resumable; a
   tuned point keeps the digest of the records of its own kernels and is measured again only
   when those change (tuning other configurations into the shared database leaves it valid);
4. predictors from :mod:`predict` are fitted on a split of the MobileNetV2 points and scored
   on the held-out rest; the report (``results.json``, ``results.csv``, ``summary.md`` and PNG
   plots) is written at the end, each file atomically, marked incomplete when points are missing.

Per-layer times come from the Relax VM's instrument hook (TVM 0.27 has no VM profiler any more:
``VirtualMachine(..., profile=True)`` and ``vm.profile`` are gone): every kernel call is timed
on the host and mapped back to the model's conv/linear layers by output shape and MAdds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, runtime_checkable

from .errors import UserError
from .models import ModelConfig

if TYPE_CHECKING:
    from .madds import LayerCount
    from .targets import TargetSpec

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "DEFAULT_WIDTHS",
    "REFERENCE_CONFIG",
    "BoardMeasurer",
    "CompareResult",
    "HostMeasurer",
    "KernelTime",
    "LayerMap",
    "LayerTime",
    "Measurement",
    "Measurer",
    "default_grid",
    "grid_configs",
    "load_grid",
    "quick_grid",
    "map_kernels",
    "profile_kernels",
    "run_compare",
]

FORMAT = "mnv2-tvm-compare/1"
DEFAULT_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)
DEFAULT_RESOLUTIONS = (96, 128, 160, 192, 224)
#: ``--grid quick`` (the main job's compact run): a 27x MAdd range in 12 builds, a few minutes on
#: 2 cores. Untuned 1.0/224 alone runs ~165 ms; compiling (~10 s a build) dominates.
QUICK_WIDTHS = (0.35, 1.0)
QUICK_RESOLUTIONS = (96, 160, 224)
#: The configuration whose tuned per-layer profile makes the layer-share plot.
REFERENCE_CONFIG = ModelConfig("mobilenet_v2", 1.0, 224)
VARIANTS = ("untuned", "tuned")
#: Timing passes over the grid; a point's latency is its fastest pass's median (see run_compare).
DEFAULT_PASSES = 5
#: A tuned point whose untuned (fallback) kernels take at least this share of its profiled time
#: measures the records' gaps more than the tuned schedules: it is reported but not fitted.
FALLBACK_TIME_LIMIT = 0.05
#: Predictor goal of the issue (held-out MobileNetV2 configs, predictor 3).
GOAL_WITHIN10, GOAL_SPEARMAN = 0.90, 0.98
#: Our predictors beyond MAdds, least to most informed (the goal is judged on the last one fitted).
OWN_PREDICTORS = {"roofline": "Per-layer roofline (fitted on end-to-end latencies)",
                  "layerwise": "Layerwise (per-kind cost laws fitted on measured layer times)"}

POINTS_FILE = "points.jsonl"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SUMMARY = "summary.md"
PLOT_LATENCY = "latency_vs_madds.png"
PLOT_PREDICTED = "predicted_vs_measured.png"
PLOT_LAYERS = "layer_share.png"
REPORT_FILES = (RESULTS_JSON, RESULTS_CSV, SUMMARY, PLOT_LATENCY, PLOT_PREDICTED, PLOT_LAYERS)
WORK_DIR = ".work"  # bundles being measured and the empty records folder of untuned builds

_CONFIG_KEYS = ("model", "width", "resolution", "num_classes", "output_stride", "batch")
_LIST_KEYS = {"widths": "width", "resolutions": "resolution"}


# --------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------


def default_grid() -> list[ModelConfig]:
    """The paper's MobileNetV2 width × resolution grid, then SSDLite 320 and DeepLabv3 513."""
    grid = [ModelConfig("mobilenet_v2", w, r) for w in DEFAULT_WIDTHS for r in DEFAULT_RESOLUTIONS]
    return grid + [ModelConfig("ssdlite"), ModelConfig("deeplabv3")]


def quick_grid() -> list[ModelConfig]:
    """A compact MobileNetV2 grid: widths 0.35 and 1.0 × resolutions 96, 160 and 224."""
    return [ModelConfig("mobilenet_v2", w, r) for w in QUICK_WIDTHS for r in QUICK_RESOLUTIONS]


#: Built-in grids by name; ``--grid NAME`` picks one, anything else is a grid file.
GRIDS = {"default": default_grid, "quick": quick_grid}


def grid_configs(grid: str | Path) -> list[ModelConfig]:
    """The configurations of a built-in grid (:data:`GRIDS`) or of a grid file (:func:`load_grid`)."""
    named = GRIDS.get(str(grid).lower())
    return named() if named is not None else load_grid(grid)


def load_grid(path: str | Path) -> list[ModelConfig]:
    """Configurations from a JSON or TOML file.

    JSON: a list of objects (or ``{"configs": [...]}``); TOML: ``[[configs]]`` tables. Each entry
    has the fields of :class:`ModelConfig` (``model``, ``width``, ``resolution``, ``num_classes``,
    ``output_stride``, ``batch``); ``widths`` / ``resolutions`` lists expand to their product.
    Duplicates are dropped; order is kept. Any problem is a :class:`UserError` naming the entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"grid file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"grid file {path} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"grid file {path} cannot be read ({e.__class__.__name__})") from None
    if not text.strip():
        raise UserError(f"grid file {path} is empty; list configurations, e.g. "
                        '[{"model": "mobilenet_v2", "width": 1.0, "resolution": 224}]')
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"grid file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                            f"column {e.colno}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"grid file {path} is not valid TOML: {e}") from None
    else:
        raise UserError(f"grid file {path} must end in .json or .toml")
    if isinstance(data, dict):
        extra = sorted(set(data) - {"configs"})
        if extra or "configs" not in data:
            raise UserError(f"grid file {path} must hold a list of configurations"
                            + (" (a JSON list, or a 'configs' key)" if suffix == ".json"
                               else " as [[configs]] tables")
                            + (f"; unexpected keys: {', '.join(extra)}" if extra else ""))
        data = data["configs"]
    if not isinstance(data, list):
        raise UserError(f"grid file {path} must hold a list of configurations, not a {type(data).__name__}")
    if not data:
        raise UserError(f"grid file {path} lists no configurations")
    grid: list[ModelConfig] = []
    for i, entry in enumerate(data, 1):
        for cfg in _expand_entry(entry, f"grid file {path}, entry {i}"):
            if cfg not in grid:
                grid.append(cfg)
    return grid


def _expand_entry(entry: Any, where: str) -> list[ModelConfig]:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a table of config fields, not {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_CONFIG_KEYS) - set(_LIST_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                        f"known: {', '.join(_CONFIG_KEYS + tuple(_LIST_KEYS))}")
    for plural, singular in _LIST_KEYS.items():
        if plural in entry and singular in entry:
            raise UserError(f"{where}: give either '{singular}' or '{plural}', not both")
    if "model" not in entry:
        raise UserError(f"{where}: missing field 'model'")
    fields = {k: v for k, v in entry.items() if k in _CONFIG_KEYS}
    lists = {}
    for plural, singular in _LIST_KEYS.items():
        if plural in entry:
            values = entry[plural]
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}: '{plural}' must be a non-empty list")
            lists[singular] = values
    kinds = {"model": (str,), "width": (int, float), "resolution": (int,), "num_classes": (int,),
             "output_stride": (int,), "batch": (int,)}
    wanted = {"model": "a string", "width": "a number"}
    combos = [dict(fields)]
    for key, values in lists.items():
        combos = [dict(c, **{key: v}) for c in combos for v in values]
    out = []
    for c in combos:
        for key, value in c.items():
            if value is None and key not in ("model",):
                continue
            if not isinstance(value, kinds[key]) or isinstance(value, bool):
                raise UserError(f"{where}: field '{key}' must be {wanted.get(key, 'an integer')}, not {value!r}")
        if "width" in c and c["width"] is not None:
            c["width"] = float(c["width"])
        try:
            out.append(ModelConfig(**c))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return out


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelTime:
    """One kernel call of a run, in execution order."""

    name: str  # the PrimFunc symbol, e.g. fused_conv2d3_add2_tir_clip1
    output_shape: tuple[int, ...]  # shape of the last (destination) argument
    bytes: int  # all tensor arguments: inputs, weights and outputs
    ms: float  # median over the profiled runs
    madds: int | None = None  # derived from the argument shapes for conv2d / matmul kernels
    layer: str | None = None  # the model layer, where the kernel's engine names it (ONNX Runtime does)


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
        from .targets import host_cores

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

        from .bundle import Runner, reference

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
    (each kernel rebuilt alone and timed on the board, times its calls).

    One session serves the whole grid (with ``--ssh``, one RPC server started on the board): it
    opens on the first point and closes with :meth:`close`; use the measurer as a context manager.
    """

    def __init__(self, where: Any, *, arch: str | None = None, repeat: int = 7, min_repeat_ms: int = 100,
                 number: int = 1, profile: bool = True, session_timeout: float = 0.0, rpc_timeout: float = 0.0,
                 tolerance: float | None = None) -> None:
        from .bench import DEFAULT_TOLERANCE, BenchSettings

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
        if self._remote is not None:
            self._remote.close()
            self._remote = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()  # stops the server started on the board, closes the SSH connection

    def _open(self) -> Any:
        if self._remote is not None:
            return self._remote
        from . import remote as rpc

        w, s = self.where, self.settings
        stack = contextlib.ExitStack()
        try:
            if w.rpc:
                sess = rpc.connect(*w.rpc, session_timeout=s.session_timeout)
            elif w.tracker:
                sess = rpc.request(*w.tracker, w.key, wait_s=w.wait_s, session_timeout=s.session_timeout)
            else:
                from .board import open_board

                def same_arch(info: dict[str, Any]) -> None:
                    if self.arch and info["arch"] != self.arch:
                        raise UserError(f"the target is {self.arch} but {w.ssh} is {info['uname_m']}: compare with "
                                        "this board's target")

                ob = stack.enter_context(open_board(w.ssh, w.ssh_opts, precheck=same_arch))
                sess = rpc.connect("127.0.0.1", ob.local_port, session_timeout=s.session_timeout,
                                   via=f"ssh {w.ssh}")
                sess.info.update(ob.identity())
                sess.address = f"{w.ssh} (127.0.0.1:{ob.server.port} on the board)"
                self.emulated = bool(ob.info.get("emulated"))
                self.emulation = "emulated" if self.emulated else "real"
        except BaseException:
            stack.close()
            raise
        self._stack, self._remote = stack, sess
        self.board = {k: v for k, v in sess.identity().items() if v is not None}
        return sess

    def measure(self, bundle_dir: Path, cfg: ModelConfig, *, profile: bool = True) -> Measurement:
        from dataclasses import replace

        from .bench import run_bench

        sess = self._open()
        settings = replace(self.settings, profile=profile and self.profile)
        chatter = io.StringIO()
        # profile_kernels announces each rebuild; keep only what a user must see.
        with contextlib.redirect_stderr(chatter):
            result = run_bench(bundle_dir, sess, settings, emulated=self.emulated)
        for line in chatter.getvalue().splitlines():
            if line.startswith(("warning", "profile: skipped")):
                print(line, file=sys.stderr)
        kernels = _board_kernels(result.profile) if result.profile is not None else None
        threads = None
        with contextlib.suppress(Exception):  # a runtime without the function: the report says n/a
            threads = int(sess.session.get_function("runtime.NumThreads")())
        measured = {"number": settings.number, "repeat": settings.repeat, "min_repeat_ms": settings.min_repeat_ms,
                    "threads": threads, "max_abs_error": result.max_abs_error, "emulated": self.emulated,
                    "emulation": self.emulation, "profile_method": "board-kernels-alone" if kernels else None,
                    "board": self.board}
        return Measurement(statistics.median(result.samples_ms), result.samples_ms, kernels, measured)


def _board_kernels(profile: list[dict[str, Any]]) -> list[KernelTime]:
    """``bench``'s per-kernel rows (one per kernel, with call positions) as one
    :class:`KernelTime` per call, in the order ``main`` makes them."""
    import numpy as np

    calls: list[tuple[int, KernelTime]] = []
    for row in profile:
        shapes = [tuple(int(d) for d in s) for s in row["args"]]
        dtypes = row.get("dtypes") or ["float32"] * len(shapes)
        nbytes = sum(math.prod(s) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes))
        k = KernelTime(row["name"], _nchw(shapes[-1]) if shapes else (), int(nbytes), float(row["ms_per_call"]),
                       _kernel_madds(row["name"], shapes))
        positions = row.get("at") or [len(calls) + i for i in range(row["calls"])]
        calls += [(p, k) for p in positions]
    calls.sort(key=lambda pk: pk[0])
    return [k for _, k in calls]


def _is_kernel(symbol: str) -> bool:
    # PrimFuncs are plain identifiers; VM builtins and packed externs are dotted
    # (vm.builtin.alloc_tensor, vm.builtin.reshape, ...).
    return "." not in symbol


def _nchw(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel's output shape as the model's layer has it: blocked NCHW[b]c (5-D) → NCHW."""
    shape = tuple(shape)
    if len(shape) == 5:
        n, blocks, h, w, lanes = shape
        return (n, blocks * lanes, h, w)
    return shape


def _kernel_madds(name: str, shapes: list[tuple[int, ...]]) -> int | None:
    """MAdds of a conv2d / matmul kernel from its argument shapes (data, weight, ..., out)."""
    if len(shapes) < 3:
        return None
    out, weight = _nchw(shapes[-1]), shapes[1]
    numel = math.prod(out)
    # Tuned CPU kernels read their weights pre-packed (5-D and up): the element count is the
    # same, so weight elements per output channel still give k_h·k_w·C_in/groups.
    if "conv2d" in name and len(out) == 4 and len(weight) >= 4 and math.prod(weight) % out[1] == 0:
        return numel * (math.prod(weight) // out[1])
    if ("matmul" in name or "dense" in name) and len(shapes[0]) >= 2:
        return numel * shapes[0][-1]
    return None


def profile_kernels(vm: Any, device: Any, x: Any, runs: int = 5) -> list[KernelTime]:
    """Per-kernel wall time of ``vm["main"](x)`` through the VM's instrument hook.

    The hook runs in Python before and after every call instruction; only the interval between
    a kernel's two hooks is kept (a few µs of call overhead per kernel on the host). One
    untimed run records the kernels' shapes, then ``runs`` timed runs give a median per call.
    """
    import numpy as np
    import tvm
    import tvm_ffi

    shapes: list[tuple[str, list[tuple[int, ...]], int]] = []
    samples: list[list[int]] = []
    state = {"record": True, "t": 0}
    clock = time.perf_counter_ns

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if not _is_kernel(symbol):
            return 0
        if before:
            if state["record"]:
                arg_shapes, nbytes = [], 0
                for a in args:
                    if hasattr(a, "shape") and hasattr(a, "dtype"):
                        s = tuple(int(d) for d in a.shape)
                        arg_shapes.append(s)
                        nbytes += math.prod(s) * np.dtype(str(a.dtype)).itemsize
                shapes.append((symbol, arg_shapes, nbytes))
            state["t"] = clock()  # last thing before the kernel runs
        else:
            dt = clock() - state["t"]  # first thing after it returns
            if not state["record"]:
                samples[-1].append(dt)
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        arg = tvm.runtime.tensor(x, device)
        vm["main"](arg)
        state["record"] = False
        for _ in range(runs):
            samples.append([])
            vm["main"](arg)
    finally:
        # Removed, not replaced by a no-op: a Python call around each of the ~70 kernels would
        # add ~1.7 ms to every later run of MobileNetV2 (measured).
        vm.set_instrument(None)
    n = len(shapes)
    if not samples or any(len(s) != n for s in samples):
        raise RuntimeError("the kernel sequence changed between profiled runs")
    per_call = np.median(np.array(samples, dtype=float), axis=0) / 1e6
    out = []
    for (symbol, arg_shapes, nbytes), ms in zip(shapes, per_call):
        out_shape = _nchw(arg_shapes[-1]) if arg_shapes else ()
        out.append(KernelTime(symbol, out_shape, int(nbytes), float(ms), _kernel_madds(symbol, arg_shapes)))
    return out


# --------------------------------------------------------------------------------------
# Kernels → layers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTime:
    """One row of a per-layer profile: a model layer with its kernel, or a kernel of no layer."""

    layer: str  # the PyTorch module name, or the kernel name for kernels of no conv/linear layer
    kind: str  # conv, depthwise, pointwise, linear; "other" for pooling, resize, concat, ...
    madds: int
    bytes: int  # the layer's count (weights + activations in and out); the kernel's for "other"
    kernel: str | None
    ms: float | None  # None when no kernel was found for the layer
    output_shape: tuple[int, ...] = ()


@dataclass
class LayerMap:
    rows: list[LayerTime]  # in execution order; unmatched layers last (ms None)
    unmatched_layers: list[str]  # conv/linear layers no kernel was mapped to
    unmatched_kernels: list[str]  # conv2d/matmul kernels that matched no layer (kept as "other")

    @property
    def complete(self) -> bool:
        return not self.unmatched_layers and not self.unmatched_kernels

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "unmatched_layers": self.unmatched_layers,
                "unmatched_kernels": self.unmatched_kernels}


def _compute_kernel(name: str) -> bool:
    return any(k in name for k in ("conv2d", "matmul", "dense"))


def _padded(layer: Sequence[int], kernel: Sequence[int]) -> bool:
    """Whether a blocked kernel's output is the layer's with channels padded to its block
    (ONNX Runtime's NCHWc convs write 488 channels for a head's 486)."""
    if len(layer) != 4 or len(kernel) != 4:
        return False
    (n, c, h, w), (kn, kc, kh, kw) = layer, kernel
    return (n, h, w) == (kn, kh, kw) and c < kc < c + 16 and kc % 8 == 0


def same_module(layer: str, named: str) -> bool:
    """Whether a kernel named after module ``named`` computes ``layer``: the module itself or a
    sibling in the same parent (``features.0.2``, the ReLU6 a conv was fused with, for ``features.0.0``)."""
    return layer == named or layer.rsplit(".", 1)[0] == named.rsplit(".", 1)[0]


def map_kernels(kernels: Sequence[KernelTime], layers: Sequence[LayerCount]) -> LayerMap:
    """Map fused TIR kernels to the model's conv and linear layers.

    A kernel that names its layer (``KernelTime.layer``) takes it, or the first free layer of the
    same parent module (a conv fused with the ReLU6 beside it is named after the ReLU6): shapes and
    MAdds mislead where an engine pads channels (ONNX Runtime's NCHW16c kernels pad 24 channels to
    32 on AVX-512).

    Relax fuses each conv (or matmul) with its bias, clip and residual add into one kernel, so a
    conv2d/matmul kernel is one layer. A kernel takes the first free layer with its output shape,
    preferring one with the MAdds its argument shapes imply and one at or after the previous
    match (execution follows PyTorch's order; parallel branches may swap); failing the shape, one
    whose channels a blocked kernel padded. Other kernels (pooling,
    resize, concat, box decoding) become rows of kind ``other``.
    """
    free = list(range(len(layers)))
    by_layer: dict[int, KernelTime] = {}
    rows_order: list[tuple[str, Any]] = []
    unmatched_kernels: list[str] = []
    cursor = 0
    for k in kernels:
        named = []
        if k.layer is not None:
            named = ([i for i in free if layers[i].name == k.layer]
                     or [i for i in free if same_module(layers[i].name, k.layer)])
        if named:
            free.remove(named[0])
            by_layer[named[0]] = k
            cursor = named[0] + 1
            rows_order.append(("layer", named[0]))
            continue
        if _compute_kernel(k.name):
            cands = ([i for i in free if tuple(layers[i].output_shape) == tuple(k.output_shape)]
                     or [i for i in free if _padded(layers[i].output_shape, k.output_shape)])
            if cands:
                exact = [i for i in cands if k.madds is not None and layers[i].madds == k.madds]
                pool = exact or cands
                after = [i for i in pool if i >= cursor]
                i = (after or pool)[0]
                free.remove(i)
                by_layer[i] = k
                cursor = i + 1
                rows_order.append(("layer", i))
                continue
            unmatched_kernels.append(k.name)
        rows_order.append(("kernel", k))
    rows: list[LayerTime] = []
    for what, ref in rows_order:
        if what == "layer":
            lc, k = layers[ref], by_layer[ref]
            rows.append(LayerTime(lc.name, lc.kind, lc.madds, lc.bytes, k.name, k.ms, tuple(lc.output_shape)))
        else:
            label = ref.name if len(ref.name) <= 40 else ref.name[:39] + "…"  # fused names run to pages
            rows.append(LayerTime(label, "other", 0, ref.bytes, ref.name, ref.ms, tuple(ref.output_shape)))
    for i in free:
        lc = layers[i]
        rows.append(LayerTime(lc.name, lc.kind, lc.madds, lc.bytes, None, None, tuple(lc.output_shape)))
    return LayerMap(rows, [layers[i].name for i in free], unmatched_kernels)


# --------------------------------------------------------------------------------------
# Points file (resumability)
# --------------------------------------------------------------------------------------


def _point_key(label: str, variant: str) -> str:
    return f"{label}|{variant}"


def _records_fingerprint(records_dir: Path) -> str | None:
    """Digest of the records files, or None when there are none (tuned points depend on it)."""
    import hashlib

    h = hashlib.sha256()
    found = False
    for name in ("database_workload.json", "database_tuning_record.json"):
        p = records_dir / name
        try:
            data = p.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            data = b""
        except OSError as e:
            raise UserError(f"cannot read tuning records {p}: {e.strerror}") from None
        found |= bool(data)
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16] if found else None


class PointStore:
    """``points.jsonl``: one finished point per line, appended, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.points: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        lines: list[str] = []
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        torn = bool(raw) and not raw.endswith(b"\n")
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "key" not in rec:
                    raise ValueError
            except ValueError:
                self.dropped += 1
                continue
            self.points[rec["key"]] = rec
            lines.append(line)
        if self.dropped or torn:
            # A run killed mid-write leaves a torn last line; appending after it would glue the
            # next record to it, so keep only the whole records.
            from .bundle import write_atomic

            write_atomic(path, "".join(ln + "\n" for ln in lines).encode())

    def add(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.points[rec["key"]] = rec

    def discard(self, key: str) -> None:
        """Forget a stale point (it will be measured again and appended; the last line wins)."""
        self.points.pop(key, None)


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


class _Progress:
    """One line per point on stderr with an ETA weighted by each point's expected cost."""

    def __init__(self, enabled: bool, costs: dict[str, float], stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.costs = costs  # expected relative cost of every point still to measure
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.done_cost = 0.0
        self.done = 0

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[compare] {text}", file=self.stream, flush=True)

    def point(self, key: str, text: str) -> None:
        self.done += 1
        self.done_cost += self.costs.get(key, 0.0)
        elapsed = time.monotonic() - self.t0
        left = sum(self.costs.values()) - self.done_cost
        eta = elapsed / self.done_cost * left if self.done_cost > 0 else None
        from .tuning.progress import fmt_duration  # loaded already: points are measured with TVM

        self.say(f"{self.done}/{len(self.costs)} {text} | elapsed {fmt_duration(elapsed)}, ETA {fmt_duration(eta)}")


def _expected_cost(madds: int, variant: str) -> float:
    # Compiling dominates and is roughly constant; untuned runs scale with MAdds (~0.5 ms/MMAdd
    # on the host), tuned ones are ~20x faster.
    return 10.0 + madds / 1e6 * (0.02 if variant == "untuned" else 0.002)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    out_dir: Path
    complete: bool
    measured: int  # points measured in this call
    reused: int  # points taken from points.jsonl
    missing: list[str]  # points without a usable measurement, with the reason
    files: dict[str, Path]  # report file name → path
    report: dict[str, Any]  # what results.json holds


def run_compare(spec: TargetSpec, out_dir: Path, *, grid: str | Path = "default", records_dir: Path | None = None,
                measurer: Measurer | None = None, tune_trials_per_config: int = 0,
                progress: bool = True, profile: bool = True, passes: int = DEFAULT_PASSES) -> CompareResult:
    """Measure ``grid`` on ``spec`` untuned and tuned, and write the report to ``out_dir``.

    Every point is timed in ``passes`` passes over the grid (the first compiles and times; the
    others time the kept bundles again, in alternating order; the last also profiles the kernels)
    and its latency is the fastest pass's median: on a shared machine a slow pass is another
    process's doing, never a faster program.

    ``grid`` is a built-in grid's name (``"default"``, ``"quick"``) or a JSON/TOML file (:func:`load_grid`). ``records_dir`` defaults to
    the target's schedules folder. Finished points in ``out_dir/points.jsonl`` are reused (tuned
    ones only while the records are unchanged). Ctrl-C keeps the finished points, writes the
    report marked incomplete and re-raises ``KeyboardInterrupt``. ``profile=False`` skips the
    per-kernel timings (no per-layer report).
    """
    out_dir = Path(out_dir)
    configs = grid_configs(grid)
    if tune_trials_per_config < 0:
        raise UserError(f"the tuning budget per configuration must be >= 0, not {tune_trials_per_config}")
    if passes < 1:
        raise UserError(f"the number of measuring passes must be at least 1, not {passes}")
    measurer = measurer or HostMeasurer()
    if not isinstance(measurer, Measurer):
        raise TypeError("measurer must have name, emulated and measure(bundle_dir, cfg, profile=...)")
    if isinstance(measurer, HostMeasurer) and not (spec.is_host and spec.device_kind == "cpu"):
        raise UserError(f"target {spec.name} is not this machine's CPU: measure it on the board (over RPC)")
    records = Path(records_dir) if records_dir is not None else spec.records_dir
    if records.exists() and not records.is_dir():
        raise UserError(f"tuning records {records} is not a folder")
    try:
        (out_dir / WORK_DIR / "no-records").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report folder {out_dir}: {e.strerror}") from None
    lock = _lock_report_dir(out_dir)
    try:
        return _run(configs, spec, out_dir, records, measurer, tune_trials_per_config, progress, profile, passes)
    finally:
        os.close(lock)  # releases the flock


def _lock_report_dir(out_dir: Path) -> int:
    """One run per report folder: two would interleave their points and remove each other's report."""
    import fcntl

    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"report folder {out_dir} is in use by another compare run") from None
    return fd


def _run(configs: list[ModelConfig], spec: TargetSpec, out_dir: Path, records: Path, measurer: Measurer,
         tune_trials_per_config: int, progress: bool, profile: bool = True,
         passes: int = DEFAULT_PASSES) -> CompareResult:
    from .madds import count
    from .tuning.records import records_digest_for, workload_digests

    store = PointStore(out_dir / POINTS_FILE)
    _check_identity(store, spec, measurer, out_dir)
    # An old report next to new points would be presented as describing them: remove it first.
    for name in REPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    bar = _Progress(progress, {})
    if store.dropped:
        bar.say(f"dropped {store.dropped} unreadable line(s) of {POINTS_FILE} (a killed run); they are measured again")

    if tune_trials_per_config > 0:
        _tune_grid(configs, spec, records, tune_trials_per_config, measurer, bar)
    fingerprint = _records_fingerprint(records)
    digests = workload_digests(records) if fingerprint else {}

    def stale(rec: dict[str, Any]) -> bool:
        # Only records of the point's own kernels matter: tuning another config leaves it valid.
        wl = rec.get("task_workloads")
        return fingerprint is None or not wl or rec.get("records_fingerprint") != records_digest_for(digests, wl)

    # Count every configuration not yet fully measured: this also proves that it builds,
    # before any time is spent compiling the others.
    counts: dict[str, Any] = {}
    todo: list[tuple[ModelConfig, str]] = []
    for cfg in configs:
        keys = {v: _point_key(cfg.label, v) for v in VARIANTS}
        for v, key in keys.items():
            rec = store.points.get(key)
            if rec is not None and v == "tuned" and stale(rec):
                store.discard(key)  # measured against other records: stale
                rec = None
            if rec is None:
                todo.append((cfg, v))
        if any(c is cfg for c, _ in todo) and cfg.label not in counts:
            try:
                counts[cfg.label] = count(cfg)
            except UserError:
                raise
            except Exception as e:  # torch raises many kinds for a model that cannot run at that size
                raise UserError(f"configuration {cfg.label} cannot be built: {e.__class__.__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    reused = sum(1 for cfg in configs for v in VARIANTS if _point_key(cfg.label, v) in store.points)
    bar.costs = {_point_key(c.label, v): 0.0 if (v == "tuned" and fingerprint is None)
                 else _expected_cost(counts[c.label].madds, v) for c, v in todo}
    if reused:
        bar.say(f"{reused} point(s) already measured in {out_dir / POINTS_FILE}; {len(todo)} to go")
    if fingerprint is None:
        bar.say(f"no tuning records in {records}: tuned points are not measured "
                "(tune first, or pass a tuning budget per configuration)")

    failures: dict[str, str] = {}
    bar.t0 = time.monotonic()  # the ETA extrapolates measuring, not the counting and tuning before it
    measured = 0
    interrupted = False
    sigint = _SigintFlag()
    try:
        with sigint:
            for cfg, variant in todo:
                key = _point_key(cfg.label, variant)
                if variant == "tuned" and fingerprint is None:
                    failures[key] = f"no tuning records in {records}"
                    bar.point(key, f"{cfg.label} tuned: skipped, no records")
                    continue
                try:
                    # With later passes the profile waits for the last one: the pass right after the
                    # compile was the slowest for most tuned points (1.0/224: 16.1 ms, then 9.4, 9.2).
                    rec = _measure_point(cfg, variant, spec, out_dir, records, measurer, counts[cfg.label],
                                         profile and passes == 1)
                except UserError:
                    raise
                except Exception as e:  # a TVM build/run failure of one config should not stop the grid
                    if sigint.hit:  # Ctrl-C inside TVM's C++ can surface as a RuntimeError
                        raise KeyboardInterrupt from None
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    failures[key] = f"{e.__class__.__name__}: {msg}"[:300]
                    bar.point(key, f"{cfg.label} {variant}: FAILED ({failures[key]})")
                    continue
                if rec.get("status") == "uncovered":
                    failures[key] = "the records hold no schedule for any of its tasks"
                store.add(rec)
                measured += 1
                bar.point(key, _point_line(rec))
            for n in range(2, passes + 1):
                _extra_pass(n, passes, configs, store, spec, out_dir, records, measurer, bar, failures, profile)
    except KeyboardInterrupt:
        interrupted = True
        bar.say("interrupted: finished points are kept; run the same command again to resume")

    bar.say("fitting predictors and writing the report")
    result = _write_report(configs, store, spec, measurer, records, fingerprint, failures, out_dir,
                           interrupted, measured, reused)
    if interrupted:
        raise KeyboardInterrupt
    import shutil

    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)  # bundles are measured and gone
    bar.say(f"report: {out_dir / SUMMARY}" + ("" if result.complete else " (INCOMPLETE)"))
    return result


class _SigintFlag:
    """Remember that SIGINT arrived while measuring (see run_compare's loop)."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self) -> _SigintFlag:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _check_identity(store: PointStore, spec: TargetSpec, measurer: Measurer, out_dir: Path) -> None:
    for rec in store.points.values():
        if rec.get("target") != spec.name or rec.get("measurer") != measurer.name:
            raise UserError(f"{out_dir / POINTS_FILE} holds points of target {rec.get('target')} measured by "
                            f"{rec.get('measurer')}; this run is {spec.name} by {measurer.name}: "
                            "choose another report folder")


def _tune_grid(configs: list[ModelConfig], spec: TargetSpec, records: Path, trials: int, measurer: Measurer,
               bar: _Progress) -> None:
    """Tune each configuration up to ``trials`` measurements (tuning.tune skips what is done)."""
    from .lower import to_relax
    from .models import build
    from .tuning import RecordsError, tune

    runner = getattr(measurer, "tune_runner", None)  # an RPC measurer may offer its RunnerSpec
    if runner is None and not spec.is_host:
        raise UserError(f"target {spec.name} is not this machine: tune it over RPC first "
                        f"(`mnv2-tvm tune --target {spec.name} --rpc-tracker ...`), or use a measurer that can tune")
    target = spec.tvm_target()
    for i, cfg in enumerate(configs, 1):
        bar.say(f"tuning {i}/{len(configs)} {cfg.label}: up to {trials} trials into {records}")
        mod = to_relax(build(cfg), cfg, layout=spec.layout)
        try:
            # Grid configs share layers of one kind at other sizes: start each from the others.
            rep = tune(mod, target, records, trials, runner=runner, progress=bar.enabled, transfer=True)
        except RecordsError as e:
            raise UserError(str(e)) from None
        if rep.interrupted:
            raise KeyboardInterrupt
        bar.say(f"tuned {cfg.label}: {rep.trials_run} trials run, {len(rep.tasks) - rep.tasks_without_measurement}"
                f"/{len(rep.tasks)} tasks have a schedule")


def _measure_point(cfg: ModelConfig, variant: str, spec: TargetSpec, out_dir: Path, records: Path,
                   measurer: Measurer, counted: Any, profile: bool = True) -> dict[str, Any]:
    import shutil

    import tvm

    from .tuning.records import records_digest_for, workload_digests

    bundle_dir = _bundle_dir(out_dir, cfg, variant)
    t = time.perf_counter()
    result, notes = _build(cfg, variant, spec, out_dir, records)
    compile_s = time.perf_counter() - t
    tuning = result.manifest["tuning"]
    n_tuned, n_fallback = len(tuning["tuned"]), len(tuning["fallback"])
    rec: dict[str, Any] = {
        "key": _point_key(cfg.label, variant), "label": cfg.label, "config": cfg.to_dict(), "variant": variant,
        "target": spec.name, "measurer": measurer.name, "tvm_version": tvm.__version__,
        "task_workloads": tuning.get("workloads") if variant == "tuned" else None,
        "records_fingerprint": (records_digest_for(workload_digests(records), tuning.get("workloads") or [])
                                if variant == "tuned" else None),
        "madds": counted.madds, "params": counted.params,
        "layers": [asdict(layer) for layer in counted.layers],
        "tasks_tuned": n_tuned, "tasks_total": n_tuned + n_fallback, "fallback": tuning["fallback"],
        "compile_s": round(compile_s, 2), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "compile_notes": [ln for ln in notes.splitlines() if ln.startswith(("warning:", "note:"))],
    }
    if variant == "tuned" and n_tuned == 0:
        # Same library as the untuned build: measuring it again would only mislabel it.
        shutil.rmtree(bundle_dir, ignore_errors=True)
        return dict(rec, status="uncovered", latency_ms=None)
    t = time.perf_counter()
    m = measurer.measure(bundle_dir, cfg, profile=profile)
    rec.update(status="ok", latency_ms=m.latency_ms, passes_ms=[m.latency_ms], times_ms=m.times_ms,
               settings=m.settings, measure_s=round(time.perf_counter() - t, 2))
    if m.kernels is not None:
        _attach_profile(rec, m.kernels, counted.layers)
    return rec  # the bundle stays for the later passes; the work folder goes when the run ends


def _attach_profile(rec: dict[str, Any], kernels: list[KernelTime], layers: Sequence[LayerCount]) -> None:
    rec["kernels"] = [asdict(k) for k in kernels]
    rec["layer_map"] = map_kernels(kernels, layers).to_dict()
    total = sum(k.ms for k in kernels)
    rec["profiled_ms"] = total
    if rec["variant"] == "tuned":
        fallback = set(rec["fallback"])
        rec["fallback_time_share"] = sum(k.ms for k in kernels if k.name in fallback) / total if total > 0 else None


def _bundle_dir(out_dir: Path, cfg: ModelConfig, variant: str) -> Path:
    return out_dir / WORK_DIR / f"{cfg.label}-{variant}"


def _build(cfg: ModelConfig, variant: str, spec: TargetSpec, out_dir: Path, records: Path) -> tuple[Any, str]:
    """Compile one point's bundle afresh; returns the compile result and what it warned."""
    import shutil

    from .compile import compile_bundle

    bundle_dir = _bundle_dir(out_dir, cfg, variant)
    shutil.rmtree(bundle_dir, ignore_errors=True)
    rdir = records if variant == "tuned" else out_dir / WORK_DIR / "no-records"
    notes = io.StringIO()
    # compile_bundle warns on stderr about (un)tuned builds; the report says it per point instead.
    with contextlib.redirect_stderr(notes):
        result = compile_bundle(cfg, spec, bundle_dir, records_dir=rdir)
    return result, notes.getvalue()


def _passes(rec: dict[str, Any]) -> list[float]:
    # Points of reports written before passes existed have one pass: their median.
    return list(rec.get("passes_ms") or ([rec["latency_ms"]] if rec.get("latency_ms") else []))


def _extra_pass(n: int, passes: int, configs: list[ModelConfig], store: PointStore, spec: TargetSpec, out_dir: Path,
                records: Path, measurer: Measurer, bar: _Progress, failures: dict[str, str],
                profile: bool) -> None:
    """Time every measured point of the grid once more (pass ``n``): latency = the fastest pass.

    Every other pass goes through the grid backwards, so a point's passes are spread over the
    run rather than taken back to back; only points with fewer than ``n`` passes are timed, so
    an interrupted run resumes here too. The last pass also profiles the kernels (when asked),
    far from the point's compile. A bundle removed since (a finished earlier run) is compiled
    again.
    """
    from .madds import LayerCount

    order = [(cfg, v) for cfg in configs for v in VARIANTS]
    if n % 2 == 0:
        order.reverse()
    todo = []
    for cfg, v in order:
        rec = store.points.get(_point_key(cfg.label, v))
        if rec is not None and rec.get("status") == "ok" and len(_passes(rec)) < n:
            todo.append((cfg, v, rec))
    if not todo:
        return
    for cfg, v, rec in todo:
        bar.costs[f"{rec['key']}#{n}"] = 0.2 + (rec["latency_ms"] or 0.0) / 1e3 * 20  # ~20 timed runs a pass
    bar.say(f"pass {n}/{passes}: timing {len(todo)} point(s) again")
    for cfg, v, rec in todo:
        key = rec["key"]
        try:
            bundle_dir = _bundle_dir(out_dir, cfg, v)
            if not (bundle_dir / "manifest.json").exists():
                _build(cfg, v, spec, out_dir, records)
            m = measurer.measure(bundle_dir, cfg, profile=profile and n == passes)
        except UserError:
            raise
        except Exception as e:  # like a failed first pass: this point keeps the passes it has
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            failures.setdefault(key, f"pass {n}: {e.__class__.__name__}: {msg}"[:300])
            bar.point(f"{key}#{n}", f"pass {n}/{passes} {cfg.label} {v}: FAILED ({msg[:200]})")
            continue
        seen = _passes(rec) + [m.latency_ms]
        rec = dict(rec, passes_ms=seen, latency_ms=min(seen))
        if m.kernels is not None:
            layers = [LayerCount(**dict(d, output_shape=tuple(d["output_shape"]))) for d in rec["layers"]]
            _attach_profile(rec, m.kernels, layers)
        store.add(rec)
        bar.point(f"{key}#{n}", f"pass {n}/{passes} {cfg.label} {v}: {m.latency_ms:.3f} ms "
                                f"(passes so far {', '.join(f'{x:.3f}' for x in seen)}; keeps {min(seen):.3f})")


def _point_line(rec: dict[str, Any]) -> str:
    head = f"{rec['label']} {rec['variant']}"
    if rec["status"] != "ok":
        return f"{head}: not measured, the records cover none of its {rec['tasks_total']} tasks"
    times = rec["times_ms"]
    spread = (max(times) - min(times)) / rec["latency_ms"] * 100 if times else 0.0
    cov = ""
    if rec["variant"] == "tuned":
        cov = f", {rec['tasks_tuned']}/{rec['tasks_total']} tasks tuned"
        if rec.get("fallback_time_share"):
            cov += f" (untuned kernels {100 * rec['fallback_time_share']:.0f}% of time)"
    return (f"{head}: {rec['latency_ms']:.3f} ms (spread {spread:.0f}%){cov}; "
            f"compile {rec['compile_s']:.0f} s, measure {rec.get('measure_s', 0):.0f} s")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _usable(rec: dict[str, Any] | None) -> bool:
    """A measured point that says what its label claims (tuned means tuned)."""
    if rec is None or rec.get("status") != "ok" or not rec.get("latency_ms"):
        return False
    if rec["variant"] == "untuned":
        return True
    share = rec.get("fallback_time_share")
    if share is None:
        return not rec.get("fallback")
    return share < FALLBACK_TIME_LIMIT


def _to_point(rec: dict[str, Any]):
    from .predict import LayerCost, Point

    cfg = rec["config"]
    # The profile's shares, the robust latency's level: a profile is one short burst of runs, and
    # on a shared machine a burst can land in a slow spell that the fastest pass avoided.
    level = rec["latency_ms"] / rec["profiled_ms"] if rec.get("profiled_ms") and rec.get("latency_ms") else 1.0
    timed = {r["layer"]: r["ms"] * level for r in rec.get("layer_map", {}).get("rows", [])
             if r["kind"] != "other" and r["ms"] is not None}
    layers = [LayerCost(l["name"], l["kind"], int(l["madds"]), int(l["bytes"]), timed.get(l["name"]))
              for l in rec["layers"]]
    return Point(cfg["model"], float(cfg["width"]), int(cfg["resolution"]), int(rec["madds"]), layers,
                 float(rec["latency_ms"]), rec["variant"] == "tuned")


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: None instead (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _evaluate_variant(variant: str, recs: list[dict[str, Any]], others: list[dict[str, Any]],
                      peak: float | None) -> dict[str, Any]:
    """Fit on a split of the MobileNetV2 points of one variant; metrics on the held-out ones."""
    from .predict import evaluate, make_predictors, split

    out: dict[str, Any] = {"notes": []}
    points = [_to_point(r) for r in recs]
    n_cfg = len(points)
    if n_cfg < 3:
        out["notes"].append(f"{variant}: {n_cfg} usable MobileNetV2 configuration(s); predictors need at least 3 "
                            "(two to fit, one held out)")
        return out
    sp = split(points)
    if not sp.test or len(sp.train) < 2:
        out["notes"].append(f"{variant}: the split left no held-out configuration")
        return out
    profiled = all(any(l.ms for l in p.layers) for p in points)
    if not profiled:
        out["notes"].append(f"{variant}: the layerwise predictor is skipped: not every point has per-layer times "
                            "(measured without a profile)")
    predictors = make_predictors(peak, layer_times=profiled)
    try:
        out["results"] = evaluate(predictors, sp.train, sp.test)
    except ValueError as e:  # includes numpy's LinAlgError
        out["notes"].append(f"{variant}: fitting failed: {e}")
        return out
    out["split"] = sp.report()
    out["test_labels"] = sp.test_labels
    out["measured_test_ms"] = [p.latency_ms for p in sp.test]
    # Predictions for every point (train too, and the other models as out-of-family extrapolation).
    out["predicted_all"] = {}
    other_points = [_to_point(r) for r in others]
    for name, pred in predictors.items():
        allp = list(pred.predict(points))
        out["predicted_all"][name] = {p.label: float(v) for p, v in zip(points, allp)}
        for p, v in zip(other_points, pred.predict(other_points) if other_points else []):
            out["predicted_all"][name][p.label] = float(v)
    out["other_models"] = [{"label": p.label, "measured_ms": p.latency_ms} for p in other_points]
    if "naive" in predictors:
        # Naive is not fitted, so every point is fair: the share of peak the target reaches.
        out["naive_efficiency"] = statistics.median(
            out["predicted_all"]["naive"][p.label] / p.latency_ms for p in points)
    res = out["results"]
    if "linear" in res:
        lin = res["linear"]["metrics"]["mape"]
        out["beats_linear"] = {name: bool(res[name]["metrics"]["mape"] < lin) for name in OWN_PREDICTORS
                               if name in res}
    return out


def _write_report(configs: list[ModelConfig], store: PointStore, spec: TargetSpec, measurer: Measurer,
                  records: Path, fingerprint: str | None, failures: dict[str, str], out_dir: Path,
                  interrupted: bool, measured: int, reused: int) -> CompareResult:
    from . import predict as P
    from .bundle import write_atomic

    # Points reused from an earlier run carry what their board was, even if no board was opened now.
    emulated = bool(measurer.emulated or getattr(spec, "emulated", False)
                    or any(r.get("settings", {}).get("emulated") for r in store.points.values()))
    recs: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for cfg in configs:
        for v in VARIANTS:
            key = _point_key(cfg.label, v)
            rec = store.points.get(key)
            if rec is not None:
                recs[key] = rec
            if not _usable(rec):
                if rec is not None and rec.get("status") == "uncovered":
                    why = "the records hold no schedule for any of its tasks"
                elif rec is not None and rec.get("status") == "ok":
                    share = rec.get("fallback_time_share")
                    why = (f"partly tuned: untuned kernels take {100 * share:.0f}% of its time" if share is not None
                           else f"partly tuned: {len(rec.get('fallback', []))} tasks without a schedule")
                else:
                    why = failures.get(key, "interrupted before it was measured" if interrupted else "not measured")
                missing.append(f"{cfg.label} {v}: {why}")
    complete = not missing and not interrupted

    def usable(variant: str, model: str | None = "mobilenet_v2", other: bool = False) -> list[dict[str, Any]]:
        out = []
        for cfg in configs:
            rec = recs.get(_point_key(cfg.label, variant))
            if _usable(rec) and ((cfg.model == model) != other if model else True):
                # split/ranking key on (model, width, resolution): keep the first of duplicates
                if all((r["config"]["model"], r["config"]["width"], r["config"]["resolution"])
                       != (cfg.model, cfg.width, cfg.resolution) for r in out):
                    out.append(rec)
        return out

    evaluation = {v: _evaluate_variant(v, usable(v), usable(v, other=True), spec.peak_gflops) for v in VARIANTS}
    notes = [] if spec.peak_gflops else [f"naive prediction skipped: {spec.path} gives no peak throughput "
                                         "(device.peak_gflops or device.flops_per_cycle)"]
    notes += [n for v in VARIANTS for n in evaluation[v]["notes"]]
    states = {r.get("settings", {}).get("emulation") for r in recs.values() if r.get("status") == "ok"}
    emulation = "emulated" if emulated else "unknown" if "unknown" in states else "real"
    if emulation == "unknown":
        notes.append(f"measured on the board behind {measurer.name}: over RPC alone it cannot be told whether that "
                     "board is real or emulated (qemu); if it is emulated these timings mean nothing "
                     "(--ssh USER@BOARD checks it)")
    ranking: dict[str, Any]
    try:
        ranking = P.ranking_change([_to_point(r) for r in usable("untuned", None)],
                                   [_to_point(r) for r in usable("tuned", None)])
        ranking["flipped"] = [list(p) for p in ranking["flipped"]]
    except ValueError as e:
        ranking = {"note": str(e)}
    speedups = {}
    for cfg in configs:
        u, t = recs.get(_point_key(cfg.label, "untuned")), recs.get(_point_key(cfg.label, "tuned"))
        if _usable(u) and _usable(t):
            speedups[cfg.label] = u["latency_ms"] / t["latency_ms"]
    per_layer = _per_layer(recs)
    spreads = {r["label"] + " " + r["variant"]: max(_passes(r)) / min(_passes(r)) - 1.0
               for r in recs.values() if len(_passes(r)) > 1}

    report = {
        "format": FORMAT,
        "complete": complete,
        "interrupted": interrupted,
        "emulated": emulated,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"name": spec.name, "title": spec.title, "arch": spec.arch, "cores": spec.cores,
                   "clock_ghz": spec.clock_ghz, "peak_gflops": spec.peak_gflops, "peak_source": spec.peak_source,
                   "bandwidth_gbs": spec.bandwidth_gbs, "bandwidth_source": spec.bandwidth_source},
        # A resumed run that measured nothing opened no board: its points still say which it was.
        "measurer": {"name": measurer.name, "emulated": emulated, "emulation": emulation,
                     "board": getattr(measurer, "board", None) or next(
                         (r["settings"]["board"] for r in reversed(list(recs.values()))
                          if r.get("settings", {}).get("board")), None)},
        "records": {"dir": str(records), "fingerprint": fingerprint},
        "grid": [cfg.label for cfg in configs],
        "missing": missing,
        "points": [{k: v for k, v in r.items() if k not in ("kernels", "layer_map", "layers", "key")}
                   | {"usable": _usable(r)} for r in recs.values()],
        "evaluation": evaluation,
        "ranking": ranking,
        "tuning_speedup": speedups,
        # How far a point's slowest pass was above its fastest: the noise the passes remove.
        "pass_spread": ({"points": len(spreads), "median": statistics.median(spreads.values()),
                         "max": max(spreads.values()), "max_point": max(spreads, key=spreads.get)}
                        if spreads else None),
        "per_layer": per_layer,
        "fallback_time_limit": FALLBACK_TIME_LIMIT,
        "notes": notes,
    }
    report = _finite(report)
    files: dict[str, Path] = {}
    files.update(_plots(out_dir, recs, usable, evaluation, per_layer, spec, emulated))
    files[RESULTS_CSV] = out_dir / RESULTS_CSV
    write_atomic(files[RESULTS_CSV], _csv(configs, recs, evaluation).encode())
    files[RESULTS_JSON] = out_dir / RESULTS_JSON
    write_atomic(files[RESULTS_JSON], (json.dumps(report, indent=1) + "\n").encode())
    files[SUMMARY] = out_dir / SUMMARY
    summary = _summary(report, files, len(usable("tuned")), len(usable("untuned")))
    write_atomic(files[SUMMARY], summary.encode())
    return CompareResult(out_dir, complete, measured, reused, missing, files, report)


def _per_layer(recs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The per-layer profile for the share plot: MobileNetV2 1.0/224 tuned when it was measured,
    else the largest profiled MobileNetV2 point (tuned before untuned)."""
    cands = [r for r in recs.values() if _usable(r) and "layer_map" in r and r["config"]["model"] == "mobilenet_v2"]
    if not cands:
        return None
    ref = REFERENCE_CONFIG.label

    def rank(r: dict[str, Any]) -> tuple:
        return (r["label"] == ref and r["variant"] == "tuned", r["variant"] == "tuned", r["madds"])

    best = max(cands, key=rank)
    rows = best["layer_map"]["rows"]
    timed = [r for r in rows if r["ms"] is not None]
    t_total = sum(r["ms"] for r in timed) or 1.0
    m_total = sum(r["madds"] for r in timed) or 1
    by_kind: dict[str, dict[str, float]] = {}
    for r in timed:
        d = by_kind.setdefault(r["kind"], {"time_share": 0.0, "madd_share": 0.0, "ms": 0.0, "layers": 0})
        d["time_share"] += r["ms"] / t_total
        d["madd_share"] += r["madds"] / m_total
        d["ms"] += r["ms"]
        d["layers"] += 1
    for d in by_kind.values():
        # How many times more time than MAdds this kind takes (1 = MAdds rate it right).
        d["time_per_madd_share"] = d["time_share"] / d["madd_share"] if d["madd_share"] > 0 else None
    return {"label": best["label"], "variant": best["variant"], "is_reference": best["label"] == ref
            and best["variant"] == "tuned", "latency_ms": best["latency_ms"], "profiled_ms": best.get("profiled_ms"),
            "rows": rows, "unmatched_layers": best["layer_map"]["unmatched_layers"],
            "unmatched_kernels": best["layer_map"]["unmatched_kernels"], "by_kind": by_kind}


def _tmp_plot(out_dir: Path, name: str, draw) -> Path:
    """Draw to a temporary name and rename, so a plot file is never half-written."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp.png"
    try:
        draw(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _plots(out_dir: Path, recs, usable, evaluation, per_layer, spec: TargetSpec, emulated: bool) -> dict[str, Path]:
    from . import predict as P

    files: dict[str, Path] = {}
    tag = f" on {spec.name}" + (" (EMULATED: timings meaningless)" if emulated else "")
    pts = [_to_point(r) for v in VARIANTS for r in usable(v)]
    if pts:
        files[PLOT_LATENCY] = _tmp_plot(out_dir, PLOT_LATENCY, lambda p: P.plot_latency_vs_madds(
            pts, p, title=f"MobileNetV2 latency vs multiply-adds{tag}"))
    for v in ("tuned", "untuned"):
        ev = evaluation[v]
        if "results" in ev:
            preds = {name: r["predicted_ms"] for name, r in ev["results"].items()}
            files[PLOT_PREDICTED] = _tmp_plot(out_dir, PLOT_PREDICTED, lambda p: P.plot_predicted_vs_measured(
                preds, ev["measured_test_ms"], p,
                title=f"{v.capitalize()} MobileNetV2: predicted vs measured, {len(ev['test_labels'])} held-out configs{tag}"))
            break
    if per_layer is not None:
        rows = [r for r in per_layer["rows"] if r["ms"] is not None]
        layers = [P.LayerCost(r["layer"], r["kind"], r["madds"], r["bytes"]) for r in rows]
        times = [r["ms"] for r in rows]
        files[PLOT_LAYERS] = _tmp_plot(out_dir, PLOT_LAYERS, lambda p: P.plot_layer_share(
            layers, times, p, title=f"{per_layer['label']} ({per_layer['variant']}): per-layer time vs MAdd share{tag}"))
    return files


def _csv(configs: list[ModelConfig], recs: dict[str, dict[str, Any]], evaluation: dict[str, Any]) -> str:
    buf = io.StringIO()
    names = ["naive", "linear", "roofline", "layerwise"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "model", "width", "resolution", "output_stride", "variant", "status", "usable", "madds",
                "params", "latency_ms", "min_ms", "max_ms", "repeats", "tasks_tuned", "tasks_total",
                "fallback_time_share", "split", "passes_ms"] + [f"pred_{n}_ms" for n in names])
    for cfg in configs:
        for v in VARIANTS:
            rec = recs.get(_point_key(cfg.label, v))
            if rec is None:
                w.writerow([cfg.label, cfg.model, cfg.width, cfg.resolution, cfg.output_stride, v, "missing"])
                continue
            times = rec.get("times_ms") or []
            ev = evaluation[v]
            split_side = ""
            if "split" in ev and _usable(rec):
                label = _to_point(rec).label
                split_side = "test" if label in ev["split"]["test"] else "train" if label in ev["split"]["train"] else ""
            preds = []
            for n in names:
                val = ev.get("predicted_all", {}).get(n, {}).get(_to_point(rec).label) if _usable(rec) else None
                preds.append("" if val is None else f"{val:.6g}")
            share = rec.get("fallback_time_share")
            w.writerow([cfg.label, cfg.model, cfg.width, cfg.resolution, cfg.output_stride, v, rec["status"],
                        int(_usable(rec)), rec["madds"], rec["params"],
                        "" if rec.get("latency_ms") is None else f"{rec['latency_ms']:.6g}",
                        f"{min(times):.6g}" if times else "", f"{max(times):.6g}" if times else "", len(times),
                        rec["tasks_tuned"], rec["tasks_total"], "" if share is None else f"{share:.4f}",
                        split_side, ";".join(f"{x:.6g}" for x in _passes(rec))] + preds)
    return buf.getvalue()


def _fmt(x: Any, spec: str = ".3f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _summary(rep: dict[str, Any], files: dict[str, Path], n_tuned: int, n_untuned: int) -> str:
    t = rep["target"]
    L: list[str] = [f"# MAdds vs latency on {t['title']} (`{t['name']}`)", ""]
    if rep["emulated"]:
        L += ["> **emulated board: timings meaningless.** The numbers below exercise the pipeline only.", ""]
    elif rep["measurer"].get("emulation") == "unknown":
        L += ["> **board not identified as real or emulated** (reached over RPC only): if it is an emulator, "
              "these timings mean nothing.", ""]
    if rep["complete"]:
        L += [f"Complete: all {2 * len(rep['grid'])} points of the {len(rep['grid'])}-configuration grid measured.", ""]
    else:
        L += [f"> **INCOMPLETE** ({'interrupted; ' if rep['interrupted'] else ''}{len(rep['missing'])} of "
              f"{2 * len(rep['grid'])} points missing or unusable). Run the same command again to resume.", ""]
        L += [f"- {m}" for m in rep["missing"][:40]] + (["- …"] if len(rep["missing"]) > 40 else []) + [""]

    # Headline numbers.
    L += ["## In numbers", ""]
    headline_variant = None
    for v in ("tuned", "untuned"):
        if "results" in rep["evaluation"][v]:
            headline_variant = v
            break
    if headline_variant is None:
        L += ["- Too few usable MobileNetV2 points to fit and hold out predictors "
              f"(tuned: {n_tuned}, untuned: {n_untuned}; at least 3 configurations are needed)."]
    else:
        ev = rep["evaluation"][headline_variant]
        res = ev["results"]
        n = len(ev["test_labels"])
        if headline_variant != "tuned":
            L += ["- No usable tuned points: the numbers below are for **untuned** builds."]
        lin = res["linear"]["metrics"]
        L += [f"- MAdds as a predictor of {headline_variant} latency (latency = a·MAdds + b, fitted on "
              f"{len(ev['split']['train'])} MobileNetV2 configs, scored on {n} held out): R² {_fmt(lin['r2'])}, "
              f"mean error {_fmt(lin['mape'], '.1f')} %, worst {_fmt(lin['worst'], '.1f')} %, "
              f"{_fmt(100 * lin['within10'], '.0f')} % of configs within ±10 %, Spearman {_fmt(lin['spearman'])}."]
        if "naive" in res:
            nv = res["naive"]["metrics"]
            eff = ev.get("naive_efficiency")
            L += [f"- Naive 2·MAdds ÷ peak ({_fmt(t['peak_gflops'], '.0f')} GFLOP/s): mean error "
                  f"{_fmt(nv['mape'], '.1f')} %; MobileNetV2 runs at {_fmt(100 * eff if eff else None, '.1f')} % "
                  "of that peak (median)."]
        own = [name for name in OWN_PREDICTORS if name in res]
        for name in own:
            rf = res[name]["metrics"]
            beats = ev.get("beats_linear", {}).get(name)
            L += [f"- {OWN_PREDICTORS[name]}: mean error {_fmt(rf['mape'], '.1f')} %, worst {_fmt(rf['worst'], '.1f')} %, "
                  f"{_fmt(100 * rf['within10'], '.0f')} % within ±10 %, Spearman {_fmt(rf['spearman'])} — "
                  + ("it **beats** the calibrated MAdd model on held-out mean error." if beats else
                     "it does **not** beat the calibrated MAdd model on held-out mean error.")]
        if own:
            name = own[-1]  # the most informed of ours that could be fitted
            rf = res[name]["metrics"]
            met = rf["within10"] is not None and rf["within10"] >= GOAL_WITHIN10 and \
                rf["spearman"] is not None and rf["spearman"] >= GOAL_SPEARMAN
            L += [f"- Goal ({name} within ±10 % on ≥ {GOAL_WITHIN10:.0%} of held-out configs, Spearman ≥ "
                  f"{GOAL_SPEARMAN}): {'met' if met else 'not met'}"
                  + (f" (only {n} held-out configs)" if n < 5 else "") + "."]
    rk = rep["ranking"]
    if "spearman" in rk:
        pct = 100 * rk["flipped_pairs"] / rk["total_pairs"] if rk["total_pairs"] else 0.0
        L += [f"- Tuning changes the ranking of {rk['n']} configurations: Spearman(untuned, tuned) "
              f"{_fmt(rk['spearman'])}, {rk['flipped_pairs']} of {rk['total_pairs']} pairs ({pct:.0f} %) swap order."]
    else:
        L += [f"- Ranking change untuned → tuned: not available ({rk.get('note', '')})."]
    if rep["tuning_speedup"]:
        s = sorted(rep["tuning_speedup"].values())
        L += [f"- Tuning speeds configurations up {statistics.median(s):.1f}× (median; range "
              f"{s[0]:.1f}×–{s[-1]:.1f}×)."]
    pl = rep["per_layer"]
    if pl is not None:
        parts = []
        for kind, d in sorted(pl["by_kind"].items(), key=lambda kv: -kv[1]["time_share"]):
            parts.append(f"{kind} {100 * d['madd_share']:.0f} % of MAdds / {100 * d['time_share']:.0f} % of time")
        L += [f"- Per layer ({pl['label']} {pl['variant']}): " + "; ".join(parts) + "."]
    L += [""]

    # Tables.
    for v in ("tuned", "untuned"):
        ev = rep["evaluation"][v]
        if "results" not in ev:
            continue
        L += [f"## Predictors, {v} latency, held-out MobileNetV2 configs only", "",
              "| predictor | R² | MAPE % | worst % | within ±10 % | Spearman |", "|---|---|---|---|---|---|"]
        for name, r in ev["results"].items():
            m = r["metrics"]
            L += [f"| {name} | {_fmt(m['r2'])} | {_fmt(m['mape'], '.1f')} | {_fmt(m['worst'], '.1f')} | "
                  f"{_fmt(100 * m['within10'] if m['within10'] is not None else None, '.0f')} % | {_fmt(m['spearman'])} |"]
        L += ["", f"Train: {', '.join(ev['split']['train'])}.", "", f"Held out: {', '.join(ev['split']['test'])}.", ""]
        for name, r in ev["results"].items():
            params = ", ".join(f"{k}={_fmt_param(val)}" for k, val in r["params"].items())
            L += [f"- {name}: {params}"]
        if ev.get("other_models"):
            L += ["", "Other models (extrapolation from the MobileNetV2 fit, not part of the metrics):", ""]
            for o in ev["other_models"]:
                preds = ", ".join(f"{name} {_fmt(ev['predicted_all'][name].get(o['label']), '.2f')} ms"
                                  for name in ev["predicted_all"])
                L += [f"- {o['label']}: measured {_fmt(o['measured_ms'], '.2f')} ms; predicted {preds}"]
        L += [""]
    if rep["notes"]:
        L += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]

    L += ["## Measured points", "", "| config | untuned ms | tuned ms | MAdds (M) | tasks tuned |", "|---|---|---|---|---|"]
    by = {(p["label"], p["variant"]): p for p in rep["points"]}
    for label in rep["grid"]:
        u, tp = by.get((label, "untuned")), by.get((label, "tuned"))
        madds = (u or tp or {}).get("madds")

        def ms(p: dict | None) -> str:
            if p is None or p.get("latency_ms") is None:
                return "—"
            return f"{p['latency_ms']:.3f}" + ("" if p["usable"] else " (partly tuned)")

        tasks = f"{tp['tasks_tuned']}/{tp['tasks_total']}" if tp else "—"
        L += [f"| {label} | {ms(u)} | {ms(tp)} | {_fmt(madds / 1e6 if madds else None, '.1f', '—')} | {tasks} |"]
    L += [""]
    methods = {p.get("settings", {}).get("profile_method") for p in rep["points"]}
    on_board = "board-kernels-alone" in methods
    how = "each kernel timed alone on the board" if on_board else "instrumented"
    if pl is not None:
        rows = [r for r in pl["rows"] if r["ms"] is not None]
        t_total = sum(r["ms"] for r in rows) or 1.0
        m_total = sum(r["madds"] for r in rows) or 1
        diff = sorted(rows, key=lambda r: r["ms"] / t_total - r["madds"] / m_total)
        L += [f"## Per layer: {pl['label']} ({pl['variant']})", "",
              f"Kernel times sum to {_fmt(pl['profiled_ms'], '.2f')} ms ({how}) against a measured "
              f"latency of {_fmt(pl['latency_ms'], '.2f')} ms."
              + ("" if pl["is_reference"] else f" ({REFERENCE_CONFIG.label} tuned was not measured.)"), ""]
        if pl["unmatched_layers"] or pl["unmatched_kernels"]:
            L += [f"Unmatched: layers {pl['unmatched_layers']}, kernels {pl['unmatched_kernels']}.", ""]
        L += ["Layers MAdds under-rate most (share of time − share of MAdds):", "",
              "| layer | kind | MAdds % | time % | bytes (KB) |", "|---|---|---|---|---|"]
        for r in reversed(diff[-5:]):
            L += [f"| {r['layer']} | {r['kind']} | {100 * r['madds'] / m_total:.1f} | {100 * r['ms'] / t_total:.1f} | "
                  f"{r['bytes'] / 1024:.0f} |"]
        L += ["", "Layers MAdds over-rate most:", "", "| layer | kind | MAdds % | time % | bytes (KB) |",
              "|---|---|---|---|---|"]
        for r in diff[:5]:
            L += [f"| {r['layer']} | {r['kind']} | {100 * r['madds'] / m_total:.1f} | {100 * r['ms'] / t_total:.1f} | "
                  f"{r['bytes'] / 1024:.0f} |"]
        L += [""]
    L += ["## How it was measured", "",
          f"- Measurer `{rep['measurer']['name']}`; records `{rep['records']['dir']}`"
          + (f" (fingerprint {rep['records']['fingerprint']})" if rep["records"]["fingerprint"] else " (none)") + "."]
    L += ["- A tuned point is measured again only when the records of its own kernels change."]
    threads = sorted({str(p.get("settings", {}).get("threads")) for p in rep["points"] if p.get("settings")})
    if threads:
        L += [f"- TVM runtime threads: {', '.join(threads)}."]
    ps = rep.get("pass_spread")
    L += [("- Latency is the fastest of each point's timing passes over the grid, each pass the median of "
           "repeated runs (TVM time_evaluator); a point's slowest pass was "
           f"{100 * ps['median']:.0f} % above its fastest (median over {ps['points']} points; at most "
           f"{100 * ps['max']:.0f} %, {ps['max_point']})" if ps else
           "- Latency is the median of repeated runs (TVM time_evaluator), one timing pass")
          + f"; tuned points whose untuned kernels take ≥ {FALLBACK_TIME_LIMIT:.0%} of their time are listed "
            "but not fitted.",
          ("- Per-layer times: each kernel of the model rebuilt alone (same records, same target), timed on "
           "the board with time_evaluator on inputs of its shapes (warm caches), times its calls; "
           if on_board else
           "- Per-layer times: the Relax VM instrument hook around each kernel call, median over runs; "
           if pl is not None else "- Per-layer times: not profiled in this run.")
          + ("mapped to conv/linear layers by output shape and MAdds; taken in the last pass when there are "
             "several. The layerwise predictor learns from them scaled to the point's latency (the profile "
             "gives each layer's share, the fastest pass the level)." if pl is not None else ""),
          "- MAdds and bytes per layer: `mnv2-tvm madds` (bytes = fp32 weights + input and output activations).",
          "", "## Files", ""]
    L += [f"- `{name}`" for name in sorted(files)] + [f"- `{POINTS_FILE}` (raw points; resumes the run)", ""]
    return "\n".join(L)


def _fmt_param(val: Any) -> str:
    if isinstance(val, dict):
        return "{" + ", ".join(f"{k}: {_fmt_param(v)}" for k, v in val.items()) + "}"
    if isinstance(val, float):
        return f"{val:.4g}"
    return str(val)
