"""Lowering and host compile: parity with PyTorch for every model through both frontends."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import SMALL
from mnv2_tvm import bundle, targets
from mnv2_tvm.bundle import BundleError, Runner
from mnv2_tvm.compile import compile_bundle
from mnv2_tvm.models import ModelConfig

TOLERANCE = 1e-4


@pytest.mark.parametrize("model", list(SMALL))
def test_torch_frontend_bundle_matches_pytorch(model, host_bundles):
    path = host_bundles(model)
    x, expected = bundle.reference(path)
    assert np.abs(expected).max() > 0.05  # a vanishing reference would make parity vacuous
    out = Runner(path).run(x)
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= TOLERANCE


def test_deeplab_at_output_stride_8_matches_pytorch(tmp_path):
    cfg = ModelConfig(**{**SMALL["deeplabv3"], "output_stride": 8})
    compile_bundle(cfg, targets.load("host"), tmp_path, records_dir=tmp_path / "none", seed=2)
    x, expected = bundle.reference(tmp_path)
    assert np.abs(expected).max() > 0.05
    assert np.abs(Runner(tmp_path).run(x) - expected).max() <= TOLERANCE
    assert bundle.load_manifest(tmp_path)["config"]["output_stride"] == 8


def test_armv7_bundle_is_a_hard_float_arm_elf(tmp_path):
    """The 32-bit Pi 3 target links with arm-linux-gnueabihf-g++: a 32-bit ARM ELF, EABI 5, hard-float ABI."""
    import struct

    compile_bundle(ModelConfig(**SMALL["mobilenet_v2"]), targets.load("rpi3b"), tmp_path,
                   records_dir=tmp_path / "none")
    m = bundle.load_manifest(tmp_path)
    head = (tmp_path / m["library"]).read_bytes()[:52]
    assert head[:4] == b"\x7fELF" and head[4] == 1 and head[5] == 1  # 32-bit, little-endian
    e_machine, = struct.unpack_from("<H", head, 18)
    e_flags, = struct.unpack_from("<I", head, 36)
    assert e_machine == 40  # EM_ARM
    assert e_flags & 0xFF000000 == 0x05000000  # EABI version 5
    assert e_flags & 0x400  # EF_ARM_ABI_FLOAT_HARD
    assert m["arch"] == "arm"


@pytest.mark.slow
@pytest.mark.parametrize("model", list(SMALL))
def test_onnx_frontend_bundle_matches_pytorch(model, tmp_path):
    cfg = ModelConfig(**SMALL[model])
    compile_bundle(cfg, targets.load("host"), tmp_path, frontend="onnx", records_dir=tmp_path / "none", seed=3)
    x, expected = bundle.reference(tmp_path)
    assert np.abs(Runner(tmp_path).run(x) - expected).max() <= TOLERANCE
    assert json.loads((tmp_path / "manifest.json").read_text())["frontend"] == "onnx"


@pytest.mark.slow
@pytest.mark.parametrize("model", list(SMALL))
def test_the_layout_the_host_does_not_use_matches_pytorch_too(model, tmp_path):
    # The host target picks one activation layout; the other one must hold parity as well
    # (boards and the other x86 target use it).
    host = targets.load("host")
    other = dataclasses.replace(host, layout="NCHW" if host.layout != "NCHW" else "NCHW8c")
    compile_bundle(ModelConfig(**SMALL[model]), other, tmp_path, records_dir=tmp_path / "none", seed=5)
    x, expected = bundle.reference(tmp_path)
    assert np.abs(Runner(tmp_path).run(x) - expected).max() <= TOLERANCE
    assert json.loads((tmp_path / "manifest.json").read_text())["layout"] == other.layout


# CPU flags an x86-64 micro-architecture level needs (what the shipped targets name as mcpu).
_LEVEL_FLAGS = {"x86-64-v3": {"avx2", "fma"}, "x86-64-v4": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}}


def _shipped_here() -> list[str]:
    """The targets with committed schedules whose code this host can run."""
    out = []
    for name in targets.available():
        spec = targets.load(name)
        mcpu = str(spec.tvm_target().attrs.get("mcpu", ""))
        if (targets.records_dir(spec) / targets.RECORD_FILE).is_file() and mcpu in _LEVEL_FLAGS \
                and spec.arch == "x86_64" and _LEVEL_FLAGS[mcpu] <= targets._host_flags():
            out.append(name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", _shipped_here())
def test_shipped_schedules_compile_mobilenet_v2_with_parity(name, tmp_path):
    """The committed records (MetaSchedule's and the hand-written ones) build MobileNetV2 1.0/224
    with every task tuned, and the tuned kernels compute what PyTorch does."""
    spec = targets.load(name)
    result = compile_bundle(ModelConfig("mobilenet_v2"), spec, tmp_path, records_dir=targets.records_dir(spec))
    assert result.manifest["tuning"]["fallback"] == [], result.manifest["tuning"]["fallback"]
    x, expected = bundle.reference(tmp_path)
    assert np.abs(Runner(tmp_path).run(x) - expected).max() <= TOLERANCE


def test_blocked_layout_stays_blocked_from_the_stem_to_the_pooling():
    import re

    import tvm

    from mnv2_tvm.lower import to_relax
    from mnv2_tvm.models import build
    from mnv2_tvm.tuning.tasks import fuse, prepare

    cfg = ModelConfig(**SMALL["mobilenet_v2"])
    fused = fuse(prepare(to_relax(build(cfg), cfg, layout="NCHW8c"), None), tvm.target.Target("llvm"))
    main = fused["main"].script()
    calls = re.findall(r"call_tir\((\w+),", main)
    # The 3-channel stem reads NCHW and writes blocks itself (with its bias and ReLU6), so the
    # only transform left is out of blocks before the global pooling; weights and biases were
    # repacked at compile time (no transform left on them).
    transforms = [i for i, c in enumerate(calls) if c.startswith("te_layout_transform")]
    assert len(transforms) == 1 and transforms[0] >= len(calls) - 3, calls
    convs = [ln for ln in main.splitlines() if re.search(r"call_tir\(\w*conv2d", ln)]
    assert len(convs) == 52
    assert all(", 8), dtype=" in ln for ln in convs)  # every conv writes blocks, the stem too
    assert "(x," in convs[0]  # the stem reads the NCHW input directly


def test_manifest_describes_the_bundle(host_bundles):
    path = host_bundles("deeplabv3")
    m = json.loads((path / "manifest.json").read_text())
    assert m["model"] == "deeplabv3" and m["config"]["resolution"] == 129
    assert m["input"] == {"name": "input", "shape": [1, 3, 129, 129], "dtype": "float32"}
    assert m["outputs"][0]["shape"] == [1, 21, 129, 129]
    assert m["arch"] == "x86_64" == bundle.elf_arch(path / m["library"])
    assert m["tvm_version"].startswith("0.27") and m["madds"] > 0 and m["params"] > 0
    assert m["tuning"]["tuned"] == [] and m["tuning"]["fallback"]
    # The target's facts bench and compare read, so they never reload the target file.
    spec = targets.load("host")
    assert m["format_version"] == bundle.FORMAT_VERSION and m["rpc_key"] == spec.rpc_key
    assert m["device"]["cores"] == spec.cores and m["device"]["peak_gflops"] == spec.peak_gflops
    # The kernel table: every call main makes, each kernel reachable by that name in both libraries.
    lib, table = bundle.verify_kernels(path, m)
    calls, _ = _fused_calls("deeplabv3", m["layout"], spec.tvm_target())
    assert sum(k["calls"] for k in table) == len(calls)
    assert sorted(p for k in table for p in k["at"]) == list(range(len(calls)))
    assert all(calls[p] == k["name"] for k in table for p in k["at"])
    assert all(len(k["args"]) == len(k["dtypes"]) >= 2 and set(k["dtypes"]) == {"float32"} for k in table)
    assert table[0]["args"][0] == m["input"]["shape"]  # the stem reads the input
    import tvm

    alone, model = tvm.runtime.load_module(str(lib)), tvm.runtime.load_module(str(path / m["library"]))
    assert all(alone.implements_function(k["name"]) and model.implements_function(k["name"], True) for k in table)


def test_runner_script_runs_alone_with_the_runtime(host_bundles, tmp_path):
    # The copy inside the bundle must work without the package: run it from another folder.
    path = host_bundles("ssdlite")
    x, expected = bundle.reference(path)
    np.save(tmp_path / "in.npy", x)
    proc = subprocess.run([sys.executable, str(path / "runner.py"), str(path), "--input", str(tmp_path / "in.npy"),
                           "--output", str(tmp_path / "out.npy"), "--check"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["max_abs_error"] <= TOLERANCE
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= TOLERANCE
    # The detections themselves, after NMS, from the copy of postprocess.py in the bundle.
    dets = result["final"]["detections"]
    assert dets and result["final_agreement"]["ok"] and result["postprocess_ms"] > 0
    assert all(0 <= v <= SMALL["ssdlite"]["resolution"] for d in dets for v in d["box"])


def test_wrong_input_shape_is_refused(host_bundles):
    with pytest.raises(BundleError, match=r"shape \(1, 3, 64, 64\), the bundle expects \(1, 3, 96, 96\)"):
        Runner(host_bundles("mobilenet_v2")).run(np.zeros((1, 3, 64, 64), np.float32))


def test_damaged_bundles_are_refused(host_bundles, tmp_path):
    import shutil

    src = host_bundles("mobilenet_v2")
    broken = tmp_path / "b"
    shutil.copytree(src, broken)
    lib = broken / "model.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    with pytest.raises(BundleError, match="does not match the digest"):
        Runner(broken)
    shutil.copy(src / "model.so", lib)
    for name in ("runner.py", "postprocess.py", "reference.npz"):  # every file is checked, not only the library
        (broken / name).write_bytes((src / name).read_bytes() + b"\n")
        with pytest.raises(BundleError, match=f"{name} does not match the digest"):
            Runner(broken)
        shutil.copy(src / name, broken / name)
    Runner(broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    # The kernel library is checked where it is used (a per-kernel profile); running needs none.
    (broken / "kernels.so").write_bytes((src / "kernels.so").read_bytes()[:1000])
    with pytest.raises(BundleError, match="kernels.so does not match the digest"):
        bundle.verify_kernels(broken, manifest)
    Runner(broken)
    for bad in ("../model.so", "/etc/passwd", ".."):
        (broken / "manifest.json").write_text(json.dumps({**manifest, "library": bad}))
        with pytest.raises(BundleError, match="only plain file names"):
            Runner(broken)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], "../x": "0"}}))
    with pytest.raises(BundleError, match="only plain file names"):
        Runner(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Runner(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Runner(broken)


def test_bundles_of_other_formats(host_bundles, tmp_path, capsys):
    """A format-2 bundle (before kernel tables) still runs and benchmarks; a profile of it is one
    line saying to recompile, before any board is reached. A newer format says so."""
    import shutil

    from mnv2_tvm.bench import BenchSettings, bench_modelled
    from mnv2_tvm.cli import main
    from mnv2_tvm.errors import UserError

    old = tmp_path / "old"
    shutil.copytree(host_bundles("mobilenet_v2"), old)
    manifest = json.loads((old / "manifest.json").read_text())
    v2 = {k: v for k, v in manifest.items() if k not in ("kernels", "device", "rpc_key")}
    (old / "manifest.json").write_text(json.dumps({**v2, "format_version": 2}))
    x, expected = bundle.reference(old)
    assert np.abs(Runner(old).run(x) - expected).max() <= TOLERANCE
    capsys.readouterr()
    assert main(["bench", str(old), "--rpc", "127.0.0.1:9", "--profile"]) == 2  # port 9: nothing may connect
    err = capsys.readouterr().err.strip()
    assert "was compiled before bundles carried their kernel table (format 2): recompile it to profile" in err
    assert "\n" not in err and "Traceback" not in err
    with pytest.raises(UserError, match="recompile it to profile"):
        bench_modelled(old, BenchSettings(profile=True))  # before any emulator starts
    (old / "manifest.json").write_text(json.dumps({**v2, "format_version": 3}))
    with pytest.raises(BundleError, match="lacks fields kernels, device, rpc_key; recompile"):
        Runner(old)
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": bundle.FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match="newer than this runner reads .*runner.py inside the bundle"):
        Runner(old)
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(BundleError, match="older than this runner reads .*; recompile the bundle"):
        Runner(old)


def _fused_calls(model: str, layout: str = "NCHW8c", target=None) -> tuple[list[str], list[str]]:
    """The kernels ``main`` calls, in order, and its conv calls, for the small config (NCHW8c and
    plain llvm by default)."""
    import re

    import tvm

    from mnv2_tvm.lower import to_relax
    from mnv2_tvm.models import build
    from mnv2_tvm.tuning.tasks import fuse, prepare

    cfg = ModelConfig(**SMALL[model])
    target = target or tvm.target.Target("llvm")
    main = fuse(prepare(to_relax(build(cfg), cfg, layout=layout), None), target)["main"].script()
    calls = re.findall(r"call_tir\((\w+),", main)
    return calls, [ln for ln in main.splitlines() if re.search(r"call_tir\(\w*conv2d", ln)]


def test_detection_heads_write_blocks_and_the_output_is_several_plain_kernels():
    """SSDLite's class heads (81 classes × 3 or 6 anchors: no multiple of 8) compute padded
    blocks, sliced after, rather than reading NCHW through a transform; its output (six heads
    gathered, decoded, gathered again) is split at the gathers, not one kernel of selects."""
    calls, convs = _fused_calls("ssdlite")
    assert convs and all(", 8), dtype=" in ln for ln in convs), [ln for ln in convs if ", 8), dtype=" not in ln]
    gathers = [c for c in calls if "concatenate" in c]
    # boxes of six heads, scores of six heads, four box coordinates: kernels of their own
    assert sum(c.startswith("concatenate") for c in gathers) == 3, gathers
    assert not [c for c in calls if "concatenate" in c and "transpose" in c], calls


def test_a_two_way_gather_still_fuses():
    """DeepLab's ASPP joins two branches: that concatenation is left to fusion as before, and
    its 21-class classifier is padded to blocks like the detection heads."""
    calls, convs = _fused_calls("deeplabv3")
    assert not [c for c in calls if c.startswith("concatenate")], calls
    assert all(", 8), dtype=" in ln for ln in convs)


@pytest.mark.parametrize("mode", ["align_corners", "half_pixel", "asymmetric"])
def test_separable_resize_computes_what_topi_resize_does(mode):
    """Bilinear resize lowered as two passes (``legalize_resize2d``) gives TOPI's results, up-
    and downsampling, and its row pass stays a kernel of its own (fused into the column pass it
    would be inlined back into four-pixel interpolation)."""
    import re

    import tvm
    from tvm import relax

    from mnv2_tvm.lower import legalize_resize2d
    from mnv2_tvm.tuning.tasks import fuse

    rng = np.random.default_rng(0)
    for size_in, size_out in (((5, 7), (33, 21)), ((33, 33), (9, 14))):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 3, *size_in), "float32"))
        with bb.function("main", [x]):
            y = bb.emit(relax.op.image.resize2d(x, size_out, method="linear", coordinate_transformation_mode=mode))
            bb.emit_func_output(y)
        mod = bb.get()
        data = rng.standard_normal((1, 3, *size_in)).astype("float32")
        outs = []
        for legalize in ({}, {"relax.image.resize2d": legalize_resize2d}):
            lowered = relax.transform.LegalizeOps(legalize)(mod)
            vm = relax.VirtualMachine(tvm.compile(lowered, target="llvm"), tvm.cpu())
            outs.append(vm["main"](tvm.runtime.tensor(data)).numpy())
        assert outs[1].shape == (1, 3, *size_out)
        assert np.abs(outs[0] - outs[1]).max() <= 1e-6
    calls = re.findall(r"call_tir\((\w+),", fuse(mod, tvm.target.Target("llvm"))["main"].script())
    assert [c.rstrip("0123456789") for c in calls] == ["resize_rows", "resize_columns"], calls
