#!/usr/bin/env python3
"""ARM peers on one emulated core: tuned and untuned TVM, ONNX Runtime and ncnn, modelled side by side.

Every engine runs the same model (same weights, seed 0) on the same input (the guest's
deterministic fill) with the same thread count on the target's emulated core (qemu-user, the
mnv2cost plugin and the target's ``[core]`` model; see ``mnv2_tvm/emulate``), and its cost is what
the core model makes of what that engine's own code executed in one inference after a warm-up:
modelled milliseconds and cycles, not measurements. No board is used.

- ``tvm_tuned``: the bundle ``mnv2-tvm compile MODEL --target T`` builds (the target's records in
  ``schedules/T/``; a board's record wins over an emulated one), ``tvm_untuned``: the same without
  records; both costed by ``EmulatedCore.measure_bundle`` at 1 thread.
- ``onnxruntime``: its aarch64 wheel, CPU execution provider, intra- and inter-op threads 1, on the
  package's ONNX export. ``ncnn``: its aarch64 wheel, ``num_threads`` 1, fp32 throughout, on the model
  traced to TorchScript and converted with ``pnnx`` on the host. Both installed with the host's pip
  (``mnv2_tvm/emulate/peers.py``); an engine that does not install, convert or run gets
  ``{"error": "..."}`` instead of figures.
- ``tvm_tuned_x4``: the tuned bundle at the board's core count, as ``mnv2-tvm bench`` models it
  (listed apart: the peers run at 1 thread, see below).

Every figure is the same in every run of the same command (the emulated cost counts what is
executed, not time); costs can move in the last digits when the request a guest answers differs
(a model's path, the deadline), because the engines' Python bindings touch Python objects.

Threads: 1 for every engine. The plugin splits a run into parallel regions at TVM's
``TVMBackendParallelLaunch``; ONNX Runtime's thread pool and ncnn's OpenMP team never call it, and
their per-thread work under qemu depends on how the host schedules the emulated threads, so a
multi-threaded peer has no modelled latency; ``--threads`` other than 1 is refused.

Published figures of real boards (MobileNetV2 1.0/224, fp32, batch 1; threads as published, not
stated in the sources here) are listed beside ours as ``published``; ours are ``modelled``.

Output: a table on stdout; with ``--json OUT.json`` that file, which maps each model label to its
engines (``{"ms", "cycles", "figure": "modelled", ...}`` or ``{"error"}``), ``published`` and
``ratios``, plus a ``meta`` entry, and ``OUT.png`` beside it. ``--docs`` also writes
``docs/results/bench-arm_<target>.json`` and ``.png`` for ``scripts/results.py``; ``--render OUT.json``
writes all of it again from a finished run's JSON.

    .venv/bin/python scripts/bench_arm.py --target rpi4b --models mobilenet_v2,ssdlite,deeplabv3 --json OUT.json
    .venv/bin/python scripts/bench_arm.py --quick --models mobilenet_v2 --json /tmp/quick.json   # 0.35 width, small inputs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = ("tvm_tuned", "tvm_untuned", "onnxruntime", "ncnn")
PEER_ENGINES = ("onnxruntime", "ncnn")
X4 = "tvm_tuned_x4"
#: --quick: the test suite's small configurations (same graph structure as the full models).
QUICK = {"mobilenet_v2": (0.35, 96), "ssdlite": (0.35, 128), "deeplabv3": (0.35, 129)}
#: Published figures of real boards for MobileNetV2 1.0/224, fp32, batch 1, by target.
PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "rpi4b": [
        {"engine": "XNNPACK", "ms": 46.0, "board": "Raspberry Pi 4 (4x Cortex-A72, 1.5 GHz)"},
        {"engine": "ncnn", "ms": 61.9, "board": "Raspberry Pi 4 (4x Cortex-A72, 1.5 GHz)"},
    ],
    "rpi5": [{"engine": "ncnn", "ms": 10.5, "board": "Raspberry Pi 5 (Cortex-A76, 2.4 GHz)"}],
    "rpi3b-aarch64": [{"engine": "TVM (AutoTVM, 2018)", "ms": 103.7, "board": "Raspberry Pi 3B (Cortex-A53, 1.2 GHz)"}],
}
PUBLISHED_LABEL = "mobilenet_v2-1.0-224"
#: Host seconds a TVM bundle's warm-up and counted inference may take under emulation (DeepLabv3 at
#: 513 pixels, untuned, retires billions of instructions through the cache simulation).
TIMEOUT_S = 4 * 3600.0


class Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit status 2, like every mnv2-tvm command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bench_arm: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="rpi4b", help="an aarch64 board target with a [core] table (default rpi4b)")
    p.add_argument("--models", default="mobilenet_v2,ssdlite,deeplabv3",
                   help="comma-separated: mobilenet_v2, ssdlite, deeplabv3")
    p.add_argument("--width", type=float, help="width multiplier (default 1.0; 0.35 with --quick)")
    p.add_argument("--resolution", type=int, help="input resolution for every model (default: each model's own)")
    p.add_argument("--threads", type=int, default=1, help="threads of every engine: 1, the only count the "
                                                          "emulated core models for the peers")
    p.add_argument("--quick", action="store_true", help="small configurations (0.35 width; 96, 128, 129 pixels)")
    p.add_argument("--no-x4", action="store_true", help=f"skip {X4} (the tuned bundle at the board's core count)")
    p.add_argument("--json", type=Path, help="write the results here, and a PNG of the same stem beside it")
    p.add_argument("--docs", action="store_true",
                   help="also write docs/results/bench-arm_<target>.json and .png (scripts/results.py renders them)")
    p.add_argument("--render", type=Path, metavar="OUT.json",
                   help="print the table and redraw the PNG (and --docs files) from a finished run's JSON")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "bench-arm",
                   help="folder for the compiled bundles (default build/bench-arm)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = tuple(QUICK)
    bad = [m for m in models if m not in known]
    if not models or bad:
        p.error(f"unknown model {bad[0]!r} in --models; choose from {', '.join(known)}" if bad else
                f"--models is empty; choose from {', '.join(known)}")
    if len(set(models)) != len(models):
        p.error("--models names a model twice")
    args.models = models
    if args.threads != 1:
        from mnv2_tvm.emulate.peers import PEER_THREADS_NOTE

        p.error(f"--threads {args.threads}: {PEER_THREADS_NOTE}; {X4} lists TVM at the board's core count")
    return args


def configs(args: argparse.Namespace) -> list[Any]:
    """The model configurations to run (a UserError names a bad width or resolution)."""
    from mnv2_tvm.models import ModelConfig

    out = []
    for model in args.models:
        width, resolution = QUICK[model] if args.quick else (1.0, None)
        out.append(ModelConfig(model, args.width if args.width is not None else width,
                               args.resolution if args.resolution is not None else resolution))
    return out


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def cost_entry(cost: Any) -> dict[str, Any]:
    """What the JSON keeps of an EmulatedCost."""
    if not cost.ok:
        return {"error": one_line(Exception(cost.error))}
    reply = cost.raw.get("reply") or {}
    outputs = reply.get("outputs") or ([reply["output"]] if reply.get("output") else [])
    entry = {"ms": cost.ms, "cycles": cost.cycles, "figure": "modelled", "threads": cost.threads,
             "instructions": cost.instructions, "fma": cost.classes.get("fma", 0),
             "l1d_misses": cost.cache[0].get("miss", 0) if cost.cache else 0, "fingerprint": cost.fingerprint(),
             "wall_s": round(cost.wall_s, 1)}
    if outputs:
        entry["output_sum"] = outputs[0]["sum"]
    if reply.get("version"):
        entry["version"] = reply["version"]
    return entry


def run_model(cfg: Any, spec: Any, tvm_core: Any, peer_status: dict[str, str | None], args: argparse.Namespace,
              log: Any) -> dict[str, Any]:
    """All engines for one configuration: label entry of the JSON."""
    from mnv2_tvm import targets
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.emulate import EmulatedCore, peers

    row: dict[str, Any] = {}
    work = args.work / spec.name / cfg.label
    bundles = {"tvm_tuned": (work / "tuned", targets.records_dir(spec)), "tvm_untuned": (work / "untuned", None)}
    for engine, (out, records) in bundles.items():
        log(f"[{cfg.label}] {engine}: compiling for {spec.name} ...")
        try:
            result = compile_bundle(cfg, spec, out, records_dir=records, untuned=records is None)
            tuning = result.manifest["tuning"]
            log(f"[{cfg.label}] {engine}: modelling one inference on the emulated {tvm_core.core.model} ...")
            cost = tvm_core.measure_bundle(out)
            row[engine] = cost_entry(cost)
            if "error" not in row[engine]:
                tuned, total = len(tuning.get("tuned", [])), len(tuning.get("tuned", [])) + len(tuning.get("fallback", []))
                row[engine]["tasks_tuned"] = f"{tuned}/{total}"
                if tuning.get("emulated_records"):
                    row[engine]["emulated_records"] = tuning["emulated_records"]
        except Exception as e:  # noqa: BLE001 - one engine failing is a result, not a failed run
            row[engine] = {"error": one_line(e)}
        log(f"[{cfg.label}] {engine}: {summary(row[engine])}")

    models_dir = peers.peers_dir() / "models" / cfg.label
    for engine in PEER_ENGINES:
        if peer_status.get(engine):
            row[engine] = {"error": peer_status[engine]}
            log(f"[{cfg.label}] {engine}: {row[engine]['error']}")
            continue
        try:
            log(f"[{cfg.label}] {engine}: converting ...")
            model = (peers.export_onnx_model if engine == "onnxruntime" else peers.convert_ncnn)(cfg, models_dir)
            log(f"[{cfg.label}] {engine}: modelling one inference in a fresh guest ...")
            row[engine] = cost_entry(peers.measure_peer(spec.path, model, cfg.input_shape, threads=args.threads))
        except Exception as e:  # noqa: BLE001
            row[engine] = {"error": one_line(e)}
        log(f"[{cfg.label}] {engine}: {summary(row[engine])}")

    if not args.no_x4 and "error" not in row.get("tvm_tuned", {"error": ""}):
        log(f"[{cfg.label}] {X4}: modelling the tuned bundle at {spec.cores} threads ...")
        try:
            # What `mnv2-tvm bench` models without a board (bench.bench_modelled), with a longer deadline
            # (the request's text differs, so the figure may differ from bench's in the last digits).
            with EmulatedCore(spec.path, threads=spec.cores, timeout_s=TIMEOUT_S) as core:
                row[X4] = cost_entry(core.measure_bundle(bundles["tvm_tuned"][0]))
        except Exception as e:  # noqa: BLE001
            row[X4] = {"error": one_line(e)}
        log(f"[{cfg.label}] {X4}: {summary(row[X4])}")

    if cfg.label == PUBLISHED_LABEL and spec.name in PUBLISHED:
        row["published"] = {p["engine"]: {"ms": p["ms"], "figure": "published", "board": p["board"],
                                          "threads": "as published (not stated)"} for p in PUBLISHED[spec.name]}
    row["ratios"] = ratios(row)
    row["outputs_agree"] = outputs_agree(row)
    return row


def summary(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"failed: {entry['error']}"
    return f"{entry['ms']:.3f} ms modelled ({entry['cycles']:,.0f} cycles)"


def ratios(row: dict[str, Any]) -> dict[str, float]:
    ok = {e: row[e]["ms"] for e in (*ENGINES, X4) if e in row and "ms" in row[e]}
    out: dict[str, float] = {}
    peers_ms = [ok[e] for e in PEER_ENGINES if e in ok]
    if "tvm_tuned" in ok and peers_ms:
        out["tvm_tuned/best_peer"] = ok["tvm_tuned"] / min(peers_ms)
    if "tvm_tuned" in ok and "tvm_untuned" in ok:
        out["tvm_untuned/tvm_tuned"] = ok["tvm_untuned"] / ok["tvm_tuned"]
    if X4 in ok and "tvm_tuned" in ok:
        out[f"tvm_tuned/{X4}"] = ok["tvm_tuned"] / ok[X4]
    return out


def outputs_agree(row: dict[str, Any], rtol: float = 1e-3) -> bool | None:
    """Whether every engine's output sums to the same (same model and input): None if fewer than two."""
    sums = [row[e]["output_sum"] for e in ENGINES if e in row and "output_sum" in row[e]]
    if len(sums) < 2:
        return None
    scale = max(1.0, max(abs(s) for s in sums))
    return max(sums) - min(sums) <= rtol * scale


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"MODELLED on the emulated {meta['core']} ({meta['target']}), {meta['threads']} thread each, same input; "
             f"'published' rows are real boards' figures",
             f"{'model':<24} {'engine':<22} {'figure':<10} {'ms':>10} {'cycles':>15} {'vs best peer':>12}"]
    for label, row in results.items():
        peer = [row[e]["ms"] for e in PEER_ENGINES if "ms" in row.get(e, {})]
        best = min(peer) if peer else None
        first = True
        for engine in (*ENGINES, X4):
            if engine not in row:
                continue
            entry = row[engine]
            name = label if first else ""
            first = False
            shown = engine if engine != X4 else f"{X4} ({entry.get('threads', '?')} thr)"
            if "error" in entry:
                lines.append(f"{name:<24} {shown:<22} {'failed':<10} {entry['error']}")
                continue
            vs = f"{entry['ms'] / best:.2f}x" if best else ""
            tasks = f"  {entry['tasks_tuned']} tasks tuned" if entry.get("tasks_tuned") else ""
            lines.append(f"{name:<24} {shown:<22} {'modelled':<10} {entry['ms']:10.3f} {entry['cycles']:15,.0f} "
                         f"{vs:>12}{tasks}")
        for engine, entry in (row.get("published") or {}).items():
            lines.append(f"{'':<24} {engine:<22} {'published':<10} {entry['ms']:10.1f} {'':>15} {'':>12}  "
                         f"{entry['board']}, threads not stated")
        if row.get("ratios"):
            lines.append(f"{'':<24} " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items()))
        if row.get("outputs_agree") is False:
            lines.append(f"{'':<24} warning: the engines' outputs differ (sums: " + ", ".join(
                f"{e} {row[e]['output_sum']:.4g}" for e in ENGINES if "output_sum" in row.get(e, {})) + ")")
    lines.append(f"threads: {meta['threads_note']}")
    return "\n".join(lines)


