#!/usr/bin/env python3
"""Best estimated end-to-end latency against tuning trials, from a records folder.

Reads the records in the order they were measured. For a fraction f of the budget it takes
each task's first f·n records (tasks are tuned with budgets in proportion, so this is what a
run with f times the trials would have kept) and sums weight × best. Run it on the full
records, before `mnv2-tvm prune`.

    .venv/bin/python scripts/tuning_curve.py mobilenet_v2 --records schedules/x86-64-avx512 --wall 1303
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int)
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--wall", type=float, help="wall seconds of the tuning run, to put a time axis beside trials")
    p.add_argument("--png", type=Path)
    args = p.parse_args()

    import tvm_ffi

    from mnv2_tvm import targets
    from mnv2_tvm.lower import to_relax
    from mnv2_tvm.models import ModelConfig, build
    from mnv2_tvm.tune import extract_tasks

    cfg = ModelConfig(args.model, args.width, args.resolution)
    tasks = extract_tasks(to_relax(build(cfg, calibrate=False), cfg), targets.load("host").tvm_target())
    weights = {str(tvm_ffi.structural_hash(t.mod)): t.weight for t in tasks}
    index = {}
    for i, line in enumerate((args.records / "database_workload.json").read_text().splitlines()):
        shash = json.loads(line)[0]
        if shash in weights:
            index[i] = shash
    runs: dict[str, list[float]] = {s: [] for s in weights}
    for line in (args.records / "database_tuning_record.json").read_text().splitlines():
        try:
            idx, rec = json.loads(line)
        except ValueError:
            continue
        if idx in index:
            secs = rec[1] or [math.inf]
            mean = sum(secs) / len(secs)
            runs[index[idx]].append(mean if mean < 1e9 else math.inf)
    missing = [s for s, r in runs.items() if not r]
    if missing:
        print(f"warning: {len(missing)} of {len(runs)} tasks have no records; the curve leaves them out")
    total = sum(len(r) for r in runs.values())
    rows = []
    for step in range(1, 11):
        f = step / 10
        est = 0.0
        for s, r in runs.items():
            if r:
                n = max(1, math.ceil(f * len(r)))
                est += weights[s] * min(r[:n]) * 1e6
        rows.append((f, round(f * total), est))
    final = rows[-1][2]
    print(f"{cfg.label}: {total} records over {len(runs)} tasks")
    print(f"{'budget':>7} {'trials':>7} {'wall':>8} {'est µs':>9} {'vs final':>9}")
    for f, n, est in rows:
        wall = f"{f * args.wall / 60:.1f} min" if args.wall else "-"
        print(f"{f:7.0%} {n:7d} {wall:>8} {est:9.0f} {est / final:8.2f}x")
    within = next(f for f, _, est in rows if est <= 1.1 * final)
    print(f"within 10 % of the final estimate at {within:.0%} of the trials"
          + (f" (~{within * args.wall / 60:.0f} min)" if args.wall else ""))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot([n for _, n, _ in rows], [e / 1e3 for _, _, e in rows], marker="o")
        ax.set_xlabel("tuning trials")
        ax.set_ylabel("estimated end-to-end latency, ms")
        ax.set_title(f"{cfg.label}: best latency vs trials")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
