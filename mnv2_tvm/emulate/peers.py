"""Other inference engines on the emulated core: ONNX Runtime and ncnn beside TVM, same input,
same core model, same rule for what is counted (``scripts/bench_arm.py``).

Set-up (``ensure_peers``; ``scripts/setup_emulator.sh`` runs it too): each engine's aarch64 wheel
for CPython 3.11 is installed with the host's pip into its own folder under
``<emulate cache>/peers/aarch64/<engine>/``, which the guest puts on its path for that request
only. pip never runs under qemu. ``pnnx`` (TorchScript to ncnn) is installed for the host into
``<emulate cache>/peers/host-pnnx/``. Dependencies are left out on purpose: the board's site has
NumPy, and what else the wheels declare serves tools not used here (ONNX Runtime's model
tools, ncnn's model-zoo downloads).

Guest: qemu-user 7.2 shows the host's ``/proc/cpuinfo`` to aarch64 code, and the cpuinfo
library inside ONNX Runtime dereferences NULL on x86 contents at load. The peers' guest therefore
runs with its own prefix (``QEMU_LD_PREFIX``): a folder of symlinks to the board's userland plus a
``proc/cpuinfo`` describing the target's cores (what the board itself would show), so the engines
also pick the kernels they would pick on that core.

Threads: peers are measured with one thread. The plugin models parallel regions by TVM's
``TVMBackendParallelLaunch``; ONNX Runtime's thread pool and ncnn's OpenMP team never call it, and
their per-thread work under qemu depends on how the host schedules the emulated threads (see
``docs/design.md``), so a multi-threaded latency of a peer is not modelled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import setup as emu_setup

PEERS = ("onnxruntime", "ncnn")
#: Pinned so that a figure names what produced it.
WHEELS = {"onnxruntime": "onnxruntime==1.32.0", "ncnn": "ncnn==1.0.20261020"}
PNNX_WHEEL = "pnnx==20261020"
AARCH64_PLATFORM_ARGS = ["--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--platform",
                         "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp"]
PEERS_RECIPE = "1"
#: Host seconds a peer's warm-up and counted inference may take under emulation (DeepLabv3 at 513
#: pixels retires billions of instructions through the cache simulation). Fixed, not a parameter:
#: it is part of the request, whose text the cost depends on (see :func:`measure_peer`).
PEER_TIMEOUT_S = 4 * 3600.0
PEER_THREADS_NOTE = ("peers run with 1 thread: the emulated core splits a run into parallel regions at TVM's "
                     "TVMBackendParallelLaunch, which ONNX Runtime's thread pool and ncnn's OpenMP team never call, "
                     "and their per-thread work under qemu depends on how the host schedules the emulated threads")
#: What a Raspberry Pi's kernel shows in /proc/cpuinfo for each core qemu emulates:
#: (CPU part, variant, revision, Features).
CPUINFO = {
    "cortex-a53": ("0xd03", "0x0", "4", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a72": ("0xd08", "0x0", "3", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": ("0xd0b", "0x4", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                        "asimdrdm lrcpc dcpop asimddp"),
}
#: Top-level folders of the board's userland the peers' guest takes from the host instead.
GUEST_HOST_ENTRIES = ("proc", "sys", "dev", "run", "tmp", "home", "root")
NETWORK_SIGNS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                 "Network is unreachable", "ConnectionError", "Could not fetch URL", "ProxyError", "timed out")


class RegistryUnreachable(UserError):
    """pip could not reach the package registry (one line, says what to do)."""


def peers_dir() -> Path:
    return emu_setup.cache_dir() / "peers"


def site_dir(engine: str) -> Path:
    """The folder holding ``engine``'s aarch64 wheel (put on the guest's path per request)."""
    return peers_dir() / "aarch64" / engine


def pnnx_dir() -> Path:
    return peers_dir() / "host-pnnx"


def _stamp_ok(folder: Path, wheel: str) -> bool:
    try:
        stamp = json.loads((folder / ".mnv2-tvm-peer.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == PEERS_RECIPE and stamp.get("wheel") == wheel


def _pip_error(what: str, stderr: str) -> UserError:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    if any(sign in stderr for sign in NETWORK_SIGNS):
        import re

        cause = re.search(r"Failed to establish a new connection: [^'\")]*|Temporary failure in name resolution|"
                          r"Network is unreachable|Read timed out|timed out|ProxyError", stderr)
        return RegistryUnreachable(f"cannot install {what}: the package registry is unreachable "
                                   f"({cause.group(0).strip() if cause else last}); run "
                                   f"`{emu_setup.SETUP_COMMAND}` when it is")
    if "No matching distribution" in stderr or "Could not find a version" in stderr:
        return UserError(f"{what}: no wheel on the registry for this platform ({last})")
    return UserError(f"installing {what} failed: {last}")


def _pip_install(folder: Path, wheel: str, platform_args: list[str], what: str) -> Path:
    """``pip install --target`` into a fresh folder, renamed into place when complete."""
    if _stamp_ok(folder, wheel):
        return folder
    new = folder.with_name(folder.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--timeout", "30", "--retries", "1", "--target", str(new), *platform_args, wheel]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        shutil.rmtree(new, ignore_errors=True)
        raise RegistryUnreachable(f"cannot install {what}: pip did not finish within 30 min") from None
    if proc.returncode != 0:
        shutil.rmtree(new, ignore_errors=True)
        raise _pip_error(what, proc.stderr)
    (new / ".mnv2-tvm-peer.json").write_text(json.dumps({"recipe": PEERS_RECIPE, "wheel": wheel}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    new.rename(folder)
    return folder


def ensure_engine(engine: str) -> Path:
    """``engine``'s aarch64 wheel installed for the guest (idempotent; quiet when done)."""
    if engine not in WHEELS:
        raise UserError(f"unknown peer {engine!r}; choose from {', '.join(PEERS)}")
    return _pip_install(site_dir(engine), WHEELS[engine], AARCH64_PLATFORM_ARGS,
                        f"{WHEELS[engine]} (aarch64, CPython 3.11)")


