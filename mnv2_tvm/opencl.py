"""OpenCL targets: building their kernels, and running every kernel on an OpenCL device here.

The TVM wheels carry no OpenCL runtime, so a library built for a board's or a phone's GPU
cannot run on this machine; the GPU code inside it can. :func:`check` runs each OpenCL kernel
of a compiled model on a local OpenCL device (PoCL, OpenCL on the CPU, from Debian's
``pocl-opencl-icd``) through pyopencl, and compares what it writes with the same fused
operator before GPU scheduling, built for this CPU with LLVM:

* the kernels are those of the very compile ``mnv2-tvm compile`` runs (:class:`Capture` records
  what TVM's passes produce while it builds), each built from its own part of the OpenCL C
  source, as TVM's OpenCL runtime builds them (one program per ``// Function:`` part);
* the launch geometry is the one the host code passes: the work-group counts and sizes of each
  ``call_ffi_kernel``, turned into an NDRange as the runtime does (global = groups x local);
* the unit of comparison is a fused operator (one PrimFunc of the Relax module): its kernels
  run in the order its host code launches them, on buffers as that code allocates them, on
  random inputs (normal, fixed seed) with the model's weights where the graph passes
  constants; outputs start as NaN, so an element no kernel writes is a mismatch.

Tolerance: the error of an output is ``max |gpu - cpu| / max |cpu|`` (the largest magnitude of
the reference output; 1 if it is all zero), and must be at most ``TOLERANCE`` = 1e-4. Both
sides compute in float32 but in another order: the GPU schedules split reductions across
threads and tiles and the compilers contract multiply-adds differently, so a sum of K terms
may differ by a few K-scaled ulps of its largest partial sums (measured: ~1e-6 on these
models); a wrong index, a missed or doubled element or a flipped operator is off by the size
of the values themselves (errors of 1e-2 .. 1 of the output's scale).
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

#: Largest error allowed, relative to the largest magnitude of the reference output.
TOLERANCE = 1e-4
#: What TVM's codegen writes before each kernel's source and the runtime splits on.
DELIMITER = "// Function: "
INSTALL_DEVICE = "apt-get install pocl-opencl-icd"


# --------------------------------------------------------------------------- building


class _Guarded:
    """A DLight rule that does not apply where it fails, instead of failing the whole build.

    DLight's GEMV rule takes SSDLite's depthwise convolutions on 1x1 maps (the extra layers'
    last, at any resolution) for matrix-vector products and trips an assertion in its
    normalisation; the next rule (``Reduction``/``Fallback``) schedules them. Every kernel's
    result is checked by :func:`check` either way."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - any failure of a rule means: not this rule
            return None

    def is_target_available(self, target: Any) -> bool:
        return self.rule.is_target_available(target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)


def relax_pipeline(target: "tvm.target.Target") -> "tvm.transform.Pass":
    """TVM's default Relax pipeline for an OpenCL target (Adreno's for Adreno), with each DLight
    rule guarded (see :class:`_Guarded`)."""
    import tvm
    from tvm import relax

    backend = relax.backend.adreno if "adreno" in target.keys else relax.backend.gpu_generic

    @tvm.transform.module_pass(opt_level=0, name="mnv2_tvm.OpenCLPipeline")
    def pipeline(mod: "tvm.IRModule", _ctx: "tvm.transform.PassContext") -> "tvm.IRModule":
        with target:
            passes = (backend.library_dispatch_passes(target) + backend.legalize_passes(target)
                      + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))
            for p in passes:
                inst = getattr(p, "_inst", None)  # dlight.ApplyDefaultSchedule's Python object
                if isinstance(getattr(inst, "rules", None), list):
                    inst.rules = [_Guarded(r) for r in inst.rules]
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def build(kernels: "tvm.IRModule", target: "tvm.target.Target") -> "relax.VMExecutable":
    """Compile a fused Relax module for a GPU target: DLight schedules, then TVM's codegen."""
    import tvm

    return tvm.compile(kernels, target=target, relax_pipeline=relax_pipeline(target))


# --------------------------------------------------------------------------- what was built


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a host function, as TVM's OpenCL runtime would enqueue it."""

    kernel: str
    args: tuple  # ("buffer", slot) or ("scalar", value, dtype) per kernel parameter
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]


