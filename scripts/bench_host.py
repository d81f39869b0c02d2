#!/usr/bin/env python3
"""Host benchmark: tuned TVM vs untuned TVM vs PyTorch eager vs ONNX Runtime, in one process.

Engines are timed in interleaved rounds (a shuffled order each round) so that the shared,
noisy machine slows them alike; the figure per engine is the median of its per-round medians.
Only ratios measured in one run are meant to be quoted.

Peak RSS per engine is measured afterwards, one fresh process per engine that imports only what
that engine needs, loads it from the artefact built here (the bundle folder for TVM, the .onnx
file for ONNX Runtime, the model for PyTorch), runs a few inferences and reports ``ru_maxrss``.
The TVM processes keep torch out (tvm_ffi would import it just because it is installed). The peak
is the process's VmHWM: ``ru_maxrss`` would carry over the spawning process's peak across exec.
The "RSS +MB" growth seen inside the timing process (which also compiled) is kept beside it.

    .venv/bin/python scripts/bench_host.py                       # all three models, 1 and 2 threads
    .venv/bin/python scripts/bench_host.py --models mobilenet_v2 --threads 2 --rounds 9
    # a second tuned build beside the first, e.g. another activation layout with its own records:
    .venv/bin/python scripts/bench_host.py --models mobilenet_v2 --alt-target my.toml --alt-records DIR
    # the blocked-layout build as the tuned one, the host's NCHW build beside it (what scripts/main.sh runs):
    .venv/bin/python scripts/bench_host.py --target x86-64-avx2-nchw8c --alt-target x86-64-avx2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("tvm_tuned", "tvm_alt", "tvm_untuned", "pytorch", "onnxruntime")
RSS_RUNS = 5  # inferences in each peak-RSS process: first-run allocations are what count
FULL = {"mobilenet_v2": {}, "ssdlite": {}, "deeplabv3": {}}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_engines(cfg, spec, work: Path, threads: list[int], skip_untuned: bool, alt=None):
    """name -> callable running one inference, and the RSS growth in MB when each was loaded
    (for TVM that includes compiling the library in this process)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from mnv2_tvm import targets
    from mnv2_tvm.bundle import Runner
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.lower import export_onnx
    from mnv2_tvm.models import build, example_input

    x = example_input(cfg)
    engines, memory, notes = {}, {}, {}

    def load(name, fn):
        before = rss_mb()
        engines[name] = fn()
        memory[name] = rss_mb() - before

    def tvm_engine(records: Path | None, out: Path, target=spec):
        def make():
            result = compile_bundle(cfg, target, out, records_dir=records, untuned=records is None)
            notes[out.name] = result.manifest["tuning"]
            runner = Runner(out)
            dev_x = __import__("tvm").runtime.tensor(x)
            main = runner.vm["main"]
            return lambda: main(dev_x)
        return make

    load("tvm_tuned", tvm_engine(targets.records_dir(spec), work / "tuned"))
    if alt is not None:
        load("tvm_alt", tvm_engine(alt[1], work / "alt", alt[0]))
    if not skip_untuned:
        load("tvm_untuned", tvm_engine(None, work / "untuned"))

    def make_torch():
        model = build(cfg)
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                model(xt)
        return run
    load("pytorch", make_torch)

    def make_ort(n: int):
        def make():
            path = work / "model.onnx"
            if not path.exists():
                export_onnx(build(cfg), cfg, path)
            so = ort.SessionOptions()
            # ORT's thread pool is fixed per session: one session per thread count.
            so.intra_op_num_threads = n
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return lambda: sess.run(None, {"input": x})
        return make
    for n in threads:
        load(f"onnxruntime@{n}", make_ort(n))
    tuned = notes.get("tuned", {})
    return engines, memory, {"tuned_tasks": len(tuned.get("tuned", [])),
                             "total_tasks": len(tuned.get("tuned", [])) + len(tuned.get("fallback", []))}


