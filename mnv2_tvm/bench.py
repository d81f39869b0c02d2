"""Benchmarks on a board: upload a bundle, load it, check it against PyTorch, time it.

The flow of ``mnv2-tvm bench``: pick the session (``--rpc``, ``--rpc-tracker``/``--rpc-key`` or
``--ssh``), upload the bundle's library, run its fixed input and compare with the PyTorch output
stored at compile time (parity *on the board*), then time ``main`` with TVM's ``time_evaluator``.

Per-operator profile: TVM 0.27's runtime has no Relax VM profiler (``VirtualMachine.profile``
and ``vm_profiler_load_executable`` are gone), and the kernels inside a bundle's library cannot
be timed one by one over RPC (they sit in a module the executable imports; see
``bundle.verify_kernels``). ``--profile`` therefore reads the bundle's kernel table and its
library of the same kernels alone, both written at compile time, times each kernel on the board
with ``time_evaluator`` on inputs of the shapes the model calls it with, and multiplies by how
often ``main`` calls it. Nothing is rebuilt: the times are of the code the bundle ships.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .remote import RUNNER_MARGIN_S, STEP_TIMEOUT_S, RemoteSession, one_line, session_errors

DEFAULT_TOLERANCE = 1e-4
EMULATED_NOTE = "the board is emulated (qemu): these timings mean nothing about real hardware; parity still holds"


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class TimingStats:
    """Statistics over the per-run times of the repeats, in milliseconds."""

    mean_ms: float
    median_ms: float
    p90_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> TimingStats:
        if not samples:
            raise ValueError("no timing samples")
        ms = sorted(float(s) * 1e3 for s in samples)
        return cls(
            mean_ms=statistics.fmean(ms),
            median_ms=statistics.median(ms),
            p90_ms=percentile(ms, 90),
            std_ms=statistics.stdev(ms) if len(ms) > 1 else 0.0,
            min_ms=ms[0],
            max_ms=ms[-1],
            repeats=len(ms),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (NumPy's default method), without NumPy."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of nothing")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def gflops(madds: int, seconds: float) -> float:
    """Achieved GFLOP/s counting one multiply-add as two floating-point operations."""
    return 2.0 * madds / seconds / 1e9 if seconds > 0 else float("nan")


# --------------------------------------------------------------------------- settings, result


@dataclass(frozen=True)
class BenchSettings:
    number: int = 10  # runs averaged into one repeat
    repeat: int = 5  # repeats: the samples of the statistics
    min_repeat_ms: int = 0  # grow `number` until one repeat lasts this long
    cache_flush: bool = False  # --profile: flush each kernel's weights and output before each repeat
    profile: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    session_timeout: float = 0  # seconds the server grants the session (0: unlimited)
    rpc_timeout: float = 0  # seconds this side waits for the board to answer one step (0: see step_timeout)

    def __post_init__(self) -> None:
        for name in ("number", "repeat"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, not {getattr(self, name)}")
        if self.cache_flush and not self.profile:
            # TVM's only flush pre-processor (cache_flush_cpu_non_first_arg) skips argument 0,
            # which for a whole bundle is its only argument (the weights are constants inside
            # the library), and a remote closure cannot be passed to make the input argument 1.
            raise UserError("--cache-flush applies to the per-kernel timings of --profile (whose arguments "
                            "include the weights); TVM 0.27 cannot flush around a whole bundle's main")
        if self.min_repeat_ms < 0:
            raise UserError(f"--min-repeat-ms must be >= 0, not {self.min_repeat_ms}")
        if not self.tolerance > 0:
            raise UserError(f"--tolerance must be positive, not {self.tolerance}")
        if self.rpc_timeout < 0:
            raise UserError(f"--rpc-timeout must be >= 0, not {self.rpc_timeout}")

    def step_timeout(self, run_s: float | None = None, runs: int = 1) -> float:
        """How long this side waits for one remote step of ``runs`` runs of ``run_s`` seconds each.

        A board that stops answering without closing the connection would otherwise hang bench
        for ever (TVM's client has no timeout). Unless --rpc-timeout says, the bound is
        generous: 300 s, or three times what the parity run predicts for a timing loop, and
        never past the server's own --session-timeout (plus a margin for the round trips).
        """
        if self.rpc_timeout:
            return self.rpc_timeout
        bound = STEP_TIMEOUT_S
        if run_s is not None:
            bound = max(bound, 3 * (run_s * runs + self.repeat * self.min_repeat_ms / 1e3 * 4) + 60)
        if self.session_timeout:
            bound = min(bound, self.session_timeout + RUNNER_MARGIN_S)
        return bound


@dataclass
class BenchResult:
    model: str
    label: str
    bundle: str
    target: str
    board: dict[str, Any]
    max_abs_error: float
    tolerance: float
    timing: TimingStats
    madds: int
    params: int
    gflops: float
    peak_gflops: float | None
    settings: dict[str, Any]
    emulated: bool | None
    profile: list[dict[str, Any]] | None = None
    final: dict[str, Any] = field(default_factory=dict)  # final outputs' agreement and post-processing time
    notes: list[str] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)  # one mean per repeat, in run order

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parity_ok"] = self.max_abs_error <= self.tolerance
        return d

    def table(self) -> str:
        t = self.timing
        b = self.board
        who = f"key {b.get('key') or '-'}, {b.get('arch', '?')}, {b.get('address', '?')} via {b.get('via', '?')}"
        if b.get("model"):
            who += f", {b['model']}"
        lines = [
            f"{self.label} ({self.target}) on {who}",
            f"parity vs PyTorch: max abs error {self.max_abs_error:.2e} (tolerance {self.tolerance:g}) OK",
            *([f"final outputs vs PyTorch's: "
               + ", ".join(f"{k} {v}" for k, v in self.final["final_agreement"].items() if k != "ok")
               + f" OK; post-processing {self.final['postprocess_ms']:.1f} ms on this host"] if self.final else []),
            f"{'mean':>9} {'median':>9} {'p90':>9} {'std':>9} {'min':>9}   ms, {t.repeats} repeats x "
            f"{self.settings['number']} runs",
            f"{t.mean_ms:9.3f} {t.median_ms:9.3f} {t.p90_ms:9.3f} {t.std_ms:9.3f} {t.min_ms:9.3f}",
            f"{self.madds / 1e6:,.1f}M MAdds, {self.params / 1e6:.2f}M params: {self.gflops:.2f} GFLOP/s at the median"
            + (f" ({100 * self.gflops / self.peak_gflops:.1f}% of the {self.peak_gflops:.0f} GFLOP/s peak)"
               if self.peak_gflops and not self.emulated else ""),
        ]
        if self.emulated:
            lines.insert(0, "EMULATED BOARD: the times below are not performance figures")
        if self.profile:
            total = sum(k["total_ms"] for k in self.profile)
            flushed = ", caches flushed before each repeat" if self.settings.get("cache_flush") else ""
            lines.append(f"per kernel (each timed alone{flushed}; sum {total:.3f} ms vs {t.median_ms:.3f} ms end to end):")
            lines.append(f"  {'kernel':<44} {'calls':>5} {'ms/call':>9} {'ms':>9} {'share':>6}")
            for k in self.profile:
                lines.append(f"  {k['name'][:44]:<44} {k['calls']:>5} {k['ms_per_call']:9.4f} {k['total_ms']:9.4f} "
                             f"{100 * k['total_ms'] / total if total else 0:5.1f}%")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- on a session


def _device(remote: RemoteSession, manifest: dict[str, Any]) -> Any:
    sess = remote.session
    if manifest.get("device_kind") == "opencl":
        dev = sess.cl(0)
        if not dev.exist:
            raise UserError(f"board {remote.address} has no OpenCL device: {manifest['target']} bundles need the "
                            "board's OpenCL driver (e.g. libmali) and a runtime built with OpenCL")
        return dev
    return sess.cpu(0)


def load_on_board(remote: RemoteSession, lib: Path, manifest: dict[str, Any], upload_name: str,
                  timeout: float = STEP_TIMEOUT_S) -> Any:
    """Upload and load a library; a load failure that smells of another architecture says so."""
    where = f"board {remote.address}"
    with session_errors(where, "check the board"):
        remote.call(lambda: remote.session.upload(str(lib), upload_name), f"uploading {lib.name}", timeout,
                    "check the board")
    try:
        return remote.call(lambda: remote.session.load_module(upload_name), f"loading {lib.name}", timeout,
                           "check the board")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = one_line(e)
        if any(s in msg for s in ("ELF", "wrong ELF class", "Exec format", "cannot open shared object")):
            raise UserError(f"{where} cannot load {lib.name} built for {manifest['arch']} ({msg}): the board is "
                            f"another architecture; compile the bundle for the board's target") from None
        with session_errors(where, "check the board"):
            raise


def run_bench(bundle_dir: Path, remote: RemoteSession, settings: BenchSettings, *,
              peak_gflops: float | None = None, emulated: bool | None = None) -> BenchResult:
    """Upload, load, check parity and time one bundle in an open RPC session (``peak_gflops``: the
    manifest's unless given)."""
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from . import bundle

    bundle_dir = Path(bundle_dir)
    manifest = bundle.load_manifest(bundle_dir)
    lib = bundle.verify_library(bundle_dir, manifest)
    if settings.profile:
        bundle_kernels(bundle_dir, manifest)  # a bundle without one fails before anything is uploaded
    if peak_gflops is None:
        peak_gflops = target_facts(manifest)[0]
    x, expected = bundle.reference(bundle_dir)
    where = f"board {remote.address}"
    hint = "run `mnv2-tvm board status --ssh USER@BOARD` to see what is left"
    name = f"{manifest['library_sha256'][:16]}.so"
    rlib = load_on_board(remote, lib, manifest, name, settings.step_timeout())
    with session_errors(where, hint):
        dev = _device(remote, manifest)
        vm = VirtualMachine(rlib, dev)
        xt = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=manifest["input"]["dtype"]), dev)
        t0 = time.monotonic()
        out = remote.call(lambda: vm["main"](xt).numpy(), "the parity run", settings.step_timeout(), hint)
        run_s = time.monotonic() - t0
    if out.shape != expected.shape:
        raise UserError(f"{where} returned shape {out.shape}, PyTorch {expected.shape}: the bundle is inconsistent; "
                        "recompile it")
    err = float(np.abs(out.astype(np.float64) - expected).max())
    if not err <= settings.tolerance:
        raise UserError(f"parity failed on {where}: max abs error {err:.3g} > {settings.tolerance:g} against PyTorch; "
                        "the library computes something else on this board (compiler flags, CPU features?)")
    final = bundle.final_report(manifest, out, expected)
    if not final["final_agreement"]["ok"]:
        raise UserError(f"final outputs from {where} differ from PyTorch's ({final['final_agreement']}) although the raw "
                        "tensors agree: a detection, class or pixel sits at a decision boundary; inspect with `mnv2-tvm run`")
    with session_errors(where, hint):
        f = vm.time_evaluator("main", dev, number=settings.number, repeat=settings.repeat,
                              min_repeat_ms=settings.min_repeat_ms)
        samples = remote.call(lambda: list(f(xt).results), "the timing runs",
                              settings.step_timeout(run_s, settings.number * settings.repeat + 1), hint)
    timing = TimingStats.from_seconds(samples)
    board = {**remote.identity()}
    board.setdefault("arch", manifest["arch"])
    if "uname_m" not in board:
        board["arch_from"] = "the library it loaded"
    notes = []
    if emulated:
        notes.append(EMULATED_NOTE)
    if "device" not in manifest:
        notes.append(f"the bundle predates manifest format {bundle.FORMAT_VERSION} (no peak, RPC key or kernel "
                     "table recorded): recompile it")
    if manifest.get("tuning", {}).get("untuned"):
        notes.append("the library is untuned: run `mnv2-tvm tune` for this target first for meaningful numbers")
    result = BenchResult(
        model=manifest["model"], label=manifest.get("label", manifest["model"]), bundle=str(bundle_dir),
        target=manifest["target"], board=board, max_abs_error=err, tolerance=settings.tolerance, timing=timing,
        madds=int(manifest.get("madds", 0)), params=int(manifest.get("params", 0)),
        gflops=gflops(int(manifest.get("madds", 0)), timing.median_ms / 1e3), peak_gflops=peak_gflops,
        settings=asdict(settings), emulated=emulated, notes=notes, samples_ms=[float(t) * 1e3 for t in samples],
        final={k: v for k, v in final.items() if k != "final"},
    )
    if settings.profile:
        result.profile = profile_kernels(bundle_dir, manifest, remote, settings, dev)
    return result


