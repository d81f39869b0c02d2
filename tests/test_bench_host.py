"""scripts/bench_host.py's peak-RSS measurement: one fresh process per engine, loading only that
engine from an artefact already built (a tiny MobileNetV2 here)."""

from __future__ import annotations

import importlib.util
import resource
from pathlib import Path

from conftest import SMALL

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_host.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_host", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_rss_is_measured_per_engine_in_a_process_that_loads_only_that_engine(host_bundles, tmp_path):
    from mnv2_tvm.lower import export_onnx
    from mnv2_tvm.models import ModelConfig, build

    bench_host = _script()
    cfg = ModelConfig(**SMALL["mobilenet_v2"])
    work = tmp_path / cfg.label
    work.mkdir()
    (work / "untuned").symlink_to(host_bundles("mobilenet_v2"))
    export_onnx(build(cfg), cfg, work / "model.onnx")

    own_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, TVM and a compile
    rss = bench_host.peak_rss(["tvm_untuned", "onnxruntime", "pytorch"], work, cfg, threads=1)
    assert set(rss) == {"tvm_untuned", "onnxruntime", "pytorch"}
    for name, r in rss.items():
        assert 0 < r["after_imports_mb"] <= r["peak_rss_mb"] < 4096, (name, r)
        assert r["runs"] == bench_host.RSS_RUNS and r["threads"] == 1
    # Each process holds its own engine and not the others' (no compiler, no torch beside TVM).
    assert rss["tvm_untuned"]["modules"] == ["tvm"]
    assert rss["onnxruntime"]["modules"] == ["onnxruntime"]
    assert rss["pytorch"]["modules"] == ["torch"]
    # The children's own peaks, not this (larger) process's high-water mark carried across exec.
    assert rss["onnxruntime"]["peak_rss_mb"] < 0.8 * own_peak_mb
    assert len({round(r["peak_rss_mb"]) for r in rss.values()}) == 3