def rss_child(engine: str, artefact: str, config: dict, threads: int, runs: int) -> dict:
    """In a fresh process: load one engine, run it ``runs`` times, report its peak RSS."""
    import resource

    def peak_mb() -> float:
        # ru_maxrss survives fork and exec (Linux keeps the parent's high-water mark), so a child of
        # the big timing process would report the parent's peak. VmHWM is this address space's own.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    os.environ["TVM_NUM_THREADS"] = str(threads)  # read once, when TVM's pool starts
    import numpy as np

    from mnv2_tvm.models import ModelConfig

    cfg = ModelConfig.from_dict(config)
    x = np.random.default_rng(0).standard_normal(cfg.input_shape).astype("float32")
    if engine.startswith("tvm"):
        # tvm_ffi imports torch whenever it is installed (for DLPack exchange); a deployed bundle
        # runs with NumPy and the TVM runtime only, so keep torch out as a board would.
        sys.modules["torch"] = None  # type: ignore[assignment]
        import tvm  # noqa: F401  (Runner imports it lazily: count it among the imports)

        from mnv2_tvm.bundle import Runner

        imported = peak_mb()
        runner = Runner(Path(artefact))
        run = lambda: runner.run(x)  # noqa: E731
    elif engine == "onnxruntime":
        import onnxruntime as ort

        imported = peak_mb()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(artefact, so, providers=["CPUExecutionProvider"])
        run = lambda: sess.run(None, {"input": x})  # noqa: E731
    elif engine == "pytorch":
        import torch

        from mnv2_tvm.models import build

        torch.set_num_threads(threads)
        imported = peak_mb()
        model = build(cfg)
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                model(xt)
    else:
        raise ValueError(f"unknown engine {engine}")
    for _ in range(runs):
        run()
    return {"engine": engine, "peak_rss_mb": peak_mb(), "after_imports_mb": imported, "runs": runs,
            "threads": threads,
            "modules": sorted(m for m in ("torch", "tvm", "onnxruntime") if sys.modules.get(m) is not None)}


def peak_rss(engines: list[str], work: Path, cfg, threads: int) -> dict[str, dict]:
    """Peak RSS of each engine, each in its own process (see the module docstring)."""
    import subprocess

    # PyTorch has no artefact here: its child builds the model from the config (same seed).
    artefacts = {"tvm_tuned": work / "tuned", "tvm_alt": work / "alt", "tvm_untuned": work / "untuned",
                 "onnxruntime": work / "model.onnx", "pytorch": ""}
    out = {}
    for name in engines:
        job = json.dumps({"engine": name, "artefact": str(artefacts[name]), "config": cfg.to_dict(),
                          "threads": threads, "runs": RSS_RUNS})
        proc = subprocess.run([sys.executable, __file__, "--rss-child", job], capture_output=True, text=True,
                              timeout=900, stdin=subprocess.DEVNULL)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"[{cfg.label}] peak RSS of {name} not measured: {tail}", file=sys.stderr)
            continue
        out[name] = json.loads(lines[-1])
    return out


