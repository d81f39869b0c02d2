#!/usr/bin/env python3
"""Hold the emulated-core cost against real timings, on x86-64 where there is ground truth.

The same libraries run twice: under qemu-x86_64 with the mnv2cost plugin, costed by the host's
core model (``[core]`` of the x86 target's TOML), and natively on this host, timed with TVM's
time_evaluator. Three parts, each optional:

- ``candidates``: MobileNetV2 1.0/224 tasks of the target (pointwise expand and project, depthwise
  stride 1 and 2, the stem, the classifier), each with candidate schedules drawn from
  MetaSchedule's own design space (random decisions replayed on its design spaces, evolutionary
  mutations of the shipped records, and the shipped best schedule): Spearman rank correlation
  of modelled against measured time, per task;
- ``e2e``: the quick grid (MobileNetV2 0.35 and 1.0 × 96, 160, 224), each compiled untuned and
  tuned with the shipped records: modelled against measured latency, error per point;
- ``kernels``: small kernels of known work (vector add, matmul, strided read).

Native timings are median per-round times over rounds that interleave every library (a load
drift on this shared machine touches them all alike), at the same thread count as the emulated
core. Emulation comes first and timing after, never both at once. Between rounds a dependent
add chain measures the core's clock (boost varies with the host's load); its median is reported
beside the model's ``clock_ghz``. Everything measured is cached in the work folder (native
times by library digest, plugin records by library and plugin digest), so a changed core model
is re-scored without measuring again (``--rescore``) and a changed plugin re-emulates only.

    .venv/bin/python scripts/validate_emulated_cost.py                      # everything, ~30 min
    .venv/bin/python scripts/validate_emulated_cost.py --parts candidates --per-task 24
    .venv/bin/python scripts/validate_emulated_cost.py --rescore            # re-score cached data

Writes docs/results/emulated-cost-validation_<target>.json (+ .png) unless ``--no-publish``;
``python3 scripts/results.py`` renders it into docs/results.md. Set-up:
``bash scripts/setup_emulator.sh``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_KERNELS = ["vadd:4096", "vadd:65536", "vadd:1048576", "stride:16384", "matmul:64", "matmul:128",
                   "matmul:256"]
RESULTS_DIR = REPO / "docs" / "results"

#: The tasks of MobileNetV2 1.0/224 the candidates come from, by role: (input shape, weight shape)
#: of the fused kernel's first two arguments, as the workload has them (before layout rewriting).
TASK_ROLES: list[tuple[str, str, tuple, tuple]] = [
    ("pw-expand", "pointwise expand 24→144, 56×56", (1, 24, 56, 56), (144, 24, 1, 1)),
    ("pw-project", "pointwise project 144→24, 56×56 (+residual)", (1, 144, 56, 56), (24, 144, 1, 1)),
    ("dw-s1", "depthwise 3×3 stride 1, 144 ch, 56×56", (1, 144, 56, 56), (144, 1, 3, 3)),
    ("dw-s2", "depthwise 3×3 stride 2, 144 ch, 56→28", (1, 144, 56, 56), (144, 1, 3, 3)),
    ("stem", "stem conv 3×3 stride 2, 3→32, 224→112", (1, 3, 224, 224), (32, 3, 3, 3)),
    ("classifier", "classifier dense 1280→1000", (1, 1280), (1280, 1000)),
]
#: dw-s1 and dw-s2 share input and weight shapes: the output tells them apart.
ROLE_OUTPUT = {"dw-s1": (1, 144, 56, 56), "dw-s2": (1, 144, 28, 28)}

CLOCK_PROBE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* Effective clock: a chain of dependent 1-cycle adds, n adds in n cycles. */
int main(int argc, char **argv) {
    int samples = argc > 1 ? atoi(argv[1]) : 5;
    long n = argc > 2 ? atol(argv[2]) : 20000000L;
    for (int s = 0; s < samples; s++) {
        struct timespec a, b;
        long x = 0, i = n;
        clock_gettime(CLOCK_MONOTONIC, &a);
        __asm__ volatile("1: add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n sub $4,%1\n jnz 1b"
                         : "+r"(x), "+r"(i));
        clock_gettime(CLOCK_MONOTONIC, &b);
        double sec = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
        printf("%.4f\n", n / sec / 1e9);
    }
    return 0;
}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


# --------------------------------------------------------------------------- statistics


def ranks(xs: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    if sa == 0 or sb == 0:
        return float("nan")
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (sa * sb)


def spearman(a: list[float], b: list[float]) -> float:
    return pearson(ranks(a), ranks(b))


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


# --------------------------------------------------------------------------- the cache


class Cache:
    """Measurements by library digest, in the work folder: native.json and emulated.json."""

    def __init__(self, work: Path) -> None:
        self.native_path = work / "native.json"
        self.emulated_path = work / "emulated.json"
        self.native: dict[str, Any] = self._read(self.native_path)
        self.emulated: dict[str, Any] = self._read(self.emulated_path)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def save(self) -> None:
        for path, data in ((self.native_path, self.native), (self.emulated_path, self.emulated)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)


# --------------------------------------------------------------------------- what is measured


@dataclass
class Item:
    """One library to measure: a candidate kernel, a test kernel or a compiled bundle."""

    part: str                 # candidates, e2e, kernels
    group: str                # task role, "untuned"/"tuned", or "kernel"
    name: str
    path: Path                # the .so (or the bundle folder for e2e)
    func: str | None
    args: list[tuple[list[int], str]] | None
    info: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    native_ms: float | None = None
    native_samples: list[float] = field(default_factory=list)
    cost: Any = None          # EmulatedCost
    error: str | None = None

    @property
    def lib(self) -> Path:
        return self.path / "model.so" if self.part == "e2e" else self.path


# --------------------------------------------------------------------------- candidates


def _shapes(mod: Any) -> list[tuple[int, ...]]:
    from tvm.s_tir import meta_schedule as ms

    return [tuple(int(d) for d in a.shape) for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]


def pick_tasks(target_name: str) -> dict[str, Any]:
    """The MobileNetV2 1.0/224 tasks of TASK_ROLES, by role."""
    from mnv2_tvm import targets
    from mnv2_tvm.lower import to_relax
    from mnv2_tvm.models import ModelConfig, build
    from mnv2_tvm.tuning.tasks import extract_tasks

    spec = targets.load(target_name)
    cfg = ModelConfig("mobilenet_v2", 1.0, 224)
    mod = to_relax(build(cfg, seed=0), cfg, "torch", spec.layout)
    tasks = extract_tasks(mod, spec.tvm_target())
    found: dict[str, Any] = {}
    for role, _, x, w in TASK_ROLES:
        for t in tasks:
            shapes = _shapes(t.mod)
            if len(shapes) >= 3 and shapes[0] == x and shapes[1] == w and \
                    (role not in ROLE_OUTPUT or shapes[-1] == ROLE_OUTPUT[role]):
                found[role] = t
                break
        else:
            raise SystemExit(f"no task of MobileNetV2 1.0/224 for {target_name} has the shapes of {role} ({x}, {w})")
    return found


def generate_candidates(task: Any, records: Path, n_random: int, n_evolve: int, seed: int) -> list[tuple[str, Any]]:
    """(origin, schedule) pairs from MetaSchedule's design space for ``task``, distinct by module:
    the shipped best schedule, ``n_evolve`` evolutionary mutations seeded with the shipped
    records (MetaSchedule's EvolutionarySearch, random cost model), ``n_random`` design-space
    traces replayed with random decisions (ReplayTrace)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tmp = Path(tempfile.mkdtemp(prefix="mnv2-validate-db-"))
    try:
        for f in ("database_workload.json", "database_tuning_record.json"):
            shutil.copy(records / f, tmp / f)
        db = ms.database.JSONDatabase(str(tmp / "database_workload.json"), str(tmp / "database_tuning_record.json"))
        out: list[tuple[str, Any]] = []
        seen: set[str] = set()

        def add(origin: str, sch: Any) -> bool:
            key = str(tvm_ffi.structural_hash(sch.mod))
            if key in seen:
                return False
            seen.add(key)
            out.append((origin, sch))
            return True

        best = db.query_schedule(task.mod, task.target, "main")
        if best is not None:
            add("tuned", best)
        for origin, want in (("evolutionary", n_evolve), ("random", n_random)):
            got, attempt = 0, 0
            while got < want and attempt < 6:
                if origin == "random":
                    strategy = "replay-trace"
                else:
                    strategy = ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32,
                                                                     genetic_num_iters=3)
                ctx = ms.TuneContext(mod=task.mod, target=task.target, space_generator="post-order-apply",
                                     search_strategy=strategy, task_name=task.name,
                                     rand_state=seed + 1000 * attempt + (7 if origin == "random" else 0),
                                     num_threads=1)
                spaces = ctx.generate_design_space()
                n = want - got
                ctx.pre_tuning(max_trials=2 * n, num_trials_per_iter=2 * n, design_spaces=spaces,
                               database=db if origin == "evolutionary" else None,
                               cost_model=ms.CostModel.create("random") if origin == "evolutionary" else None)
                cands = ctx.generate_measure_candidates() or []
                ctx.post_tuning()
                for c in cands:
                    if got < want and add(origin, c.sch):
                        got += 1
                attempt += 1
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_candidate(sch: Any, target: Any, path: Path) -> list[tuple[list[int], str]]:
    """Build a candidate as MetaSchedule's default builder does for CPUs (weights read in the
    layout the schedule chose, the rewriting itself left to compile time) and export it; the
    arguments it takes (after layout rewriting)."""
    import tvm
    import tvm.s_tir.tensor_intrin  # noqa: F401
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(sch.mod)
    rt = tvm.tirx.build(mod, target=target)
    path.parent.mkdir(parents=True, exist_ok=True)
    rt.export_library(str(path))
    infos = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    return [([int(d) for d in a.shape], str(a.dtype)) for a in infos]


