"""A model of a board's CPU core: per-thread counts from the emulated core → cycles → milliseconds.

The figures live in the target's TOML, in a ``[core]`` table, each with where it comes from in
``[core.sources]`` (Arm's Technical Reference Manuals and Software Optimization Guides where they
state it; "assumed" with a reason where they do not — those are the ones to calibrate).

The model, per thread and per parallel region (counts ``c`` from the plugin)::

    t_core  = sum over blocks b of block_cycles(b)              # with a scheduling model (mca_cpu)
            | max( instructions / issue_width,                  # without one: throughput bounds
                   v64 * 64 / vector_bits_per_cycle,            #   vector pipes (64-bit lane units)
                   ld_ops / loads_per_cycle,
                   st_ops / stores_per_cycle,
                   (ld_ops + st_ops) / memory_ops_per_cycle )   #   address generation
    stall   = sum over levels i of (1 - overlap_i) *
                  [random load misses_i + sequential_miss_cost * sequential load misses_i]
                  * (latency_{i+1} - latency_i)                  # latency_{last+1} = DRAM latency
              overlap_1 = l2_hit_overlap (optional), the others miss_overlap
    t_dram  = (misses_last + writebacks_last) * line / (DRAM bytes per cycle / active threads)
    t_l2    = (misses_1 + writebacks_1) * line / l2_bytes_per_cycle   # optional: L2 → L1 bandwidth
    t_l3    = (misses_2 + writebacks_2) * line / l3_bytes_per_cycle   # optional: L3 → L2 bandwidth
    cycles  = max(t_core + stall, t_dram, t_l2, t_l3)

**Blocks.** With ``mca_cpu`` set, every translation block the thread executed is costed by
LLVM's scheduling model of the core (``llvm-mca``, :class:`BlockCosts`): run back to back, a
block takes ``latency`` cycles an execution (dispatch width, ports, and dependency chains carried
from one execution to the next, L1 hits at the load-to-use latency) and at least its resource
bound ``throughput``. Loops come from the control flow (:func:`loop_trips`): a jump back to a
block heads a loop, and each block of the loop runs T iterations per entry (entries counted as
the loop's exits, since the first iteration may run in a block begun before the head). Known
errors of LLVM's model for a core are corrected before it runs (:data:`MCA_REWRITES`). An out-of-order
core runs the chains of consecutive independent loop instances side by side, 1 + W / (T × uops)
of them in a window of W = ``ooo_window`` micro-ops (Little's law), so an iteration costs
latency / (1 + W / (T × uops)), never less than ``throughput`` (:func:`block_cycles`): short loops
cost their throughput, long ones their chain; an in-order core (W = 0) overlaps nothing.
x86 string instructions with a rep prefix (libc's memset) move their bytes at one 256-bit
store a cycle. A forward conditional branch (an if, not a loop) whose outcomes the edges show
is charged ``branch_miss_cycles`` for each of its minority outcomes (:func:`branch_mispredicts`):
data-dependent branches follow no pattern a predictor could learn.

**Memory.** L1 hits cost nothing beyond t_core. Store misses cost bandwidth only (the store
buffer hides their latency). A miss is "sequential" (the plugin's ``seq``) when it continues a
pattern of the last 16 misses within one page — next/previous lines or a constant stride — the
patterns hardware prefetchers follow, so it costs ``sequential_miss_cost`` of a random miss.
``miss_overlap`` (and ``l2_hit_overlap`` for an L1 miss that hits L2) is the fraction of a
random miss's latency hidden by memory-level parallelism and the out-of-order window.

A measurement's latency is, over the parallel regions of the call (region 0: the serial code
before the first parallel launch), the sum of the slowest thread's cycles, plus
``sync_cycles`` per parallel region when more than one thread runs (the thread pool's launch and
barrier). Serial code after a launch is attributed to the region it follows, on the calling
thread. Shared cache levels are simulated as per-thread slices (size / threads), which keeps
multi-threaded results deterministic and ignores sharing between threads.

The x86-64 cores' figures are calibrated on the development host by microbenchmarks, and the
model is held against real timings there (``scripts/validate_emulated_cost.py``; docs/design.md,
"The emulated core's cost model").
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

#: [core] keys every core model needs; numbers must also have an entry in [core.sources].
NUMBER_KEYS = (
    "clock_ghz", "issue_width", "vector_bits_per_cycle", "loads_per_cycle", "stores_per_cycle",
    "memory_ops_per_cycle", "line_bytes", "l1d_kib", "l1d_ways", "l1d_latency", "l2_kib", "l2_ways",
    "l2_latency", "dram_latency_ns", "dram_bandwidth_gbs", "miss_overlap", "sequential_miss_cost",
    "sync_cycles",
)
TEXT_KEYS = ("model", "qemu_cpu")
#: Optional: the core's scheduling model in LLVM (``llvm-mca -mcpu``), which costs each executed
#: block, and the out-of-order window: how many micro-ops of independent work the core holds while
#: a dependency chain waits (0 for an in-order core); consecutive loops overlap their chains in it.
OPTIONAL_TEXT_KEYS = ("mca_cpu",)
OPTIONAL_NUMBER_KEYS = ("ooo_window", "l2_hit_overlap", "l2_bytes_per_cycle", "l3_bytes_per_cycle",
                        "branch_miss_cycles")
BOOL_KEYS = ("l2_shared",)
#: An optional third level: all of these or none.
L3_NUMBER_KEYS = ("l3_kib", "l3_ways", "l3_latency")
L3_BOOL_KEYS = ("l3_shared",)

#: What the plugin reports per thread and region, in this order (its hello line says the same).
CLASSES = ("int", "fp", "vec", "fma", "load", "store", "vload", "vstore", "branch", "other")
LEVEL_FIELDS = ("acc", "miss", "seq", "wb", "stmiss")
FIELDS = (*CLASSES, "ld_ops", "st_ops", "v64", "ld_acc", "st_acc", "ld_bytes", "st_bytes",
          *(f"l{n}_{f}" for n in (1, 2, 3) for f in LEVEL_FIELDS))


@dataclass(frozen=True)
class CacheLevel:
    name: str
    kib: int
    ways: int
    latency: float  # load-to-use cycles
    shared: bool

    def slice_bytes(self, threads: int) -> int:
        """What one thread gets: all of a private level, 1/threads of a shared one."""
        size = self.kib * 1024
        return size // threads if self.shared and threads > 1 else size


#: The version of how counts become cycles (this module's formulas): bump it with any change
#: that moves a cost, so records costed before it are told apart (:attr:`CoreModel.version`).
FORMULA_VERSION = 2


@dataclass(frozen=True)
class CoreModel:
    target: str
    arch: str
    model: str
    qemu_cpu: str
    clock_ghz: float
    issue_width: float
    vector_bits_per_cycle: float
    loads_per_cycle: float
    stores_per_cycle: float
    memory_ops_per_cycle: float
    line_bytes: int
    levels: tuple[CacheLevel, ...]
    dram_latency_ns: float
    dram_bandwidth_gbs: float
    miss_overlap: float
    sequential_miss_cost: float
    sync_cycles: float
    sources: dict[str, str]
    path: Path
    mca_cpu: str | None = None
    ooo_window: float = 0.0
    l2_hit_overlap: float | None = None  # miss_overlap for the L1→L2 step when None
    #: Bandwidth from L2 into L1 and from L3 into L2 (bytes a cycle, lines in and out); 0: unbounded.
    l2_bytes_per_cycle: float = 0.0
    l3_bytes_per_cycle: float = 0.0
    #: Exposed cycles of a mispredicted branch (0: branches are not costed beyond their blocks).
    branch_miss_cycles: float = 0.0
    _blocks: "BlockCosts | None" = field(default=None, compare=False, repr=False)

    @property
    def version(self) -> str:
        """A short digest of everything that turns counts into cycles: the figures of the
        ``[core]`` table and :data:`FORMULA_VERSION`. Costs of two versions are not comparable,
        so a records folder holds one (its meta's ``measurement`` names it)."""
        skip = {"target", "arch", "sources", "path", "_blocks"}
        figures: dict[str, Any] = {"formula": FORMULA_VERSION}
        if self.mca_cpu in MCA_REWRITES:
            figures["mca_rewrites"] = MCA_REWRITES[self.mca_cpu]
        for f in dataclasses.fields(self):
            if f.name not in skip:
                v = getattr(self, f.name)
                figures[f.name] = [dataclasses.astuple(lv) for lv in v] if f.name == "levels" else v
        return hashlib.sha256(json.dumps(figures, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def dram_latency_cycles(self) -> float:
        return self.dram_latency_ns * self.clock_ghz

    def plugin_args(self, threads: int) -> list[str]:
        """The plugin's cache arguments: one slice per thread of shared levels."""
        args = [f"line={self.line_bytes}"]
        for i, lv in enumerate(self.levels, 1):
            args.append(f"l{i}={lv.slice_bytes(threads)}:{lv.ways}")
        return args

    # ------------------------------------------------------------------ cycles

    @property
    def blocks(self) -> "BlockCosts | None":
        """The per-block scheduling model (llvm-mca for ``mca_cpu``), or None without one."""
        if self.mca_cpu is None:
            return None
        if self._blocks is None:
            object.__setattr__(self, "_blocks", BlockCosts(self.arch, self.mca_cpu))
        return self._blocks

    def thread_cycles(self, c: dict[str, int], active_threads: int = 1,
                      block_cycles: float | None = None) -> dict[str, float]:
        """Cycles of one thread's counts in one region, with the terms that make them up.

        ``block_cycles``: the scheduling model's cycles for the blocks this thread executed in
        the region (executions × cycles per execution); it replaces the throughput bounds as
        the core's time when given.
        """
        insns = sum(c[k] for k in CLASSES)
        t_issue = insns / self.issue_width
        t_vec = c["v64"] * 64 / self.vector_bits_per_cycle
        t_ld = c["ld_ops"] / self.loads_per_cycle
        t_st = c["st_ops"] / self.stores_per_cycle
        t_mem = (c["ld_ops"] + c["st_ops"]) / self.memory_ops_per_cycle
        t_core = max(t_issue, t_vec, t_ld, t_st, t_mem) if block_cycles is None else block_cycles
        latencies = [lv.latency for lv in self.levels] + [self.dram_latency_cycles]
        stall = 0.0
        for i in range(len(self.levels)):
            n = i + 1
            miss, seq, stmiss = c[f"l{n}_miss"], c[f"l{n}_seq"], c[f"l{n}_stmiss"]
            load_miss = miss - stmiss
            seq_load = seq * load_miss / miss if miss else 0.0
            weight = (load_miss - seq_load) + self.sequential_miss_cost * seq_load
            # An L1 miss that hits L2 is short enough for the out-of-order window to hide more of it.
            overlap = self.l2_hit_overlap if i == 0 and self.l2_hit_overlap is not None else self.miss_overlap
            stall += weight * (latencies[i + 1] - latencies[i]) * (1.0 - overlap)
        last = len(self.levels)
        dram_bytes = (c[f"l{last}_miss"] + c[f"l{last}_wb"]) * self.line_bytes
        bytes_per_cycle = self.dram_bandwidth_gbs / self.clock_ghz / max(active_threads, 1)
        t_dram = dram_bytes / bytes_per_cycle
        # Lines moved between the levels (fills and write-backs) at each level's bandwidth.
        t_levels = []
        for n, bw in ((1, self.l2_bytes_per_cycle), (2, self.l3_bytes_per_cycle)):
            if bw > 0 and n < last:
                t_levels.append((c[f"l{n}_miss"] + c[f"l{n}_wb"]) * self.line_bytes / bw)
            else:
                t_levels.append(0.0)
        cycles = max(t_core + stall, t_dram, *t_levels)
        return {"cycles": cycles, "core": t_core, "issue": t_issue, "vector": t_vec, "loads": t_ld, "stores": t_st,
                "memory_ops": t_mem, "stall": stall, "dram": t_dram, "l2_bandwidth": t_levels[0],
                "l3_bandwidth": t_levels[1]}

    def ms(self, cycles: float) -> float:
        return cycles / (self.clock_ghz * 1e6)


# ---------------------------------------------------------------------- loading


def _target_file(target: str | Path) -> tuple[Path, dict[str, Any]]:
    from .. import targets

    name = str(target)
    if name == targets.HOST_ALIAS:
        name = targets.host_target_name()
    path = Path(name)
    if path.suffix != ".toml":
        path = targets.TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(targets.available())} "
                        f"or give a path to a .toml file")
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def load_core_model(target: str | Path) -> CoreModel:
    """The ``[core]`` table of a target (a name in targets/ or a path to a TOML file).

    Raises UserError naming every missing or malformed key, in one line.
    """
    path, data = _target_file(target)
    arch = data.get("arch", "")
    core = data.get("core")
    if isinstance(core, dict) and "same_as" in core:
        # One board, two OS targets (rpi3b armv7 / rpi3b-aarch64): its core figures live in one file.
        other = str(core["same_as"])
        if other == path.stem or "/" in other or other.endswith(".toml"):
            raise UserError(f"{path}: core.same_as must name another file in targets/, not {other!r}")
        shared = load_core_model(other)
        return dataclasses.replace(shared, target=path.stem, arch=str(arch), path=path)
    if not isinstance(core, dict):
        needed = ", ".join((*TEXT_KEYS, *NUMBER_KEYS, *BOOL_KEYS))
        raise UserError(f"target {path.stem} has no core model: {path} lacks a [core] table with {needed} "
                        f"(and a [core.sources] entry for each number); see targets/rpi4b.toml")
    sources = core.get("sources", {})
    if not isinstance(sources, dict):
        sources = {}
    has_l3 = any(k in core for k in (*L3_NUMBER_KEYS, *L3_BOOL_KEYS))
    numbers = NUMBER_KEYS + (L3_NUMBER_KEYS if has_l3 else ())
    bools = BOOL_KEYS + (L3_BOOL_KEYS if has_l3 else ())
    missing = [k for k in (*TEXT_KEYS, *numbers, *bools) if k not in core]
    missing += [f"sources.{k}" for k in numbers if k in core and not str(sources.get(k, "")).strip()]
    bad = [k for k in (*TEXT_KEYS, *OPTIONAL_TEXT_KEYS) if k in core and not isinstance(core[k], str)]
    bad += [k for k in numbers if k in core and (isinstance(core[k], bool) or not isinstance(core[k], (int, float))
                                                  or core[k] < 0)]
    bad += [k for k in bools if k in core and not isinstance(core[k], bool)]
    bad += [k for k in OPTIONAL_NUMBER_KEYS if k in core and (isinstance(core[k], bool)
                                                             or not isinstance(core[k], (int, float)) or core[k] < 0)]
    missing += [f"sources.{k}" for k in (*OPTIONAL_TEXT_KEYS, *OPTIONAL_NUMBER_KEYS)
                if k in core and not str(sources.get(k, "")).strip()]
    if missing or bad:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"core.{k}" for k in missing))
        if bad:
            parts.append("malformed " + ", ".join(f"core.{k}" for k in bad))
        raise UserError(f"{path}: the core model is incomplete: {'; '.join(parts)}")
    for k in ("clock_ghz", "issue_width", "vector_bits_per_cycle", "loads_per_cycle", "stores_per_cycle",
              "memory_ops_per_cycle", "line_bytes", "l1d_kib", "l1d_ways", "l2_kib", "l2_ways", "dram_bandwidth_gbs"):
        if core[k] <= 0:
            raise UserError(f"{path}: core.{k} must be positive")
    for k in ("miss_overlap", "sequential_miss_cost", "l2_hit_overlap"):
        if k in core and not 0 <= core[k] <= 1:
            raise UserError(f"{path}: core.{k} must be between 0 and 1")
    levels = [CacheLevel("L1D", int(core["l1d_kib"]), int(core["l1d_ways"]), float(core["l1d_latency"]), False),
              CacheLevel("L2", int(core["l2_kib"]), int(core["l2_ways"]), float(core["l2_latency"]),
                         bool(core["l2_shared"]))]
    if has_l3:
        levels.append(CacheLevel("L3", int(core["l3_kib"]), int(core["l3_ways"]), float(core["l3_latency"]),
                                 bool(core["l3_shared"])))
    return CoreModel(
        target=path.stem, arch=str(arch), model=core["model"], qemu_cpu=core["qemu_cpu"],
        clock_ghz=float(core["clock_ghz"]), issue_width=float(core["issue_width"]),
        vector_bits_per_cycle=float(core["vector_bits_per_cycle"]), loads_per_cycle=float(core["loads_per_cycle"]),
        stores_per_cycle=float(core["stores_per_cycle"]), memory_ops_per_cycle=float(core["memory_ops_per_cycle"]),
        line_bytes=int(core["line_bytes"]), levels=tuple(levels), dram_latency_ns=float(core["dram_latency_ns"]),
        dram_bandwidth_gbs=float(core["dram_bandwidth_gbs"]), miss_overlap=float(core["miss_overlap"]),
        sequential_miss_cost=float(core["sequential_miss_cost"]), sync_cycles=float(core["sync_cycles"]),
        sources={str(k): str(v) for k, v in sources.items()}, path=path,
        mca_cpu=str(core["mca_cpu"]) if core.get("mca_cpu") else None,
        ooo_window=float(core.get("ooo_window", 0)),
        l2_hit_overlap=float(core["l2_hit_overlap"]) if "l2_hit_overlap" in core else None,
        l2_bytes_per_cycle=float(core.get("l2_bytes_per_cycle", 0)),
        l3_bytes_per_cycle=float(core.get("l3_bytes_per_cycle", 0)),
        branch_miss_cycles=float(core.get("branch_miss_cycles", 0)),
    )


