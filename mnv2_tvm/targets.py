"""Device descriptions: ``targets/<name>.toml`` → a validated :class:`TargetSpec`.

This is the one place that maps a target name to a TVM target object, to the records
folder of that target (:func:`records_dir`) and to the figures the MAd comparison needs.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import tvm

    from .emulate import CoreModel

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = Path(os.environ.get("MNV2_TVM_TARGETS", REPO_ROOT / "targets"))
SCHEDULES_DIR = Path(os.environ.get("MNV2_TVM_SCHEDULES", REPO_ROOT / "schedules"))
HOST_ALIAS = "host"
#: The file of a records folder that holds the measured schedules (MetaSchedule's JSON database).
RECORD_FILE = "database_tuning_record.json"
#: The records folder's other file: the workloads (kernels) the records refer to by line number.
WORKLOAD_FILE = "database_workload.json"
#: Activation layouts a target may ask for (``[build] layout``): plain NCHW, or channels in blocks
#: of 4, 8 or 16 innermost (``lower.to_blocked_layout`` rewrites the model for them).
LAYOUTS = ("NCHW", "NCHW4c", "NCHW8c", "NCHW16c")


@dataclass(frozen=True)
class TargetSpec:
    name: str  # the file's stem: also the records folder name and default RPC key
    title: str
    target: Any  # a tag string or a JSON-able dict
    host: Any | None
    arch: str  # x86_64, aarch64, arm: what the compiled library's ELF must say
    device_kind: str  # cpu or opencl
    cross_compiler: str | None
    ndk: bool
    rpc_key: str
    cores: int
    clock_ghz: float
    peak_gflops: float | None
    peak_source: str
    bandwidth_gbs: float | None
    bandwidth_source: str
    path: Path = field(compare=False)
    layout: str = "NCHW"  # of activations inside the model: NCHW or NCHW[b]c (see lower.py)

    @property
    def core(self) -> "CoreModel":
        """The model of the board's CPU core (the TOML's ``[core]``): what costs the board's code
        without the board. A target without one is one line naming the missing keys."""
        from .emulate import load_core_model

        try:
            return load_core_model(self.path)
        except UserError as e:
            raise UserError(f"{e}; or measure on the board with --ssh USER@HOST or --rpc-tracker HOST:PORT "
                            f"--rpc-key {self.rpc_key}") from None

    @property
    def is_host(self) -> bool:
        return self.cross_compiler is None and not self.ndk and self.arch == os.uname().machine

    def tvm_target(self) -> "tvm.target.Target":
        import tvm

        def make(spec: Any) -> "tvm.target.Target":
            if isinstance(spec, dict) and spec.get("kind") == "llvm":
                # MetaSchedule needs the core count to size its parallel loops.
                spec = {"num-cores": self.cores, **spec}
            return tvm.target.Target(spec)

        try:
            if self.host is None:
                return make(self.target)
            return tvm.target.Target(make(self.target), host=make(self.host))
        except Exception as e:  # TVM raises ValueError/TVMError with a C++ trace
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.path}: field 'target' is not a valid TVM target: {msg}") from None

    def check_llvm_triple(self) -> None:
        """TVM accepts any ``mtriple``; compiling for one its LLVM does not know fails inside TVM
        (reported as such), but MetaSchedule's builder segfaults on it (TVM 0.27): ``tune``
        refuses it first, in one line, before anything is written."""
        from tvm.target import codegen

        target = self.tvm_target()
        known = [str(k) for k in codegen.llvm_get_targets()]
        for t in (target, target.host):
            triple = str(t.attrs.get("mtriple", "") or "") if t is not None and t.kind.name == "llvm" else ""
            if not triple:
                continue
            arch = triple.split("-", 1)[0]
            if not any(arch == k or arch.startswith(k) for k in known):
                raise UserError(f"{self.path}: mtriple {triple!r} names an architecture this TVM's LLVM does not "
                                f"know ({arch!r}; it knows {', '.join(k for k in known if k in KNOWN_ARCHES)}, ...)")

    def target_json(self) -> str:
        """A stable text form for manifests and records metadata."""
        return json.dumps({"target": self.target, "host": self.host}, sort_keys=True)

    def summary(self) -> str:
        peak = f"{self.peak_gflops:.0f} GFLOP/s" if self.peak_gflops else "peak unknown"
        link = "NDK" if self.ndk else (self.cross_compiler or "host cc")
        return f"{self.name:20s} {self.arch:8s} {self.device_kind:6s} {self.cores}x{self.clock_ghz:.2f} GHz  {peak:>14s}  link: {link:24s} {self.title}"


def vector_registers(target: "tvm.target.Target") -> int:
    """Architectural vector registers of a CPU target: 32 on AArch64 and with AVX-512, else 16
    (AVX2, 32-bit NEON). Register tiles of the hand-written schedules are sized by it."""
    text = str(target.export()).lower()
    return 32 if any(k in text for k in ("aarch64", "arm64", "avx512", "x86-64-v4")) else 16


def host_cores() -> int:
    return len(os.sched_getaffinity(0))


def _host_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def host_cpu_model() -> str:
    """The host CPU's marketing name and family/model/stepping, as results files record it."""
    f = _cpuinfo_fields(_host_cpuinfo())
    name = f.get("model name", os.uname().machine)
    fms = "/".join(f.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return f"{name} (family/model/stepping {fms})"


def host_clock_ghz() -> float:
    mhz = _cpuinfo_fields(_host_cpuinfo()).get("cpu MHz")
    return float(mhz) / 1000.0 if mhz else 2.0


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def flops_per_cycle(cpuinfo: str) -> tuple[int, str]:
    """fp32 FLOP per cycle per core of the x86 CPU a /proc/cpuinfo text describes, and why: FMA
    pipes × lanes × 2. The ISA alone does not say it: AMD's first Zen executes 256-bit AVX2 on two
    128-bit pipes (half Zen 2's peak), Zen 4 runs AVX-512 on 256-bit pipes, most Xeons on two
    512-bit ones."""
    f = _cpuinfo_fields(cpuinfo)
    flags = set(f.get("flags", "").split())
    vendor, family, model = f.get("vendor_id", ""), int(f.get("cpu family", "0")), int(f.get("model", "0"))
    if vendor == "AuthenticAMD" and family == 0x17 and model < 0x30:
        return 16, "AMD Zen/Zen+: two 128-bit FMA pipes (2 x 4 lanes x 2)"
    if vendor == "AuthenticAMD" and family == 0x19:
        return 32, "AMD Zen 3/4: two 256-bit FMA pipes (2 x 8 lanes x 2; Zen 4's AVX-512 on them)"
    if "avx512f" in flags:
        return 64, "two 512-bit FMA units (2 x 16 lanes x 2; Xeon server cores, AMD Zen 5)"
    if "fma" in flags:
        return 32, "two 256-bit FMA units (2 x 8 lanes x 2)"
    return 8, "SSE: no FMA (4 lanes x 2 ops)"


def _host_flags() -> set[str]:
    fields = _cpuinfo_fields(_host_cpuinfo())
    return set((fields.get("flags") or fields.get("Features", "")).split())


def host_target_name() -> str:
    """Which targets/ file describes this machine."""
    machine = os.uname().machine
    if machine == "x86_64":
        return "x86-64-avx512" if "avx512f" in _host_flags() else "x86-64-avx2"
    raise UserError(f"no targets/ file describes a {machine} host yet; add one (see targets/x86-64-avx2.toml)")


def fastest_host_target_name() -> str:
    """The target to deploy with on this machine: the host target's blocked-layout variant
    (``<host>-nchw8c``: NCHW8c activations, hand-written register-tiled convolutions) where its
    schedules are shipped, else the host target itself.

    ``host`` itself stays the NCHW target: the shipped schedules of the width × resolution grids
    that ``compare`` measures are NCHW ones. On Zen 1 the NCHW8c build of MobileNetV2 runs in 0.6×
    the NCHW build's time (README, Host benchmark).
    """
    name = host_target_name()
    blocked = f"{name}-nchw8c"
    if (TARGETS_DIR / f"{blocked}.toml").is_file() and _has_records(_schedules(blocked)):
        return blocked
    return name


#: Sub-folder of a target's records folder that holds records measured on its emulated core
#: (``mnv2_tvm.tuning.emulated``); compile takes them for workloads the board's records lack.
EMULATED_SUBDIR = "emulated"


def records_dir(target: TargetSpec | str, given: str | os.PathLike | None = None, *, emulated: bool = False) -> Path:
    """The tuning records folder to use for ``target``: ``given`` (``--tuning-records``) when set,
    else the target's own, ``schedules/<target name>/`` (``MNV2_TVM_SCHEDULES`` moves the root),
    or with ``emulated`` its sub-folder of records measured on the emulated core.

    ``target`` is a :class:`TargetSpec` or anything :func:`load` takes; a name is loaded only
    when ``given`` is None (the folder is named after the target file's stem).
    """
    if given is not None:
        return Path(given)
    if isinstance(target, str):
        target = load(target)
    folder = _schedules(target.name)
    return folder / EMULATED_SUBDIR if emulated else folder


def _schedules(name: str) -> Path:
    """The records folder shipped for the target file ``targets/<name>.toml``."""
    return SCHEDULES_DIR / name


def _has_records(folder: Path) -> bool:
    records = folder / RECORD_FILE
    return records.is_file() and records.stat().st_size > 0


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load(name: str) -> TargetSpec:
    """Load a target by name (``host``, a file stem in targets/) or by a path to a TOML file."""
    if name == HOST_ALIAS:
        name = host_target_name()
    path = Path(name)
    if path.suffix != ".toml":
        path = TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown target {name!r}; choose one of {HOST_ALIAS}, {', '.join(available())} "
                        f"or give a path to a .toml file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    return _parse(path, data)


#: LLVM architectures named in the message for an unknown triple (the ones edge boards use).
KNOWN_ARCHES = ("aarch64", "arm", "x86_64", "riscv64")


def _parse(path: Path, data: dict) -> TargetSpec:
    def need(table: dict, key: str, kinds: type | tuple, where: str = "") -> Any:
        full = f"{where}.{key}" if where else key
        if key not in table:
            raise UserError(f"{path}: missing field '{full}'")
        value = table[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise UserError(f"{path}: field '{full}' has the wrong type ({type(value).__name__})")
        return value

    title = need(data, "name", str)
    target = need(data, "target", (str, dict))
    host = data.get("host")
    if host is not None and not isinstance(host, (str, dict)):
        raise UserError(f"{path}: field 'host' must be a tag or a table")
    arch = need(data, "arch", str)
    if arch not in ("x86_64", "aarch64", "arm"):
        raise UserError(f"{path}: field 'arch' must be x86_64, aarch64 or arm, not {arch!r}")
    device_kind = data.get("device_kind", "cpu")
    if device_kind not in ("cpu", "opencl"):
        raise UserError(f"{path}: field 'device_kind' must be cpu or opencl, not {device_kind!r}")
    build = data.get("build", {})
    rpc = data.get("rpc", {})
    device = need(data, "device", dict)
    cores = device.get("cores")
    cores = host_cores() if cores == "host" else need(device, "cores", int, "device")
    clock = device.get("clock_ghz")
    clock = host_clock_ghz() if clock == "host" else float(need(device, "clock_ghz", (int, float), "device"))
    if cores < 1 or clock <= 0:
        raise UserError(f"{path}: fields 'device.cores' and 'device.clock_ghz' must be positive")
    peak = device.get("peak_gflops")
    peak_source = str(device.get("peak_source", ""))
    if peak is None and device.get("flops_per_cycle") == "host":
        cpuinfo = _host_cpuinfo()
        per_cycle, why = flops_per_cycle(cpuinfo) if cpuinfo else (32, "assumed (no /proc/cpuinfo): two 256-bit FMA units")
        peak = cores * clock * per_cycle
        peak_source = f"derived: cores x clock x {per_cycle} FLOP/cycle, {why}"
    elif peak is None and "flops_per_cycle" in device:
        peak = cores * clock * float(need(device, "flops_per_cycle", (int, float), "device"))
    if peak is not None and (not isinstance(peak, (int, float)) or peak <= 0):
        raise UserError(f"{path}: field 'device.peak_gflops' must be a positive number")
    bandwidth = device.get("bandwidth_gbs")
    if bandwidth is not None and (not isinstance(bandwidth, (int, float)) or bandwidth <= 0):
        raise UserError(f"{path}: field 'device.bandwidth_gbs' must be a positive number")
    cross = build.get("cross_compiler")
    if cross is not None and not isinstance(cross, str):
        raise UserError(f"{path}: field 'build.cross_compiler' must be a command name")
    layout = build.get("layout", "NCHW")
    if layout not in LAYOUTS:
        raise UserError(f"{path}: field 'build.layout' must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    return TargetSpec(
        name=path.stem, title=title, target=target, host=host, arch=arch, device_kind=device_kind,
        cross_compiler=cross, ndk=bool(build.get("ndk", False)), rpc_key=str(rpc.get("key", path.stem)),
        cores=cores, clock_ghz=clock, peak_gflops=float(peak) if peak else None,
        peak_source=peak_source, bandwidth_gbs=float(bandwidth) if bandwidth else None,
        bandwidth_source=str(device.get("bandwidth_source", "")), path=path,
        layout=layout,
    )