def records_folder(args: argparse.Namespace) -> Path:
    """The shipped records of the target (``--records`` overrides)."""
    if args.records:
        return args.records
    return Path(os.environ.get("MNV2_TVM_SCHEDULES", REPO / "schedules")) / args.target


def candidate_items(args: argparse.Namespace, work: Path) -> list[Item]:
    manifest_path = work / "candidates" / "manifest.json"
    want = {"per_task": args.per_task, "seed": args.seed, "target": args.target}
    manifest = None
    if manifest_path.is_file() and not args.regenerate:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") != want or not all(Path(c["path"]).is_file() for c in manifest["candidates"]):
            manifest = None
    if manifest is None:
        log("extracting MobileNetV2 1.0/224 tasks")
        tasks = pick_tasks(args.target)
        cands = []
        n_evolve = args.per_task // 3
        n_random = args.per_task - n_evolve
        for role, title, _, _ in TASK_ROLES:
            task = tasks[role]
            t0 = time.monotonic()
            scheds = generate_candidates(task, records_folder(args), n_random, n_evolve, args.seed)
            ok = 0
            for k, (origin, sch) in enumerate(scheds):
                path = work / "candidates" / role / f"{k:03d}-{origin}.so"
                try:
                    cargs = build_candidate(sch, task.target, path)
                except Exception as e:  # noqa: BLE001 - a candidate that does not build is no candidate
                    log(f"  {role} #{k}: build failed: {str(e).strip().splitlines()[-1][:120]}")
                    continue
                cands.append({"role": role, "task": task.name, "title": title, "origin": origin, "index": k,
                              "path": str(path), "args": cargs})
                ok += 1
            log(f"{role:11s} {task.name}: {ok} candidates built ({time.monotonic() - t0:.0f} s)")
        manifest = {"settings": want, "candidates": cands}
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return [Item("candidates", c["role"], f"{c['role']}/{c['index']:03d}-{c['origin']}", Path(c["path"]), "main",
                 [(list(s), d) for s, d in c["args"]], {k: c[k] for k in ("task", "title", "origin")})
            for c in manifest["candidates"]]


