#!/usr/bin/env python3
"""Best estimated end-to-end latency against tuning trials (and wall time), from a records folder.

Replays the model's records in the order they were measured (the record file is appended as
candidates are measured): after each of the first N records, the estimate is the sum over tasks
of weight × best time so far. Tasks with no valid record yet make the estimate incomplete; the
curve starts once every task has one. With `--log` (the records folder's `tune.log` of the run)
trials get a wall-clock axis from the run's per-task progress lines. Run it on the full records,
before `mnv2-tvm prune`.

    .venv/bin/python scripts/tuning_curve.py mobilenet_v2 --records schedules/x86-64-avx2 \
        --log schedules/x86-64-avx2/tune.log --png docs/tuning_curve_mobilenet_v2.png

With `--baseline DIR` (a run of the same model from scratch, e.g. without `--transfer-from`) it
also says how many trials the run under `--records` needed to reach the baseline's final
estimate: the trials that transfer saved. `--json OUT` writes the curves and that figure.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

# The logger is mnv2_tvm.tuning.<module> (mnv2_tvm.tune in the logs of older runs).
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) \[INFO\] mnv2_tvm\.tun[\w.]*: "


def wall_axis(log: Path) -> tuple[list[int], list[float]]:
    """(cumulative trials, seconds since the run started) from the last run in a tune.log."""
    start, points, done = None, [], {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(_STAMP + r"tuning \d+ tasks", line)
        if m:  # a later run in the same log: start over
            start, points, done = _time(m[1]), [], {}
            continue
        m = re.match(_STAMP + r"task (\S+): (\d+)/\d+ trials measured", line)
        if m and start is not None:
            done[m[2]] = int(m[3])
            points.append((sum(done.values()), _time(m[1]) - start))
    return [0] + [n for n, _ in points], [0.0] + [t for _, t in points]


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def estimate_curve(records: Path, weights: dict[str, int]) -> tuple[list[tuple[int, float]], int]:
    """(trials, estimated µs) after each record, in measurement order, once every task has a
    valid one; and the number of the model's records in the folder."""
    from mnv2_tvm import targets

    index = {}
    for i, line in enumerate((records / targets.WORKLOAD_FILE).read_text().splitlines()):
        shash = json.loads(line)[0]
        if shash in weights:
            index[i] = shash
    order: list[tuple[str, float]] = []  # (task, mean seconds) in measurement order
    for line in (records / targets.RECORD_FILE).read_text().splitlines():
        try:
            idx, rec = json.loads(line)
        except ValueError:
            continue
        if idx in index:
            secs = rec[1] or [math.inf]
            mean = sum(secs) / len(secs)
            order.append((index[idx], mean if mean < 1e9 else math.inf))
    best: dict[str, float] = {}
    curve: list[tuple[int, float]] = []
    for n, (shash, secs) in enumerate(order, 1):
        best[shash] = min(best.get(shash, math.inf), secs)
        if len(best) == len(weights) and all(math.isfinite(v) for v in best.values()):
            curve.append((n, sum(weights[s] * best[s] for s in weights) * 1e6))
    return curve, len(order)


