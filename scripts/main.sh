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
# The build to deploy here is the fastest one with shipped schedules (`mnv2-tvm targets` marks it +):
# the host target's NCHW8c variant where it has them. It is timed as "tuned", the host's NCHW build
# beside it. `compare` below stays on `host` (NCHW): the shipped grid records are NCHW ones.
build=$(python -c "from mnv2_tvm.targets import fastest_host_target_name; print(fastest_host_target_name())")
alt=()

mnv2-tvm madds mobilenet_v2
if [ "$build" != "$target" ]; then
    echo "== using the shipped schedules in schedules/$build/ (the NCHW build of schedules/$target/ is timed beside)"
    alt=(--alt-target "$target")
elif [ -s "$records" ]; then
    echo "== using the shipped schedules in schedules/$target/"
else
    echo "== no shipped schedules for $target: tuning MobileNetV2 with 300 trials (about 12 minutes on 2 cores)"
    mnv2-tvm tune mobilenet_v2 --target host --trials 300
fi
mnv2-tvm compile mobilenet_v2 --target "$build" -o "build/mobilenet_v2-$build"
mnv2-tvm run "build/mobilenet_v2-$build" --time
echo "== tuned ($build) vs untuned TVM vs ONNX Runtime vs PyTorch (interleaved rounds, one process)"
python scripts/bench_host.py --models mobilenet_v2 --threads "$(nproc)" --rounds 3 --target "$build" "${alt[@]}" \
    --out reports/bench_host
echo "== MAdds vs measured latency on this host: compact grid (MobileNetV2 0.35 and 1.0 x 96, 160, 224; a few minutes)"
mnv2-tvm compare --target host --grid quick --repeat 5 -o reports/compare-quick
echo "== summary: reports/compare-quick/summary.md; plots: reports/compare-quick/latency_vs_madds.png," \
     "reports/compare-quick/predicted_vs_measured.png, reports/compare-quick/layer_share.png"
