"""Host side of the emulated core: a long-lived guest process under qemu-user with our plugin.

``EmulatedCore(target, threads)`` starts (lazily) ``setarch -R qemu-<arch> -cpu <core> -plugin
libmnv2cost.so,... python3 guest.py`` and keeps it for many measurements; ``measure`` sends one
request, waits for the guest's reply and reads the plugin's record for that request from the
plugin's output file, then turns the counts into cycles with the target's core model.

Determinism: the guest runs with the host's address-space randomisation off (``setarch -R``),
``PYTHONHASHSEED=0``, a fixed malloc mmap threshold, page-aligned deterministic arguments, and
the plugin counts only inside windows, per thread, with pseudo-physical cache indexing; nothing
of the host's load or timing enters the counts.

Failures: a candidate that crashes or hangs is one failed measurement (``EmulatedCost.ok`` false,
``error`` says why): the guest runs each measurement in a forked child, and restarts itself
(on the next request) only if the long-lived guest process dies.
Missing qemu, plugin or guest userland is a UserError naming the set-up command.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from . import setup as emu_setup
from .core_model import CLASSES, FIELDS, CoreModel, load_core_model, record_block_cycles

GUEST_SCRIPT = Path(__file__).with_name("guest.py")
BOARD_SITE = "/opt/tvm-site"
SETUP_COMMAND = emu_setup.SETUP_COMMAND
BOARD_SETUP_COMMAND = "python3 scripts/virtual_board.py setup"
#: glibc's malloc with a fixed, low mmap threshold: every buffer of a page or more (the Relax VM's
#: storage and TVM's workspaces are rounded up to pages) gets its own mapping at the same page
#: offset, whatever was allocated and freed before: cache conflicts do not depend on history.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4096"


class EmulatorError(RuntimeError):
    """The measuring service itself failed (not a candidate): the guest would not start."""


@dataclass
class ThreadCost:
    vcpu: int
    counts: dict[str, int]          # summed over regions: FIELDS of the plugin
    cycles: float                   # sum over regions of this thread's modelled cycles
    regions: dict[int, dict[str, int]] = field(repr=False, default_factory=dict)

    @property
    def instructions(self) -> int:
        return sum(self.counts[k] for k in CLASSES)


@dataclass
class EmulatedCost:
    """What one measurement of a candidate (or a whole model) costs on the modelled core."""

    target: str
    core: str
    threads: int                    # the thread pool size the guest runs with
    ok: bool
    error: str | None = None
    cycles: float = 0.0             # latency: sum over regions of the slowest thread, + sync
    ms: float = 0.0
    instructions: int = 0           # all threads
    classes: dict[str, int] = field(default_factory=dict)
    cache: list[dict[str, int]] = field(default_factory=list)   # per level, all threads
    regions: int = 0                # parallel regions + 1 (region 0: serial code before the first)
    per_thread: list[ThreadCost] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)       # slowest-thread terms, summed over regions
    wall_s: float = 0.0             # host seconds this measurement took
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def fingerprint(self) -> str:
        """A digest of every count the plugin reported: equal fingerprints = bit-identical costs."""
        # Block ids follow translation order, which the host's scheduling of threads may change,
        # and branch targets the library's load address: blocks are identified by their text
        # without those here.
        from .core_model import canonical_text

        tbs = {k: canonical_text(v[-1] if isinstance(v, list) else v) for k, v in (self.raw.get("tbs") or {}).items()}

        def name(i: Any) -> str:
            return tbs.get(str(i), str(i))

        threads = [{"vcpu": t.get("vcpu"), "regions": t.get("regions"),
                    "blocks": sorted([b[0], name(b[1]), *b[2:]] for b in t.get("blocks", [])),
                    "edges": sorted([e[0], name(e[1]), name(e[2]), e[3]] for e in t.get("edges", []))}
                   for t in self.raw.get("threads") or []]
        payload = json.dumps({"threads": threads, "regions": self.raw.get("regions")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def summary(self) -> str:
        if not self.ok:
            return f"failed: {self.error}"
        l1 = self.cache[0] if self.cache else {}
        return (f"{self.ms:.3f} ms ({self.cycles:,.0f} cycles at {self.core}) | {self.instructions:,} instructions, "
                f"{self.classes.get('fma', 0):,} vector FMA | L1D {l1.get('miss', 0):,} misses of "
                f"{l1.get('acc', 0):,} | {self.regions - 1} parallel regions, {len(self.per_thread)} threads")


def cost_from_record(record: dict[str, Any], core: CoreModel, threads: int) -> EmulatedCost:
    """Cycles and milliseconds from the plugin's record of one counting window."""
    nlevels = len(core.levels)
    per_region: dict[int, dict[int, dict[str, int]]] = {}
    per_thread: list[ThreadCost] = []
    for t in record["threads"]:
        totals = dict.fromkeys(FIELDS, 0)
        regions = {}
        for row in t["regions"]:
            r, values = int(row[0]), row[1:]
            counts = dict(zip(FIELDS, values))
            regions[r] = counts
            per_region.setdefault(r, {})[t["vcpu"]] = counts
            for k, v in counts.items():
                totals[k] += v
        per_thread.append(ThreadCost(vcpu=int(t["vcpu"]), counts=totals, cycles=0.0, regions=regions))
    by_vcpu = {tc.vcpu: tc for tc in per_thread}
    blocks = record_block_cycles(record, core)
    cycles = 0.0
    terms: dict[str, float] = {}
    for r in sorted(per_region):
        workers = per_region[r]
        results = {v: core.thread_cycles(c, active_threads=len(workers),
                                         block_cycles=None if blocks is None else blocks.get((v, r), 0.0))
                   for v, c in workers.items()}
        for v, res in results.items():
            by_vcpu[v].cycles += res["cycles"]
        slowest = max(results.values(), key=lambda res: res["cycles"])
        cycles += slowest["cycles"]
        for k, v in slowest.items():
            terms[k] = terms.get(k, 0.0) + v
    n_regions = int(record.get("regions", 1))
    if threads > 1:
        sync = core.sync_cycles * max(n_regions - 1, 0)
        cycles += sync
        terms["sync"] = sync
    classes = {k: sum(tc.counts[k] for tc in per_thread) for k in CLASSES}
    cache = [{f: sum(tc.counts[f"l{i}_{f}"] for tc in per_thread) for f in ("acc", "miss", "seq", "wb", "stmiss")}
             for i in range(1, nlevels + 1)]
    return EmulatedCost(target=core.target, core=core.model, threads=threads, ok=True, cycles=cycles,
                        ms=core.ms(cycles), instructions=sum(classes.values()), classes=classes, cache=cache,
                        regions=n_regions, per_thread=sorted(per_thread, key=lambda t: t.vcpu), terms=terms,
                        raw=record)