def ensure_pnnx() -> Path:
    """The host's pnnx executable (TorchScript to ncnn), installed once; its path."""
    folder = _pip_install(pnnx_dir(), PNNX_WHEEL, [], f"{PNNX_WHEEL} (host)")
    exe = folder / "pnnx" / "pnnx"
    if not exe.is_file():
        raise UserError(f"the pnnx wheel has no executable at {exe}: its layout changed")
    exe.chmod(exe.stat().st_mode | 0o111)
    return exe


def ensure_peers(engines: tuple[str, ...] = PEERS) -> dict[str, str | None]:
    """Install every peer it can: engine -> None when ready, else why not (one line each).
    ncnn also needs the host's pnnx. An unreachable registry stops at the first attempt
    (:class:`RegistryUnreachable`) unless everything is installed already."""
    status: dict[str, str | None] = {}
    for engine in engines:
        try:
            ensure_engine(engine)
            if engine == "ncnn":
                ensure_pnnx()
            status[engine] = None
        except RegistryUnreachable:
            raise
        except UserError as e:
            status[engine] = str(e)
    return status


# --------------------------------------------------------------------------- the peers' guest


def board_rootfs() -> Path:
    """The virtual board's aarch64 userland (the same default as :class:`~.runner.EmulatedCore`)."""
    base = Path(os.environ.get("MNV2_TVM_BOARD_DIR", Path.home() / ".cache/mnv2-tvm/virtual-board"))
    return base / "rootfs"


def cpuinfo_text(qemu_cpu: str, cores: int) -> str:
    """``/proc/cpuinfo`` as a Raspberry Pi with ``cores`` cores of this kind shows it."""
    if qemu_cpu not in CPUINFO:
        raise UserError(f"peers run on aarch64 Cortex cores ({', '.join(CPUINFO)}), not {qemu_cpu}")
    part, variant, revision, features = CPUINFO[qemu_cpu]
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
              f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n"
              for i in range(cores)]
    return "\n".join(blocks) + "\n"


