"""A compiled bundle: library + manifest + reference input/output, and how to run it.

This file must run on a board that has only NumPy and the TVM *runtime*: no torch, no
compiler imports, nothing from the rest of the package but ``postprocess.py``. ``compile``
copies both into every bundle (as ``runner.py`` and ``postprocess.py``), so over SSH a board
runs::

    python3 runner.py BUNDLE_DIR --input in.npy --output out.npy [--check] [--time]

and prints, as one JSON line, the model's final outputs (top-5, detections after NMS, or the
mask's class shares), the post-processing time apart from the network's, and with ``--check``
how both the raw tensor and the final outputs agree with PyTorch's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The manifest format this file writes. 2: "files" holds the digests of the files besides the
#: library. 3: the bundle describes itself to bench and compare: "kernels" (the kernel table and
#: a library of the kernels alone, for per-kernel profiles), "device" and "rpc_key" (the target's
#: facts), so nothing rebuilds the model or reloads the target file to learn them.
FORMAT_VERSION = 3
#: The oldest format this file still reads: a format-2 bundle runs and benchmarks as it did, and
#: only what needs the newer fields (a per-kernel profile) asks for a recompile.
OLDEST_FORMAT = 2
MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
RUNNER = "runner.py"
POSTPROCESS = "postprocess.py"
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm"}
REQUIRED_FIELDS = ("format_version", "model", "config", "library", "library_sha256", "files", "input", "outputs",
                   "target", "arch", "tvm_version")
#: Fields a manifest of (at least) this format must hold besides REQUIRED_FIELDS.
FORMAT_FIELDS = {3: ("kernels", "device", "rpc_key")}


class BundleError(Exception):
    """A bundle is missing, incomplete or does not match this machine or input."""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry, not only the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via temp file + fsync + rename: readers see the old or the new file, never half.

    The package's one durable write (bundles, records, reports); here because this file also
    runs alone on a board, with the standard library only.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def elf_arch(path: Path) -> str:
    """The machine an ELF shared library was built for (x86_64, aarch64, arm or unknown)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return "not-elf"
    order = "little" if head[5] == 1 else "big"
    return ELF_MACHINES.get(int.from_bytes(head[18:20], order), "unknown")


def host_arch() -> str:
    machine = os.uname().machine
    return {"armv7l": "arm", "armv8l": "arm", "arm64": "aarch64"}.get(machine, machine)


def load_manifest(bundle_dir: Path) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist or is not a folder")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir} has no {MANIFEST}; compile it with `mnv2-tvm compile`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e.__class__.__name__}); recompile the bundle") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a manifest object; recompile the bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path} has no valid format_version; recompile the bundle")
    if version > FORMAT_VERSION:
        # A newer mnv2-tvm wrote it: recompiling here would only downgrade it.
        raise BundleError(f"{path} has format {version}, newer than this runner reads ({OLDEST_FORMAT} to "
                          f"{FORMAT_VERSION}): run it with the runner.py inside the bundle or a newer mnv2-tvm")
    if version < OLDEST_FORMAT:
        raise BundleError(f"{path} has format {version}, older than this runner reads ({OLDEST_FORMAT} to "
                          f"{FORMAT_VERSION}); recompile the bundle")
    required = [*REQUIRED_FIELDS, *(f for v, fields in FORMAT_FIELDS.items() if version >= v for f in fields)]
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks fields {', '.join(missing)}; recompile the bundle")
    names = [manifest["library"], *manifest["files"]] if isinstance(manifest["files"], dict) else [None]
    if "kernels" in manifest:
        kernels = manifest["kernels"]
        names.append(kernels.get("library") if isinstance(kernels, dict) else None)
    for name in names:
        if not _plain_file_name(name):
            raise BundleError(f"{path} names {name!r} as a file of the bundle: only plain file names inside the "
                              "bundle folder are allowed; recompile the bundle")
    return manifest


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def bundle_files(bundle_dir: Path) -> dict[str, str]:
    """The digests of the bundle's files besides the library (whose digest is ``library_sha256``)."""
    return {name: sha256(Path(bundle_dir) / name) for name in (RUNNER, POSTPROCESS, REFERENCE)}