class EmulatedCore:
    """A measuring service: one guest process on an emulated core of ``target``'s kind.

    Use as a context manager (or call ``close``). Thread-safe: requests are serialised.
    """

    def __init__(self, target: str | Path = "rpi4b", threads: int = 1, *, timeout_s: float = 900.0,
                 start_timeout_s: float = 300.0, rootfs: str | Path | None = None,
                 work_dir: str | Path | None = None) -> None:
        if threads < 1:
            raise UserError("threads must be at least 1")
        self.core = load_core_model(target)
        self.threads = threads
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._rootfs = Path(rootfs) if rootfs else None
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="mnv2-emulate-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.work_dir / "plugin.jsonl"
        self.log_path = self.work_dir / "guest.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._out_offset = 0
        self._tag = 0
        self._lock = threading.Lock()
        self.starts = 0
        self.start_seconds: list[float] = []
        self.guest_info: dict[str, Any] = {}
        self._command, self._env = self._build_command()

    # ------------------------------------------------------------------ set-up

    def _build_command(self) -> tuple[list[str], dict[str, str]]:
        arch = self.core.arch
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.work_dir),
            "PYTHONHASHSEED": "0",
            "TVM_NUM_THREADS": str(self.threads),
            "TVM_BIND_THREADS": "0",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "GLIBC_TUNABLES": GLIBC_TUNABLES,
        }
        if arch == "aarch64":
            qemu = "qemu-aarch64"
            rootfs = self._rootfs or Path(os.environ.get("MNV2_TVM_BOARD_DIR", Path.home() / ".cache/mnv2-tvm/virtual-board")) / "rootfs"
            python = rootfs / "usr/bin/python3"
            if not python.exists() or not (rootfs / BOARD_SITE.lstrip("/") / "tvm").is_dir():
                raise UserError(f"the aarch64 guest userland is missing ({rootfs}); run `{BOARD_SETUP_COMMAND}`")
            env["QEMU_LD_PREFIX"] = str(rootfs)
            env["PYTHONPATH"] = BOARD_SITE
        elif arch == "x86_64":
            qemu = "qemu-x86_64"
            python = Path("/usr/bin/python3")
            site = emu_setup.x86_site()
            if not emu_setup.x86_site_ready():
                raise UserError(f"the x86-64 guest's runtime-only TVM site is missing ({site}); run `{SETUP_COMMAND}`")
            env["PYTHONPATH"] = str(site)
        else:
            raise UserError(f"target {self.core.target} is {arch!r}: the emulated core runs aarch64 and x86-64 "
                            f"guests only (no TVM runtime wheel exists for 32-bit arm)")
        if shutil.which(qemu) is None:
            raise UserError(f"{qemu} (Debian's dynamic qemu-user, which loads plugins) is missing; run `{SETUP_COMMAND}`")
        if shutil.which("setarch") is None:
            raise UserError("setarch (util-linux) is missing; install util-linux")
        plugin = emu_setup.ensure_plugin()
        plugin_arg = ",".join([str(plugin), f"out={self.out_path}", *self.core.plugin_args(self.threads)])
        cmd = ["setarch", platform.machine(), "-R", qemu, "-cpu", self.core.qemu_cpu, "-plugin", plugin_arg,
               str(python), "-S", str(GUEST_SCRIPT)]
        return cmd, env

    @property
    def command(self) -> list[str]:
        return list(self._command)

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop_process()
        t0 = time.monotonic()
        self.out_path.touch()
        self._out_offset = self.out_path.stat().st_size
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=log, env=self._env, cwd=self.work_dir, start_new_session=True)
        finally:
            log.close()
        self._buf = b""
        try:
            ready = self._read_reply(self.start_timeout_s)
        except (_GuestDied, TimeoutError) as e:
            self._stop_process()
            raise EmulatorError(f"the emulated guest did not start ({e}): {self._log_tail()}") from None
        if not ready.get("ready"):
            self._stop_process()
            raise EmulatorError(f"the emulated guest failed to start: {ready.get('error')}")
        hello = [r for r in self._new_records() if "hello" in r]
        if not hello:
            self._stop_process()
            raise EmulatorError(f"the plugin did not answer the guest ({self.out_path}): {self._log_tail()}")
        if list(hello[-1].get("fields", [])) != list(FIELDS):
            self._stop_process()
            raise EmulatorError("the plugin reports other fields than core_model.FIELDS: plugin and host disagree")
        self.guest_info = ready
        self.starts += 1
        self.start_seconds.append(time.monotonic() - t0)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._send({"op": "exit"})
                    self._proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired, _GuestDied):
                    pass
            self._stop_process()
            if self._own_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "EmulatedCore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop_process()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: qemu and nothing else
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ protocol

    def _send(self, req: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(req) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _GuestDied(self._exit_description()) from None

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _GuestDied(self._exit_description())
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _exit_description(self) -> str:
        if self._proc is None:
            return "not running"
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        # qemu-user reports a guest's fatal signal as exit status 128+n in some versions
        return f"exited with status {code}"

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def _new_records(self) -> list[dict[str, Any]]:
        with open(self.out_path, "rb") as fh:
            fh.seek(self._out_offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._out_offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def _request(self, req: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
        """(reply, plugin record, error): error set when the measurement failed."""
        self._ensure_started()
        self._tag += 1
        req = {**req, "tag": self._tag, "timeout_s": self.timeout_s}
        self._new_records()  # skip anything stale
        try:
            self._send(req)
            reply = self._read_reply(self.timeout_s + 120)  # the guest enforces timeout_s itself
        except _GuestDied as e:
            tail = self._log_tail(3)
            self._stop_process()
            return None, None, f"the candidate crashed the emulated guest ({e})" + (f": {tail}" if tail else "")
        except TimeoutError as e:
            self._stop_process()
            return None, None, f"the candidate did not finish under emulation ({e}); guest restarted"
        if not reply.get("ok"):
            return reply, None, str(reply.get("error", "unknown error"))
        records = [r for r in self._new_records() if r.get("tag") == self._tag and "threads" in r]
        if not records:
            return reply, None, "the plugin wrote no record for this measurement"
        return reply, records[-1], None

    # ------------------------------------------------------------------ measurements

    def _measure(self, req: dict[str, Any]) -> EmulatedCost:
        t0 = time.monotonic()
        with self._lock:
            reply, record, error = self._request(req)
        wall = time.monotonic() - t0
        if error is not None or record is None:
            return EmulatedCost(target=self.core.target, core=self.core.model, threads=self.threads, ok=False,
                                error=error, wall_s=wall)
        cost = cost_from_record(record, self.core, self.threads)
        cost.wall_s = wall
        cost.raw["reply"] = reply
        return cost

    def measure(self, lib_path: str | Path, func_name: str,
                args: Sequence[tuple[Sequence[int], str] | dict[str, Any]], *, warmup: int = 1) -> EmulatedCost:
        """Cost of one call of ``func_name`` from the library, with arguments of these shapes/dtypes
        (filled deterministically), after ``warmup`` calls that only warm the simulated caches."""
        specs = [a if isinstance(a, dict) else {"shape": list(a[0]), "dtype": str(a[1])} for a in args]
        return self._measure({"op": "measure", "lib": str(Path(lib_path).resolve()), "func": func_name,
                              "args": specs, "warmup": int(warmup)})

    def measure_vm(self, lib_path: str | Path, inputs: Sequence[tuple[Sequence[int], str] | dict[str, Any]], *,
                   warmup: int = 1, func: str = "main") -> EmulatedCost:
        """Cost of one call of a Relax VM executable's ``func`` (a whole model's inference)."""
        specs = [a if isinstance(a, dict) else {"shape": list(a[0]), "dtype": str(a[1])} for a in inputs]
        return self._measure({"op": "measure_vm", "lib": str(Path(lib_path).resolve()), "inputs": specs,
                              "warmup": int(warmup), "func": func})

    def measure_bundle(self, bundle_dir: str | Path, *, warmup: int = 1) -> EmulatedCost:
        """Cost of one inference of a compiled bundle (``mnv2-tvm compile``) on this core."""
        from .. import bundle

        try:
            manifest = bundle.load_manifest(Path(bundle_dir))
            lib = bundle.verify_library(Path(bundle_dir), manifest)
        except bundle.BundleError as e:
            raise UserError(str(e)) from None
        if manifest["arch"] != self.core.arch:
            raise UserError(f"bundle {bundle_dir} is built for {manifest['arch']}; this emulated core "
                            f"({self.core.target}) runs {self.core.arch}")
        spec = manifest["input"]
        return self.measure_vm(lib, [{"shape": spec["shape"], "dtype": spec["dtype"]}], warmup=warmup)

    def crash_for_test(self, hang: bool = False) -> EmulatedCost:
        """Abort (or hang) in the guest as a crashing (or endless) candidate would: tests of the
        recovery path."""
        return self._measure({"op": "hang" if hang else "crash"})


class _GuestDied(Exception):
    pass
