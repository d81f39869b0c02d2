"""Relax module (+ tuning records) → a bundle for one target: library, manifest, reference.

Compiling reads what tuning left in a records folder (the database, :mod:`.tuning.records`; the
loop-order table, :mod:`.tuning.row_order`) and fuses kernels exactly as tuning did
(:mod:`.tuning.tasks`); nothing of the search itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import bundle
from .errors import UserError
from .models import ModelConfig
from .targets import EMULATED_SUBDIR, TargetSpec

if TYPE_CHECKING:
    import tvm
    from tvm import relax

LIBRARY = "model.so"
KERNELS_LIBRARY = "kernels.so"  # the same kernels, alone: see bundle.verify_kernels


@dataclass
class CompileResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


@dataclass
class ApplyReport:
    """What :func:`compile_with_records` applied."""

    tuned: list[str]
    fallback: list[str]
    records_digest: str | None  # sha256 of workload file + NUL + record file as read
    records_dir: str | None
    untuned: bool = field(default=False)
    # Structural hashes of every kernel's workload looked up in the records (see workload_digests)
    workloads: list[str] = field(default_factory=list)
    # Kernels whose parallel loop runs over output rows outermost (tuning.row_order.ROW_ORDER_FILE)
    rows_outermost: list[str] = field(default_factory=list)
    # Kernels whose record came from the emulated core's records (``<records>/emulated/``), not a board's
    emulated_records: int = 0


def kernels_module(mod: tvm.IRModule, target: tvm.target.Target, db: Any | None = None) -> tvm.IRModule:
    """The fused Relax module as it will be compiled: records of ``db`` applied and, where the
    tuned kernels read pre-packed weights, the packing folded into the constants. Its
    ``call_tir`` calls are exactly the kernels of the compiled library (``mod`` as from
    :func:`.tuning.tasks.prepare`)."""
    from .tuning.records import as_target
    from .tuning.tasks import fuse

    target = as_target(target)
    return _applied(fuse(mod, target), target, db)


def _applied(fused: tvm.IRModule, target: tvm.target.Target, db: Any | None) -> tvm.IRModule:
    import tvm
    from tvm import relax

    from .tuning.tasks import prepacks_weights

    if db is None:
        return fused
    with target, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)
        if prepacks_weights(target):
            applied = relax.transform.SplitLayoutRewritePreproc()(applied)
            applied = relax.transform.FoldConstant()(applied)
            applied = relax.transform.DeadCodeElimination(["main"])(applied)  # the folded repacking
    return applied


def _build(kernels: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    import tvm
    from tvm import relax

    from .kernels import loop_order

    if target.kind.name != "llvm":
        # GPU kernels need the default pipeline's DLight schedules to build at all (opencl.build:
        # with each rule guarded; `mnv2-tvm check-opencl` runs the kernels it produces).
        from . import opencl

        return opencl.build(kernels, target)
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes

    # Lower only: the default pipeline would run FuseOps again over the tuned kernels and
    # could merge them into new, unscheduled ones.
    @tvm.transform.module_pass(opt_level=0)
    def lower(m: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(dataflow_lower_passes(target) + finalize_passes(target))(m)

    with target:
        return relax.build(kernels, target=target, relax_pipeline=lower, tir_pipeline=loop_order.tir_pipeline())


def compile_with_records(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: Path | None,
    params: dict | None = None,
) -> tuple[relax.VMExecutable, ApplyReport]:
    """Compile ``mod`` with the best records of ``records_dir`` applied to its kernels.

    Without records (``records_dir`` None, missing or empty) the kernels are compiled as
    legalised (slow on CPUs); the report then says ``untuned``.
    """
    executable, report, _ = compile_kernels(mod, target, records_dir, params)
    return executable, report


def compile_kernels(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: Path | None,
    params: dict | None = None,
) -> tuple[relax.VMExecutable, ApplyReport, tvm.IRModule]:
    """:func:`compile_with_records`, also returning the module that was compiled (see
    :func:`kernels_module`), for listing the library's kernels and their argument shapes."""
    import tvm

    from .kernels import loop_order
    from .tuning.records import (BOARD_MEASUREMENT, PreferringDatabase, as_target, check_meta, has_files,
                                 measurement_of, open_records, read_meta)
    from .tuning.row_order import rows_outermost_kernels
    from .tuning.tasks import fuse, prepare

    target = as_target(target)
    prepared = prepare(mod, params)
    rdir = Path(records_dir) if records_dir is not None else None
    emu_dir = rdir / EMULATED_SUBDIR if rdir is not None else None
    if rdir is None or not any(d.is_dir() and has_files(d) for d in (rdir, emu_dir)):
        if rdir is not None and rdir.is_dir():
            meta = read_meta(rdir)
            if meta is not None:
                check_meta(meta, target, rdir)
        kernels = kernels_module(prepared, target)
        names = sorted(gv.name_hint for gv, f in kernels.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
        report = ApplyReport([], names, None, None if rdir is None else str(rdir), untuned=True)
        return _build(kernels, target), report, kernels
    # A board's records (the folder's own) and the emulated core's (its emulated/ sub-folder):
    # per kernel, the board's record when it has one.
    dirs = [d for d in (rdir, emu_dir) if d.is_dir() and has_files(d)]
    opened = [open_records(d, target, writable=False) for d in dirs]
    try:
        db = opened[0].db if len(opened) == 1 else PreferringDatabase([o.db for o in opened])
        fused = fuse(prepared, target)
        kernels = _applied(fused, target, db)
        # Named as the tasks are (SplitLayoutRewritePreproc renames kernels that read packed weights).
        prims = {gv.name_hint.removesuffix("_prepacked"): f
                 for gv, f in kernels.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        tuned = sorted(n for n, f in prims.items() if f.attrs and f.attrs.get("tirx.is_scheduled", False))
        fallback = sorted(n for n in prims if n not in set(tuned))
        reorder: set[str] = set()
        for o, d in zip(opened, dirs):
            reorder |= rows_outermost_kernels(fused, o.db, d)
        kernels, reordered = loop_order.rows_outermost(
            kernels, [gv.name_hint for gv in kernels.functions
                      if gv.name_hint.removesuffix("_prepacked") in reorder & set(tuned)])
        if len(opened) > 1:
            emulated = sum(1 for i in db.sources.values() if dirs[i] == emu_dir)
        else:
            emulated = len(tuned) if measurement_of(read_meta(dirs[0])) != BOARD_MEASUREMENT else 0
        report = ApplyReport(tuned, fallback, db.digest, str(rdir), untuned=not tuned, workloads=sorted(db.queried),
                             rows_outermost=sorted(n.removesuffix("_prepacked") for n in reordered),
                             emulated_records=emulated)
        return _build(kernels, target), report, kernels
    finally:
        for o in opened:
            o.close()


def _fcompile(spec: TargetSpec):
    """The linker for this target: host cc, a cross g++, or the Android NDK."""
    from tvm.support import cc

    if spec.ndk:
        ndk_cc = os.environ.get("TVM_NDK_CC")
        if not ndk_cc:
            check = (f"; its OpenCL kernels compile and run here without it: mnv2-tvm check-opencl MODEL "
                     f"--target {spec.name}") if spec.device_kind == "opencl" else ""
            raise UserError(f"target {spec.name} links with the Android NDK: install the NDK and set TVM_NDK_CC "
                            "to its clang++ (e.g. .../bin/aarch64-linux-android28-clang++)" + check)
        # A stale path would otherwise fail only after minutes of compiling, inside TVM's linker call.
        if shutil.which(ndk_cc) is None:
            raise UserError(f"TVM_NDK_CC={ndk_cc} is not an executable compiler; point it at the NDK's clang++ "
                            "(e.g. $NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang++)")
        from tvm.support import ndk

        return ndk.create_shared
    if spec.cross_compiler:
        if shutil.which(spec.cross_compiler) is None:
            raise UserError(f"target {spec.name} needs the cross compiler {spec.cross_compiler}; install it "
                            f"(Debian: apt-get install g++-{spec.cross_compiler.rsplit('-', 1)[0]})")
        return cc.cross_compiler(spec.cross_compiler)
    return None


def kernel_table(mod: tvm.IRModule) -> list[dict[str, Any]]:
    """The ``call_tir`` kernels ``main`` calls, from the module that was compiled (see
    :func:`compile_kernels`): for each, its name (the function's name in the library), the shapes
    and dtypes of one call's arguments (inputs, then outputs), how many calls one inference makes
    and at which positions of ``main``'s call sequence (``at``). The manifest keeps it, so a
    per-kernel profile times the bundle's own kernels with the right arguments and orders them
    onto the model's layers without building the model again."""
    import tvm

    call_tir = tvm.ir.Op.get("relax.call_tir")
    kernels: dict[str, dict[str, Any]] = {}
    position = 0

    def shapes(ty: Any) -> list[tuple[list[int], str]]:
        # TVM 0.27 types: TupleType has fields, TensorType a ShapeExpr and a dtype.
        if hasattr(ty, "fields"):
            return [s for f in ty.fields for s in shapes(f)]
        return [([int(v) for v in ty.shape.values], str(ty.dtype))]

    def visit(expr: Any) -> None:
        nonlocal position
        if hasattr(expr, "blocks"):  # SeqExpr
            for block in expr.blocks:
                for binding in block.bindings:
                    visit(binding.value)
        elif getattr(expr, "op", None) is not None and expr.op.same_as(call_tir):
            name = expr.args[0].name_hint
            args = [a for f in expr.args[1].fields for a in shapes(f.ty)] + shapes(expr.ty_args[0])
            k = kernels.setdefault(name, {"name": name, "args": [s for s, _ in args], "dtypes": [d for _, d in args],
                                          "calls": 0, "at": []})
            k["calls"] += 1
            k["at"].append(position)
            position += 1

    visit(mod["main"].body)
    return list(kernels.values())


def build_executable(mod: tvm.IRModule, spec: TargetSpec, records_dir: Path | None, *, untuned: bool = False
                     ) -> tuple[Any, dict[str, Any], tvm.IRModule]:
    """Compile a Relax module, applying tuning records when there are any; also returns the
    module that was compiled (for :func:`kernel_table`). ``untuned``: no records on purpose (a
    baseline), so nothing is said about their absence."""
    from .tuning.records import RecordsError

    try:
        executable, report, compiled = compile_kernels(mod, spec.tvm_target(), None if untuned else records_dir)
    except RecordsError as e:
        raise UserError(str(e)) from None
    info = asdict(report)
    total = len(report.tuned) + len(report.fallback)
    if untuned:
        pass
    elif not report.tuned:
        print(f"warning: no tuning records for target {spec.name} apply to this model: the library is "
              f"untuned and slow on CPU; run `mnv2-tvm tune` first", file=sys.stderr)
    elif report.fallback:
        print(f"note: {len(report.fallback)} of {total} tasks have no tuned schedule: "
              + ", ".join(report.fallback[:5]) + ("…" if len(report.fallback) > 5 else ""), file=sys.stderr)
    return executable, info, compiled


def _export(module: Any, path: Path, fcompile: Any, spec: TargetSpec) -> None:
    """Link ``module`` to ``path`` through a temporary file: a failed link leaves no half library."""
    tmp = path.with_name(f".{path.name}.tmp.so")
    try:
        module.export_library(str(tmp), fcompile=fcompile) if fcompile else module.export_library(str(tmp))
    except Exception as e:  # a linker failure surfaces as a TVMError with the compiler's output
        tmp.unlink(missing_ok=True)
        raise UserError(f"linking {path.name} for {spec.name} failed: {str(e).strip().splitlines()[-1]}") from None
    os.replace(tmp, path)
    arch = bundle.elf_arch(path)
    if arch != spec.arch:
        raise UserError(f"the linker produced a {arch} library for target {spec.name}, which needs {spec.arch}")


def _kernels_entry(executable: Any, compiled: tvm.IRModule, out_dir: Path, fcompile: Any,
                   spec: TargetSpec) -> dict[str, Any]:
    """Link the kernels alone beside the model and describe them (see ``bundle.verify_kernels``)."""
    libs = list(executable.mod.imports)
    if not libs:
        raise UserError(f"the compiled model has no kernel library to link for {spec.name}")
    table = kernel_table(compiled)
    absent = [k["name"] for k in table if not libs[0].implements_function(k["name"], True)]
    if absent:  # the table and the library come from one build: a mismatch is a bug here, not the user's
        raise RuntimeError(f"kernels {', '.join(absent[:3])} of main are not in the compiled library")
    path = out_dir / KERNELS_LIBRARY
    _export(libs[0], path, fcompile, spec)
    return {"library": KERNELS_LIBRARY, "library_sha256": bundle.sha256(path), "table": table}


def compile_bundle(cfg: ModelConfig, spec: TargetSpec, out_dir: Path, *, frontend: str = "torch",
                   records_dir: Path | None = None, weights: Path | None = None, seed: int = 0,
                   untuned: bool = False) -> CompileResult:
    """Build the model, lower it, compile it for ``spec`` and write a bundle to ``out_dir``
    (``untuned``: without tuning records on purpose, an untuned baseline)."""
    import torch
    import tvm

    from .lower import INPUT_NAME, to_relax
    from .madds import count
    from .models import build, example_input

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create bundle folder {out_dir}: {e.strerror}") from None
    fcompile = _fcompile(spec)  # fail on a missing linker before minutes of compiling
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    model = build(cfg, seed=seed, weights=weights)
    x = example_input(cfg, seed)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    counts = count(cfg, model)  # before to_relax folds batch norm into the convs
    mod = to_relax(model, cfg, frontend, spec.layout)
    seconds["lower"] = time.perf_counter() - t

    t = time.perf_counter()
    executable, tuning, compiled = build_executable(mod, spec, records_dir, untuned=untuned)
    seconds["build"] = time.perf_counter() - t

    t = time.perf_counter()
    lib = out_dir / LIBRARY
    _export(executable, lib, fcompile, spec)
    kernels = _kernels_entry(executable, compiled, out_dir, fcompile, spec)
    seconds["link"] = time.perf_counter() - t

    buf = _npz_bytes(input=x, output=expected)
    bundle.write_atomic(out_dir / bundle.REFERENCE, buf)
    shutil.copyfile(bundle.__file__, out_dir / bundle.RUNNER)
    shutil.copyfile(Path(bundle.__file__).with_name(bundle.POSTPROCESS), out_dir / bundle.POSTPROCESS)
    manifest = {
        "format_version": bundle.FORMAT_VERSION,
        "model": cfg.model,
        "label": cfg.label,
        "config": cfg.to_dict(),
        "frontend": frontend,
        "layout": spec.layout,
        "library": LIBRARY,
        "library_sha256": bundle.sha256(lib),
        "files": bundle.bundle_files(out_dir),
        "input": {"name": INPUT_NAME, "shape": list(cfg.input_shape), "dtype": "float32"},
        "outputs": [{"name": cfg.info.output_name, "shape": list(expected.shape), "dtype": "float32"}],
        "target": spec.name,
        "target_spec": json.loads(spec.target_json()),
        "arch": spec.arch,
        "device_kind": spec.device_kind,
        # The target's facts bench and compare need, so they never reload the target file.
        "device": {"cores": spec.cores, "clock_ghz": spec.clock_ghz, "peak_gflops": spec.peak_gflops,
                   "peak_source": spec.peak_source},
        "rpc_key": spec.rpc_key,
        "kernels": kernels,
        "tvm_version": tvm.__version__,
        "madds": counts.madds,
        "params": counts.params,
        "tuning": tuning,
        "seed": seed,
        "weights": str(weights) if weights else None,
        "compile_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    bundle.write_atomic(out_dir / bundle.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return CompileResult(out_dir, manifest, seconds)


def _npz_bytes(**arrays) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