@dataclass
class Op:
    """A fused operator: a PrimFunc of the Relax module, its host code and its kernels."""

    name: str
    reference: Any  # the PrimFunc before GPU scheduling (None: not available)
    params: list[tuple[str, tuple[int, ...], str]]  # name, shape, dtype of each buffer
    n_inputs: int
    constants: dict[int, Any]  # parameter index -> numpy array the graph passes
    temporaries: list[int]  # bytes of each buffer the host code allocates (slots after params)
    launches: list[Launch]
    problem: str | None = None  # why the op cannot be run, if so


@dataclass
class Program:
    """The OpenCL side of a compiled model: the source, each kernel's part, the fused ops."""

    source: str
    kernels: dict[str, str]
    ops: list[Op]
    target: Any
    unlaunched: list[str] = field(default_factory=list)  # kernels no host code launches

    @property
    def n_kernels(self) -> int:
        return len(self.kernels)


def split_kernels(source: str) -> dict[str, str]:
    """The source of each kernel, cut as TVM's OpenCL runtime cuts it (``SplitKernels``): the
    text after each ``// Function: NAME`` line up to the next one."""
    parts: dict[str, str] = {}
    begin = source.find(DELIMITER)
    while begin != -1:
        begin += len(DELIMITER)
        eol = source.find("\n", begin)
        name = source[begin:eol]
        end = source.find(DELIMITER, eol + 1)
        parts[name] = source[eol + 1:] if end == -1 else source[eol + 1:end]
        begin = end
    return parts


def opencl_source(executable: Any) -> str:
    """The OpenCL C source a compiled executable (or runtime module) carries."""
    root = getattr(executable, "mod", executable)
    stack = [root]
    while stack:
        m = stack.pop()
        if m.kind == "opencl":
            return m.inspect_source()
        stack.extend(m.imports)
    raise ValueError("the compiled module holds no OpenCL code")


class Capture:
    """Records, while TVM compiles for an OpenCL target, the fused PrimFuncs before GPU
    scheduling and the TIR right after host and device code are split.

    >>> with Capture() as cap:
    ...     executable = build(kernels, target)
    >>> program = cap.program(executable)
    """

    def __init__(self, unscheduled: "tvm.IRModule | None" = None) -> None:
        self.unscheduled = unscheduled  # references for kernels scheduled by tuning records
        self.before_schedule: Any = None
        self.split: Any = None
        self._ctx: Any = None

    def __enter__(self) -> "Capture":
        import tvm

        cap = self

        @tvm.instrument.pass_instrument
        class Instrument:
            # Copies of the function maps: DLight updates the module it is given in place.
            def run_before_pass(self, mod: Any, info: Any) -> None:
                if info.name == "ApplyDefaultSchedule" and cap.before_schedule is None:
                    cap.before_schedule = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)

            def run_after_pass(self, mod: Any, info: Any) -> None:
                if info.name == "tirx.SplitHostDevice":
                    cap.split = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)

        current = tvm.transform.PassContext.current()
        self._ctx = tvm.transform.PassContext(
            opt_level=current.opt_level, required_pass=list(current.required_pass),
            disabled_pass=list(current.disabled_pass), config=dict(current.config),
            instruments=[*current.instruments, Instrument()])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def program(self, executable: Any) -> Program:
        if self.before_schedule is None or self.split is None:
            raise RuntimeError("no OpenCL build was seen: compile inside `with Capture()`")
        return _program(self.before_schedule, self.split, opencl_source(executable), self.unscheduled)