def guest_rootfs(qemu_cpu: str, cores: int, rootfs: Path | None = None) -> Path:
    """A prefix for qemu-user: the board's userland through symlinks, with its own
    ``proc/cpuinfo`` (qemu looks a path up under the prefix first and falls back to the host's;
    ``/proc/self/maps`` and the like are qemu's own and never looked up there)."""
    from .runner import BOARD_SETUP_COMMAND, BOARD_SITE

    board = (rootfs or board_rootfs()).resolve()
    if not (board / "usr/bin/python3").exists() or not (board / BOARD_SITE.lstrip("/") / "tvm").is_dir():
        raise UserError(f"the aarch64 guest userland is missing ({board}); run `{BOARD_SETUP_COMMAND}`")
    text = cpuinfo_text(qemu_cpu, cores)
    root = peers_dir() / f"rootfs-{qemu_cpu}-x{cores}"
    # The guest reads these links as host paths and goes on resolving them under the prefix:
    # an entry named like the first component of a host path (/root/.cache/..., /tmp/...) would
    # hide that path, so only the userland's own folders are linked; the rest is the host's.
    host_roots = {Path(p).resolve().parts[1] for p in (board, root, "/tmp") if len(Path(p).resolve().parts) > 1}
    entries = sorted(p.name for p in board.iterdir()
                     if p.name not in GUEST_HOST_ENTRIES and p.name not in host_roots)
    stamp = {"board": str(board), "cpuinfo": text, "entries": entries}
    try:
        if json.loads((root / ".mnv2-tvm-prefix.json").read_text()) == stamp:
            return root
    except (OSError, ValueError):
        pass
    new = root.with_name(root.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    (new / "proc").mkdir(parents=True)
    for entry in entries:
        (new / entry).symlink_to(board / entry)
    (new / "proc" / "cpuinfo").write_text(text)
    (new / ".mnv2-tvm-prefix.json").write_text(json.dumps(stamp))
    shutil.rmtree(root, ignore_errors=True)
    new.rename(root)
    return root


def peer_core(target: str | Path, *, work_dir: Path | None = None, timeout_s: float = 900.0) -> Any:
    """An :class:`~.runner.EmulatedCore` (1 thread) for the peers: the target's core model and
    plugin, the board's userland seen through :func:`guest_rootfs`."""
    from .. import targets
    from .core_model import load_core_model
    from .runner import EmulatedCore

    core = load_core_model(target)
    if core.arch != "aarch64":
        raise UserError(f"peers run on aarch64 targets; {core.target} is {core.arch}")
    spec = targets.load(str(target))
    return EmulatedCore(target, threads=1, rootfs=guest_rootfs(core.qemu_cpu, spec.cores), work_dir=work_dir,
                        timeout_s=timeout_s)


@dataclass
class PeerModel:
    """What one engine loads: a file on the host the guest can read."""

    engine: str
    path: Path


def measure_peer(target: str | Path, model: PeerModel, input_shape: tuple[int, ...] | list[int], *,
                 threads: int = 1, warmup: int = 1) -> Any:
    """Cost (an :class:`~.runner.EmulatedCost`) of one inference of ``model`` in its engine on
    ``target``'s emulated core, after ``warmup`` inferences that only warm the simulated caches.

    The input is the guest's deterministic fill, the same as ``EmulatedCore.measure_vm`` gives a
    TVM bundle. Each measurement runs in a guest of its own (~15 s to start): the engines' Python
    bindings are instrumented code that touches Python objects, whose placement depends on every
    request the long-lived guest answered before and on the request's own text; a fresh guest
    answering the same request (same model path, same deadline: :data:`PEER_TIMEOUT_S`) makes
    the cost the same in every run.
    """
    if threads != 1:
        raise UserError(PEER_THREADS_NOTE)
    if model.engine not in WHEELS:
        raise UserError(f"unknown peer {model.engine!r}; choose from {', '.join(PEERS)}")
    site = site_dir(model.engine)
    if not _stamp_ok(site, WHEELS[model.engine]):
        raise UserError(f"{model.engine} is not installed for the guest; run `{emu_setup.SETUP_COMMAND}`")
    req = {"op": "measure_engine", "engine": model.engine, "model": str(Path(model.path).resolve()),
           "input": {"shape": [int(d) for d in input_shape], "dtype": "float32"}, "threads": threads,
           "site": str(site), "warmup": int(warmup)}
    with peer_core(target, timeout_s=PEER_TIMEOUT_S) as core:
        return core._measure(req)


# --------------------------------------------------------------------------- models for the peers


def export_onnx_model(cfg: Any, work: Path, seed: int = 0) -> PeerModel:
    """The model as ONNX (the package's own export: BN folded, opset 17), for ONNX Runtime."""
    from ..lower import export_onnx
    from ..models import build

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{cfg.label}.onnx"
    export_onnx(build(cfg, seed=seed), cfg, path)
    return PeerModel("onnxruntime", path)


def convert_ncnn(cfg: Any, work: Path, seed: int = 0) -> PeerModel:
    """The model traced to TorchScript (BN folded) and converted by pnnx on the host to an fp32
    ncnn model (``fp16=0``: pnnx stores fp16 weights by default)."""
    import warnings

    import torch

    from ..models import build, fold_batchnorm

    exe = ensure_pnnx()
    work.mkdir(parents=True, exist_ok=True)
    model = fold_batchnorm(build(cfg, seed=seed))
    pt = work / f"{cfg.label}.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, torch.zeros(cfg.input_shape)).save(str(pt))
    param, binary = work / f"{cfg.label}.ncnn.param", work / f"{cfg.label}.ncnn.bin"
    shape = ",".join(str(d) for d in cfg.input_shape)
    cmd = [str(exe), str(pt), f"inputshape=[{shape}]", "fp16=0", f"ncnnparam={param}", f"ncnnbin={binary}",
           f"pnnxparam={work / 'pnnx.param'}", f"pnnxbin={work / 'pnnx.bin'}", f"pnnxpy={work / 'pnnx.py'}",
           f"pnnxonnx={work / 'pnnx.onnx'}", f"ncnnpy={work / 'ncnn.py'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=1800, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not param.is_file() or not binary.is_file():
        tail = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise UserError(f"pnnx could not convert {cfg.label} (exit {proc.returncode}): "
                        f"{tail[-1] if tail else 'no output'}")
    return PeerModel("ncnn", param)


def main() -> int:
    """``python -m mnv2_tvm.emulate.peers``: install the peers (scripts/setup_emulator.sh)."""
    try:
        status = ensure_peers()
    except UserError as e:
        print(f"setup_emulator: peers: {e}", file=sys.stderr)
        return 2
    for engine, error in status.items():
        if error:
            print(f"setup_emulator: peer {engine} unavailable: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