def set_threads(n: int) -> None:
    import torch
    import tvm

    torch.set_num_threads(n)
    # (mode 1 = big cores first, n threads): TVM reads TVM_NUM_THREADS only once, this resizes its pool.
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def time_round(fn, min_seconds: float) -> float:
    fn()  # warm caches after the other engines ran
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.5, help="minimum time per engine per round")
    p.add_argument("--skip-untuned", action="store_true", help="untuned DeepLab takes seconds per run")
    p.add_argument("--target", default="host", help="the tuned build's target: 'host', a targets/ name or a .toml "
                                                    "path describing this host")
    p.add_argument("--alt-target", help="also time a tuned build for this target (a targets/ name or .toml path) of this host")
    p.add_argument("--alt-records", type=Path, help="records for --alt-target (default: its schedules/ folder)")
    p.add_argument("--out", type=Path, default=Path("reports/bench_host"))
    args = p.parse_args()

    from mnv2_tvm import targets
    from mnv2_tvm.madds import count
    from mnv2_tvm.models import ModelConfig

    spec = targets.load(args.target)
    alt = None
    if args.alt_target:
        alt_spec = targets.load(args.alt_target)
        alt = (alt_spec, targets.records_dir(alt_spec, args.alt_records))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cfg = ModelConfig(model)
            madds = count(cfg).madds
            print(f"[{cfg.label}] compiling tuned and untuned, loading PyTorch and ONNX Runtime ...", file=sys.stderr)
            all_engines, memory, tuning = make_engines(cfg, spec, Path(tmp) / cfg.label, args.threads,
                                                       args.skip_untuned, alt)
            if tuning["tuned_tasks"] == 0:
                print(f"[{cfg.label}] warning: no records in {targets.records_dir(spec)} apply: 'tuned' is untuned",
                      file=sys.stderr)
            model_rows = []
            for threads in args.threads:
                set_threads(threads)
                engines = {n: f for n, f in all_engines.items() if not n.startswith("onnxruntime@")}
                engines["onnxruntime"] = all_engines[f"onnxruntime@{threads}"]
                per_round: dict[str, list[float]] = {name: [] for name in engines}
                for r in range(args.rounds):
                    order = list(engines)
                    random.shuffle(order)
                    for name in order:
                        per_round[name].append(time_round(engines[name], args.seconds))
                    print(f"[{cfg.label}] {threads} thread(s): round {r + 1}/{args.rounds}", file=sys.stderr)
                med = {name: statistics.median(v) for name, v in per_round.items()}
                peak = spec.peak_gflops * threads / spec.cores if spec.peak_gflops else None
                row = {"model": cfg.label, "threads": threads, "madds": madds, "median_ms": med,
                       "rounds_ms": per_round, **tuning,
                       "rss_growth_mb": {**{n: v for n, v in memory.items() if "@" not in n},
                                         "onnxruntime": memory[f"onnxruntime@{threads}"]},
                       "gflops": {n: 2 * madds / (t * 1e-3) / 1e9 for n, t in med.items()},
                       "peak_gflops": peak,
                       "ratios": {"tuned/ort": med["tvm_tuned"] / med["onnxruntime"],
                                  "tuned/pytorch": med["tvm_tuned"] / med["pytorch"]}}
                if "tvm_untuned" in med:
                    row["ratios"]["untuned/tuned"] = med["tvm_untuned"] / med["tvm_tuned"]
                if "tvm_alt" in med:
                    row["alt"] = {"target": alt[0].name, "layout": alt[0].layout, "records": str(alt[1])}
                    row["ratios"]["alt/ort"] = med["tvm_alt"] / med["onnxruntime"]
                    row["ratios"]["alt/tuned"] = med["tvm_alt"] / med["tvm_tuned"]
                model_rows.append(row)
            # The timing process's engines would otherwise sit in memory beside each child.
            all_engines.clear()
            import gc

            gc.collect()
            rss_threads = max(args.threads)
            print(f"[{cfg.label}] peak RSS: one fresh process per engine, {rss_threads} thread(s), "
                  f"{RSS_RUNS} inferences ...", file=sys.stderr)
            rss = peak_rss([n for n in ENGINES if n in model_rows[0]["median_ms"]], Path(tmp) / cfg.label, cfg,
                           rss_threads)
            for row in model_rows:
                row["peak_rss_mb"] = {n: r["peak_rss_mb"] for n, r in rss.items()}
                row["peak_rss"] = rss
                results.append(row)
                print_row(row)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu_model": targets.host_cpu_model(), "cpu": spec.title,
            "host_target": spec.name, "layout": spec.layout, "cores": spec.cores, "clock_ghz": spec.clock_ghz,
            "peak_gflops_all_cores": spec.peak_gflops, "rounds": args.rounds,
            "peak_rss": f"VmHWM of a fresh process per engine: imports, load from the built artefact, "
                        f"{RSS_RUNS} inferences at max(--threads) threads",
            "command": "python scripts/bench_host.py " + " ".join(sys.argv[1:])}
    (args.out / "bench_host.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, args.out / "bench_host.png")
    print(f"wrote {args.out}/bench_host.json and bench_host.png")
    return 0


def print_row(row: dict) -> None:
    med, g = row["median_ms"], row["gflops"]
    peak = f"{row['peak_gflops']:.0f}" if row["peak_gflops"] else "?"
    print(f"\n{row['model']}  threads={row['threads']}  ({row['madds'] / 1e6:,.0f}M MAdds; "
          f"{row['tuned_tasks']}/{row['total_tasks']} tasks tuned; FMA peak {peak} GFLOP/s)")
    print(f"  {'engine':12s} {'median ms':>10s} {'GFLOP/s':>8s} {'% peak':>7s} {'RSS +MB':>8s} {'peak RSS MB':>11s}")
    for name in ENGINES:
        if name in med:
            pct = f"{100 * g[name] / row['peak_gflops']:.1f}" if row["peak_gflops"] else "?"
            rss = row.get("peak_rss_mb", {}).get(name)
            print(f"  {name:12s} {med[name]:10.2f} {g[name]:8.1f} {pct:>7s} {row['rss_growth_mb'][name]:8.0f} "
                  f"{'n/a' if rss is None else f'{rss:.0f}':>11s}")
    print("  ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items()))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.6), squeeze=False)
    for ax, row in zip(axes[0], results):
        names = [n for n in ENGINES if n in row["median_ms"]]
        vals = [row["median_ms"][n] for n in names]
        colors = {"tvm_tuned": "#1b7837", "tvm_alt": "#5aae61", "tvm_untuned": "#a6dba0", "pytorch": "#2166ac",
                  "onnxruntime": "#b2182b"}
        ax.bar(range(len(names)), vals, color=[colors[n] for n in names])
        # The alternative build is named by its layout (e.g. "TVM NCHW8c"), which is what differs.
        alt = row.get("alt", {}).get("layout") or "alt"
        labels = [n.replace("tvm_alt", f"TVM {alt}").replace("tvm_", "TVM ").replace("onnxruntime", "ORT") for n in names]
        ax.set_xticks(range(len(names)), labels, rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{row['model']}\n{row['threads']} thread(s)", fontsize=9)
        ax.set_ylabel("median latency, ms (log)")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        job = json.loads(sys.argv[2])
        print(json.dumps(rss_child(job["engine"], job["artefact"], job["config"], job["threads"], job["runs"])))
        sys.exit(0)
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    sys.exit(main())