def _program(before: "tvm.IRModule", split: "tvm.IRModule", source: str,
             unscheduled: "tvm.IRModule | None") -> Program:
    from tvm import tirx

    kernels = split_kernels(source)
    device: dict[str, Any] = {}
    host: dict[str, Any] = {}
    target = None
    for gv, func in split.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.kernel_launch_params" in func.attrs:
            device[gv.name_hint] = func
            target = target or func.attrs.get("target")
        else:
            host[gv.name_hint] = func
    sites = _call_sites(before)
    ops = []
    for name in sorted(host):
        ref = _reference(name, before, unscheduled)
        params = [(str(p.name), tuple(int(d) for d in p.shape), str(p.dtype)) for p in host[name].params]
        n_inputs, constants = sites.get(name, (len(params) - 1, {}))
        op = Op(name, ref, params, n_inputs, constants, [], [])
        try:
            _launches(op, host[name], device)
        except _Unsupported as e:
            op.problem = f"host code not understood: {e}"
        if ref is None:
            op.problem = op.problem or "no unscheduled version to compare with"
        ops.append(op)
    launched = {launch.kernel for op in ops for launch in op.launches}
    return Program(source, kernels, [op for op in ops if op.launches or op.problem], target,
                   sorted(set(kernels) - launched))


def _reference(name: str, before: "tvm.IRModule", unscheduled: "tvm.IRModule | None") -> Any:
    """The PrimFunc ``name`` before GPU scheduling: as DLight received it or, when tuning records
    had scheduled it already, from the unscheduled module."""
    func = _lookup(before, name)
    if func is not None and not (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
        return func
    func = _lookup(unscheduled, name) if unscheduled is not None else None
    if func is not None and not (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
        return func
    return None


def _lookup(mod: "tvm.IRModule", name: str) -> Any:
    for gv, func in mod.functions.items():
        if gv.name_hint == name:
            return func
    return None


def _call_sites(mod: "tvm.IRModule") -> dict[str, tuple[int, dict[int, Any]]]:
    """For each PrimFunc a Relax function calls: its number of inputs and the constants the
    first call passes (parameter index -> numpy array)."""
    import tvm
    from tvm import relax

    sites: dict[str, tuple[int, dict[int, Any]]] = {}

    def visit(expr: Any) -> None:
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
                and expr.op.name == "relax.call_tir"):
            return
        gv, args = expr.args[0], expr.args[1]
        fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
        if gv.name_hint in sites:
            return
        consts = {i: a.value.numpy() for i, a in enumerate(fields) if isinstance(a, tvm.ir.expr.Constant)}
        sites[gv.name_hint] = (len(fields), consts)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sites


class _Unsupported(Exception):
    pass


def _launches(op: Op, func: Any, device: dict[str, Any]) -> None:
    """Fill ``op.launches`` and ``op.temporaries`` by walking the host function as TVM's
    runtime would run it: buffer declarations, allocations, bindings and kernel calls."""
    import tvm
    from tvm import tirx

    env: list[tuple[Any, Any]] = [(p, ("buffer", i)) for i, p in enumerate(func.params)]

    def lookup(var: Any) -> Any:
        for v, value in env:
            if v.same_as(var):
                return value
        raise _Unsupported(f"unknown variable {var}")

    def resolve(expr: Any) -> Any:
        if isinstance(expr, tvm.ir.Call) and expr.op.name == "tirx.buffer_data":
            return resolve(expr.args[0])
        if isinstance(expr, tvm.ir.Var):
            return lookup(expr)
        if isinstance(expr, (tirx.IntImm, tirx.FloatImm)):
            return ("scalar", expr.value, str(expr.ty.dtype))
        raise _Unsupported(f"expression {expr}")

    def walk(stmt: Any) -> None:
        if stmt is None:
            return
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                walk(s)
        elif isinstance(stmt, tirx.DeclBuffer):
            env.append((stmt.buffer, resolve(stmt.data)))
            walk(getattr(stmt, "body", None))
        elif isinstance(stmt, tirx.AllocBuffer):
            buf = stmt.buffer
            scope = buf.scope() if callable(getattr(buf, "scope", None)) else "global"
            if scope not in ("global", ""):
                raise _Unsupported(f"a {scope} allocation in host code")
            nbytes = int(np.prod([int(d) for d in buf.shape])) * np.dtype(str(buf.dtype)).itemsize
            op.temporaries.append(nbytes)
            env.append((buf, ("buffer", len(func.params) + len(op.temporaries) - 1)))
            walk(getattr(stmt, "body", None))
        elif isinstance(stmt, tirx.Bind):
            env.append((stmt.var, resolve(stmt.value)))
        elif isinstance(stmt, tirx.AttrStmt):
            walk(stmt.body)
        elif isinstance(stmt, tirx.AssertStmt):
            walk(getattr(stmt, "body", None))
        elif isinstance(stmt, tirx.Evaluate):
            call = stmt.value
            if isinstance(call, tvm.ir.Call) and call.op.name == "tirx.call_ffi_kernel":
                op.launches.append(_launch(call, device, resolve))
            elif not isinstance(call, tirx.IntImm):
                raise _Unsupported(f"statement {stmt}")
        else:
            raise _Unsupported(f"{type(stmt).__name__} in host code")

    walk(func.body)


def _launch(call: Any, device: dict[str, Any], resolve: Callable[[Any], Any]) -> Launch:
    """A ``call_ffi_kernel(name, args..., extents...)`` as an NDRange: TVM's OpenCL runtime
    (``ThreadAxisConfig``) sets work_dim to the highest thread axis used, the local size to the
    threadIdx extents and the global size to blockIdx x threadIdx extents."""
    name = str(call.args[0].value)
    if name not in device:
        raise _Unsupported(f"a call of {name}, which is no device kernel")
    tags = [str(t) for t in call.attrs.launch_params]
    n_args = len(device[name].params)
    args = tuple(resolve(a) for a in call.args[1:1 + n_args])
    extents = [resolve(a) for a in call.args[1 + n_args:]]
    if len(extents) != len(tags) or any(e[0] != "scalar" for e in extents):
        raise _Unsupported(f"launch parameters {tags} of {name}")
    groups, local = [1, 1, 1], [1, 1, 1]
    work_dim = 1
    for tag, (_, value, _) in zip(tags, extents):
        scope, _, axis = tag.partition(".")
        if scope not in ("blockIdx", "threadIdx") or axis not in ("x", "y", "z"):
            raise _Unsupported(f"launch parameter {tag} of {name}")
        dim = "xyz".index(axis)
        (groups if scope == "blockIdx" else local)[dim] = int(value)
        work_dim = max(work_dim, dim + 1)
    return Launch(name, args, tuple(g * t for g, t in zip(groups[:work_dim], local[:work_dim])),
                  tuple(local[:work_dim]))


# --------------------------------------------------------------------------- running


@dataclass
class Device:
    context: Any
    queue: Any
    name: str


def open_device() -> Device:
    """The OpenCL device to run on (``PYOPENCL_CTX`` picks one; default: the first), or a
    one-line :class:`UserError` naming what to install."""
    try:
        import pyopencl as cl
    except ImportError:
        raise UserError("checking OpenCL kernels needs pyopencl: pip install pyopencl "
                        "(scripts/setup.sh installs it)") from None
    try:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error:
        devices = []
    if not devices:
        raise UserError(f"no OpenCL device here to run the kernels on: {INSTALL_DEVICE} "
                        "(PoCL, OpenCL on the CPU)")
    if os.environ.get("PYOPENCL_CTX"):
        context = cl.create_some_context(interactive=False)
    else:
        context = cl.Context([devices[0]])
    dev = context.devices[0]
    return Device(context, cl.CommandQueue(context), f"{dev.name.strip()} ({dev.platform.name.strip()})")


@dataclass
class KernelResult:
    op: str
    kernel: str
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]
    error: float  # the op's outputs' error, relative to their scale (inf: wrong or not run)
    ok: bool
    note: str = ""
    scale: float = float("nan")  # the largest magnitude of the op's reference outputs


