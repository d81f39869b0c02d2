#!/usr/bin/env python3
"""Where tuned TVM loses to ONNX Runtime: both engines' per-layer times, in place, by layer kind.

TVM: the tuned bundle's kernels timed inside the model through the Relax VM's instrument hook
(``compare.profile_kernels``, as ``mnv2-tvm compare`` profiles). ONNX Runtime: its own profiler's
per-node times. ORT keeps the PyTorch module path in its node names and reports logical NCHW shapes
(even for its blocked NCHWc kernels), so both engines' kernels map onto the same model layers
(``compare.map_kernels``: output shape and MAdds, in execution order). The two engines alternate in
rounds, as in ``bench_host.py``, so a slow spell of this shared machine hits both; each layer's time
is its median over all profiled runs. End-to-end medians are timed without any profiler.

    .venv/bin/python scripts/profile_vs_ort.py                                  # MobileNetV2 1.0/224
    .venv/bin/python scripts/profile_vs_ort.py --model deeplabv3 --target x86-64-avx2-nchw8c
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

KINDS = ("conv", "depthwise", "pointwise", "linear", "other")


def ort_kernels(profile_file: str, skip_runs: int):
    """Per node of ORT's profile, median ms over the runs after the first ``skip_runs``, in
    execution order, as ``compare.KernelTime`` rows (Conv as conv2d, Gemm/MatMul as matmul)."""
    from mnv2_tvm.compare import KernelTime

    events = json.load(open(profile_file))
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip_runs:]
    per_run: list[list[dict]] = [[] for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for i, (t0, t1) in enumerate(runs):
            if t0 <= e["ts"] <= t1:
                per_run[i].append(e)
                break
    per_run = [sorted(r, key=lambda e: e["ts"]) for r in per_run if r]
    if not per_run or any(len(r) != len(per_run[0]) for r in per_run):
        raise SystemExit("profile_vs_ort: ORT's node sequence differs between runs")
    out = []
    for j, e in enumerate(per_run[0]):
        ms = statistics.median(r[j]["dur"] for r in per_run) / 1e3
        args = e["args"]
        ins = [tuple(next(iter(d.values()))) for d in args.get("input_type_shape", [])]
        outs = [tuple(next(iter(d.values()))) for d in args.get("output_type_shape", [])]
        shape = outs[0] if outs else ()
        nbytes = 4 * sum(math.prod(s) for s in ins + outs)
        op = args.get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        madds, name = None, f"{op} {node}"
        if op in ("Conv", "FusedConv") and len(ins) >= 2 and shape:
            madds, name = math.prod(shape) * (math.prod(ins[1]) // ins[1][0]), f"conv2d {op} {node}"
        elif op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul") and shape and ins:
            madds, name = math.prod(shape) * ins[0][-1], f"matmul {op} {node}"
        out.append(KernelTime(name, shape, nbytes, ms, madds, module_path(node)))
    return out


def module_path(node: str) -> str | None:
    """The PyTorch module an ORT node came from, from the scope path the exporter gives it:
    ``/features/features.7/conv/conv.2/Conv_output_0_nchwc`` is ``features.7.conv.2``. Each scope
    is a child's name, written in full under its parent (``features.7``) or relative (``conv``)."""
    scopes = node.split("/")[1:-1]
    if not scopes:
        return None
    name = scopes[0]
    for prev, scope in zip(scopes, scopes[1:]):
        name += scope[len(prev):] if scope.startswith(prev + ".") else "." + scope
    return name


