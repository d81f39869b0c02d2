#!/usr/bin/env bash
# The main job on the embedded default: MobileNetV2 1.0/224 on this host, tuned (shipped
# schedules, or a short tuning run where none match this CPU) against untuned TVM,
# ONNX Runtime and PyTorch, then a compact MAdds-vs-latency comparison (`compare --grid quick`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
target=$(python -c "from mnv2_tvm.targets import host_target_name; print(host_target_name())")
records="schedules/$target/database_tuning_record.json"

mnv2-tvm madds mobilenet_v2
if [ -s "$records" ]; then
    echo "== using the shipped schedules in schedules/$target/"
else
    echo "== no shipped schedules for $target: tuning MobileNetV2 with 300 trials (about 12 minutes on 2 cores)"
    mnv2-tvm tune mobilenet_v2 --target host --trials 300
fi
mnv2-tvm compile mobilenet_v2 --target host -o build/mobilenet_v2-host
mnv2-tvm run build/mobilenet_v2-host --time
echo "== tuned vs untuned TVM vs ONNX Runtime vs PyTorch (interleaved rounds, one process)"
# Where this host's target has a blocked-layout variant with schedules (x86-64-avx2-nchw8c,
# x86-64-avx512-nchw8c: convolutions with the hand-written register-tiled schedules), time it beside.
alt=()
if [ -s "schedules/$target-nchw8c/database_tuning_record.json" ]; then
    alt=(--alt-target "targets/$target-nchw8c.toml")
fi
python scripts/bench_host.py --models mobilenet_v2 --threads "$(nproc)" --rounds 3 "${alt[@]}" --out reports/bench_host
echo "== MAdds vs measured latency on this host: compact grid (MobileNetV2 0.35 and 1.0 x 96, 160, 224; a few minutes)"
mnv2-tvm compare --target host --grid quick --repeat 5 -o reports/compare-quick
echo "== summary: reports/compare-quick/summary.md; plots: reports/compare-quick/latency_vs_madds.png," \
     "reports/compare-quick/predicted_vs_measured.png, reports/compare-quick/layer_share.png"