# --------------------------------------------------------------------------- end to end


def e2e_items(args: argparse.Namespace, work: Path) -> list[Item]:
    """The quick grid compiled untuned and tuned (``mnv2-tvm compile``), one bundle each."""
    try:
        from mnv2_tvm.compare import quick_grid
    except ImportError:  # the grid as `compare --grid quick` defines it
        from mnv2_tvm.models import ModelConfig

        def quick_grid() -> list[Any]:
            return [ModelConfig("mobilenet_v2", w, r) for w in (0.35, 1.0) for r in (96, 160, 224)]

    items = []
    empty = work / "no-records"
    empty.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "mnv2_tvm.cli"] if not (REPO / ".venv/bin/mnv2-tvm").exists() \
        else [str(REPO / ".venv/bin/mnv2-tvm")]
    for cfg in quick_grid():
        for variant in ("untuned", "tuned"):
            out = work / "bundles" / f"{cfg.label}-{variant}"
            manifest = out / "manifest.json"
            if not manifest.is_file() or args.recompile:
                t0 = time.monotonic()
                cmd = [*cli, "compile", cfg.model, "--width", str(cfg.width), "--resolution", str(cfg.resolution),
                       "--target", args.target, "-o", str(out)]
                cmd += ["--records", str(empty if variant == "untuned" else records_folder(args))]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if res.returncode != 0:
                    log(f"compile {cfg.label} {variant} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
                    continue
                log(f"compiled {cfg.label} {variant} ({time.monotonic() - t0:.0f} s)")
            m = json.loads(manifest.read_text())
            tuning = m.get("tuning") or {}
            n_tuned = len(tuning.get("tuned", []))
            n_total = n_tuned + len(tuning.get("fallback", []))
            items.append(Item("e2e", variant, f"{cfg.label} {variant}", out, None, None,
                              {"label": cfg.label, "width": cfg.width, "resolution": cfg.resolution,
                               "madds": m.get("madds"), "tasks_tuned": n_tuned, "tasks_total": n_total}))
    return items


def kernel_items(args: argparse.Namespace, work: Path) -> list[Item]:
    from mnv2_tvm.emulate.kernels import build_kernel

    items = []
    for spec in args.kernels:
        kind, _, n = spec.partition(":")
        k = build_kernel(kind, args.target, work / "kernels", n=int(n or 4096))
        items.append(Item("kernels", "kernel", k.func, k.path, k.func, [(list(s), d) for s, d in k.args]))
    return items


# --------------------------------------------------------------------------- measuring


def emulate(items: list[Item], args: argparse.Namespace, cache: Cache) -> None:
    """Plugin records for every item not cached for this plugin build; costed afterwards."""
    from mnv2_tvm.emulate import EmulatedCore
    from mnv2_tvm.emulate import setup as emu_setup

    plugin = emu_setup.ensure_plugin().name
    todo = []
    for it in items:
        it.digest = sha256(it.lib)
        key = f"{it.digest}:{plugin}:{args.threads}"
        if key not in cache.emulated or "error" in cache.emulated[key]:  # failures are tried again
            todo.append((it, key))
    if not todo:
        return
    log(f"emulating {len(todo)} libraries under qemu-x86_64 ({args.threads} thread(s))")
    t_all = time.monotonic()
    with EmulatedCore(args.target, threads=args.threads, timeout_s=args.emulation_timeout) as emu:
        for n, (it, key) in enumerate(todo, 1):
            cost = emu.measure_bundle(it.path) if it.part == "e2e" else emu.measure(it.lib, it.func, it.args)
            if cost.ok:
                cache.emulated[key] = {"record": cost.raw, "wall_s": cost.wall_s}
            else:
                cache.emulated[key] = {"error": cost.error, "wall_s": cost.wall_s}
            if n % 10 == 0 or it.part == "e2e" or not cost.ok:
                cache.save()
                log(f"  {n}/{len(todo)} {it.name}: " + (f"{cost.ms:.3f} ms modelled, {cost.instructions:,} insns"
                                                       if cost.ok else f"failed: {cost.error}")
                    + f" ({cost.wall_s:.1f} s)")
    cache.save()
    log(f"emulation done ({time.monotonic() - t_all:.0f} s)")


def clock_probe(work: Path) -> Path | None:
    exe = work / "clock_probe"
    if exe.exists():
        return exe
    src = work / "clock_probe.c"
    src.write_text(CLOCK_PROBE_C)
    res = subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], capture_output=True, text=True)
    return exe if res.returncode == 0 else None


