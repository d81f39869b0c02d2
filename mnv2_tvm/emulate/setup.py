"""Builds what the emulated core needs beyond apt packages: our TCG plugin and the x86-64 guest's
runtime-only TVM site. Standard library only (scripts/setup_emulator.sh runs it).

Everything lives in the cache folder ``$MNV2_TVM_EMULATE_DIR`` (default
``~/.cache/mnv2-tvm/emulate``):

- ``include/qemu-plugin.h``: the plugin API header of the installed qemu (setup_emulator.sh
  takes it from Debian's qemu source package);
- ``libmnv2cost-<sha>.so``: the plugin, named by a digest of its source and the header, so an
  edited source is rebuilt on first use;
- ``x86_64-site/``: apache-tvm + tvm-ffi + numpy wheels for the host's CPython, without the
  compiler library (runtime-only mode: quick to import under qemu-x86_64).

    python -c "from mnv2_tvm.emulate.setup import main; main()"   # both, quiet when done
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError

SETUP_COMMAND = "bash scripts/setup_emulator.sh"
PLUGIN_SOURCE = Path(__file__).parent / "plugin" / "mnv2cost.c"
# Same pins as the virtual board's site (scripts/virtual_board.py BOARD_WHEELS).
X86_WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "cloudpickle", "psutil"]
X86_PLATFORM_ARGS = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform",
                     "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp"]
STRIPPED_LIBS = ["libtvm_compiler.so", "libtvm_runtime_cuda.so"]
X86_SITE_RECIPE = "1"


def cache_dir() -> Path:
    env = os.environ.get("MNV2_TVM_EMULATE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mnv2-tvm" / "emulate"


def header_path() -> Path:
    return cache_dir() / "include" / "qemu-plugin.h"


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def plugin_path() -> Path:
    """Where the plugin built from the current source lives (it may not exist yet)."""
    header = header_path()
    if not header.is_file():
        raise UserError(f"the QEMU plugin header is missing ({header}); run `{SETUP_COMMAND}`")
    return cache_dir() / f"libmnv2cost-{_digest(PLUGIN_SOURCE, header)}.so"


def ensure_plugin(quiet: bool = True) -> Path:
    """The plugin for the current source, compiled with gcc when it is not built yet."""
    out = plugin_path()
    if out.is_file():
        return out
    gcc = shutil.which("gcc")
    pkg_config = shutil.which("pkg-config")
    if gcc is None or pkg_config is None:
        raise UserError(f"gcc and pkg-config are needed to build the emulator plugin; run `{SETUP_COMMAND}`")
    glib = subprocess.run([pkg_config, "--cflags", "--libs", "glib-2.0"], capture_output=True, text=True)
    if glib.returncode != 0:
        raise UserError(f"glib-2.0 development files are missing; run `{SETUP_COMMAND}`")
    if not quiet:
        print(f"setup_emulator: building {out.name}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".libmnv2cost-", suffix=".so")
    os.close(fd)
    cmd = [gcc, "-O2", "-g", "-Wall", "-Wno-unused-parameter", "-shared", "-fPIC",
           "-I", str(header_path().parent), *glib.stdout.split(), str(PLUGIN_SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"building the emulator plugin failed: {last}")
    os.replace(tmp, out)
    # Older builds of the plugin are dead weight.
    for old in out.parent.glob("libmnv2cost-*.so"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def x86_site() -> Path:
    return cache_dir() / "x86_64-site"


def x86_site_ready() -> bool:
    try:
        stamp = json.loads((x86_site() / ".mnv2-tvm-site.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == X86_SITE_RECIPE


def ensure_x86_site(quiet: bool = True) -> Path:
    """Runtime-only TVM for the host's CPython 3.11, as the virtual board has for aarch64."""
    site = x86_site()
    if x86_site_ready():
        return site
    if not quiet:
        print(f"setup_emulator: runtime-only TVM site for x86-64 guests ({site})", file=sys.stderr)
    new = site.with_name(site.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--target", str(new), *X86_PLATFORM_ARGS, *X86_WHEELS],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(new, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"installing the x86-64 guest's TVM site failed: {last}")
    removed = 0
    for name in STRIPPED_LIBS:
        for p in new.rglob(name):
            p.unlink()
            removed += 1
    if removed == 0:
        raise UserError(f"none of {STRIPPED_LIBS} found in the TVM wheel: its layout changed")
    (new / ".mnv2-tvm-site.json").write_text(json.dumps({"recipe": X86_SITE_RECIPE, "wheels": X86_WHEELS}) + "\n")
    shutil.rmtree(site, ignore_errors=True)
    new.rename(site)
    return site


def main() -> int:
    try:
        ensure_plugin(quiet=False)
        ensure_x86_site(quiet=False)
    except UserError as e:
        print(f"setup_emulator: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
