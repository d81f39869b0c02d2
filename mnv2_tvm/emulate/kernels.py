"""Small kernels with known work, built for a target: what the emulated-core tests and the
validation script measure (a vector add, a matmul with a parallel outer loop, a strided read).

    lib = build_kernel("vadd", "rpi4b", out_dir, n=4096)   # -> Kernel(path, func, args)

Each is a TVM PrimFunc compiled with the target's own TVM target and linker (a cross g++ for the
boards), exported as a shared library whose function ``func`` takes ``args`` (shape, dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Kernel:
    path: Path
    func: str
    args: tuple[tuple[tuple[int, ...], str], ...]
    flops: int           # floating-point operations of one call
    bytes_moved: int     # bytes each call reads and writes once (its compulsory traffic)


def _vadd(n: int):
    from tvm import te

    a = te.placeholder((n,), "float32", name="A")
    b = te.placeholder((n,), "float32", name="B")
    c = te.compute((n,), lambda i: a[i] + b[i], name="C")
    return te.create_prim_func([a, b, c]), [((n,), "float32")] * 3, n, 12 * n


def _matmul(n: int):
    from tvm import te

    a = te.placeholder((n, n), "float32", name="A")
    b = te.placeholder((n, n), "float32", name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return te.create_prim_func([a, b, c]), [((n, n), "float32")] * 3, 2 * n ** 3, 12 * n * n


def _stride(n: int, stride: int):
    """out[i] = in[i * stride]: one useful float per `stride` floats read past."""
    from tvm import te

    a = te.placeholder((n * stride,), "float32", name="A")
    c = te.compute((n,), lambda i: a[i * stride] * 2.0, name="C")
    return te.create_prim_func([a, c]), [((n * stride,), "float32"), ((n,), "float32")], n, 8 * n


def _schedule_matmul(func: Any, parallel: bool):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("C")
    i, j, k = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(i, jo, k, ji)
    sch.vectorize(ji)
    if parallel:
        sch.parallel(i)
    return sch.mod["main"]


def build_kernel(kind: str, target: str, out_dir: str | Path, *, n: int = 4096, stride: int = 16,
                 parallel: bool = True) -> Kernel:
    """Compile one test kernel for ``target`` (a name in targets/) into ``out_dir``."""
    import tvm

    from .. import targets
    from ..compile import _fcompile

    spec = targets.load(target)
    if kind == "vadd":
        func, args, flops, moved = _vadd(n)
    elif kind == "matmul":
        func, args, flops, moved = _matmul(n)
        func = _schedule_matmul(func, parallel)
    elif kind == "stride":
        func, args, flops, moved = _stride(n, stride)
    else:
        raise UserError(f"unknown test kernel {kind!r} (vadd, matmul, stride)")
    name = f"{kind}_{n}" + (f"_s{stride}" if kind == "stride" else "") + ("_par" if kind == "matmul" and parallel else "")
    func = func.with_attr("global_symbol", name)
    mod = tvm.IRModule({name: func})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{spec.name}.so"
    lib = tvm.compile(mod, target=spec.tvm_target())
    fcompile = _fcompile(spec)
    if fcompile:
        lib.export_library(str(path), fcompile=fcompile)
    else:
        lib.export_library(str(path))
    return Kernel(path=path, func=name, args=tuple((tuple(s), d) for s, d in args), flops=flops,
                  bytes_moved=moved)