NATIVE_CHECK = r"""
import json, sys
import numpy as np
import tvm
dev = tvm.cpu(0)
for line in sys.stdin:
    it = json.loads(line)
    print("start", it["key"], flush=True)
    if it["e2e"]:
        sys.path.insert(0, it["repo"])
        from mnv2_tvm import bundle
        runner = bundle.Runner(it["path"])
        x, _ = bundle.reference(it["path"])
        runner.run(x)
    else:
        mod = tvm.runtime.load_module(it["path"])
        mod[it["func"]](*[tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in it["args"]])
    print("ok", it["key"], flush=True)
"""


def native_check(items: list[Item], cache: Cache) -> None:
    """Run each library once natively in a child process: one that crashes is recorded as failed
    (and not timed) instead of killing this process in the middle of the timing rounds."""
    todo = [it for it in items if f"check:{it.digest}" not in cache.native]
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", NATIVE_CHECK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env={**os.environ, "TVM_NUM_THREADS": "1"})
        assert proc.stdin is not None and proc.stdout is not None
        for it in todo:
            proc.stdin.write(json.dumps({"key": it.digest, "e2e": it.part == "e2e", "path": str(it.path),
                                         "func": it.func, "args": it.args, "repo": str(REPO)}) + "\n")
        proc.stdin.close()
        started = None
        for line in proc.stdout:
            status, key = line.split()
            if status == "start":
                started = key
            else:
                cache.native[f"check:{key}"] = "ok"
                started = None
        proc.wait()
        if started is not None:
            cache.native[f"check:{started}"] = f"crashed natively (exit status {proc.returncode})"
            log(f"  {next(it.name for it in todo if it.digest == started)} crashed natively")
        todo = [it for it in todo if f"check:{it.digest}" not in cache.native]
        if proc.returncode == 0:
            break
    cache.save()


