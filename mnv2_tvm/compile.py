"""Relax module (+ tuning records) → a bundle for one target: library, manifest, reference."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import bundle
from .errors import UserError
from .models import ModelConfig
from .targets import TargetSpec

LIBRARY = "model.so"


@dataclass
class CompileResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


def _fcompile(spec: TargetSpec):
    """The linker for this target: host cc, a cross g++, or the Android NDK."""
    from tvm.support import cc

    if spec.ndk:
        ndk_cc = os.environ.get("TVM_NDK_CC")
        if not ndk_cc:
            raise UserError(f"target {spec.name} links with the Android NDK: install the NDK and set TVM_NDK_CC "
                            "to its clang++ (e.g. .../bin/aarch64-linux-android28-clang++)")
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


def build_executable(mod, spec: TargetSpec, records_dir: Path | None) -> tuple[Any, dict[str, Any]]:
    """Compile a Relax module, applying tuning records when there are any."""
    from .tune import RecordsError, compile_with_records

    try:
        executable, report = compile_with_records(mod, spec.tvm_target(), records_dir)
    except RecordsError as e:
        raise UserError(str(e)) from None
    info = asdict(report)
    total = len(report.tuned) + len(report.fallback)
    if not report.tuned:
        print(f"warning: no tuning records for target {spec.name} apply to this model: the library is "
              f"untuned and slow on CPU; run `mnv2-tvm tune` first", file=sys.stderr)
    elif report.fallback:
        print(f"note: {len(report.fallback)} of {total} tasks have no tuned schedule: "
              + ", ".join(report.fallback[:5]) + ("…" if len(report.fallback) > 5 else ""), file=sys.stderr)
    return executable, info


def compile_bundle(cfg: ModelConfig, spec: TargetSpec, out_dir: Path, *, frontend: str = "torch",
                   records_dir: Path | None = None, weights: Path | None = None, seed: int = 0) -> CompileResult:
    """Build the model, lower it, compile it for ``spec`` and write a bundle to ``out_dir``."""
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
    executable, tuning = build_executable(mod, spec, records_dir)
    seconds["build"] = time.perf_counter() - t

    t = time.perf_counter()
    lib = out_dir / LIBRARY
    tmp = out_dir / f".{LIBRARY}.tmp.so"
    try:
        executable.export_library(str(tmp), fcompile=fcompile) if fcompile else executable.export_library(str(tmp))
    except Exception as e:  # a linker failure surfaces as a TVMError with the compiler's output
        tmp.unlink(missing_ok=True)
        raise UserError(f"linking the library for {spec.name} failed: {str(e).strip().splitlines()[-1]}") from None
    os.replace(tmp, lib)
    seconds["link"] = time.perf_counter() - t
    arch = bundle.elf_arch(lib)
    if arch != spec.arch:
        raise UserError(f"the linker produced a {arch} library for target {spec.name}, which needs {spec.arch}")

    buf = _npz_bytes(input=x, output=expected)
    bundle.write_atomic(out_dir / bundle.REFERENCE, buf)
    shutil.copyfile(bundle.__file__, out_dir / bundle.RUNNER)
    manifest = {
        "format_version": bundle.FORMAT_VERSION,
        "model": cfg.model,
        "label": cfg.label,
        "config": cfg.to_dict(),
        "frontend": frontend,
        "layout": spec.layout,
        "library": LIBRARY,
        "library_sha256": bundle.sha256(lib),
        "input": {"name": INPUT_NAME, "shape": list(cfg.input_shape), "dtype": "float32"},
        "outputs": [{"name": cfg.info.output_name, "shape": list(expected.shape), "dtype": "float32"}],
        "target": spec.name,
        "target_spec": json.loads(spec.target_json()),
        "arch": spec.arch,
        "device_kind": spec.device_kind,
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