@dataclass
class CheckResult:
    device: str
    target: str
    tolerance: float
    rows: list[KernelResult]
    unlaunched: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and not self.unlaunched

    @property
    def n_kernels(self) -> int:
        """Kernel launches checked (each kernel is launched once in these models)."""
        return len(self.rows)

    @property
    def failed(self) -> list[KernelResult]:
        return [r for r in self.rows if not r.ok]

    @property
    def worst(self) -> KernelResult | None:
        return max(self.rows, key=lambda r: r.error, default=None)

    def table(self, failed_only: bool = False) -> str:
        """One line per kernel: its NDRange (global and local size), its op's error, the verdict."""
        def size(s: tuple[int, ...]) -> str:
            return "x".join(map(str, s))

        width = max([len(r.kernel) for r in self.rows] + [6])
        lines = [f"{'kernel':{width}s} {'global':>16s} {'local':>10s} {'max error':>10s}  result"]
        for r in self.failed if failed_only else self.rows:
            err = "-" if r.error != r.error else f"{r.error:10.2e}"
            lines.append(f"{r.kernel:{width}s} {size(r.global_size):>16s} {size(r.local_size):>10s} {err:>10s}  "
                         + ("ok" if r.ok else "MISMATCH") + (f" ({r.note})" if r.note else ""))
        return "\n".join(lines)

    def summary(self) -> str:
        worst = self.worst
        head = (f"{self.n_kernels} OpenCL kernels of {self.target} run on {self.device}: "
                f"{self.n_kernels - len(self.failed)} match the CPU")
        tail = (f"; worst error {worst.error:.2e} of the output scale ({worst.kernel}), tolerance {self.tolerance:g}"
                if worst is not None else "")
        lost = f"; {len(self.unlaunched)} kernels no host code launches: {', '.join(self.unlaunched)}" \
            if self.unlaunched else ""
        return head + tail + lost

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "target": self.target, "tolerance": self.tolerance, "ok": self.ok,
                "kernels": self.n_kernels, "failed": len(self.failed),
                "worst_error": self.worst.error if self.worst else None, "seconds": round(self.seconds, 1),
                "unlaunched": self.unlaunched,
                "rows": [{"op": r.op, "kernel": r.kernel, "global": list(r.global_size), "local": list(r.local_size),
                          "error": r.error, "scale": r.scale, "ok": r.ok, "note": r.note} for r in self.rows]}


