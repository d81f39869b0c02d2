#!/usr/bin/env python3
"""Hold the emulated-core cost against real timings, on x86-64 where there is ground truth.

The same libraries run twice: under qemu-x86_64 with the mnv2cost plugin, costed by the host's
core model (``[core]`` of the x86 target's TOML), and natively on this host, timed with TVM's
time_evaluator (best of several repeats: the machine is shared). The table shows predicted
against measured milliseconds and their ratio, kernel by kernel; ``--bundle`` adds a whole
compiled model (``mnv2-tvm compile ... --target x86-64-avx2``).

    .venv/bin/python scripts/validate_emulated_cost.py
    .venv/bin/python scripts/validate_emulated_cost.py --bundle /tmp/b86 --threads 1 2 --json out.json

A model that earns trust here (ratios near 1, and above all the same ranking of candidates)
is the one to use for the boards, where no ground truth exists. Set-up:
``bash scripts/setup_emulator.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_KERNELS = ["vadd:4096", "vadd:65536", "vadd:1048576", "stride:16384", "matmul:64", "matmul:128",
                   "matmul:256"]


def native_ms(lib_path: Path, func: str, args, threads: int) -> float:
    """Best per-call time over repeats, natively on this host."""
    import numpy as np
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    mod = tvm.runtime.load_module(str(lib_path))
    dev = tvm.cpu(0)
    tensors = [tvm.runtime.tensor(np.random.default_rng(i).standard_normal(shape).astype(dtype), dev)
               for i, (shape, dtype) in enumerate(args)]
    f = mod.time_evaluator(func, dev, number=5, repeat=15, min_repeat_ms=30)
    return min(f(*tensors).results) * 1e3


def native_bundle_ms(bundle_dir: Path, threads: int) -> float:
    import tvm

    from mnv2_tvm import bundle

    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    runner = bundle.Runner(bundle_dir)
    x, _ = bundle.reference(bundle_dir)
    return min(runner.time(x, number=5, repeat=15, min_repeat_ms=30)) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="x86-64-avx2", help="an x86-64 target with a [core] table")
    p.add_argument("--kernels", nargs="*", default=DEFAULT_KERNELS,
                   help="KIND:N (vadd, matmul, stride); default: %(default)s")
    p.add_argument("--bundle", type=Path, action="append", default=[], help="compiled bundles to add")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--work", type=Path, help="where to build the kernels (default: a temporary folder)")
    args = p.parse_args(argv)

    from mnv2_tvm.emulate import EmulatedCore, load_core_model
    from mnv2_tvm.emulate.kernels import build_kernel
    from mnv2_tvm.errors import UserError

    try:
        core_model = load_core_model(args.target)
        if core_model.arch != "x86_64":
            raise UserError(f"{args.target} is {core_model.arch}: validation needs an x86-64 target (ground truth)")
        work = args.work or Path(tempfile.mkdtemp(prefix="mnv2-validate-"))
        items = []
        for spec in args.kernels:
            kind, _, n = spec.partition(":")
            k = build_kernel(kind, args.target, work, n=int(n or 4096))
            items.append(("kernel", k.func, k))
        for b in args.bundle:
            items.append(("bundle", b.name, b))
        rows = []
        for threads in args.threads:
            with EmulatedCore(args.target, threads=threads) as emu:
                for kind, name, obj in items:
                    t0 = time.monotonic()
                    cost = emu.measure(obj.path, obj.func, obj.args) if kind == "kernel" else emu.measure_bundle(obj)
                    emu_s = time.monotonic() - t0
                    if not cost.ok:
                        print(f"{name}: emulation failed: {cost.error}", file=sys.stderr)
                        continue
                    real = native_ms(obj.path, obj.func, obj.args, threads) if kind == "kernel" \
                        else native_bundle_ms(obj, threads)
                    row = {"name": name, "threads": threads, "predicted_ms": cost.ms, "measured_ms": real,
                           "ratio": cost.ms / real if real else None, "instructions": cost.instructions,
                           "l1_misses": cost.cache[0]["miss"], "terms": cost.terms, "emulation_s": emu_s}
                    rows.append(row)
                    print(f"{name:24s} t={threads}  predicted {cost.ms:9.4f} ms  measured {real:9.4f} ms  "
                          f"ratio {row['ratio']:.2f}  ({cost.instructions:,} insns, emulated in {emu_s:.1f} s)",
                          flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        meta = {"target": args.target, "core": core_model.model, "host_cpu": _host_cpu(),
                "date": time.strftime("%Y-%m-%d")}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if rows:
        import math

        logs = [math.log(r["ratio"]) for r in rows if r["ratio"]]
        geo = math.exp(sum(logs) / len(logs))
        spread = math.exp((sum((x - math.log(geo)) ** 2 for x in logs) / len(logs)) ** 0.5)
        print(f"geometric-mean ratio predicted/measured {geo:.2f}, spread x{spread:.2f} over {len(rows)} rows")
    return 0


def _host_cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