def by_kind(rows) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for r in rows:
        if r.ms is not None:
            total[r.kind] += r.ms
    return dict(total)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "ssdlite", "deeplabv3"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int)
    p.add_argument("--target", default="host", help="a targets/ name of this host, 'host', or a .toml path")
    p.add_argument("--records", type=Path, help="default: the target's schedules/ folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=10, help="profiled runs per engine per round")
    p.add_argument("--out", type=Path, default=Path("reports/profile_vs_ort"))
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read once, when TVM's pool starts

    import onnxruntime as ort

    from mnv2_tvm import targets
    from mnv2_tvm.bundle import Runner
    from mnv2_tvm.compare import KernelTime, map_kernels, profile_kernels
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.lower import export_onnx
    from mnv2_tvm.madds import count
    from mnv2_tvm.models import ModelConfig, build, example_input

    spec = targets.load(args.target)
    cfg = ModelConfig(args.model, width=args.width, **({"resolution": args.resolution} if args.resolution else {}))
    records = targets.records_dir(spec, args.records)
    layers = count(cfg).layers
    x = example_input(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[{cfg.label}] compiling with {records} ...", file=sys.stderr)
        result = compile_bundle(cfg, spec, Path(tmp) / "tuned", records_dir=records)
        tuning = result.manifest["tuning"]
        runner = Runner(Path(tmp) / "tuned")
        onnx_path = export_onnx(build(cfg), cfg, Path(tmp) / "model.onnx")

        def session(profile: bool):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
            if profile:
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / "ort_profile")
            return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        ort_plain, ort_prof = session(False), session(True)
        feed = {"input": x}
        ort_prof.run(None, feed)  # its first run allocates: not counted (skip_runs=1)
        e2e = {"tvm": [], "ort": []}
        tvm_runs: list[list] = []
        for r in range(args.rounds):
            tvm_runs.append(profile_kernels(runner.vm, runner.device, runner.check_input(x), args.runs))
            for _ in range(args.runs):
                ort_prof.run(None, feed)
            e2e["tvm"].append(statistics.median(runner.time(x, number=1, repeat=max(5, args.runs))) * 1e3)
            times = []
            for _ in range(max(5, args.runs)):
                t = time.perf_counter()
                ort_plain.run(None, feed)
                times.append(time.perf_counter() - t)
            e2e["ort"].append(statistics.median(times) * 1e3)
            print(f"[{cfg.label}] round {r + 1}/{args.rounds}: TVM {e2e['tvm'][-1]:.2f} ms, "
                  f"ORT {e2e['ort'][-1]:.2f} ms", file=sys.stderr)
        ort_rows = ort_kernels(ort_prof.end_profiling(), skip_runs=1)
    # TVM: per kernel, the median over the rounds' medians
    tvm_rows = [KernelTime(k.name, k.output_shape, k.bytes, statistics.median(rr[i].ms for rr in tvm_runs), k.madds)
                for i, k in enumerate(tvm_runs[0])]
    maps = {"tvm": map_kernels(tvm_rows, layers), "ort": map_kernels(ort_rows, layers)}
    for eng, m in maps.items():
        if m.unmatched_layers:
            print(f"warning: {eng}: {len(m.unmatched_layers)} layers without a kernel "
                  f"({', '.join(m.unmatched_layers[:3])} ...)", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in e2e.items()}
    kinds = {eng: by_kind(m.rows) for eng, m in maps.items()}
    madds = defaultdict(int)
    n_layers = defaultdict(int)
    for lc in layers:
        madds[lc.kind] += lc.madds
        n_layers[lc.kind] += 1
    total_madds = sum(madds.values())
    table = []
    for kind in KINDS:
        t, o = kinds["tvm"].get(kind), kinds["ort"].get(kind)
        if t is None and o is None:
            continue
        table.append({"kind": kind, "layers": n_layers.get(kind, 0), "madds_share": madds.get(kind, 0) / total_madds,
                      "tvm_ms": t or 0.0, "ort_ms": o or 0.0,
                      "tvm_gmadds": madds[kind] / (t * 1e6) if kind != "other" and t else None,
                      "ort_gmadds": madds[kind] / (o * 1e6) if kind != "other" and o else None})
    inside = {eng: sum(kinds[eng].values()) for eng in kinds}
    table.append({"kind": "outside kernels", "layers": 0, "madds_share": 0.0,
                  "tvm_ms": max(0.0, med["tvm"] - inside["tvm"]), "ort_ms": max(0.0, med["ort"] - inside["ort"]),
                  "tvm_gmadds": None, "ort_gmadds": None})
    ort_by_layer = {r.layer: r.ms for r in maps["ort"].rows if r.kind != "other"}
    per_layer = [{"layer": r.layer, "kind": r.kind, "shape": list(r.output_shape), "madds": r.madds,
                  "tvm_ms": r.ms, "ort_ms": ort_by_layer.get(r.layer)}
                 for r in maps["tvm"].rows if r.kind != "other"]
    gaps = sorted((d for d in per_layer if d["tvm_ms"] is not None and d["ort_ms"] is not None),
                  key=lambda d: d["ort_ms"] - d["tvm_ms"])

    print(f"\n{cfg.label} on {spec.name}, {args.threads} thread(s): end-to-end TVM {med['tvm']:.2f} ms, "
          f"ORT {med['ort']:.2f} ms (TVM/ORT {med['tvm'] / med['ort']:.2f}x); {len(tuning.get('tuned', []))} tuned "
          f"tasks, {len(tuning.get('fallback', []))} fell back")
    print(f"  {'kind':16s} {'layers':>6s} {'MAdds %':>7s} {'TVM ms':>8s} {'ORT ms':>8s} {'TVM/ORT':>7s} "
          f"{'TVM GMAdd/s':>11s} {'ORT GMAdd/s':>11s}")
    for row in table:
        ratio = f"{row['tvm_ms'] / row['ort_ms']:.2f}" if row["ort_ms"] else "-"
        g = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
        print(f"  {row['kind']:16s} {row['layers']:6d} {100 * row['madds_share']:7.1f} {row['tvm_ms']:8.2f} "
              f"{row['ort_ms']:8.2f} {ratio:>7s} {g(row['tvm_gmadds']):>11s} {g(row['ort_gmadds']):>11s}")
    print("  layers where TVM loses most (ms behind ORT):")
    for d in gaps[:8]:
        print(f"    {d['layer']:32s} {d['kind']:9s} {'x'.join(map(str, d['shape'][1:])):>12s} "
              f"TVM {d['tvm_ms']:.3f}  ORT {d['ort_ms']:.3f}  (+{d['tvm_ms'] - d['ort_ms']:.3f})")
    stem = f"{spec.name}_{cfg.label}_vs_ort".replace("/", "_")
    out = {"model": cfg.label, "target": spec.name, "threads": args.threads, "rounds": args.rounds,
           "runs_per_round": args.runs, "end_to_end_ms": med, "end_to_end_rounds_ms": e2e, "by_kind": table,
           "per_layer": per_layer,
           "other_kernels": {eng: [{"kernel": r.kernel, "ms": r.ms} for r in m.rows if r.kind == "other"]
                             for eng, m in maps.items()},
           "tuning": {"tuned": len(tuning.get("tuned", [])), "fallback": len(tuning.get("fallback", []))},
           "command": "python scripts/profile_vs_ort.py " + " ".join(sys.argv[1:])}
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1))
    plot(table, per_layer, med, args.out / f"{stem}.png", f"{cfg.label} on {spec.name}, {args.threads} thr.")
    print(f"wrote {args.out}/{stem}.json and .png")
    return 0