# ---------------------------------------------------------------------- blocks


MCA_TRIPLES = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}
#: Back-to-back executions llvm-mca simulates per block: the steady state of a loop body.
MCA_ITERATIONS = 100
#: LLVM 19 (Debian 12's llvm-19) first: it has a Zen 4 model, and LLVM 14's Zen 3 model charges a
#: 256-bit FMA two cycles of a pipe (half Zen's throughput).
MCA_CANDIDATES = ("llvm-mca-19", "llvm-mca-18", "llvm-mca-17", "llvm-mca-16", "llvm-mca")
_ERROR_LINE = re.compile(r"^<stdin>:(\d+):\d+: error", re.M)
#: aarch64 branch targets as QEMU prints them (absolute, "b.ne #0x5511..."), which the assembler
#: cannot encode as pc offsets: made offset 0 (the target does not change a block's cost).
_A64_TARGET = re.compile(r"^((?:b|bl|b\.\w+|cbn?z|tbn?z|adrp?)\b.*?)#-?0x[0-9a-f]+$")
_X86_TARGET = re.compile(r"^((?:j\w*|call\w*|loop\w*)\s+)0x[0-9a-f]+$")


def canonical_text(text: str) -> str:
    """A block's disassembly without the absolute addresses of its branch targets (they move
    with where the library was loaded, the block's cost does not): aarch64 targets become
    offset 0 (which the assembler can encode), x86 ones address 0."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        line = _A64_TARGET.sub(r"\g<1>#0", line)
        line = _X86_TARGET.sub(r"\g<1>0x0", line)
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


#: Corrections to LLVM's scheduling models where they contradict the core's measured throughput,
#: per ``-mcpu``: (pattern, replacement) applied to each line before llvm-mca sees it. LLVM 19's
#: Zen 4 model gives scalar FMAs and scalar min/max (VFMADD231SS, VMAXSS, ...) two cycles of an FP
#: pipe, half the throughput of their packed forms; Zen 4 issues two of either per cycle (uops.info:
#: reciprocal throughput 0.5 for both). Costed as their packed forms, they keep their latency.
MCA_REWRITES: dict[str, tuple[tuple[str, str], ...]] = {
    "znver4": ((r"^(vfn?m(?:add|sub)\d{3}|vmin|vmax)s([sd])\s", r"\1p\2 "),),
}


def mca_rewrite(text: str, cpu: str) -> str:
    """``text`` with the corrections of :data:`MCA_REWRITES` for ``cpu`` applied, line by line."""
    rules = [(re.compile(pattern), repl) for pattern, repl in MCA_REWRITES.get(cpu, ())]
    if not rules:
        return text
    out = []
    for line in text.splitlines():
        for rule, repl in rules:
            line = rule.sub(repl, line)
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


#: An x86 string instruction with a rep prefix: QEMU runs (and the plugin counts) one element per
#: execution of its block.
_REP_STRING = re.compile(r"^rep\w* +(?:stos|movs|lods|scas|cmps)([bwlq])\b")
_ELEMENT_BYTES = {"b": 1, "w": 2, "l": 4, "q": 8}
#: Bytes a fast string instruction (ERMS/FSRM: memset, memcpy of libc) moves per cycle: one
#: 256-bit store a cycle.
STRING_BYTES_PER_CYCLE = 32.0


def find_llvm_mca() -> str:
    for name in MCA_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    from .setup import SETUP_COMMAND

    raise UserError(f"llvm-mca (Debian package llvm-19) is missing; the core model costs blocks with it: run "
                    f"`{SETUP_COMMAND}`")


class BlockCosts:
    """Cycles per execution of a translation block on a core, from LLVM's scheduling model.

    ``llvm-mca`` runs each block as if it executed back to back (``MCA_ITERATIONS`` times):
    dispatch width, execution ports, register dependency chains (within and across executions,
    as in a loop whose body the block is) and the load-to-use latency of L1 hits. A block's
    cost is its total cycles over the iterations. Results are cached on disk by block text,
    per triple, CPU and llvm-mca version, so a block is simulated once per machine.
    Lines llvm-mca cannot parse are dropped from their block (counted in ``dropped``).
    """

    def __init__(self, arch: str, cpu: str) -> None:
        if arch not in MCA_TRIPLES:
            raise UserError(f"no llvm-mca triple for {arch!r}")
        self.triple = MCA_TRIPLES[arch]
        self.cpu = cpu
        self.exe = find_llvm_mca()
        version = subprocess.run([self.exe, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\S+)", version)
        self.version = m.group(1) if m else "unknown"
        known = subprocess.run([self.exe, f"-mtriple={self.triple}", "-mcpu=help"], capture_output=True, text=True)
        if not re.search(rf"^\s+{re.escape(cpu)}\s", known.stdout + known.stderr, re.M):
            from .setup import SETUP_COMMAND

            raise UserError(f"{self.exe} (LLVM {self.version}) has no scheduling model for {cpu!r}; run "
                            f"`{SETUP_COMMAND}` (it installs llvm-19)")
        from .setup import cache_dir

        self.path = cache_dir() / "mca" / f"{self.triple}-{cpu}-{self.version}-v3.json"
        try:
            self._cache: dict[str, list[float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._cache = {}
        self.dropped = 0

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    @staticmethod
    def string_op(text: str) -> float | None:
        """Cycles of one element of a rep-prefixed x86 string instruction (a block of its own
        in QEMU, executed once per element), or None for any other block. llvm-mca costs the
        whole instruction (~100 cycles) for every element; the core streams it at
        ``STRING_BYTES_PER_CYCLE``."""
        m = _REP_STRING.match(text.strip())
        if m is None or "\n" in text.strip():
            return None
        return _ELEMENT_BYTES[m.group(1)] / STRING_BYTES_PER_CYCLE

    def cycles(self, texts: list[str]) -> dict[str, tuple[float, float, float]]:
        """Per block text: (cycles per execution back to back, the block's resource-bound
        reciprocal throughput, micro-ops per execution)."""
        originals = texts
        canon = {t: mca_rewrite(canonical_text(t), self.cpu) for t in originals}
        strings = {t: self.string_op(t) for t in originals}
        strings = {t: c for t, c in strings.items() if c is not None}
        texts = [canon[t] for t in originals if t not in strings]
        todo = sorted({t for t in texts if self.key(t) not in self._cache})
        if todo:
            for i in range(0, len(todo), 500):
                self._simulate(todo[i:i + 500])
            self._save()
        out = {t: tuple(self._cache[self.key(canon[t])]) for t in originals if t not in strings}
        out.update({t: (c, c, 0.0) for t, c in strings.items()})
        return out

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(self._cache)
        tmp.write_text(json.dumps(on_disk))
        os.replace(tmp, self.path)
        self._cache = on_disk

    def _simulate(self, texts: list[str]) -> None:
        blocks = [[ln for ln in t.splitlines() if ln.strip()] for t in texts]
        for _ in range(8):
            src, owner = [], []  # owner: (block, line) of each source line, None for markers
            for b, lines in enumerate(blocks):
                src.append(f"# LLVM-MCA-BEGIN b{b}")
                owner.append(None)
                for i, ln in enumerate(lines):
                    src.append(ln)
                    owner.append((b, i))
                src.append("# LLVM-MCA-END")
                owner.append(None)
            res = subprocess.run([self.exe, f"-mtriple={self.triple}", f"-mcpu={self.cpu}",
                                  f"-iterations={MCA_ITERATIONS}", "-json", "-"], input="\n".join(src) + "\n",
                                 capture_output=True, text=True)
            bad = [int(n) - 1 for n in _ERROR_LINE.findall(res.stderr)]
            if res.returncode == 0 and res.stdout.strip():
                regions = json.loads(res.stdout).get("CodeRegions", [])
                by_name = {r.get("Name"): r for r in regions}
                for b, text in enumerate(texts):
                    v = (by_name.get(f"b{b}") or {}).get("SummaryView") or {}
                    iters = v.get("Iterations") or MCA_ITERATIONS
                    self._cache[self.key(text)] = [v.get("TotalCycles", 0) / iters, float(v.get("BlockRThroughput", 0)),
                                                   v.get("TotaluOps", 0) / iters]
                return
            drop = {owner[i] for i in bad if 0 <= i < len(owner) and owner[i] is not None}
            if not drop:
                raise UserError(f"llvm-mca failed ({self.triple}, {self.cpu}): {res.stderr.strip()[:300]}")
            self.dropped += len(drop)
            blocks = [[ln for i, ln in enumerate(lines) if (b, i) not in drop] for b, lines in enumerate(blocks)]
        raise UserError(f"llvm-mca kept failing on the blocks of one record ({self.triple}, {self.cpu})")


def block_cycles(core: CoreModel, latency: float, throughput: float, uops: float, executions: int,
                 entries: int) -> float:
    """Cycles of ``executions`` of one block, entered ``entries`` times (a loop of
    T = executions / entries iterations per entry).

    Back to back, a block costs ``latency`` cycles per execution: its resource bound or, when
    longer, its loop-carried dependency chain. An out-of-order core runs the chains of
    consecutive independent loop instances side by side, as many as its window holds: with a
    window of W micro-ops and T × uops per instance, 1 + W / (T × uops) instances in flight
    (Little's law), so an iteration costs latency / (1 + W / (T × uops)), and never less than
    the resource bound (``throughput``). Short loops thus cost their throughput, long ones their
    chain. An in-order core (``ooo_window`` 0) overlaps nothing.
    """
    if executions <= 0:
        return 0.0
    if core.ooo_window <= 0 or uops <= 0 or latency <= throughput:
        return executions * max(latency, throughput)
    trip = executions / max(entries, 1)
    in_flight = 1.0 + core.ooo_window / (trip * uops)
    return executions * max(throughput, latency / in_flight)


_JUMP = re.compile(r"^(j\w*|b|b\.\w+|cbn?z|tbn?z|br)\b")


def _block_text(entry: Any) -> tuple[int | None, str]:
    """(pc, text) of a record's "tbs" entry ([pc, text]; older records: text only)."""
    if isinstance(entry, list):
        return int(entry[0]), str(entry[1])
    return None, str(entry)


def _ends_in_jump(text: str) -> bool:
    """Whether a block ends with a jump (not a call or a return): only a jump can close a loop."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return bool(lines) and bool(_JUMP.match(lines[-1].strip().lower()))


def loop_trips(blocks: dict[int, int], edges: list[tuple[int, int, int]], pcs: dict[int, int | None],
               texts: dict[int, str]) -> dict[int, float]:
    """Per block, the trip count of the innermost loop it belongs to (1 outside loops).

    A jump from a block to one at the same or a lower address is a loop's back edge; the target
    heads the loop, whose body spans the addresses from the head to the farthest block that jumps
    back to it. A loop runs (back edges + entries) / entries iterations per entry, entries being
    the loop's exits (edges from its body to code outside), or without exits the head's
    executions not reached through a back edge. Every block in the body (a loop body
    can span several blocks: QEMU ends a block at every branch) gets its innermost loop's count.
    """
    back: dict[int, int] = {}
    span: dict[int, int] = {}
    for prev, cur, count in edges:
        pp, pc = pcs.get(prev), pcs.get(cur)
        if pp is None or pc is None or pp < pc or not _ends_in_jump(texts.get(prev, "")):
            continue
        back[cur] = back.get(cur, 0) + count
        span[cur] = max(span.get(cur, pc), pp)
    # Edges by address, once: (from, to, count) of those whose both ends have one.
    placed = [(pcs[p], pcs[c], n) for p, c, n in edges if pcs.get(p) is not None and pcs.get(c) is not None]
    loops = []
    for head, n_back in back.items():
        lo, hi = pcs[head], span[head]
        # Entries counted as exits (edges from the body to code outside it): the first iteration
        # may run in a block QEMU started before the head (code falling into the loop), so the
        # head's own executions can miss the entries. Without exits: the head's count.
        exits = sum(n for pp, pc, n in placed if lo <= pp <= hi and not lo <= pc <= hi)
        entries = exits if exits > 0 else max(blocks.get(head, 0) - n_back, 1)
        loops.append((lo, hi, (n_back + entries) / entries))
    loops.sort(key=lambda lp: lp[1] - lp[0])  # innermost (shortest) first
    trips: dict[int, float] = {}
    for b in blocks:
        pc = pcs.get(b)
        trips[b] = next((t for lo, hi, t in loops if pc is not None and lo <= pc <= hi), 1.0)
    return trips


_COND_TARGET = re.compile(r"^(?:j(?!mp)\w+|b\.\w+|cbn?z\s.*,|tbn?z\s.*,)\s*#?(0x[0-9a-f]+)$")


def branch_mispredicts(edges: list[tuple[int, int, int]], pcs: dict[int, int | None],
                       texts: dict[int, str]) -> float:
    """Mispredictions of the forward conditional branches (ifs, not loops) ending the blocks.

    From the edges out of a block that ends in a conditional branch, its outcomes: taken (the
    successor starts at the branch's target) and not taken. A predictor cannot do better than
    predict the majority outcome when the minority follows no pattern (data-dependent branches:
    a clip written as a branch per element), so the minority count is charged. Backward
    branches close loops, whose exits a predictor learns, and are not charged.
    """
    outcomes: dict[int, list[int]] = {}
    for prev, cur, count in edges:
        lines = texts.get(prev, "").strip().splitlines()
        if not lines or pcs.get(cur) is None or pcs.get(prev) is None:
            continue
        m = _COND_TARGET.match(lines[-1].strip().lower())
        if m is None:
            continue
        target = int(m.group(1), 16)
        if target <= pcs[prev]:
            continue  # a loop's back edge
        o = outcomes.setdefault(prev, [0, 0])
        o[0 if pcs[cur] == target else 1] += count
    return float(sum(min(t, n) for t, n in outcomes.values()))


def record_block_cycles(record: dict[str, Any], core: CoreModel) -> dict[tuple[int, int], float] | None:
    """Per (vcpu, region), the scheduling model's cycles for the blocks that thread executed
    there; None when the core has no scheduling model or the record no blocks."""
    costs = core.blocks
    tbs = record.get("tbs")
    if costs is None or not tbs:
        return None
    parsed = {int(k): _block_text(v) for k, v in tbs.items()}
    texts = {k: t for k, (_, t) in parsed.items()}
    pcs = {k: pc for k, (pc, _) in parsed.items()}
    cyc = costs.cycles(list(set(texts.values())))
    out: dict[tuple[int, int], float] = {}
    for t in record["threads"]:
        vcpu = int(t["vcpu"])
        per_region: dict[int, dict[int, int]] = {}
        for region, tb, count, *_ in t.get("blocks", []):
            per_region.setdefault(int(region), {})[int(tb)] = int(count)
        edges_by_region: dict[int, list[tuple[int, int, int]]] = {}
        for region, prev, cur, count in t.get("edges", []):
            edges_by_region.setdefault(int(region), []).append((int(prev), int(cur), int(count)))
        for region, blocks in per_region.items():
            trips = loop_trips(blocks, edges_by_region.get(region, []), pcs, texts)
            total = 0.0
            for tb, count in blocks.items():
                lat, thr, uops = cyc.get(texts.get(tb, ""), (0.0, 0.0, 0.0))
                total += block_cycles(core, lat, thr, uops, count, max(1, round(count / trips[tb])))
            if core.branch_miss_cycles > 0:
                total += core.branch_miss_cycles * branch_mispredicts(edges_by_region.get(region, []), pcs, texts)
            out[(vcpu, region)] = total
    return out