# --------------------------------------------------------------------------- per-kernel profile


def bundle_kernels(bundle_dir: Path, manifest: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """The bundle's kernel library and table (``bundle.verify_kernels``), as a one-line error for
    a bundle compiled without them."""
    from . import bundle

    try:
        return bundle.verify_kernels(bundle_dir, manifest)
    except bundle.BundleError as e:
        raise UserError(str(e)) from None


def profile_kernels(bundle_dir: Path, manifest: dict[str, Any], remote: RemoteSession, settings: BenchSettings,
                    dev: Any) -> list[dict[str, Any]]:
    """Time every kernel of the bundle alone on the board (see the module docstring)."""
    import numpy as np
    import tvm

    lib, table = bundle_kernels(bundle_dir, manifest)
    rk = load_on_board(remote, lib, manifest, f"{manifest['kernels']['library_sha256'][:16]}-kernels.so",
                       settings.step_timeout())
    rng = np.random.default_rng(0)
    rows = []
    with session_errors(f"board {remote.address}", "profile again without the failing kernel"):
        for k in table:
            tensors = [tvm.runtime.tensor(rng.uniform(-1, 1, size=shape).astype(dtype), dev)
                       for shape, dtype in zip(k["args"], k["dtypes"])]
            try:
                f = rk.time_evaluator(k["name"], dev, number=settings.number, repeat=min(settings.repeat, 3),
                                      min_repeat_ms=settings.min_repeat_ms,
                                      f_preproc="cache_flush_cpu_non_first_arg" if settings.cache_flush else "")
            except Exception as e:  # noqa: BLE001 - a kernel the library lacks: the others still count
                print(f"profile: skipped {k['name']}: {one_line(e)}", file=sys.stderr)
                continue
            results = remote.call(lambda: list(f(*tensors).results), f"timing {k['name']}", settings.step_timeout(),
                                  "profile again without the failing kernel")
            per_call = statistics.median(results) * 1e3
            rows.append({"name": k["name"], "calls": k["calls"], "ms_per_call": per_call,
                         "total_ms": per_call * k["calls"], "args": k["args"], "dtypes": k["dtypes"], "at": k["at"]})
            del tensors
    rows.sort(key=lambda r: -r["total_ms"])
    return rows


# --------------------------------------------------------------------------- the bench command


@dataclass(frozen=True)
class Where:
    """Exactly one of: a direct server, a tracker + key, or a board over SSH."""

    rpc: tuple[str, int] | None = None
    tracker: tuple[str, int] | None = None
    key: str | None = None
    ssh: Any = None  # board.SshTarget
    ssh_opts: Any = None  # board.SshOptions
    wait_s: float = 120.0

    def check(self) -> None:
        given = [n for n, v in (("--rpc", self.rpc), ("--rpc-tracker", self.tracker), ("--ssh", self.ssh)) if v]
        if len(given) != 1:
            raise UserError("say where to run: exactly one of --rpc HOST:PORT, --rpc-tracker HOST:PORT "
                            f"(with --rpc-key KEY) or --ssh USER@HOST[:PORT]" + (f" (got {' and '.join(given)})"
                                                                               if given else ""))


@contextlib.contextmanager
def open_remote(where: Where, settings: BenchSettings, *, key: str | None = None,
                precheck: Callable[[dict[str, Any]], None] | None = None
                ) -> Iterator[tuple[RemoteSession, bool | None]]:
    """A session with the board ``where`` names, and whether that board is emulated (None: it cannot
    say, only a board reached over SSH does). With ``--ssh`` its RPC server is started and tunnelled
    to, ``precheck`` sees the board's description first (e.g. to refuse another architecture), and
    the server is stopped when the session ends. ``key`` is the tracker key when ``where`` has none.
    """
    from . import remote as rpc

    where.check()
    if where.rpc:
        sess = rpc.connect(*where.rpc, session_timeout=settings.session_timeout)
        try:
            yield sess, None
        finally:
            sess.close()
        return
    if where.tracker:
        key = where.key or key
        if not key:
            raise UserError("--rpc-tracker needs --rpc-key KEY (the key the boards serve under)")
        sess = rpc.request(*where.tracker, key, wait_s=where.wait_s, session_timeout=settings.session_timeout)
        try:
            yield sess, None
        finally:
            sess.close()
        return
    from .board import open_board

    with open_board(where.ssh, where.ssh_opts, precheck=precheck) as ob:
        sess = rpc.connect("127.0.0.1", ob.local_port, session_timeout=settings.session_timeout,
                           via=f"ssh {where.ssh}")
        sess.info.update(ob.identity())
        sess.address = f"{where.ssh} (127.0.0.1:{ob.server.port} on the board)"
        try:
            yield sess, bool(ob.info.get("emulated"))
        finally:
            sess.close()


def bench_bundle(bundle_dir: Path, where: Where, settings: BenchSettings) -> BenchResult:
    """Run :func:`run_bench` on the board ``where`` names; with ``--ssh`` start and stop its server."""
    from . import bundle

    where.check()
    manifest = bundle.load_manifest(bundle_dir)
    bundle.verify_library(bundle_dir, manifest)
    if settings.profile:
        bundle_kernels(bundle_dir, manifest)  # before a board is opened or anything uploaded
    peak, key = target_facts(manifest)
    if where.tracker and not (where.key or key):
        raise UserError("--rpc-tracker needs --rpc-key KEY (the bundle names no default key: recompile it, or "
                        "say the key)")

    def same_arch(info: dict[str, Any]) -> None:
        # Refuse a bundle for another architecture before anything is uploaded or started.
        if info["arch"] != manifest["arch"]:
            raise UserError(f"bundle {bundle_dir} is built for {manifest['arch']} ({manifest['target']}) but "
                            f"{where.ssh} is {info['uname_m']}: compile it for this board's target")

    with open_remote(where, settings, key=key, precheck=same_arch) as (sess, emulated):
        return run_bench(bundle_dir, sess, settings, peak_gflops=peak, emulated=emulated)


def target_facts(manifest: dict[str, Any]) -> tuple[float | None, str | None]:
    """The FMA peak (GFLOP/s) and default RPC key the bundle's manifest records (None for a
    format-2 bundle, which predates them)."""
    peak = (manifest.get("device") or {}).get("peak_gflops")
    return (float(peak) if peak else None), manifest.get("rpc_key")


def resolve_bundle(source: str, target: str | None, make_config: Any, *, out_dir: Path | None = None,
                   frontend: str = "torch", weights: Path | None = None, seed: int = 0,
                   tuning_records: Path | None = None) -> Path:
    """``bench MODEL|BUNDLE``: a bundle folder as is, or a model compiled for ``target`` now."""
    from . import bundle

    path = Path(source)
    if path.is_dir():
        manifest = bundle.load_manifest(path)
        if target and target not in (manifest["target"], Path(target).stem):
            raise UserError(f"bundle {path} is for target {manifest['target']}, not {target}; drop --target or "
                            "compile the model for that target")
        return path
    from .models import MODELS

    if source not in MODELS:
        raise UserError(f"{source!r} is neither a bundle folder nor a model ({', '.join(MODELS)})")
    if not target:
        raise UserError(f"bench {source} compiles the model first: say for which board with --target (e.g. rpi4b)")
    from . import targets
    from .compile import compile_bundle

    spec = targets.load(target)
    cfg = make_config()
    out = out_dir or Path("build") / f"{cfg.label}-{spec.name}"
    records = targets.records_dir(spec, tuning_records)
    compile_bundle(cfg, spec, out, frontend=frontend, records_dir=records, weights=weights, seed=seed)
    return out


def print_result(result: BenchResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())


# --------------------------------------------------------------------------- no board: the emulated core


def bench_modelled(bundle_dir: Path, settings: BenchSettings) -> dict[str, Any]:
    """Without a board: one inference of the bundle costed on its target's emulated core
    (``[core]`` of the TOML) at the core count the manifest records; with ``settings.profile``
    also each kernel alone (:func:`profile_modelled`). Modelled figures, not measurements."""
    from . import bundle, targets
    from .emulate import EmulatedCore

    manifest = bundle.load_manifest(bundle_dir)
    bundle.verify_library(bundle_dir, manifest)
    if settings.profile:
        bundle_kernels(bundle_dir, manifest)  # before minutes of emulation
    # The core model is the target file's (the manifest records the board's facts, not how to emulate it).
    spec = targets.load(manifest["target"])
    spec.core  # one line naming the missing keys when the target has no core model
    threads = int((manifest.get("device") or {}).get("cores") or spec.cores)
    tuning = manifest.get("tuning", {})
    out: dict[str, Any] = {"modelled": True, "label": manifest.get("label", manifest.get("model")),
                           "bundle": str(bundle_dir), "target": manifest["target"], "threads": threads,
                           "madds": manifest.get("madds"), "tuned": len(tuning.get("tuned", [])),
                           "kernels": len(tuning.get("tuned", [])) + len(tuning.get("fallback", [])),
                           "emulated_records": tuning.get("emulated_records", 0)}
    with EmulatedCore(spec.path, threads=threads) as core:
        cost = core.measure_bundle(bundle_dir)
        if not cost.ok:
            raise UserError(f"the model failed under emulation: {cost.error}")
        out.update(core=cost.core, ms=cost.ms, cycles=cost.cycles, instructions=cost.instructions,
                   classes=cost.classes, cache=cost.cache, regions=cost.regions, wall_s=cost.wall_s,
                   fingerprint=cost.fingerprint())
        if settings.profile:
            out["profile"] = profile_modelled(manifest, spec, core, Path(bundle_dir))
    return out


def profile_modelled(manifest: dict[str, Any], spec: Any, core: Any, bundle_dir: Path) -> list[dict[str, Any]]:
    """Each kernel of the bundle alone on the emulated ``core`` (of target ``spec``), from the
    bundle's kernel library and table: rows as :func:`profile_kernels`'s, with modelled cycles and
    instructions per call."""
    lib, table = bundle_kernels(bundle_dir, manifest)
    if manifest["arch"] != spec.arch:
        raise UserError(f"bundle {bundle_dir} is built for {manifest['arch']}; the emulated core of {spec.name} "
                        f"runs {spec.arch}")
    rows = []
    for k in table:
        cost = core.measure(lib, k["name"], list(zip(k["args"], k["dtypes"])))
        if not cost.ok:
            print(f"profile: {k['name']} failed under emulation: {cost.error}", file=sys.stderr)
            continue
        rows.append({"name": k["name"], "calls": k["calls"], "ms_per_call": cost.ms,
                     "total_ms": cost.ms * k["calls"], "cycles_per_call": cost.cycles,
                     "instructions_per_call": cost.instructions, "args": k["args"], "dtypes": k["dtypes"],
                     "at": k["at"]})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows


def print_modelled(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    r = result
    l1 = r["cache"][0] if r.get("cache") else {}
    lines = [
        f"MODELLED (emulated {r['core']} x{r['threads']}), not measured: {r['label']} ({r['target']})",
        f"{r['ms']:.3f} ms modelled | {r['cycles']:,.0f} cycles | {r['instructions']:,} instructions | "
        f"{r['classes'].get('fma', 0):,} vector FMA | L1D {l1.get('miss', 0):,} misses of {l1.get('acc', 0):,} | "
        f"{r['regions'] - 1} parallel regions",
        f"{r['tuned']}/{r['kernels']} kernels tuned" + (f" ({r['emulated_records']} from emulated records)"
                                                         if r.get("emulated_records") else "")
        + f"; {r['wall_s']:.0f} s under emulation",
    ]
    if r.get("profile"):
        total = sum(k["total_ms"] for k in r["profile"])
        lines.append(f"per kernel (each modelled alone; sum {total:.3f} ms vs {r['ms']:.3f} ms end to end):")
        lines.append(f"  {'kernel':<44} {'calls':>5} {'ms/call':>9} {'ms':>9} {'cycles/call':>13} {'share':>6}")
        for k in r["profile"]:
            lines.append(f"  {k['name'][:44]:<44} {k['calls']:>5} {k['ms_per_call']:9.4f} {k['total_ms']:9.4f} "
                         f"{k['cycles_per_call']:13,.0f} {100 * k['total_ms'] / total if total else 0:5.1f}%")
    print("\n".join(lines))