def check(program: Program, device: Device | None = None, *, tolerance: float = TOLERANCE, seed: int = 0,
          progress: bool = False, sources: dict[str, str] | None = None, label: str | None = None) -> CheckResult:
    """Run every kernel of ``program`` on ``device`` and compare each fused op's outputs with
    its unscheduled PrimFunc built for this CPU. ``sources`` replaces kernels' OpenCL source
    (tests corrupt one to see the check fail)."""
    t0 = time.perf_counter()
    device = device or open_device()
    reference = _reference_library(program)
    kernels = {**program.kernels, **(sources or {})}
    limits = _limits(program.target)
    built: dict[str, Any] = {}
    rows: list[KernelResult] = []
    for i, op in enumerate(program.ops):
        if progress and sys.stderr.isatty():
            print(f"\r[{i + 1}/{len(program.ops)}] {op.name[:60]:60s}", end="", file=sys.stderr, flush=True)
        error, scale, note = float("inf"), float("nan"), op.problem or ""
        if not op.problem:
            try:
                inputs = _inputs(op, seed)
                expected = _run_reference(reference, op, inputs)
                got = _run_device(device, op, inputs, kernels, built)
                error = max((_error(e, g) for e, g in zip(expected, got)), default=0.0)
                scale = max((float(np.max(np.abs(e[np.isfinite(e)]), initial=0)) for e in expected), default=0.0)
            except _DeviceError as e:
                note = str(e)
        for launch in op.launches or [Launch("(none)", (), (), ())]:
            limit = _over_limits(launch, limits, built.get(launch.kernel), device)
            ok = error <= tolerance and not note and not limit
            rows.append(KernelResult(op.name, launch.kernel, launch.global_size, launch.local_size, error, ok,
                                     note or limit or ("" if ok else "outputs differ"), scale))
    if progress and sys.stderr.isatty():
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    if label is None:
        kind = str(program.target.attrs.get("device", "")) if program.target is not None else ""
        label = f"opencl -device={kind}" if kind else "opencl"
    return CheckResult(device.name, label, tolerance, rows, program.unlaunched, time.perf_counter() - t0)


class _DeviceError(Exception):
    pass


def _limits(target: Any) -> dict[str, int]:
    out = {}
    if target is not None:
        for key in ("max_num_threads", "max_shared_memory_per_block"):
            if key in target.attrs:
                out[key] = int(target.attrs[key])
    return out


