"""The report of a compare run: predictors fitted and scored, ``results.json``, ``results.csv``,
``summary.md`` and the plots, each written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..models import ModelConfig
from .grid import REFERENCE_CONFIG
from .store import POINTS_FILE, VARIANTS, PointStore, passes_of, point_key

if TYPE_CHECKING:
    from ..targets import TargetSpec
    from .measure import Measurer

FORMAT = "mnv2-tvm-compare/1"
#: A tuned point whose untuned (fallback) kernels take at least this share of its profiled time
#: measures the records' gaps more than the tuned schedules: it is reported but not fitted.
FALLBACK_TIME_LIMIT = 0.05
#: Predictor goal of the issue (held-out MobileNetV2 configs, predictor 3).
GOAL_WITHIN10, GOAL_SPEARMAN = 0.90, 0.98
#: Our predictors beyond MAdds, least to most informed (the goal is judged on the last one fitted).
OWN_PREDICTORS = {"roofline": "Per-layer roofline (fitted on end-to-end latencies)",
                  "layerwise": "Layerwise (per-kind cost laws fitted on measured layer times)"}

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SUMMARY = "summary.md"
PLOT_LATENCY = "latency_vs_madds.png"
PLOT_PREDICTED = "predicted_vs_measured.png"
PLOT_LAYERS = "layer_share.png"
REPORT_FILES = (RESULTS_JSON, RESULTS_CSV, SUMMARY, PLOT_LATENCY, PLOT_PREDICTED, PLOT_LAYERS)


@dataclass
class CompareResult:
    out_dir: Path
    complete: bool
    measured: int  # points measured in this call
    reused: int  # points taken from points.jsonl
    missing: list[str]  # points without a usable measurement, with the reason
    files: dict[str, Path]  # report file name → path
    report: dict[str, Any]  # what results.json holds


def _usable(rec: dict[str, Any] | None) -> bool:
    """A measured point that says what its label claims (tuned means tuned)."""
    if rec is None or rec.get("status") != "ok" or not rec.get("latency_ms"):
        return False
    if rec["variant"] == "untuned":
        return True
    share = rec.get("fallback_time_share")
    if share is None:
        return not rec.get("fallback")
    return share < FALLBACK_TIME_LIMIT


def _to_point(rec: dict[str, Any]):
    from ..predict import LayerCost, Point

    cfg = rec["config"]
    # The profile's shares, the robust latency's level: a profile is one short burst of runs, and
    # on a shared machine a burst can land in a slow spell that the fastest pass avoided.
    level = rec["latency_ms"] / rec["profiled_ms"] if rec.get("profiled_ms") and rec.get("latency_ms") else 1.0
    timed = {r["layer"]: r["ms"] * level for r in rec.get("layer_map", {}).get("rows", [])
             if r["kind"] != "other" and r["ms"] is not None}
    layers = [LayerCost(l["name"], l["kind"], int(l["madds"]), int(l["bytes"]), timed.get(l["name"]))
              for l in rec["layers"]]
    return Point(cfg["model"], float(cfg["width"]), int(cfg["resolution"]), int(rec["madds"]), layers,
                 float(rec["latency_ms"]), rec["variant"] == "tuned")


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: None instead (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _evaluate_variant(variant: str, recs: list[dict[str, Any]], others: list[dict[str, Any]],
                      peak: float | None) -> dict[str, Any]:
    """Fit on a split of the MobileNetV2 points of one variant; metrics on the held-out ones."""
    from ..predict import evaluate, make_predictors, split

    out: dict[str, Any] = {"notes": []}
    points = [_to_point(r) for r in recs]
    n_cfg = len(points)
    if n_cfg < 3:
        out["notes"].append(f"{variant}: {n_cfg} usable MobileNetV2 configuration(s); predictors need at least 3 "
                            "(two to fit, one held out)")
        return out
    sp = split(points)
    if not sp.test or len(sp.train) < 2:
        out["notes"].append(f"{variant}: the split left no held-out configuration")
        return out
    profiled = all(any(l.ms for l in p.layers) for p in points)
    if not profiled:
        out["notes"].append(f"{variant}: the layerwise predictor is skipped: not every point has per-layer times "
                            "(measured without a profile)")
    predictors = make_predictors(peak, layer_times=profiled)
    try:
        out["results"] = evaluate(predictors, sp.train, sp.test)
    except ValueError as e:  # includes numpy's LinAlgError
        out["notes"].append(f"{variant}: fitting failed: {e}")
        return out
    out["split"] = sp.report()
    out["test_labels"] = sp.test_labels
    out["measured_test_ms"] = [p.latency_ms for p in sp.test]
    # Predictions for every point (train too, and the other models as out-of-family extrapolation).
    out["predicted_all"] = {}
    other_points = [_to_point(r) for r in others]
    for name, pred in predictors.items():
        allp = list(pred.predict(points))
        out["predicted_all"][name] = {p.label: float(v) for p, v in zip(points, allp)}
        for p, v in zip(other_points, pred.predict(other_points) if other_points else []):
            out["predicted_all"][name][p.label] = float(v)
    out["other_models"] = [{"label": p.label, "measured_ms": p.latency_ms} for p in other_points]
    if "naive" in predictors:
        # Naive is not fitted, so every point is fair: the share of peak the target reaches.
        out["naive_efficiency"] = statistics.median(
            out["predicted_all"]["naive"][p.label] / p.latency_ms for p in points)
    res = out["results"]
    if "linear" in res:
        lin = res["linear"]["metrics"]["mape"]
        out["beats_linear"] = {name: bool(res[name]["metrics"]["mape"] < lin) for name in OWN_PREDICTORS
                               if name in res}
    return out


def write_report(configs: list[ModelConfig], store: PointStore, spec: TargetSpec, measurer: Measurer,
                 records: Path, fingerprint: str | None, failures: dict[str, str], out_dir: Path,
                 interrupted: bool, measured: int, reused: int) -> CompareResult:
    """Fit the predictors on the usable points and write every report file (marked incomplete
    when points are missing)."""
    from .. import predict as P
    from ..bundle import write_atomic

    # Points reused from an earlier run carry what their board was, even if no board was opened now.
    emulated = bool(measurer.emulated or getattr(spec, "emulated", False)
                    or any(r.get("settings", {}).get("emulated") for r in store.points.values()))
    # Costs of the emulated core's model (no board): which core, from the points themselves.
    modelled = next((f"{r['settings']['core']} x{r['settings']['threads']}" for r in store.points.values()
                     if r.get("settings", {}).get("modelled")), None)
    recs: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for cfg in configs:
        for v in VARIANTS:
            key = point_key(cfg.label, v)
            rec = store.points.get(key)
            if rec is not None:
                recs[key] = rec
            if not _usable(rec):
                if rec is not None and rec.get("status") == "uncovered":
                    why = "the records hold no schedule for any of its tasks"
                elif rec is not None and rec.get("status") == "ok":
                    share = rec.get("fallback_time_share")
                    why = (f"partly tuned: untuned kernels take {100 * share:.0f}% of its time" if share is not None
                           else f"partly tuned: {len(rec.get('fallback', []))} tasks without a schedule")
                else:
                    why = failures.get(key, "interrupted before it was measured" if interrupted else "not measured")
                missing.append(f"{cfg.label} {v}: {why}")
    complete = not missing and not interrupted

    def usable(variant: str, model: str | None = "mobilenet_v2", other: bool = False) -> list[dict[str, Any]]:
        out = []
        for cfg in configs:
            rec = recs.get(point_key(cfg.label, variant))
            if _usable(rec) and ((cfg.model == model) != other if model else True):
                # split/ranking key on (model, width, resolution): keep the first of duplicates
                if all((r["config"]["model"], r["config"]["width"], r["config"]["resolution"])
                       != (cfg.model, cfg.width, cfg.resolution) for r in out):
                    out.append(rec)
        return out

    evaluation = {v: _evaluate_variant(v, usable(v), usable(v, other=True), spec.peak_gflops) for v in VARIANTS}
    notes = [] if spec.peak_gflops else [f"naive prediction skipped: {spec.path} gives no peak throughput "
                                         "(device.peak_gflops or device.flops_per_cycle)"]
    notes += [n for v in VARIANTS for n in evaluation[v]["notes"]]
    states = {r.get("settings", {}).get("emulation") for r in recs.values() if r.get("status") == "ok"}
    emulation = ("emulated" if emulated else "modelled" if modelled else "unknown" if "unknown" in states
                 else "real")
    if emulation == "unknown":
        notes.append(f"measured on the board behind {measurer.name}: over RPC alone it cannot be told whether that "
                     "board is real or emulated (qemu); if it is emulated these timings mean nothing "
                     "(--ssh USER@BOARD checks it)")
    ranking: dict[str, Any]
    try:
        ranking = P.ranking_change([_to_point(r) for r in usable("untuned", None)],
                                   [_to_point(r) for r in usable("tuned", None)])
        ranking["flipped"] = [list(p) for p in ranking["flipped"]]
    except ValueError as e:
        ranking = {"note": str(e)}
    speedups = {}
    for cfg in configs:
        u, t = recs.get(point_key(cfg.label, "untuned")), recs.get(point_key(cfg.label, "tuned"))
        if _usable(u) and _usable(t):
            speedups[cfg.label] = u["latency_ms"] / t["latency_ms"]
    per_layer = _per_layer(recs)
    spreads = {r["label"] + " " + r["variant"]: max(passes_of(r)) / min(passes_of(r)) - 1.0
               for r in recs.values() if len(passes_of(r)) > 1}

    report = {
        "format": FORMAT,
        "complete": complete,
        "interrupted": interrupted,
        "emulated": emulated,
        "modelled": modelled,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"name": spec.name, "title": spec.title, "arch": spec.arch, "cores": spec.cores,
                   "clock_ghz": spec.clock_ghz, "peak_gflops": spec.peak_gflops, "peak_source": spec.peak_source,
                   "bandwidth_gbs": spec.bandwidth_gbs, "bandwidth_source": spec.bandwidth_source},
        # A resumed run that measured nothing opened no board: its points still say which it was.
        "measurer": {"name": measurer.name, "emulated": emulated, "emulation": emulation,
                     "board": getattr(measurer, "board", None) or next(
                         (r["settings"]["board"] for r in reversed(list(recs.values()))
                          if r.get("settings", {}).get("board")), None)},
        "records": {"dir": str(records), "fingerprint": fingerprint},
        "grid": [cfg.label for cfg in configs],
        "missing": missing,
        "points": [{k: v for k, v in r.items() if k not in ("kernels", "layer_map", "layers", "key")}
                   | {"usable": _usable(r)} for r in recs.values()],
        "evaluation": evaluation,
        "ranking": ranking,
        "tuning_speedup": speedups,
        # How far a point's slowest pass was above its fastest: the noise the passes remove.
        "pass_spread": ({"points": len(spreads), "median": statistics.median(spreads.values()),
                         "max": max(spreads.values()), "max_point": max(spreads, key=spreads.get)}
                        if spreads else None),
        "per_layer": per_layer,
        "fallback_time_limit": FALLBACK_TIME_LIMIT,
        "notes": notes,
    }
    report = _finite(report)
    files: dict[str, Path] = {}
    files.update(_plots(out_dir, recs, usable, evaluation, per_layer, spec, emulated, modelled))
    files[RESULTS_CSV] = out_dir / RESULTS_CSV
    write_atomic(files[RESULTS_CSV], _csv(configs, recs, evaluation).encode())
    files[RESULTS_JSON] = out_dir / RESULTS_JSON
    write_atomic(files[RESULTS_JSON], (json.dumps(report, indent=1) + "\n").encode())
    files[SUMMARY] = out_dir / SUMMARY
    summary = _summary(report, files, len(usable("tuned")), len(usable("untuned")))
    write_atomic(files[SUMMARY], summary.encode())
    return CompareResult(out_dir, complete, measured, reused, missing, files, report)


def _per_layer(recs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The per-layer profile for the share plot: MobileNetV2 1.0/224 tuned when it was measured,
    else the largest profiled MobileNetV2 point (tuned before untuned)."""
    cands = [r for r in recs.values() if _usable(r) and "layer_map" in r and r["config"]["model"] == "mobilenet_v2"]
    if not cands:
        return None
    ref = REFERENCE_CONFIG.label

    def rank(r: dict[str, Any]) -> tuple:
        return (r["label"] == ref and r["variant"] == "tuned", r["variant"] == "tuned", r["madds"])

    best = max(cands, key=rank)
    rows = best["layer_map"]["rows"]
    timed = [r for r in rows if r["ms"] is not None]
    t_total = sum(r["ms"] for r in timed) or 1.0
    m_total = sum(r["madds"] for r in timed) or 1
    by_kind: dict[str, dict[str, float]] = {}
    for r in timed:
        d = by_kind.setdefault(r["kind"], {"time_share": 0.0, "madd_share": 0.0, "ms": 0.0, "layers": 0})
        d["time_share"] += r["ms"] / t_total
        d["madd_share"] += r["madds"] / m_total
        d["ms"] += r["ms"]
        d["layers"] += 1
    for d in by_kind.values():
        # How many times more time than MAdds this kind takes (1 = MAdds rate it right).
        d["time_per_madd_share"] = d["time_share"] / d["madd_share"] if d["madd_share"] > 0 else None
    return {"label": best["label"], "variant": best["variant"], "is_reference": best["label"] == ref
            and best["variant"] == "tuned", "latency_ms": best["latency_ms"], "profiled_ms": best.get("profiled_ms"),
            "rows": rows, "unmatched_layers": best["layer_map"]["unmatched_layers"],
            "unmatched_kernels": best["layer_map"]["unmatched_kernels"], "by_kind": by_kind}


