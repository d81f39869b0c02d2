#!/usr/bin/env bash
# Installs everything mnv2-tvm needs on a Debian 12 machine into ./.venv (idempotent).
#   apt: a C++ compiler (TVM links libraries with it), venv support, the aarch64 and armv7 hard-float cross compilers.
#        PoCL (OpenCL on the CPU: `mnv2-tvm check-opencl` runs the GPU targets' kernels on it).
#   pip: the package with its pinned TVM/torch versions and the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_PACKAGES=(g++ python3-venv python3-dev g++-aarch64-linux-gnu g++-arm-linux-gnueabihf pocl-opencl-icd)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.mnv2-tvm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: pip install -e .[test] (torch, apache-tvm, onnxruntime, ...; a few minutes the first time)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import tvm, torch, mnv2_tvm" || { echo "setup: install failed" >&2; exit 1; }
    touch "$stamp"
fi
bash scripts/setup_emulator.sh  # emulated-core cost: qemu-user, the QEMU plugin header, our plugin (mnv2_tvm/emulate)
