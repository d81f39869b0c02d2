#!/usr/bin/env python3
"""What running parallel loops with output rows outermost buys (``kernels.loop_order.rows_outermost``).

Two measurements, both on the shipped records of a target:

``--pairs``: each kernel of the model timed alone, and timed right after the kernel that produced
its input (inside the model, through the VM's instrument hook: the pair run back to back, minus
the producer alone). On 2 threads the difference is what reading the other core's output costs.

default: end to end, interleaved rounds in one process, the model compiled reordering the kernels
that timed within each ``--tolerance`` (0 = none, ``inf`` = every kernel it applies to) beside ONNX
Runtime; per-round ratios to ORT, split into rounds where ORT ran within 1.2× of its fastest round
of the run and slower ones (this shared machine has spells in which its second core is slow).

    .venv/bin/python scripts/bench_row_order.py --model mobilenet_v2 --threads 2
    .venv/bin/python scripts/bench_row_order.py --pairs --tolerance 0 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "ssdlite", "deeplabv3"])
    p.add_argument("--target", default="x86-64-avx512-nchw8c")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, nargs="+", default=[0, 1.1, 1.25, 2.0, float("inf")])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--pairs", action="store_true", help="kernels alone and after their producer")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read once, when TVM's pool starts
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import onnxruntime as ort
    import tvm
    from tvm import relax

    from bench_host import time_round  # this script's folder is first on sys.path
    from mnv2_tvm import targets
    from mnv2_tvm.compile import compile_with_records
    from mnv2_tvm.lower import export_onnx, to_relax
    from mnv2_tvm.models import ModelConfig, build, example_input
    from mnv2_tvm.tuning import row_order

    cfg = ModelConfig(args.model)
    spec = targets.load(args.target)
    mod = to_relax(build(cfg), cfg, "torch", spec.layout)
    x_np = example_input(cfg)
    x = tvm.runtime.tensor(x_np)
    vms = {}
    for tol in args.tolerance:
        row_order.ROW_ORDER_TOLERANCE = tol
        ex, rep = compile_with_records(mod, spec.tvm_target(), targets.records_dir(spec))
        vms[f"within {tol:g}x ({len(rep.rows_outermost)} kernels)"] = relax.VirtualMachine(ex, tvm.cpu())
    if args.pairs:
        for name, vm in vms.items():
            alone, after = pairs(vm, x)
            print(f"{name}: kernels alone {alone:.0f} us, after their producer {after:.0f} us "
                  f"(+{after - alone:.0f}) on {args.threads} thread(s)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(build(cfg), cfg, path)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        runs = {k: (lambda vm=vm: vm["main"](x)) for k, vm in vms.items()}
        runs["onnxruntime"] = lambda: sess.run(None, {"input": x_np})
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            for k, f in runs.items():
                times[k].append(time_round(f, 0.25))
            print(f"round {r + 1}/{args.rounds}: ORT {times['onnxruntime'][-1]:.2f} ms", file=sys.stderr)
    fastest = min(times["onnxruntime"])
    for label, keep in (("fast", lambda o: o < 1.2 * fastest), ("slow", lambda o: o >= 1.2 * fastest)):
        idx = [i for i, o in enumerate(times["onnxruntime"]) if keep(o)]
        if not idx:
            continue
        print(f"{label} rounds ({len(idx)}; ORT {statistics.median(times['onnxruntime'][i] for i in idx):.2f} ms), "
              f"{cfg.label}, {args.threads} thread(s), median of per-round ratios to ORT:")
        for k in runs:
            ratio = statistics.median(times[k][i] / times["onnxruntime"][i] for i in idx)
            print(f"  {k:32s} {statistics.median(times[k][i] for i in idx):8.2f} ms  {ratio:.3f}x")
    return 0


def pairs(vm, x) -> tuple[float, float]:
    """Sum over kernels of (alone, after their producer) median µs."""
    import tvm_ffi

    from mnv2_tvm.compare.profile import is_kernel

    def med(f, n=40):
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter_ns()
            f()
            ts.append(time.perf_counter_ns() - t)
        return statistics.median(ts) / 1e3

    prev, alone, after = [None], [0.0], [0.0]

    def instrument(func, symbol, before, ret, *args):
        if not is_kernel(symbol) or not before:
            return 0
        if prev[0] is not None:
            pf, pa = prev[0]
            alone[0] += med(lambda: func(*args))
            after[0] += med(lambda: (pf(*pa), func(*args))) - med(lambda: pf(*pa))
        prev[0] = (func, args)
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        vm["main"](x)
    finally:
        vm.set_instrument(None)
    return alone[0], after[0]


if __name__ == "__main__":
    sys.exit(main())