def plot(table: list[dict], per_layer: list[dict], med: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    idx = range(len(table))
    a.bar([i - 0.2 for i in idx], [r["tvm_ms"] for r in table], 0.4, label=f"TVM tuned ({med['tvm']:.1f} ms)",
          color="#1b7837")
    a.bar([i + 0.2 for i in idx], [r["ort_ms"] for r in table], 0.4, label=f"ONNX Runtime ({med['ort']:.1f} ms)",
          color="#b2182b")
    a.set_xticks(list(idx), [r["kind"].replace(" kernels", "\nkernels") for r in table], fontsize=8, rotation=30)
    a.set_ylabel("ms per inference")
    a.legend(fontsize=8)
    a.set_title("time by layer kind", fontsize=9)
    colors = {"conv": "#762a83", "depthwise": "#e08214", "pointwise": "#2166ac", "linear": "#4d4d4d"}
    pts = [d for d in per_layer if d["tvm_ms"] and d["ort_ms"]]
    for kind, c in colors.items():
        sel = [(i, d["tvm_ms"] / d["ort_ms"]) for i, d in enumerate(pts) if d["kind"] == kind]
        if sel:
            b.scatter(*zip(*sel), s=14, color=c, label=kind)
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_yscale("log")
    b.set_xlabel("layer, in execution order")
    b.set_ylabel("TVM / ORT time (log)")
    b.legend(fontsize=8)
    b.set_title("per layer", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    sys.exit(main())