def time_natively(items: list[Item], args: argparse.Namespace, cache: Cache, work: Path) -> list[float]:
    """Interleaved rounds over all items not cached (or all, with --retime); returns clock samples (GHz)."""
    import numpy as np
    import tvm

    native_check(items, cache)
    todo = [it for it in items if (args.retime or it.digest not in cache.native)
            and cache.native.get(f"check:{it.digest}") == "ok"]
    if not todo:
        return []
    tvm.get_global_func("runtime.config_threadpool")(1, args.threads)
    dev = tvm.cpu(0)
    evaluators = []
    for it in todo:
        if it.part == "e2e":
            from mnv2_tvm import bundle

            runner = bundle.Runner(it.path)
            x, _ = bundle.reference(it.path)
            xt = tvm.runtime.tensor(runner.check_input(x), dev)
            f = runner.vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=int(args.min_repeat_ms_e2e))
            evaluators.append((it, f, [xt], runner))
        else:
            mod = tvm.runtime.load_module(str(it.lib))
            tensors = [tvm.runtime.tensor(np.random.default_rng(i).standard_normal(s).astype(d), dev)
                       for i, (s, d) in enumerate(it.args)]
            f = mod.time_evaluator(it.func, dev, number=1, repeat=1, min_repeat_ms=int(args.min_repeat_ms))
            evaluators.append((it, f, tensors, mod))
    for it, f, a, _ in evaluators:  # warm-up: first touch, code paged in
        f(*a)
    probe = clock_probe(work)
    clocks: list[float] = []
    samples: dict[int, list[float]] = {id(it): [] for it in todo}
    log(f"timing {len(todo)} libraries natively: {args.rounds} interleaved rounds, {args.threads} thread(s)")
    t0 = time.monotonic()
    for r in range(args.rounds):
        order = todo if r % 2 == 0 else todo[::-1]
        for it, f, a, _ in (e for it2 in order for e in evaluators if e[0] is it2):
            samples[id(it)].append(f(*a).mean * 1e3)
        if probe:
            out = subprocess.run([str(probe), "3"], capture_output=True, text=True).stdout.split()
            clocks += [float(v) for v in out]
        if (r + 1) % max(1, args.rounds // 5) == 0:
            log(f"  round {r + 1}/{args.rounds} ({time.monotonic() - t0:.0f} s)")
    for it in todo:
        s = samples[id(it)]
        cache.native[it.digest] = {"median_ms": statistics.median(s), "samples_ms": s, "name": it.name,
                                   "threads": args.threads}
    cache.save()
    return clocks


# --------------------------------------------------------------------------- scoring


def score(items: list[Item], args: argparse.Namespace, cache: Cache, core: Any = None) -> None:
    from mnv2_tvm.emulate import cost_from_record, load_core_model
    from mnv2_tvm.emulate import setup as emu_setup

    core = core or load_core_model(args.target)
    plugin = emu_setup.ensure_plugin().name
    for it in items:
        it.digest = it.digest or sha256(it.lib)
        nat = cache.native.get(it.digest)
        if nat:
            it.native_samples = nat["samples_ms"]
            it.native_ms = min(it.native_samples) if args.statistic == "min" else statistics.median(it.native_samples)
        em = cache.emulated.get(f"{it.digest}:{plugin}:{args.threads}")
        if em is None:
            it.error = "not emulated"
        elif "error" in em:
            it.error = em["error"]
        else:
            it.cost = cost_from_record(em["record"], core, args.threads)


#: The model with some of its mechanisms taken out (``--ablation``): what each one contributes.
ABLATIONS = [
    ("the first model: throughput bounds, base clock 2.6 GHz, assumed memory figures",
     {"mca_cpu": None, "clock_ghz": 2.6, "miss_overlap": 0.7, "l2_hit_overlap": None, "dram_bandwidth_gbs": 20.0,
      "l2_bytes_per_cycle": 0.0, "l3_bytes_per_cycle": 0.0, "branch_miss_cycles": 0.0}),
    ("throughput bounds, measured clock and memory figures", {"mca_cpu": None}),
    ("LLVM scheduling model per block, no out-of-order overlap", {"ooo_window": 0.0}),
    ("scheduling model, overlap, no bandwidth limit between cache levels",
     {"l2_bytes_per_cycle": 0.0, "l3_bytes_per_cycle": 0.0}),
    ("scheduling model, overlap, level bandwidths, no branch mispredictions", {"branch_miss_cycles": 0.0}),
    ("the model: scheduling model per block, loops overlapping in the window, level bandwidths, "
     "mispredicted forward branches", {}),
]


def ablation(items: list[Item], args: argparse.Namespace, cache: Cache) -> list[dict[str, Any]]:
    import dataclasses

    from mnv2_tvm.emulate import load_core_model

    base = load_core_model(args.target)
    rows = []
    for title, changes in ABLATIONS:
        core = dataclasses.replace(base, **changes)
        score(items, args, cache, core)
        s = summarise(items, args, [])
        e2e = [abs(e["error"]) for e in s["e2e"]]
        rows.append({"model": title, "spearman": {t["role"]: t["spearman"] for t in s["tasks"]},
                     "e2e_max_abs_error": max(e2e) if e2e else None,
                     "e2e_median_abs_error": statistics.median(e2e) if e2e else None})
        log(f"ablation: {title}: " + " ".join(f"{k} {v:+.2f}" for k, v in rows[-1]["spearman"].items())
            + (f"; end to end |error| median {rows[-1]['e2e_median_abs_error']:.1%}, max {rows[-1]['e2e_max_abs_error']:.1%}"
               if e2e else ""))
    return rows


def summarise(items: list[Item], args: argparse.Namespace, clocks: list[float]) -> dict[str, Any]:
    from mnv2_tvm.emulate import load_core_model

    core = load_core_model(args.target)
    ok = [it for it in items if it.cost is not None and it.native_ms]
    out: dict[str, Any] = {"tasks": [], "e2e": [], "kernels": []}
    for role, title, _, _ in TASK_ROLES:
        pts = [it for it in ok if it.part == "candidates" and it.group == role]
        n_all = sum(1 for it in items if it.part == "candidates" and it.group == role)
        if not pts:
            continue
        mod = [it.cost.ms for it in pts]
        mea = [it.native_ms for it in pts]
        other = "median" if args.statistic == "min" else "min"
        mea_other = [statistics.median(it.native_samples) if other == "median" else min(it.native_samples)
                     for it in pts]
        best_measured = min(pts, key=lambda it: it.native_ms)
        best_modelled = min(pts, key=lambda it: it.cost.ms)
        out["tasks"].append({
            "role": role, "title": title, "task": pts[0].info["task"], "candidates": len(pts), "built": n_all,
            "spearman": spearman(mod, mea), f"spearman_{other}": spearman(mod, mea_other),
            "spearman_measured_min_vs_median": spearman(mea, mea_other),
            "pearson_log": pearson([math.log(x) for x in mod], [math.log(y) for y in mea]),
            "ratio_geomean": geomean([a / b for a, b in zip(mod, mea)]),
            "measured_range_ms": [min(mea), max(mea)],
            # What the model's pick costs, against the fastest measured candidate.
            "pick_regret": best_modelled.native_ms / best_measured.native_ms,
            "points": [{"name": it.name, "origin": it.info["origin"], "measured_ms": it.native_ms,
                        "measured_median_ms": statistics.median(it.native_samples),
                        "measured_min_ms": min(it.native_samples),
                        "modelled_ms": it.cost.ms, "instructions": it.cost.instructions,
                        "terms": {k: round(v) for k, v in it.cost.terms.items()}} for it in pts],
        })
    for it in (x for x in ok if x.part == "e2e"):
        med = statistics.median(it.native_samples)
        out["e2e"].append({**it.info, "variant": it.group, "measured_ms": it.native_ms, "modelled_ms": it.cost.ms,
                           "error": it.cost.ms / it.native_ms - 1, "measured_median_ms": med,
                           "measured_min_ms": min(it.native_samples), "error_vs_median": it.cost.ms / med - 1,
                           "instructions": it.cost.instructions,
                           "terms": {k: round(v) for k, v in it.cost.terms.items()}})
    for it in (x for x in ok if x.part == "kernels"):
        out["kernels"].append({"name": it.name, "measured_ms": it.native_ms, "modelled_ms": it.cost.ms,
                               "ratio": it.cost.ms / it.native_ms, "terms": {k: round(v) for k, v in it.cost.terms.items()}})
    out["failed"] = [{"name": it.name, "error": it.error} for it in items if it.cost is None]
    out["statistic"] = args.statistic
    out["clock"] = {"model_ghz": core.clock_ghz, "samples": len(clocks), "max_ghz": max(clocks) if clocks else None,
                    "median_ghz": statistics.median(clocks) if clocks else None,
                    "p10_ghz": sorted(clocks)[len(clocks) // 10] if clocks else None,
                    "p90_ghz": sorted(clocks)[len(clocks) * 9 // 10] if clocks else None}
    return out


def print_summary(s: dict[str, Any]) -> None:
    for t in s["tasks"]:
        other = next(k for k in t if k.startswith("spearman_m") and k != "spearman_measured_min_vs_median")
        print(f"{t['role']:11s} {t['candidates']:3d} candidates  Spearman {t['spearman']:+.3f} ({other[9:]}: {t[other]:+.3f})  "
              f"modelled/measured {t['ratio_geomean']:.2f} (geomean)  pick regret {t['pick_regret']:.2f}×  "
              f"measured {t['measured_range_ms'][0]:.3f}–{t['measured_range_ms'][1]:.3f} ms")
    for e in s["e2e"]:
        print(f"{e['label']:22s} {e['variant']:7s} measured {e['measured_ms']:9.3f} ms  modelled {e['modelled_ms']:9.3f} ms  "
              f"error {e['error']:+.1%}")
    for k in s["kernels"]:
        print(f"{k['name']:22s} measured {k['measured_ms']:.4f} ms  modelled {k['modelled_ms']:.4f} ms  ratio {k['ratio']:.2f}")
    c = s["clock"]
    if c["median_ghz"]:
        print(f"clock: model {c['model_ghz']} GHz; measured max {c['max_ghz']:.2f}, median {c['median_ghz']:.2f} GHz "
              f"(p10 {c['p10_ghz']:.2f}, p90 {c['p90_ghz']:.2f}; {c['samples']} samples)")
    for f in s["failed"]:
        print(f"failed: {f['name']}: {f['error']}")


# --------------------------------------------------------------------------- publishing


def plot(s: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(s["tasks"]) + (1 if s["e2e"] else 0)
    cols = 4
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    colours = {"tuned": "tab:red", "evolutionary": "tab:orange", "random": "tab:blue"}
    for ax, t in zip(axes.flat, s["tasks"]):
        for origin in ("random", "evolutionary", "tuned"):
            pts = [p for p in t["points"] if p["origin"] == origin]
            if pts:
                ax.scatter([p["measured_ms"] for p in pts], [p["modelled_ms"] for p in pts], s=14,
                           c=colours[origin], label=origin, alpha=0.8)
        _diagonal(ax, [p["measured_ms"] for p in t["points"]] + [p["modelled_ms"] for p in t["points"]])
        ax.set_title(f"{t['role']}: ρ = {t['spearman']:.2f} (n = {t['candidates']})", fontsize=10)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("modelled ms")
    if s["tasks"]:
        axes.flat[0].legend(fontsize=7)
    if s["e2e"]:
        ax = axes.flat[len(s["tasks"])]
        for variant, marker in (("untuned", "s"), ("tuned", "o")):
            pts = [e for e in s["e2e"] if e["variant"] == variant]
            ax.scatter([e["measured_ms"] for e in pts], [e["modelled_ms"] for e in pts], marker=marker, label=variant)
        vals = [e["measured_ms"] for e in s["e2e"]] + [e["modelled_ms"] for e in s["e2e"]]
        _diagonal(ax, vals, band=0.2)
        ax.set_title("quick grid end to end (±20 % band)", fontsize=10)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("modelled ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _diagonal(ax: Any, vals: list[float], band: float | None = None) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    lo, hi = min(vals) / 1.3, max(vals) * 1.3
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi / lo < 200 else (1.0,)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.7)
    if band:
        ax.plot([lo, hi], [lo * (1 + band), hi * (1 + band)], "k:", lw=0.7)
        ax.plot([lo, hi], [lo * (1 - band), hi * (1 - band)], "k:", lw=0.7)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


def host_cpu() -> str:
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    except OSError:
        return os.uname().machine
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}), "
            f"{os.cpu_count()} cores")


def publish(s: dict[str, Any], args: argparse.Namespace, command: list[str], wall_s: float) -> Path:
    from mnv2_tvm.emulate import load_core_model

    core = load_core_model(args.target)
    stem = f"emulated-cost-validation_{args.target}"
    json_path = RESULTS_DIR / f"{stem}.json"
    png_path = RESULTS_DIR / f"{stem}.png"
    title = f"Emulated-core cost against measured time: {args.target}, {args.threads} thread"
    plot(s, png_path, title + f" ({core.model} model)")
    tables = []
    other = "median" if s["statistic"] == "min" else "min"
    if s["tasks"]:
        tables.append({
            "caption": "Candidate schedules of MobileNetV2 1.0/224 tasks (MetaSchedule's design space: random "
                       "decisions, evolutionary mutations of the shipped records, the shipped best): Spearman ρ of "
                       "modelled against measured time (goal ≥ 0.9); pick regret = measured time of the model's "
                       "fastest candidate over the fastest measured",
            "columns": ["task", "kernel", "candidates", f"Spearman ρ ({s['statistic']})", f"ρ ({other})",
                        "modelled / measured (geomean)", "pick regret", "measured range, ms"],
            "rows": [[t["title"], t["task"], t["candidates"], f"{t['spearman']:.3f}", f"{t['spearman_' + other]:.3f}",
                      f"{t['ratio_geomean']:.2f}", f"{t['pick_regret']:.2f}×",
                      f"{t['measured_range_ms'][0]:.3f}–{t['measured_range_ms'][1]:.3f}"]
                     for t in s["tasks"]]})
    if s["e2e"]:
        tables.append({
            "caption": "The quick grid end to end, untuned and tuned (schedules/x86-64-avx2/): modelled against "
                       "measured latency (goal: within ±20 %)",
            "columns": ["configuration", "variant", "tasks tuned", f"measured ms ({s['statistic']})", "modelled ms", "error",
                        "measured ms (median)", "error vs median"],
            "rows": [[e["label"], e["variant"], f"{e['tasks_tuned']}/{e['tasks_total']}", f"{e['measured_ms']:.2f}",
                      f"{e['modelled_ms']:.2f}", f"{e['error']:+.1%}", f"{e['measured_median_ms']:.2f}",
                      f"{e['error_vs_median']:+.1%}"]
                     for e in sorted(s["e2e"], key=lambda e: (e["variant"] != "untuned", e["width"], e["resolution"]))]})
    if s.get("ablation"):
        roles = [t["role"] for t in s["tasks"]]
        tables.append({
            "caption": "What each mechanism of the model contributes: the same measurements scored with mechanisms "
                       "taken out (Spearman ρ per task; end-to-end |error| over the quick grid)",
            "columns": ["model", *roles, "e2e |error| median", "e2e |error| max"],
            "rows": [[a["model"], *(f"{a['spearman'].get(r, float('nan')):.2f}" for r in roles),
                      f"{a['e2e_median_abs_error']:.1%}" if a["e2e_median_abs_error"] is not None else "",
                      f"{a['e2e_max_abs_error']:.1%}" if a["e2e_max_abs_error"] is not None else ""]
                     for a in s["ablation"]]})
    if s["kernels"]:
        tables.append({"caption": "Test kernels", "columns": ["kernel", "measured ms", "modelled ms", "ratio"],
                       "rows": [[k["name"], f"{k['measured_ms']:.4f}", f"{k['modelled_ms']:.4f}", f"{k['ratio']:.2f}"]
                                for k in s["kernels"]]})
    c = s["clock"]
    clock = (f"; the core's clock, measured between rounds by a dependent add chain: best {c['max_ghz']:.2f} GHz, median "
             f"{c['median_ghz']:.2f} (p10 {c['p10_ghz']:.2f}: the VM loses time to its neighbours), the model assumes "
             f"{c['model_ghz']} GHz"
             if c["median_ghz"] else "")
    data = {
        "kind": "tables",
        "title": f"Emulated-core cost against real timings: {args.target} ({core.model} model)",
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "cpu_model": host_cpu(),
            "command": command if len(command) > 1 else command[0],
            "conditions": (f"{args.threads} thread on both sides; native: TVM time_evaluator, the {args.statistic} of "
                           f"{args.rounds} interleaved rounds (each ≥ {args.min_repeat_ms} ms of calls; ≥ "
                           f"{args.min_repeat_ms_e2e} ms per bundle); emulated: qemu-x86_64 -cpu {core.qemu_cpu} with the mnv2cost plugin, "
                           f"one warm-up call then one counted call; shared 2-core VM, wall time {wall_s / 60:.0f} min"
                           + clock),
            "note": "The model's figures are those of targets/" + f"{args.target}.toml [core]; how counts become cycles "
                    "is in docs/design.md (The emulated core's cost model).",
        },
        "plot": png_path.name,
        "tables": tables,
        "data": s,
    }
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    return json_path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="x86-64-avx2", help="an x86-64 target with a [core] table")
    p.add_argument("--parts", nargs="+", default=["candidates", "e2e", "kernels"], choices=["candidates", "e2e", "kernels"])
    p.add_argument("--per-task", type=int, default=28, help="candidate schedules per task (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--records", type=Path, help="records the tuned candidates and the tuned bundles come from "
                   "(default: schedules/<target>/)")
    p.add_argument("--kernels", nargs="*", default=DEFAULT_KERNELS, help="KIND:N (vadd, matmul, stride)")
    p.add_argument("--threads", type=int, default=1, help="threads on both sides (default %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved native timing rounds (default %(default)s)")
    p.add_argument("--min-repeat-ms", type=int, default=15, help="per kernel and round")
    p.add_argument("--min-repeat-ms-e2e", type=int, default=60, help="per bundle and round")
    p.add_argument("--statistic", choices=["min", "median"], default="min",
                   help="native time of a library over the rounds (default %(default)s: on a shared VM, preemption "
                        "only ever adds time; the median is reported beside it)")
    p.add_argument("--emulation-timeout", type=float, default=1800.0)
    p.add_argument("--work", type=Path, default=REPO / "build" / "validate-emulated",
                   help="libraries, bundles and cached measurements (default %(default)s)")
    p.add_argument("--regenerate", action="store_true", help="draw and build the candidates again")
    p.add_argument("--recompile", action="store_true", help="compile the bundles again")
    p.add_argument("--retime", action="store_true", help="time natively again even what is cached")
    p.add_argument("--rescore", action="store_true", help="measure nothing: score what is cached with the current model")
    p.add_argument("--ablation", action="store_true", help="also score the model with mechanisms taken out")
    p.add_argument("--no-publish", action="store_true", help="do not write docs/results/")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)

    from mnv2_tvm.emulate import load_core_model
    from mnv2_tvm.errors import UserError

    t_start = time.monotonic()
    command = "python scripts/validate_emulated_cost.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = command.strip()
    try:
        core = load_core_model(args.target)
        if core.arch != "x86_64":
            raise UserError(f"{args.target} is {core.arch}: validation needs an x86-64 target (ground truth)")
        work = args.work / args.target
        work.mkdir(parents=True, exist_ok=True)
        cache = Cache(work)
        items: list[Item] = []
        if "candidates" in args.parts:
            items += candidate_items(args, work)
        if "e2e" in args.parts:
            items += e2e_items(args, work)
        if "kernels" in args.parts:
            items += kernel_items(args, work)
        for it in items:
            it.digest = sha256(it.lib)
        clocks: list[float] = []
        if not args.rescore:
            emulate(items, args, cache)
            clocks = time_natively(items, args, cache, work)
            if clocks:
                cache.native["_clock"] = clocks
            cache.native["_run"] = {"command": command, "wall_s": time.monotonic() - t_start,
                                    "date": time.strftime("%Y-%m-%d")}
            cache.save()
        clocks = clocks or cache.native.get("_clock", [])
        abl = ablation(items, args, cache) if args.ablation else []
        score(items, args, cache)
        s = summarise(items, args, clocks)
        s["ablation"] = abl
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(s)
    wall = time.monotonic() - t_start
    if args.json:
        args.json.write_text(json.dumps(s, indent=1) + "\n")
    if not args.no_publish:
        run = cache.native.get("_run") or {}
        if args.rescore and run.get("command"):
            command_list = [run["command"], command]
            wall = run.get("wall_s", wall)
        else:
            command_list = [command]
        path = publish(s, args, command_list, wall)
        log(f"wrote {path.relative_to(REPO)} and its plot; run `python3 scripts/results.py` to render it")
    log(f"done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