def _over_limits(launch: Launch, limits: dict[str, int], kernel: Any, device: Device) -> str:
    """Whether a launch exceeds what the target says its GPU has (threads per work-group, local
    memory): it would fail there even though this device runs it."""
    threads = int(np.prod(launch.local_size)) if launch.local_size else 1
    if "max_num_threads" in limits and threads > limits["max_num_threads"]:
        return f"{threads} work-items per group; the target has at most {limits['max_num_threads']}"
    if kernel is not None and "max_shared_memory_per_block" in limits:
        import pyopencl as cl

        local = kernel.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, device.context.devices[0])
        if local > limits["max_shared_memory_per_block"]:
            return f"{local} bytes of local memory; the target has {limits['max_shared_memory_per_block']}"
    return ""


def _reference_library(program: Program) -> Any:
    """The unscheduled PrimFuncs of all ops, built in one library for this CPU."""
    import tvm

    funcs = {}
    for op in program.ops:
        if op.reference is None or op.problem:
            continue
        func = op.reference
        if func.attrs is not None and "target" in func.attrs:
            func = func.without_attr("target")
        funcs[tvm.ir.GlobalVar(op.name)] = func.with_attr("global_symbol", op.name)
    if not funcs:
        return None
    return tvm.tirx.build(tvm.IRModule(funcs), target=tvm.target.Target("llvm"))


def _inputs(op: Op, seed: int) -> list[Any]:
    """The op's inputs: the graph's constants where it passes some, else normal random values
    (fixed seed per op name), integers in [0, 4)."""
    rng = np.random.default_rng([seed, zlib.crc32(op.name.encode())])
    out = []
    for i, (name, shape, dtype) in enumerate(op.params[:op.n_inputs]):
        if i in op.constants:
            out.append(np.ascontiguousarray(op.constants[i], dtype=dtype).reshape(shape))
        elif np.issubdtype(np.dtype(dtype), np.floating):
            out.append(rng.standard_normal(shape).astype(dtype))
        else:
            out.append(rng.integers(0, 4, shape).astype(dtype))
    return out


def _run_reference(lib: Any, op: Op, inputs: list[Any]) -> list[Any]:
    import tvm

    args = [tvm.runtime.tensor(x) for x in inputs]
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype)) for _, shape, dtype in op.params[op.n_inputs:]]
    lib[op.name](*args, *outs)
    return [o.numpy() for o in outs]


def _run_device(device: Device, op: Op, inputs: list[Any], kernels: dict[str, str],
                built: dict[str, Any]) -> list[Any]:
    import pyopencl as cl

    mf = cl.mem_flags
    ctx, queue = device.context, device.queue
    buffers = []
    for i, (_, shape, dtype) in enumerate(op.params):
        if i < op.n_inputs:
            host = np.ascontiguousarray(inputs[i])
        else:
            host = np.full(shape, np.nan, dtype) if np.issubdtype(np.dtype(dtype), np.floating) \
                else np.full(shape, -1, dtype)  # never written: a mismatch
        buffers.append(cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=host) if host.nbytes
                       else cl.Buffer(ctx, mf.READ_WRITE, 4))
    for nbytes in op.temporaries:
        buffers.append(cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR,
                                 hostbuf=np.full(max(nbytes, 4), 0xFF, np.uint8)))
    try:
        for launch in op.launches:
            kernel = _kernel(device, launch.kernel, kernels, built)
            for k, arg in enumerate(launch.args):
                if arg[0] == "buffer":
                    kernel.set_arg(k, buffers[arg[1]])
                else:
                    kernel.set_arg(k, np.array(arg[1], dtype=arg[2]))
            cl.enqueue_nd_range_kernel(queue, kernel, launch.global_size, launch.local_size)
        outs = []
        for i, (_, shape, dtype) in enumerate(op.params[op.n_inputs:], op.n_inputs):
            host = np.empty(shape, dtype)
            cl.enqueue_copy(queue, host, buffers[i])
            outs.append(host)
        queue.finish()
    except cl.Error as e:
        raise _DeviceError(f"OpenCL error: {str(e).strip().splitlines()[0]}") from None
    return outs


