#!/usr/bin/env bash
# The main job on the embedded default: MobileNetV2 1.0/224 on this host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
mnv2-tvm madds mobilenet_v2
mnv2-tvm compile mobilenet_v2 --target host -o build/mobilenet_v2-host
mnv2-tvm run build/mobilenet_v2-host --time
