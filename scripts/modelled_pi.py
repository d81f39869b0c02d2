#!/usr/bin/env python3
"""MobileNetV2 on the three Raspberry Pi cores, modelled: the shipped schedules (and, with
``--untuned``, no schedules) at the board's core count, beside the published figures of real boards.

Each target's bundle is compiled as ``mnv2-tvm compile MODEL --target T`` does (its ``schedules/T/``
records; the emulated core's where no board's exist) and costed as ``mnv2-tvm bench`` costs a bundle
without a board: one inference after a warm-up on the target's emulated core at its core count.
Modelled figures, not measurements; the published ones are real boards' (``scripts/bench_arm.py``
holds them).

    .venv/bin/python scripts/modelled_pi.py --json docs/results/modelled-pi_mobilenet_v2.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TARGETS = ("rpi3b-aarch64", "rpi4b", "rpi5")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--untuned", action="store_true", help="also cost the untuned build (slow under emulation)")
    p.add_argument("--json", type=Path, help="write a docs/results/ file for scripts/results.py")
    args = p.parse_args()

    from bench_arm import PUBLISHED, PUBLISHED_LABEL

    from mnv2_tvm import targets
    from mnv2_tvm.bench import BenchSettings, bench_modelled
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.models import ModelConfig

    cfg = ModelConfig("mobilenet_v2", args.width, args.resolution)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mnv2-modelled-pi-") as tmp:
        for name in args.targets.split(","):
            spec = targets.load(name)
            variants = [("tuned", False)] + ([("untuned", True)] if args.untuned else [])
            figures: dict[str, dict] = {}
            for variant, untuned in variants:
                print(f"[{name}] {variant}: compiling and modelling {cfg.label} ...", file=sys.stderr)
                out = Path(tmp) / f"{name}-{variant}"
                compile_bundle(cfg, spec, out, records_dir=targets.records_dir(spec), untuned=untuned)
                figures[variant] = bench_modelled(out, BenchSettings(number=1, repeat=1))
                r = figures[variant]
                print(f"[{name}] {variant}: {r['ms']:.2f} ms modelled ({r['core']} x{r['threads']}, "
                      f"{r['tuned']}/{r['kernels']} kernels tuned)", file=sys.stderr)
            published = PUBLISHED.get(name, []) if cfg.label == PUBLISHED_LABEL else []
            t, u = figures["tuned"], figures.get("untuned")
            rows.append([name, f"{t['core']} (model {spec.core.version})", t["threads"], f"{t['tuned']}/{t['kernels']}", round(t["ms"], 2),
                         round(u["ms"], 2) if u else None, round(u["ms"] / t["ms"], 2) if u else None,
                         "; ".join(f"{x['engine']} {x['ms']} ms" for x in published) or None])
    columns = ["target", "core", "threads", "kernels tuned", "tuned, ms (modelled)", "untuned, ms (modelled)",
               "untuned / tuned", "published (real boards, threads not stated)"]
    width = [14, 27, 7, 13, 20, 22, 15, 40]
    print("  ".join(c[:w].ljust(w) for c, w in zip(columns, width)))
    for r in rows:
        print("  ".join(("" if v is None else str(v))[:w].ljust(w) for v, w in zip(r, width)))
    if args.json:
        from mnv2_tvm.targets import host_cpu_model

        doc = {"kind": "tables", "title": f"{cfg.label} on the Raspberry Pi cores, modelled",
               "meta": {"date": time.strftime("%Y-%m-%d"), "cpu_model": host_cpu_model() + "; costs modelled on the "
                        "emulated cores of the targets' [core] tables",
                        "command": "python scripts/modelled_pi.py " + shlex.join(sys.argv[1:]),
                        "note": "One inference after a warm-up at the board's core count, with the shipped schedules "
                                "(schedules/<target>/emulated/, tuned on the emulated core). Published figures are "
                                "real boards' and a sanity check, not a target."},
               "tables": [{"caption": "Modelled latency beside published figures", "columns": columns, "rows": rows}]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
