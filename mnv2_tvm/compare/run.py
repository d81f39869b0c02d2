"""One compare run: count the grid, tune it if asked, compile and time every point untuned and
tuned in passes, then write the report (see the package docstring)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .. import targets
from ..errors import UserError
from ..models import ModelConfig
from .grid import grid_configs
from .measure import HostMeasurer, Measurer
from .profile import KernelTime, map_kernels
from .report import REPORT_FILES, SUMMARY, CompareResult, write_report
from .store import POINTS_FILE, VARIANTS, PointStore, passes_of, point_key, records_fingerprint

if TYPE_CHECKING:
    from ..madds import LayerCount
    from ..targets import TargetSpec

#: Timing passes over the grid; a point's latency is its fastest pass's median (see run_compare).
DEFAULT_PASSES = 5
WORK_DIR = ".work"  # bundles being measured


class _Progress:
    """One line per point on stderr with an ETA weighted by each point's expected cost."""

    def __init__(self, enabled: bool, costs: dict[str, float], stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.costs = costs  # expected relative cost of every point still to measure
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.done_cost = 0.0
        self.done = 0

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[compare] {text}", file=self.stream, flush=True)

    def point(self, key: str, text: str) -> None:
        self.done += 1
        self.done_cost += self.costs.get(key, 0.0)
        elapsed = time.monotonic() - self.t0
        left = sum(self.costs.values()) - self.done_cost
        eta = elapsed / self.done_cost * left if self.done_cost > 0 else None
        from ..tuning.progress import fmt_duration  # loaded already: points are measured with TVM

        self.say(f"{self.done}/{len(self.costs)} {text} | elapsed {fmt_duration(elapsed)}, ETA {fmt_duration(eta)}")


def _expected_cost(madds: int, variant: str) -> float:
    # Compiling dominates and is roughly constant; untuned runs scale with MAdds (~0.5 ms/MMAdd
    # on the host), tuned ones are ~20x faster.
    return 10.0 + madds / 1e6 * (0.02 if variant == "untuned" else 0.002)


def run_compare(spec: TargetSpec, out_dir: Path, *, grid: str | Path = "default", records_dir: Path | None = None,
                measurer: Measurer | None = None, tune_trials_per_config: int = 0,
                progress: bool = True, profile: bool = True, passes: int = DEFAULT_PASSES) -> CompareResult:
    """Measure ``grid`` on ``spec`` untuned and tuned, and write the report to ``out_dir``.

    Every point is timed in ``passes`` passes over the grid (the first compiles and times; the
    others time the kept bundles again, in alternating order; the last also profiles the kernels)
    and its latency is the fastest pass's median: on a shared machine a slow pass is another
    process's doing, never a faster program.

    ``grid`` is a built-in grid's name (``"default"``, ``"quick"``) or a JSON/TOML file (:func:`load_grid`). ``records_dir`` defaults to
    the target's schedules folder. Finished points in ``out_dir/points.jsonl`` are reused (tuned
    ones only while the records are unchanged). Ctrl-C keeps the finished points, writes the
    report marked incomplete and re-raises ``KeyboardInterrupt``. ``profile=False`` skips the
    per-kernel timings (no per-layer report).
    """
    out_dir = Path(out_dir)
    configs = grid_configs(grid)
    if tune_trials_per_config < 0:
        raise UserError(f"the tuning budget per configuration must be >= 0, not {tune_trials_per_config}")
    if passes < 1:
        raise UserError(f"the number of measuring passes must be at least 1, not {passes}")
    measurer = measurer or HostMeasurer()
    if not isinstance(measurer, Measurer):
        raise TypeError("measurer must have name, emulated and measure(bundle_dir, cfg, profile=...)")
    if getattr(measurer, "modelled", False):
        passes = 1  # a modelled cost has no noise to take the best of
    if isinstance(measurer, HostMeasurer) and not (spec.is_host and spec.device_kind == "cpu"):
        raise UserError(f"target {spec.name} is not this machine's CPU: measure it on the board (over RPC)")
    records = targets.records_dir(spec, records_dir)
    if records.exists() and not records.is_dir():
        raise UserError(f"tuning records {records} is not a folder")
    try:
        (out_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report folder {out_dir}: {e.strerror}") from None
    lock = _lock_report_dir(out_dir)
    try:
        return _run(configs, spec, out_dir, records, measurer, tune_trials_per_config, progress, profile, passes)
    finally:
        os.close(lock)  # releases the flock


def _lock_report_dir(out_dir: Path) -> int:
    """One run per report folder: two would interleave their points and remove each other's report."""
    import fcntl

    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"report folder {out_dir} is in use by another compare run") from None
    return fd


def _run(configs: list[ModelConfig], spec: TargetSpec, out_dir: Path, records: Path, measurer: Measurer,
         tune_trials_per_config: int, progress: bool, profile: bool = True,
         passes: int = DEFAULT_PASSES) -> CompareResult:
    from ..madds import count
    from ..tuning.records import records_digest_for, workload_digests

    store = PointStore(out_dir / POINTS_FILE)
    _check_identity(store, spec, measurer, out_dir)
    # An old report next to new points would be presented as describing them: remove it first.
    for name in REPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    bar = _Progress(progress, {})
    if store.dropped:
        bar.say(f"dropped {store.dropped} unreadable line(s) of {POINTS_FILE} (a killed run); they are measured again")

    if tune_trials_per_config > 0:
        # Records the emulated core measured go beside a board's, never among them (compile reads both).
        tune_dir = records / targets.EMULATED_SUBDIR if getattr(measurer, "modelled", False) else records
        _tune_grid(configs, spec, tune_dir, tune_trials_per_config, measurer, bar)
    fingerprint = records_fingerprint(records)
    digests = workload_digests(records) if fingerprint else {}

    def stale(rec: dict[str, Any]) -> bool:
        # Only records of the point's own kernels matter: tuning another config leaves it valid.
        wl = rec.get("task_workloads")
        return fingerprint is None or not wl or rec.get("records_fingerprint") != records_digest_for(digests, wl)

    # Count every configuration not yet fully measured: this also proves that it builds,
    # before any time is spent compiling the others.
    counts: dict[str, Any] = {}
    todo: list[tuple[ModelConfig, str]] = []
    for cfg in configs:
        keys = {v: point_key(cfg.label, v) for v in VARIANTS}
        for v, key in keys.items():
            rec = store.points.get(key)
            if rec is not None and v == "tuned" and stale(rec):
                store.discard(key)  # measured against other records: stale
                rec = None
            if rec is None:
                todo.append((cfg, v))
        if any(c is cfg for c, _ in todo) and cfg.label not in counts:
            try:
                counts[cfg.label] = count(cfg)
            except UserError:
                raise
            except Exception as e:  # torch raises many kinds for a model that cannot run at that size
                raise UserError(f"configuration {cfg.label} cannot be built: {e.__class__.__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    reused = sum(1 for cfg in configs for v in VARIANTS if point_key(cfg.label, v) in store.points)
    bar.costs = {point_key(c.label, v): 0.0 if (v == "tuned" and fingerprint is None)
                 else _expected_cost(counts[c.label].madds, v) for c, v in todo}
    if reused:
        bar.say(f"{reused} point(s) already measured in {out_dir / POINTS_FILE}; {len(todo)} to go")
    if fingerprint is None:
        bar.say(f"no tuning records in {records}: tuned points are not measured "
                "(tune first, or pass a tuning budget per configuration)")

    failures: dict[str, str] = {}
    bar.t0 = time.monotonic()  # the ETA extrapolates measuring, not the counting and tuning before it
    measured = 0
    interrupted = False
    sigint = _SigintFlag()
    try:
        with sigint:
            for cfg, variant in todo:
                key = point_key(cfg.label, variant)
                if variant == "tuned" and fingerprint is None:
                    failures[key] = f"no tuning records in {records}"
                    bar.point(key, f"{cfg.label} tuned: skipped, no records")
                    continue
                try:
                    # With later passes the profile waits for the last one: the pass right after the
                    # compile was the slowest for most tuned points (1.0/224: 16.1 ms, then 9.4, 9.2).
                    rec = _measure_point(cfg, variant, spec, out_dir, records, measurer, counts[cfg.label],
                                         profile and passes == 1)
                except UserError:
                    raise
                except Exception as e:  # a TVM build/run failure of one config should not stop the grid
                    if sigint.hit:  # Ctrl-C inside TVM's C++ can surface as a RuntimeError
                        raise KeyboardInterrupt from None
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    failures[key] = f"{e.__class__.__name__}: {msg}"[:300]
                    bar.point(key, f"{cfg.label} {variant}: FAILED ({failures[key]})")
                    continue
                if rec.get("status") == "uncovered":
                    failures[key] = "the records hold no schedule for any of its tasks"
                store.add(rec)
                measured += 1
                bar.point(key, _point_line(rec))
            for n in range(2, passes + 1):
                _extra_pass(n, passes, configs, store, spec, out_dir, records, measurer, bar, failures, profile)
    except KeyboardInterrupt:
        interrupted = True
        bar.say("interrupted: finished points are kept; run the same command again to resume")

    bar.say("fitting predictors and writing the report")
    result = write_report(configs, store, spec, measurer, records, fingerprint, failures, out_dir,
                          interrupted, measured, reused)
    if interrupted:
        raise KeyboardInterrupt
    import shutil

    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)  # bundles are measured and gone
    bar.say(f"report: {out_dir / SUMMARY}" + ("" if result.complete else " (INCOMPLETE)"))
    return result


class _SigintFlag:
    """Remember that SIGINT arrived while measuring (see run_compare's loop)."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self) -> _SigintFlag:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _check_identity(store: PointStore, spec: TargetSpec, measurer: Measurer, out_dir: Path) -> None:
    for rec in store.points.values():
        if rec.get("target") != spec.name or rec.get("measurer") != measurer.name:
            raise UserError(f"{out_dir / POINTS_FILE} holds points of target {rec.get('target')} measured by "
                            f"{rec.get('measurer')}; this run is {spec.name} by {measurer.name}: "
                            "choose another report folder")


def _tune_grid(configs: list[ModelConfig], spec: TargetSpec, records: Path, trials: int, measurer: Measurer,
               bar: _Progress) -> None:
    """Tune each configuration up to ``trials`` measurements (tuning.tune skips what is done)."""
    from ..lower import to_relax
    from ..models import build
    from ..tuning import RecordsError, tune

    runner = getattr(measurer, "tune_runner", None)  # an RPC measurer may offer its RunnerSpec
    if runner is None and not spec.is_host:
        raise UserError(f"target {spec.name} is not this machine: tune it over RPC first "
                        f"(`mnv2-tvm tune --target {spec.name} --rpc-tracker ...`), or use a measurer that can tune")
    target = spec.tvm_target()
    for i, cfg in enumerate(configs, 1):
        bar.say(f"tuning {i}/{len(configs)} {cfg.label}: up to {trials} trials into {records}")
        mod = to_relax(build(cfg), cfg, layout=spec.layout)
        try:
            # Grid configs share layers of one kind at other sizes: start each from the others.
            rep = tune(mod, target, records, trials, runner=runner, progress=bar.enabled, transfer=True)
        except RecordsError as e:
            raise UserError(str(e)) from None
        if rep.interrupted:
            raise KeyboardInterrupt
        bar.say(f"tuned {cfg.label}: {rep.trials_run} trials run, {len(rep.tasks) - rep.tasks_without_measurement}"
                f"/{len(rep.tasks)} tasks have a schedule")


def _measure_point(cfg: ModelConfig, variant: str, spec: TargetSpec, out_dir: Path, records: Path,
                   measurer: Measurer, counted: Any, profile: bool = True) -> dict[str, Any]:
    import shutil

    import tvm

    from ..tuning.records import records_digest_for, workload_digests

    bundle_dir = _bundle_dir(out_dir, cfg, variant)
    t = time.perf_counter()
    result, notes = _build(cfg, variant, spec, out_dir, records)
    compile_s = time.perf_counter() - t
    tuning = result.manifest["tuning"]
    n_tuned, n_fallback = len(tuning["tuned"]), len(tuning["fallback"])
    rec: dict[str, Any] = {
        "key": point_key(cfg.label, variant), "label": cfg.label, "config": cfg.to_dict(), "variant": variant,
        "target": spec.name, "measurer": measurer.name, "tvm_version": tvm.__version__,
        "task_workloads": tuning.get("workloads") if variant == "tuned" else None,
        "records_fingerprint": (records_digest_for(workload_digests(records), tuning.get("workloads") or [])
                                if variant == "tuned" else None),
        "madds": counted.madds, "params": counted.params,
        "layers": [asdict(layer) for layer in counted.layers],
        "tasks_tuned": n_tuned, "tasks_total": n_tuned + n_fallback, "fallback": tuning["fallback"],
        "compile_s": round(compile_s, 2), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "compile_notes": [ln for ln in notes.splitlines() if ln.startswith(("warning:", "note:"))],
    }
    if variant == "tuned" and n_tuned == 0:
        # Same library as the untuned build: measuring it again would only mislabel it.
        shutil.rmtree(bundle_dir, ignore_errors=True)
        return dict(rec, status="uncovered", latency_ms=None)
    t = time.perf_counter()
    m = measurer.measure(bundle_dir, cfg, profile=profile)
    rec.update(status="ok", latency_ms=m.latency_ms, passes_ms=[m.latency_ms], times_ms=m.times_ms,
               settings=m.settings, measure_s=round(time.perf_counter() - t, 2))
    if m.kernels is not None:
        _attach_profile(rec, m.kernels, counted.layers)
    return rec  # the bundle stays for the later passes; the work folder goes when the run ends


def _attach_profile(rec: dict[str, Any], kernels: list[KernelTime], layers: Sequence[LayerCount]) -> None:
    rec["kernels"] = [asdict(k) for k in kernels]
    rec["layer_map"] = map_kernels(kernels, layers).to_dict()
    total = sum(k.ms for k in kernels)
    rec["profiled_ms"] = total
    if rec["variant"] == "tuned":
        fallback = set(rec["fallback"])
        rec["fallback_time_share"] = sum(k.ms for k in kernels if k.name in fallback) / total if total > 0 else None


def _bundle_dir(out_dir: Path, cfg: ModelConfig, variant: str) -> Path:
    return out_dir / WORK_DIR / f"{cfg.label}-{variant}"


def _build(cfg: ModelConfig, variant: str, spec: TargetSpec, out_dir: Path, records: Path) -> tuple[Any, str]:
    """Compile one point's bundle afresh; returns the compile result and what it warned."""
    import shutil

    from ..compile import compile_bundle

    bundle_dir = _bundle_dir(out_dir, cfg, variant)
    shutil.rmtree(bundle_dir, ignore_errors=True)
    notes = io.StringIO()
    # compile_bundle notes partly tuned builds on stderr; the report says it per point instead.
    with contextlib.redirect_stderr(notes):
        result = compile_bundle(cfg, spec, bundle_dir, records_dir=records, untuned=variant == "untuned")
    return result, notes.getvalue()


def _extra_pass(n: int, passes: int, configs: list[ModelConfig], store: PointStore, spec: TargetSpec, out_dir: Path,
                records: Path, measurer: Measurer, bar: _Progress, failures: dict[str, str],
                profile: bool) -> None:
    """Time every measured point of the grid once more (pass ``n``): latency = the fastest pass.

    Every other pass goes through the grid backwards, so a point's passes are spread over the
    run rather than taken back to back; only points with fewer than ``n`` passes are timed, so
    an interrupted run resumes here too. The last pass also profiles the kernels (when asked),
    far from the point's compile. A bundle removed since (a finished earlier run) is compiled
    again.
    """
    from ..madds import LayerCount

    order = [(cfg, v) for cfg in configs for v in VARIANTS]
    if n % 2 == 0:
        order.reverse()
    todo = []
    for cfg, v in order:
        rec = store.points.get(point_key(cfg.label, v))
        if rec is not None and rec.get("status") == "ok" and len(passes_of(rec)) < n:
            todo.append((cfg, v, rec))
    if not todo:
        return
    for cfg, v, rec in todo:
        bar.costs[f"{rec['key']}#{n}"] = 0.2 + (rec["latency_ms"] or 0.0) / 1e3 * 20  # ~20 timed runs a pass
    bar.say(f"pass {n}/{passes}: timing {len(todo)} point(s) again")
    for cfg, v, rec in todo:
        key = rec["key"]
        try:
            bundle_dir = _bundle_dir(out_dir, cfg, v)
            if not (bundle_dir / "manifest.json").exists():
                _build(cfg, v, spec, out_dir, records)
            m = measurer.measure(bundle_dir, cfg, profile=profile and n == passes)
        except UserError:
            raise
        except Exception as e:  # like a failed first pass: this point keeps the passes it has
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            failures.setdefault(key, f"pass {n}: {e.__class__.__name__}: {msg}"[:300])
            bar.point(f"{key}#{n}", f"pass {n}/{passes} {cfg.label} {v}: FAILED ({msg[:200]})")
            continue
        seen = passes_of(rec) + [m.latency_ms]
        rec = dict(rec, passes_ms=seen, latency_ms=min(seen))
        if m.kernels is not None:
            layers = [LayerCount(**dict(d, output_shape=tuple(d["output_shape"]))) for d in rec["layers"]]
            _attach_profile(rec, m.kernels, layers)
        store.add(rec)
        bar.point(f"{key}#{n}", f"pass {n}/{passes} {cfg.label} {v}: {m.latency_ms:.3f} ms "
                                f"(passes so far {', '.join(f'{x:.3f}' for x in seen)}; keeps {min(seen):.3f})")


def _point_line(rec: dict[str, Any]) -> str:
    head = f"{rec['label']} {rec['variant']}"
    if rec["status"] != "ok":
        return f"{head}: not measured, the records cover none of its {rec['tasks_total']} tasks"
    times = rec["times_ms"]
    spread = (max(times) - min(times)) / rec["latency_ms"] * 100 if times else 0.0
    cov = ""
    if rec["variant"] == "tuned":
        cov = f", {rec['tasks_tuned']}/{rec['tasks_total']} tasks tuned"
        if rec.get("fallback_time_share"):
            cov += f" (untuned kernels {100 * rec['fallback_time_share']:.0f}% of time)"
    return (f"{head}: {rec['latency_ms']:.3f} ms (spread {spread:.0f}%){cov}; "
            f"compile {rec['compile_s']:.0f} s, measure {rec.get('measure_s', 0):.0f} s")