def fmt_ms(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


COLORS = {"tvm_tuned": "#1b7837", "tvm_untuned": "#a6dba0", "onnxruntime": "#b2182b", "ncnn": "#2166ac",
          X4: "#5aae61", "published": "#bdbdbd"}


def plot(results: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(max(3.6 * len(results) + 0.6, 5.5), 4.4), squeeze=False)
    for ax, (label, row) in zip(axes[0], results.items()):
        names, vals, colors, hatches, texts = [], [], [], [], []
        for engine in (*ENGINES, X4):
            if engine not in row:
                continue
            entry = row[engine]
            name = engine.replace("tvm_", "TVM ").replace("onnxruntime", "ORT").replace("_x4", " x4")
            names.append(name + (f"\n({entry['tasks_tuned']} tuned)" if entry.get("tasks_tuned") else ""))
            if "error" in entry:
                vals.append(0.0)
                texts.append("n/a")
            else:
                vals.append(entry["ms"])
                texts.append(fmt_ms(entry["ms"]))
            colors.append(COLORS[engine])
            hatches.append("")
        for engine, entry in (row.get("published") or {}).items():
            names.append(f"{engine}\n(published)")
            vals.append(entry["ms"])
            texts.append(fmt_ms(entry["ms"]))
            colors.append(COLORS["published"])
            hatches.append("//")
        bars = ax.bar(range(len(names)), vals, color=colors)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        positive = [v for v in vals if v > 0]
        ax.set_yscale("log")  # engines differ by more than 10x; a linear axis hides the fast ones
        if positive:
            ax.set_ylim(min(positive) / 2, max(positive) * 2.5)
        for i, (v, t) in enumerate(zip(vals, texts)):
            ax.text(i, v, t, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("ms per inference (log)")
    fig.suptitle(f"Modelled on the emulated {meta['core']} ({meta['target']}), {meta['threads']} thread unless "
                 f"marked x4\npublished (hatched) = real boards' figures, threads not stated", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def docs_result(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``"kind": "tables"`` file scripts/results.py renders."""
    rows = []
    for label, row in results.items():
        peer = [row[e]["ms"] for e in PEER_ENGINES if "ms" in row.get(e, {})]
        best = min(peer) if peer else None
        for engine in (*ENGINES, X4):
            entry = row.get(engine)
            if entry is None:
                continue
            if "error" in entry:
                rows.append([label, engine, "failed", "", "", "", entry["error"]])
                continue
            note = f"{entry.get('tasks_tuned')} tasks tuned" if entry.get("tasks_tuned") else ""
            if entry.get("emulated_records"):
                note += f" ({entry['emulated_records']} by emulated-core records)"
            if engine == X4:
                note = f"{entry['threads']} threads"
            rows.append([label, engine, "modelled", f"{entry['ms']:.3f}", f"{entry['cycles']:,.0f}",
                         f"{entry['ms'] / best:.2f}×" if best else "", note])
        for engine, entry in (row.get("published") or {}).items():
            rows.append([label, engine, "published", f"{entry['ms']:.1f}", "", "", f"{entry['board']}, threads not stated"])
    ratio_rows = [[label, row.get("tvm_tuned", {}).get("tasks_tuned", ""),
                   *(f"{row['ratios'][k]:.2f}×" if k in row["ratios"] else "" for k in
                     ("tvm_tuned/best_peer", "tvm_untuned/tvm_tuned", f"tvm_tuned/{X4}"))]
                  for label, row in results.items()]
    return {
        "kind": "tables",
        "meta": {
            "title": f"ARM peers on the emulated {meta['core']} ({meta['target']}): TVM, ONNX Runtime, ncnn",
            "date": meta["date"], "cpu_model": meta["cpu_model"], "command": meta["command"],
            "conditions": meta["conditions"], "note": meta["note"],
        },
        "tables": [
            {"caption": "Modelled cost of one inference (1 thread each, same input); published figures of real boards beside",
             "columns": ["model", "engine", "figure", "ms", "cycles", "vs best peer", "note"], "rows": rows},
            {"caption": "Ratios (modelled)",
             "columns": ["model", "TVM tasks tuned", "TVM tuned / best peer", "TVM untuned / tuned", f"TVM tuned 1 thread / {spec_cores(meta)} threads"],
             "rows": ratio_rows},
        ],
        "models": results,
    }


def spec_cores(meta: dict[str, Any]) -> str:
    return str(meta.get("cores", "N"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.docs)
    from mnv2_tvm import targets
    from mnv2_tvm.emulate import EmulatedCore, peers
    from mnv2_tvm.errors import UserError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        cfgs = configs(args)
        spec = targets.load(args.target)
        if spec.arch != "aarch64":
            raise UserError(f"{spec.name} is {spec.arch}: the peers' wheels and the emulated board are aarch64 "
                            "(choose rpi4b, rpi5 or rpi3b-aarch64)")
        tvm_core = EmulatedCore(spec.path, threads=args.threads, timeout_s=TIMEOUT_S)  # set-up checked first
        peers.guest_rootfs(tvm_core.core.qemu_cpu, spec.cores)
    except UserError as e:
        print(f"bench_arm: {e}", file=sys.stderr)
        return 2
    try:
        peer_status = peers.ensure_peers()
    except UserError as e:  # the registry is unreachable: TVM's figures still come
        log(f"bench_arm: {e}")
        peer_status = {p: one_line(e) for p in PEER_ENGINES}
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    try:
        with tvm_core:
            for cfg in cfgs:
                results[cfg.label] = run_model(cfg, spec, tvm_core, peer_status, args, log)
    except UserError as e:
        print(f"bench_arm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_arm: interrupted", file=sys.stderr)
        return 130
    versions = {e: peers.WHEELS[e].split("==")[1] for e in PEER_ENGINES}
    versions["pnnx"] = peers.PNNX_WHEEL.split("==")[1]
    meta = {
        "target": spec.name, "core": tvm_core.core.model, "core_model_version": tvm_core.core.version, "qemu_cpu": tvm_core.core.qemu_cpu, "cores": spec.cores,
        "threads": args.threads, "threads_note": peers.PEER_THREADS_NOTE + f"; {X4} is TVM at the board's "
                                                                             f"{spec.cores} cores",
        "input": "the emulated guest's deterministic fill of the input shape (the same for every engine); "
                 "weights: the models' seed 0",
        "versions": versions, "date": time.strftime("%Y-%m-%d"),
        "cpu_model": f"modelled {tvm_core.core.model} ({spec.name} [core] table), emulated under qemu-aarch64 on "
                     f"{targets.host_cpu_model()}",
        "command": "python scripts/bench_arm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "conditions": f"{args.threads} thread for every engine (the peers' thread pools are not modelled); one "
                      f"inference after a warm-up; ONNX Runtime {versions['onnxruntime']} (CPU EP), ncnn "
                      f"{versions['ncnn']} (fp32, pnnx {versions['pnnx']}); TVM tuned with the records in "
                      f"schedules/{spec.name}/",
        "note": "Modelled figures are the emulated core's cost model, not measurements; published figures are "
                "real boards' (threads not stated) and are a sanity check, not a target.",
        "wall_s": round(time.monotonic() - t0, 1),
    }
    write_outputs(results, meta, args.json, args.docs)
    return 0


def write_outputs(results: dict[str, Any], meta: dict[str, Any], json_path: Path | None, docs: bool) -> None:
    """The table on stdout; the JSON and its PNG; with ``docs`` the results.py files."""
    print(table(results, meta))
    if json_path:
        out = {"meta": meta, **results}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2) + "\n")
        png = json_path.with_suffix(".png")
        plot(results, meta, png)
        print(f"wrote {json_path} and {png}")
    if docs:
        path = ROOT / "docs" / "results" / f"bench-arm_{meta['target']}.json"
        path.write_text(json.dumps(docs_result(results, meta), indent=2) + "\n")
        png = path.with_suffix(".png")
        if json_path:
            shutil.copyfile(json_path.with_suffix(".png"), png)
        else:
            plot(results, meta, png)
        print(f"wrote {path} and {png} (run `python scripts/results.py`)")


def render(path: Path, docs: bool) -> int:
    """``--render OUT.json``: the table, the PNG beside it and (``--docs``) the results.py files
    again from a finished run's JSON, without emulating anything."""
    try:
        data = json.loads(path.read_text())
        meta = data["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"bench_arm: cannot read the results in {path}: {one_line(e)}", file=sys.stderr)
        return 2
    results = {label: row for label, row in data.items() if label != "meta"}
    write_outputs(results, meta, path, docs)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    sys.exit(main())