def _tmp_plot(out_dir: Path, name: str, draw) -> Path:
    """Draw to a temporary name and rename, so a plot file is never half-written."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp.png"
    try:
        draw(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _plots(out_dir: Path, recs, usable, evaluation, per_layer, spec: TargetSpec, emulated: bool,
           modelled: str | None = None) -> dict[str, Path]:
    from .. import predict as P

    files: dict[str, Path] = {}
    tag = f" on {spec.name}" + (" (EMULATED: timings meaningless)" if emulated
                                else f" (MODELLED: emulated {modelled})" if modelled else "")
    pts = [_to_point(r) for v in VARIANTS for r in usable(v)]
    if pts:
        files[PLOT_LATENCY] = _tmp_plot(out_dir, PLOT_LATENCY, lambda p: P.plot_latency_vs_madds(
            pts, p, title=f"MobileNetV2 latency vs multiply-adds{tag}"))
    for v in ("tuned", "untuned"):
        ev = evaluation[v]
        if "results" in ev:
            preds = {name: r["predicted_ms"] for name, r in ev["results"].items()}
            files[PLOT_PREDICTED] = _tmp_plot(out_dir, PLOT_PREDICTED, lambda p: P.plot_predicted_vs_measured(
                preds, ev["measured_test_ms"], p,
                title=f"{v.capitalize()} MobileNetV2: predicted vs measured, {len(ev['test_labels'])} held-out configs{tag}"))
            break
    if per_layer is not None:
        rows = [r for r in per_layer["rows"] if r["ms"] is not None]
        layers = [P.LayerCost(r["layer"], r["kind"], r["madds"], r["bytes"]) for r in rows]
        times = [r["ms"] for r in rows]
        files[PLOT_LAYERS] = _tmp_plot(out_dir, PLOT_LAYERS, lambda p: P.plot_layer_share(
            layers, times, p, title=f"{per_layer['label']} ({per_layer['variant']}): per-layer time vs MAdd share{tag}"))
    return files


def _csv(configs: list[ModelConfig], recs: dict[str, dict[str, Any]], evaluation: dict[str, Any]) -> str:
    buf = io.StringIO()
    names = ["naive", "linear", "roofline", "layerwise"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "model", "width", "resolution", "output_stride", "variant", "status", "usable", "madds",
                "params", "latency_ms", "min_ms", "max_ms", "repeats", "tasks_tuned", "tasks_total",
                "fallback_time_share", "split", "passes_ms"] + [f"pred_{n}_ms" for n in names])
    for cfg in configs:
        for v in VARIANTS:
            rec = recs.get(point_key(cfg.label, v))
            if rec is None:
                w.writerow([cfg.label, cfg.model, cfg.width, cfg.resolution, cfg.output_stride, v, "missing"])
                continue
            times = rec.get("times_ms") or []
            ev = evaluation[v]
            split_side = ""
            if "split" in ev and _usable(rec):
                label = _to_point(rec).label
                split_side = "test" if label in ev["split"]["test"] else "train" if label in ev["split"]["train"] else ""
            preds = []
            for n in names:
                val = ev.get("predicted_all", {}).get(n, {}).get(_to_point(rec).label) if _usable(rec) else None
                preds.append("" if val is None else f"{val:.6g}")
            share = rec.get("fallback_time_share")
            w.writerow([cfg.label, cfg.model, cfg.width, cfg.resolution, cfg.output_stride, v, rec["status"],
                        int(_usable(rec)), rec["madds"], rec["params"],
                        "" if rec.get("latency_ms") is None else f"{rec['latency_ms']:.6g}",
                        f"{min(times):.6g}" if times else "", f"{max(times):.6g}" if times else "", len(times),
                        rec["tasks_tuned"], rec["tasks_total"], "" if share is None else f"{share:.4f}",
                        split_side, ";".join(f"{x:.6g}" for x in passes_of(rec))] + preds)
    return buf.getvalue()


def _fmt(x: Any, spec: str = ".3f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _summary(rep: dict[str, Any], files: dict[str, Path], n_tuned: int, n_untuned: int) -> str:
    t = rep["target"]
    L: list[str] = [f"# MAdds vs latency on {t['title']} (`{t['name']}`)", ""]
    if rep["emulated"]:
        L += ["> **emulated board: timings meaningless.** The numbers below exercise the pipeline only.", ""]
    elif rep.get("modelled"):
        L += [f"> **modelled, not measured:** every latency is the cost of one inference on the emulated "
              f"{rep['modelled']} core (instructions retired and a simulated cache hierarchy, deterministic; "
              "see docs/design.md), not a board's timing.", ""]
    elif rep["measurer"].get("emulation") == "unknown":
        L += ["> **board not identified as real or emulated** (reached over RPC only): if it is an emulator, "
              "these timings mean nothing.", ""]
    if rep["complete"]:
        L += [f"Complete: all {2 * len(rep['grid'])} points of the {len(rep['grid'])}-configuration grid measured.", ""]
    else:
        L += [f"> **INCOMPLETE** ({'interrupted; ' if rep['interrupted'] else ''}{len(rep['missing'])} of "
              f"{2 * len(rep['grid'])} points missing or unusable). Run the same command again to resume.", ""]
        L += [f"- {m}" for m in rep["missing"][:40]] + (["- …"] if len(rep["missing"]) > 40 else []) + [""]

    # Headline numbers.
    L += ["## In numbers", ""]
    headline_variant = None
    for v in ("tuned", "untuned"):
        if "results" in rep["evaluation"][v]:
            headline_variant = v
            break
    if headline_variant is None:
        L += ["- Too few usable MobileNetV2 points to fit and hold out predictors "
              f"(tuned: {n_tuned}, untuned: {n_untuned}; at least 3 configurations are needed)."]
    else:
        ev = rep["evaluation"][headline_variant]
        res = ev["results"]
        n = len(ev["test_labels"])
        if headline_variant != "tuned":
            L += ["- No usable tuned points: the numbers below are for **untuned** builds."]
        lin = res["linear"]["metrics"]
        L += [f"- MAdds as a predictor of {headline_variant} latency (latency = a·MAdds + b, fitted on "
              f"{len(ev['split']['train'])} MobileNetV2 configs, scored on {n} held out): R² {_fmt(lin['r2'])}, "
              f"mean error {_fmt(lin['mape'], '.1f')} %, worst {_fmt(lin['worst'], '.1f')} %, "
              f"{_fmt(100 * lin['within10'], '.0f')} % of configs within ±10 %, Spearman {_fmt(lin['spearman'])}."]
        if "naive" in res:
            nv = res["naive"]["metrics"]
            eff = ev.get("naive_efficiency")
            L += [f"- Naive 2·MAdds ÷ peak ({_fmt(t['peak_gflops'], '.0f')} GFLOP/s): mean error "
                  f"{_fmt(nv['mape'], '.1f')} %; MobileNetV2 runs at {_fmt(100 * eff if eff else None, '.1f')} % "
                  "of that peak (median)."]
        own = [name for name in OWN_PREDICTORS if name in res]
        for name in own:
            rf = res[name]["metrics"]
            beats = ev.get("beats_linear", {}).get(name)
            L += [f"- {OWN_PREDICTORS[name]}: mean error {_fmt(rf['mape'], '.1f')} %, worst {_fmt(rf['worst'], '.1f')} %, "
                  f"{_fmt(100 * rf['within10'], '.0f')} % within ±10 %, Spearman {_fmt(rf['spearman'])} — "
                  + ("it **beats** the calibrated MAdd model on held-out mean error." if beats else
                     "it does **not** beat the calibrated MAdd model on held-out mean error.")]
        if own:
            name = own[-1]  # the most informed of ours that could be fitted
            rf = res[name]["metrics"]
            met = rf["within10"] is not None and rf["within10"] >= GOAL_WITHIN10 and \
                rf["spearman"] is not None and rf["spearman"] >= GOAL_SPEARMAN
            L += [f"- Goal ({name} within ±10 % on ≥ {GOAL_WITHIN10:.0%} of held-out configs, Spearman ≥ "
                  f"{GOAL_SPEARMAN}): {'met' if met else 'not met'}"
                  + (f" (only {n} held-out configs)" if n < 5 else "") + "."]
    rk = rep["ranking"]
    if "spearman" in rk:
        pct = 100 * rk["flipped_pairs"] / rk["total_pairs"] if rk["total_pairs"] else 0.0
        L += [f"- Tuning changes the ranking of {rk['n']} configurations: Spearman(untuned, tuned) "
              f"{_fmt(rk['spearman'])}, {rk['flipped_pairs']} of {rk['total_pairs']} pairs ({pct:.0f} %) swap order."]
    else:
        L += [f"- Ranking change untuned → tuned: not available ({rk.get('note', '')})."]
    if rep["tuning_speedup"]:
        s = sorted(rep["tuning_speedup"].values())
        L += [f"- Tuning speeds configurations up {statistics.median(s):.1f}× (median; range "
              f"{s[0]:.1f}×–{s[-1]:.1f}×)."]
    pl = rep["per_layer"]
    if pl is not None:
        parts = []
        for kind, d in sorted(pl["by_kind"].items(), key=lambda kv: -kv[1]["time_share"]):
            parts.append(f"{kind} {100 * d['madd_share']:.0f} % of MAdds / {100 * d['time_share']:.0f} % of time")
        L += [f"- Per layer ({pl['label']} {pl['variant']}): " + "; ".join(parts) + "."]
    L += [""]

    # Tables.
    for v in ("tuned", "untuned"):
        ev = rep["evaluation"][v]
        if "results" not in ev:
            continue
        L += [f"## Predictors, {v} latency, held-out MobileNetV2 configs only", "",
              "| predictor | R² | MAPE % | worst % | within ±10 % | Spearman |", "|---|---|---|---|---|---|"]
        for name, r in ev["results"].items():
            m = r["metrics"]
            L += [f"| {name} | {_fmt(m['r2'])} | {_fmt(m['mape'], '.1f')} | {_fmt(m['worst'], '.1f')} | "
                  f"{_fmt(100 * m['within10'] if m['within10'] is not None else None, '.0f')} % | {_fmt(m['spearman'])} |"]
        L += ["", f"Train: {', '.join(ev['split']['train'])}.", "", f"Held out: {', '.join(ev['split']['test'])}.", ""]
        for name, r in ev["results"].items():
            params = ", ".join(f"{k}={_fmt_param(val)}" for k, val in r["params"].items())
            L += [f"- {name}: {params}"]
        if ev.get("other_models"):
            L += ["", "Other models (extrapolation from the MobileNetV2 fit, not part of the metrics):", ""]
            for o in ev["other_models"]:
                preds = ", ".join(f"{name} {_fmt(ev['predicted_all'][name].get(o['label']), '.2f')} ms"
                                  for name in ev["predicted_all"])
                L += [f"- {o['label']}: measured {_fmt(o['measured_ms'], '.2f')} ms; predicted {preds}"]
        L += [""]
    if rep["notes"]:
        L += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]

    L += ["## Measured points", "", "| config | untuned ms | tuned ms | MAdds (M) | tasks tuned |", "|---|---|---|---|---|"]
    by = {(p["label"], p["variant"]): p for p in rep["points"]}
    for label in rep["grid"]:
        u, tp = by.get((label, "untuned")), by.get((label, "tuned"))
        madds = (u or tp or {}).get("madds")

        def ms(p: dict | None) -> str:
            if p is None or p.get("latency_ms") is None:
                return "—"
            return f"{p['latency_ms']:.3f}" + ("" if p["usable"] else " (partly tuned)")

        tasks = f"{tp['tasks_tuned']}/{tp['tasks_total']}" if tp else "—"
        L += [f"| {label} | {ms(u)} | {ms(tp)} | {_fmt(madds / 1e6 if madds else None, '.1f', '—')} | {tasks} |"]
    L += [""]
    methods = {p.get("settings", {}).get("profile_method") for p in rep["points"]}
    on_board = "board-kernels-alone" in methods
    how = ("each kernel timed alone on the board" if on_board else "each kernel modelled alone on the emulated core"
           if "modelled-kernels-alone" in methods else "instrumented")
    if pl is not None:
        rows = [r for r in pl["rows"] if r["ms"] is not None]
        t_total = sum(r["ms"] for r in rows) or 1.0
        m_total = sum(r["madds"] for r in rows) or 1
        diff = sorted(rows, key=lambda r: r["ms"] / t_total - r["madds"] / m_total)
        L += [f"## Per layer: {pl['label']} ({pl['variant']})", "",
              f"Kernel times sum to {_fmt(pl['profiled_ms'], '.2f')} ms ({how}) against a measured "
              f"latency of {_fmt(pl['latency_ms'], '.2f')} ms."
              + ("" if pl["is_reference"] else f" ({REFERENCE_CONFIG.label} tuned was not measured.)"), ""]
        if pl["unmatched_layers"] or pl["unmatched_kernels"]:
            L += [f"Unmatched: layers {pl['unmatched_layers']}, kernels {pl['unmatched_kernels']}.", ""]
        L += ["Layers MAdds under-rate most (share of time − share of MAdds):", "",
              "| layer | kind | MAdds % | time % | bytes (KB) |", "|---|---|---|---|---|"]
        for r in reversed(diff[-5:]):
            L += [f"| {r['layer']} | {r['kind']} | {100 * r['madds'] / m_total:.1f} | {100 * r['ms'] / t_total:.1f} | "
                  f"{r['bytes'] / 1024:.0f} |"]
        L += ["", "Layers MAdds over-rate most:", "", "| layer | kind | MAdds % | time % | bytes (KB) |",
              "|---|---|---|---|---|"]
        for r in diff[:5]:
            L += [f"| {r['layer']} | {r['kind']} | {100 * r['madds'] / m_total:.1f} | {100 * r['ms'] / t_total:.1f} | "
                  f"{r['bytes'] / 1024:.0f} |"]
        L += [""]
    L += ["## How it was measured", "",
          f"- Measurer `{rep['measurer']['name']}`; records `{rep['records']['dir']}`"
          + (f" (fingerprint {rep['records']['fingerprint']})" if rep["records"]["fingerprint"] else " (none)") + "."]
    L += ["- A tuned point is measured again only when the records of its own kernels change."]
    threads = sorted({str(p.get("settings", {}).get("threads")) for p in rep["points"] if p.get("settings")})
    if threads:
        L += [f"- TVM runtime threads: {', '.join(threads)}."]
    ps = rep.get("pass_spread")
    L += [("- Latency is the fastest of each point's timing passes over the grid, each pass the median of "
           "repeated runs (TVM time_evaluator); a point's slowest pass was "
           f"{100 * ps['median']:.0f} % above its fastest (median over {ps['points']} points; at most "
           f"{100 * ps['max']:.0f} %, {ps['max_point']})" if ps else
           "- Latency is the median of repeated runs (TVM time_evaluator), one timing pass")
          + f"; tuned points whose untuned kernels take ≥ {FALLBACK_TIME_LIMIT:.0%} of their time are listed "
            "but not fitted.",
          ("- Per-layer times: each kernel of the bundle's kernel library (kernels.so) timed alone on the board "
           "with time_evaluator on inputs of its shapes (warm caches), times its calls; "
           if on_board else
           "- Per-layer times: each kernel of the bundle's kernel library modelled alone on the emulated core, "
           "times its calls; "
           if "modelled-kernels-alone" in methods else
           "- Per-layer times: the Relax VM instrument hook around each kernel call, median over runs; "
           if pl is not None else "- Per-layer times: not profiled in this run.")
          + ("mapped to conv/linear layers by output shape and MAdds; taken in the last pass when there are "
             "several. The layerwise predictor learns from them scaled to the point's latency (the profile "
             "gives each layer's share, the fastest pass the level)." if pl is not None else ""),
          "- MAdds and bytes per layer: `mnv2-tvm madds` (bytes = fp32 weights + input and output activations).",
          "", "## Files", ""]
    L += [f"- `{name}`" for name in sorted(files)] + [f"- `{POINTS_FILE}` (raw points; resumes the run)", ""]
    return "\n".join(L)


def _fmt_param(val: Any) -> str:
    if isinstance(val, dict):
        return "{" + ", ".join(f"{k}: {_fmt_param(v)}" for k, v in val.items()) + "}"
    if isinstance(val, float):
        return f"{val:.4g}"
    return str(val)
