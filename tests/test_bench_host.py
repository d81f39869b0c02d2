"""scripts/bench_host.py's peak-RSS measurement: one fresh process per engine, loading only that
engine from an artefact already built (a tiny MobileNetV2 here)."""

from __future__ import annotations

import importlib.util
import resource
from pathlib import Path

import pytest
from conftest import SMALL
from mnv2_tvm import targets

pytestmark = pytest.mark.slow  # the virtual board, tuning or a benchmark: minutes, not seconds

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_host.py"


def _script(name: str = "bench_host"):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
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


def test_ort_profile_maps_onto_every_layer_of_each_model(tmp_path):
    """profile_vs_ort.py reads ONNX Runtime's own profile: every conv and linear layer of the
    three models gets one ORT node with the layer's output shape and MAdds (its blocked NCHWc
    kernels included), the warm-up run is left out, and times are positive."""
    import onnxruntime as ort

    from mnv2_tvm.compare import map_kernels, same_module
    from mnv2_tvm.lower import export_onnx
    from mnv2_tvm.madds import count
    from mnv2_tvm.models import ModelConfig, build, example_input

    pvo = _script("profile_vs_ort")
    for model in ("mobilenet_v2", "ssdlite", "deeplabv3"):
        cfg = ModelConfig(**SMALL[model])
        onnx_path = export_onnx(build(cfg), cfg, tmp_path / f"{model}.onnx")
        so = ort.SessionOptions()
        so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / model)
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, {"input": example_input(cfg)})
        kernels = pvo.ort_kernels(sess.end_profiling(), skip_runs=1)
        layers = count(cfg).layers
        mapped = map_kernels(kernels, layers)
        assert mapped.complete, (model, mapped.unmatched_layers[:3], mapped.unmatched_kernels[:3])
        rows = [r for r in mapped.rows if r.kind != "other"]
        assert len(rows) == len(layers) and all(r.ms > 0 for r in rows)
        by_name = {lc.name: lc for lc in layers}
        # Each ORT node names its PyTorch module (or the ReLU6 fused into it): the layer it was mapped to.
        assert all(same_module(r.layer, next(k.layer for k in kernels if k.name == r.kernel)) for r in rows), model
        # ORT's NCHWc convs pad channels to its block (8 with AVX2, 16 with AVX-512): SSDLite's heads
        # (12, 243, 486 channels) and DeepLab's 21-class classifier, and with 16 also the 24-channel
        # layers' inputs and outputs. A padded layer reports the padded shape and MAdds.
        block = 16 if "avx512f" in targets._host_flags() else 8
        padded = [r for r in rows if _shape(kernels, r.kernel) != tuple(by_name[r.layer].output_shape)
                  or _madds(kernels, r.kernel) != by_name[r.layer].madds]
        for r in padded:
            channels, layer = _shape(kernels, r.kernel)[1], by_name[r.layer]
            assert channels % block == 0 or channels == layer.output_shape[1], (model, r.layer, channels)
            assert layer.madds < _madds(kernels, r.kernel) < 2.5 * layer.madds, (model, r.layer)
        assert len(padded) < len(rows) // 2, model
        if block == 8:
            assert (len(padded) > 0) == (model != "mobilenet_v2"), model


def _madds(kernels, name):
    return next(k.madds for k in kernels if k.name == name)


def _shape(kernels, name):
    return tuple(next(k.output_shape for k in kernels if k.name == name))