def verify_files(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its recorded digest: checked before anything is loaded."""
    for name, digest in manifest["files"].items():
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir} lacks {name}; recompile the bundle")
        if sha256(path) != digest:
            raise BundleError(f"{path} does not match the digest in {MANIFEST} (changed or truncated); recompile")


def verify_library(bundle_dir: Path, manifest: dict[str, Any], expect_arch: str | None = None) -> Path:
    """Check every file of the bundle is intact and the library is for ``expect_arch`` (the manifest's by default)."""
    lib = Path(bundle_dir) / manifest["library"]
    if not lib.is_file():
        raise BundleError(f"bundle {bundle_dir} lacks its library {manifest['library']}; recompile the bundle")
    if sha256(lib) != manifest["library_sha256"]:
        raise BundleError(f"{lib} does not match the digest in {MANIFEST} (changed or truncated); recompile")
    verify_files(bundle_dir, manifest)
    arch = elf_arch(lib)
    want = expect_arch or manifest["arch"]
    if arch != want:
        raise BundleError(f"{lib} is built for {arch}, not {want}; compile the bundle for this device's target")
    return lib


def verify_kernels(bundle_dir: Path, manifest: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """The library of the kernels alone and the kernel table, for timing each kernel by itself.

    The kernels inside the bundle's library cannot be timed one by one on a board: they sit in a
    module the Relax executable imports, TVM's RPC time evaluator looks a function up in the
    loaded module itself, and a function handle cannot be passed back over RPC. ``compile``
    therefore also links the same kernels as a library of their own (``kernels.library``), with
    the table of what ``main`` calls (``kernels.table``). Each entry: ``name`` (the function's
    name in both libraries), ``args`` and ``dtypes`` (one call's arguments: inputs, then
    outputs), ``calls`` per inference and ``at`` (their positions in ``main``'s call sequence,
    which orders the kernels onto the model's layers).
    """
    if "kernels" not in manifest:
        raise BundleError(f"bundle {bundle_dir} was compiled before bundles carried their kernel table (format "
                          f"{manifest.get('format_version')}): recompile it to profile its kernels")
    kernels = manifest["kernels"]
    table = kernels.get("table") if isinstance(kernels, dict) else None
    fields = {"name", "args", "dtypes", "calls", "at"}
    if not isinstance(table, list) or not all(isinstance(k, dict) and fields <= k.keys() for k in table):
        raise BundleError(f"{Path(bundle_dir) / MANIFEST} has a malformed kernel table; recompile the bundle")
    lib = Path(bundle_dir) / kernels["library"]
    if not lib.is_file():
        raise BundleError(f"bundle {bundle_dir} lacks its kernel library {kernels['library']}; recompile the bundle")
    if sha256(lib) != kernels.get("library_sha256"):
        raise BundleError(f"{lib} does not match the digest in {MANIFEST} (changed or truncated); recompile")
    if elf_arch(lib) != manifest["arch"]:
        raise BundleError(f"{lib} is built for {elf_arch(lib)}, not {manifest['arch']}; recompile the bundle")
    return lib, table


def _postprocess() -> Any:
    """The post-processing module: the package's inside the package, the copy beside runner.py in a bundle."""
    try:
        from . import postprocess
    except ImportError:  # runner.py run as a script: its folder is on sys.path
        import postprocess  # type: ignore[no-redef]
    return postprocess


class Runner:
    """Loads a bundle into the Relax VM on one device and runs it."""

    def __init__(self, bundle_dir: Path, device: str = "cpu") -> None:
        import tvm
        # tvm.runtime.vm, not tvm.relax: importing relax needs the compiler library, which a
        # runtime-only install on a board lacks (same class either way).
        from tvm.runtime.vm import VirtualMachine

        self.dir = Path(bundle_dir)
        self.manifest = load_manifest(self.dir)
        lib = verify_library(self.dir, self.manifest, expect_arch=host_arch())
        self.device = tvm.device(device, 0)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib)), self.device)

    def check_input(self, x: Any) -> Any:
        import numpy as np

        spec = self.manifest["input"]
        x = np.asarray(x)
        if tuple(x.shape) != tuple(spec["shape"]):
            raise BundleError(f"input has shape {tuple(x.shape)}, the bundle expects {tuple(spec['shape'])}")
        return np.ascontiguousarray(x, dtype=spec["dtype"])

    def run(self, x: Any) -> Any:
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(self.check_input(x), self.device))
        return out.numpy()

    def final(self, raw: Any) -> dict[str, Any]:
        """The model's final outputs (top-5, detections in input pixels, or the class mask)."""
        return final_outputs(self.manifest, raw)

    def time(self, x: Any, number: int = 10, repeat: int = 5, min_repeat_ms: int = 0) -> list[float]:
        """Per-run seconds for each repeat, as TVM's time_evaluator measures them."""
        import tvm

        f = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return list(f(tvm.runtime.tensor(self.check_input(x), self.device)).results)