def _measurement(records: Path) -> str:
    """What measured the records (the folder's meta.json): ``board`` or ``emulated:<core>``."""
    try:
        return str(json.loads((records / "meta.json").read_text()).get("measurement", "board"))
    except (OSError, ValueError):
        return "board"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int)
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--target", default="host", help="a targets/ name, 'host', or a .toml path (its layout)")
    p.add_argument("--log", type=Path, help="the run's tune.log, for a wall-clock axis")
    p.add_argument("--png", type=Path)
    p.add_argument("--baseline", type=Path, help="records of the same model tuned from scratch: trials saved")
    p.add_argument("--json", type=Path, help="write the figures here as a docs/results/ file (scripts/results.py)")
    p.add_argument("--command", action="append", default=[], help="a command that made the records (for --json)")
    p.add_argument("--note", help="conditions of the run, for --json (e.g. what else the machine ran)")
    args = p.parse_args()

    import tvm_ffi

    from mnv2_tvm import targets
    from mnv2_tvm.lower import to_relax
    from mnv2_tvm.models import ModelConfig, build
    from mnv2_tvm.tuning import extract_tasks

    cfg = ModelConfig(args.model, args.width, args.resolution)
    spec = targets.load(args.target)
    tasks = extract_tasks(to_relax(build(cfg, calibrate=False), cfg, layout=spec.layout), spec.tvm_target())
    weights = {str(tvm_ffi.structural_hash(t.mod)): t.weight for t in tasks}
    curve, total = estimate_curve(args.records, weights)
    if not curve:
        print(f"{cfg.label}: {total} records, not every one of its {len(weights)} tasks has a valid one yet")
        return 1
    trials_axis, secs_axis = wall_axis(args.log) if args.log else ([], [])

    def wall(n: int) -> float | None:
        if len(trials_axis) < 2 or n > trials_axis[-1]:
            return None
        j = bisect.bisect_left(trials_axis, n)
        if trials_axis[j] == n or j == 0:
            return secs_axis[j]
        t0, t1, s0, s1 = trials_axis[j - 1], trials_axis[j], secs_axis[j - 1], secs_axis[j]
        return s0 + (s1 - s0) * (n - t0) / (t1 - t0)

    final = curve[-1][1]
    # total: the model's records, from estimate_curve
    print(f"{cfg.label}: {total} records over {len(weights)} tasks; every task timed after {curve[0][0]} trials")
    print(f"{'trials':>7} {'share':>6} {'wall':>9} {'est µs':>9} {'vs final':>9}")
    marks = sorted({curve[0][0]} | {max(curve[0][0], math.ceil(f / 10 * total)) for f in range(1, 11)})
    by_n = dict(curve)
    for n in marks:
        w = wall(n)
        print(f"{n:7d} {n / total:6.0%} {f'{w / 60:.1f} min' if w is not None else '-':>9} "
              f"{by_n[n]:9.0f} {by_n[n] / final:8.2f}x")
    n10 = next(n for n, est in curve if est <= 1.1 * final)
    w10 = wall(n10)
    print(f"within 10 % of the final estimate after {n10} trials ({n10 / total:.0%})"
          + (f", {w10 / 60:.1f} min into the run" if w10 is not None else ""))
    rows = []
    for n in marks:
        w = wall(n)
        rows.append([n, round(w / 60, 1) if w is not None else None, round(by_n[n] / 1e3, 3),
                     f"{by_n[n] / final:.2f}×" + (" (every task timed)" if n == curve[0][0] else "")])
    measured = _measurement(args.records)
    out = {"kind": "tables",
           "title": f"Tuning curve: {cfg.label}, {spec.name}" + (", transferred vs from scratch" if args.baseline else ""),
           "meta": {"date": time.strftime("%Y-%m-%d"), "cpu_model": targets.host_cpu_model()
                    + (f"; costs modelled on the emulated {measured.split(':', 1)[1]} core" if measured.startswith("emulated:")
                       else ""),
                    "command": [*args.command, "python scripts/tuning_curve.py " + shlex.join(sys.argv[1:])],
                    "note": f"Records replayed in the order they were measured; the estimate is the sum of weight × best "
                            f"kernel time, {'modelled' if measured.startswith('emulated:') else 'measured'}."
                            + (f" {args.note}" if args.note else "")},
           "tables": [{"caption": f"{args.records}: estimate after N trials", "columns": ["trials", "wall clock, min",
                                                                                      "estimate, ms", "vs final"],
                       "rows": rows}]}
    if args.png:
        out["plot"] = args.png.name
    base_curve: list[tuple[int, float]] = []
    if args.baseline:
        base_curve, base_total = estimate_curve(args.baseline, weights)
        if not base_curve:
            print(f"baseline {args.baseline}: not every task has a valid record")
            return 1
        goal = base_curve[-1][1]
        reach = next((n for n, est in curve if est <= goal), None)
        same = next((est for n, est in reversed(curve) if n <= base_total), None)  # at the baseline's budget
        out["tables"].append({
            "caption": "What the transfer saved: trials to reach the from-scratch run's final estimate",
            "columns": ["from scratch: trials", "from scratch: final estimate, ms", "transferred: trials to reach it",
                        "trials saved", "transferred: estimate after as many trials, ms",
                        "transferred: final estimate, ms"],
            "rows": [[base_total, round(goal / 1e3, 3), reach, base_total - reach if reach is not None else None,
                      round(same / 1e3, 3) if same is not None else None, round(final / 1e3, 3)]]})
        if reach is None:
            print(f"never reaches the baseline's final estimate ({goal:.0f} µs after {base_total} trials); "
                  f"ends at {final:.0f} µs")
        else:
            print(f"reaches the baseline's final estimate ({goal:.0f} µs after {base_total} trials) after {reach} "
                  f"trials: {base_total - reach} trials saved ({(base_total - reach) / base_total:.0%})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot([n for n, _ in curve], [e / 1e3 for _, e in curve], label=str(args.records.name))
        if base_curve:
            ax.plot([n for n, _ in base_curve], [e / 1e3 for _, e in base_curve], label="from scratch")
        ax.axhline(1.1 * final / 1e3, color="grey", ls=":", label="final + 10 %")
        ax.axvline(n10, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("tuning trials")
        ax.set_ylabel("estimated end-to-end latency, ms")
        ax.set_title(f"{cfg.label}: best estimate vs trials" + (f"\n(within 10 % after {w10 / 60:.0f} min)" if w10 else ""),
                     fontsize=10)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