def _kernel(device: Device, name: str, kernels: dict[str, str], built: dict[str, Any]) -> Any:
    """Kernel ``name`` built from its own part of the source, as TVM's runtime builds it."""
    import warnings

    import pyopencl as cl

    if name not in built:
        if name not in kernels:
            raise _DeviceError(f"no source for kernel {name}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PoCL's build log comes back as a CompilerWarning
                program = cl.Program(device.context, kernels[name]).build()
            built[name] = cl.Kernel(program, name)
        except cl.Error as e:
            log = [ln for ln in str(e).splitlines() if "error" in ln.lower()]
            raise _DeviceError(f"the OpenCL build failed: {(log or [str(e)])[-1].strip()[:160]}") from None
    return built[name]


def _error(expected: np.ndarray, got: np.ndarray) -> float:
    """``max |got - expected|`` relative to ``max |expected|``; inf where one side is NaN or
    infinite and the other is not (an element no kernel wrote stays NaN)."""
    if expected.shape != got.shape:
        return float("inf")
    if not np.issubdtype(expected.dtype, np.floating):
        return float(np.max(np.abs(expected.astype(np.int64) - got.astype(np.int64)), initial=0))
    finite = np.isfinite(expected)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    e_nf, g_nf = expected[~finite], got[~finite]
    if not np.all((np.isnan(e_nf) & np.isnan(g_nf)) | (e_nf == g_nf)):
        return float("inf")
    if not finite.any():
        return 0.0
    e, g = expected[finite].astype(np.float64), got[finite].astype(np.float64)
    scale = float(np.max(np.abs(e)))
    return float(np.max(np.abs(g - e))) / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------- a model, a bundle


def require_opencl(spec: Any) -> None:
    """One line, before any compiling, when ``spec`` is not an OpenCL target."""
    if spec.device_kind != "opencl":
        raise UserError(f"target {spec.name} runs on the {spec.device_kind}, not OpenCL: give an OpenCL "
                        "target such as rk3399-mali or adreno640")


def build_program(cfg: Any, spec: Any, *, frontend: str = "torch", records_dir: Any = None,
                  weights: Any = None, seed: int = 0) -> Program:
    """Lower and compile a model for an OpenCL target exactly as ``mnv2-tvm compile`` does, up
    to (not including) the link: no cross compiler or Android NDK is needed."""
    from pathlib import Path

    from .compile import compile_with_records, kernels_module
    from .lower import to_relax
    from .models import build as build_model
    from .tuning.records import has_files
    from .tuning.tasks import prepare

    require_opencl(spec)
    target = spec.tvm_target()
    mod = to_relax(build_model(cfg, seed=seed, weights=weights), cfg, frontend, spec.layout)
    rdir = Path(records_dir) if records_dir is not None else None
    # Kernels that tuning records schedule reach DLight scheduled: compare them with the fused
    # module before any records.
    unscheduled = kernels_module(prepare(mod, None), target) if rdir is not None and rdir.is_dir() \
        and has_files(rdir) else None
    with Capture(unscheduled) as cap:
        executable, _ = compile_with_records(mod, target, rdir)
    return cap.program(executable)


def bundle_program(bundle_dir: Any) -> tuple[Program, Any]:
    """Rebuild the OpenCL kernels of a bundle from its manifest, and make sure they are the very
    kernels its library embeds (their source byte for byte)."""
    from pathlib import Path

    from . import bundle, targets
    from .models import ModelConfig

    bundle_dir = Path(bundle_dir)
    m = bundle.load_manifest(bundle_dir)
    lib = bundle.verify_library(bundle_dir, m)
    if m.get("device_kind") != "opencl":
        raise UserError(f"bundle {bundle_dir} is for {m.get('target')}, which runs on the {m.get('device_kind')}; "
                        "it holds no OpenCL kernels")
    spec = targets.load(m["target"])
    cfg = ModelConfig.from_dict(m["config"])
    records = (m.get("tuning") or {}).get("records_dir")
    program = build_program(cfg, spec, frontend=m.get("frontend", "torch"), records_dir=records,
                            weights=m.get("weights"), seed=int(m.get("seed", 0)))
    if program.source.encode() not in lib.read_bytes():
        raise UserError(f"the OpenCL kernels of {lib} differ from a rebuild here (another TVM, mnv2-tvm or "
                        f"records?): recompile the bundle, then check it")
    return program, spec