def final_outputs(manifest: dict[str, Any], raw: Any) -> dict[str, Any]:
    return _postprocess().final_outputs(manifest["model"], raw, manifest["config"]["resolution"])


def final_report(manifest: dict[str, Any], raw: Any, ref_raw: Any | None = None) -> dict[str, Any]:
    """Final outputs as JSON, the time post-processing took here, and their agreement with ``ref_raw``'s."""
    pp = _postprocess()
    t0 = time.perf_counter()
    final = final_outputs(manifest, raw)
    report: dict[str, Any] = {"postprocess_ms": (time.perf_counter() - t0) * 1e3,
                              "final": pp.summary(manifest["model"], final)}
    if ref_raw is not None:
        ref = final_outputs(manifest, ref_raw)
        report["final_agreement"] = pp.agreement(manifest["model"], final, ref, ref_raw)
    return report


def reference(bundle_dir: Path) -> tuple[Any, Any]:
    """The fixed input and PyTorch's output on it, stored at compile time."""
    import numpy as np

    path = Path(bundle_dir) / REFERENCE
    try:
        with np.load(path) as ref:
            return ref["input"], ref["output"]
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir} has no {REFERENCE}; recompile the bundle") from None
    except (ValueError, KeyError, OSError) as e:
        raise BundleError(f"{path} is unreadable ({e.__class__.__name__}); recompile the bundle") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a compiled mnv2-tvm bundle with the TVM runtime only.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--input", type=Path, help=".npy input (default: the bundle's reference input)")
    p.add_argument("--output", type=Path, help="where to write the output .npy")
    p.add_argument("--check", action="store_true", help="compare with the stored PyTorch output")
    p.add_argument("--time", action="store_true", help="time the model with time_evaluator")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        import numpy as np

        runner = Runner(args.bundle, args.device)
        ref_in, ref_out = reference(args.bundle) if (args.check or args.input is None) else (None, None)
        x = ref_in if args.input is None else np.load(args.input)
        out = runner.run(x)
        result: dict[str, Any] = {"model": runner.manifest["model"], "output_shape": list(out.shape), "arch": host_arch()}
        if args.output:
            buf = _npy_bytes(out)
            write_atomic(args.output, buf)
        result.update(final_report(runner.manifest, out, ref_out if args.check else None))
        if args.check:
            result["max_abs_error"] = float(np.abs(out - ref_out).max())
        if args.time:
            t0 = time.perf_counter()
            result["times_ms"] = [s * 1e3 for s in runner.time(x)]
            result["timing_wall_s"] = time.perf_counter() - t0
        print(json.dumps(result))
        return 0
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2


def _npy_bytes(array: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
