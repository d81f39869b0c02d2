"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL

CLI = [sys.executable, "-m", "mnv2_tvm.cli"]


def mnv2(*args, cwd=None, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("mnv2-tvm: error:") and needle in lines[0], lines[0]


def test_madds_json_reports_the_paper_figure():
    proc = mnv2("madds", "mobilenet_v2", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["model"] == "mobilenet_v2" and d["width"] == 1.0 and d["resolution"] == 224
    assert 297e6 < d["madds"] < 303e6 and isinstance(d["params"], int)


def test_madds_per_layer_table():
    proc = mnv2("madds", "deeplabv3", "--per-layer")
    assert proc.returncode == 0
    assert "depthwise" in proc.stdout and "2,740.7M MAdds" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["madds", "resnet"], "unknown model 'resnet'"),
    (["madds", "mobilenet_v2", "--width", "0"], "width 0 is invalid"),
    (["madds", "mobilenet_v2", "--width", "5"], "width 5 is invalid"),
    (["madds", "mobilenet_v2", "--resolution", "100"], "resolution 100 is invalid"),
    (["madds", "mobilenet_v2", "--resolution", "16"], "at least 32"),
    (["compile", "mobilenet_v2", "--target", "nosuchboard"], "unknown target 'nosuchboard'"),
    (["run", "/nonexistent/bundle"], "does not exist"),
    (["tune", "mobilenet_v2", "--trials", "0"], "--trials must be positive"),
])
def test_bad_input_gives_one_line_and_exit_2(args, needle):
    assert_one_line_error(mnv2(*args), needle)


def test_broken_target_file_names_file_and_field(tmp_path):
    bad = tmp_path / "myboard.toml"
    bad.write_text('name = "x"\ntarget = "raspberry-pi/4b-aarch64"\narch = "aarch64"\n[device]\ncores = "four"\n')
    proc = mnv2("compile", "mobilenet_v2", "--target", bad)
    assert_one_line_error(proc, "myboard.toml: field 'device.cores' has the wrong type")
    bad.write_text('name = "x"\ntarget = "raspberry-pi/4b-aarch64"\narch = "aarch64"\n[build]\nlayout = "NHWC"\n'
                   '[device]\ncores = 4\nclock_ghz = 1.5\n')
    proc = mnv2("compile", "mobilenet_v2", "--target", bad)
    assert_one_line_error(proc, "myboard.toml: field 'build.layout' must be one of NCHW, NCHW4c, NCHW8c")


def _cpuinfo(vendor: str, family: int, model: int, flags: str) -> str:
    one = f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nflags\t\t: {flags}\n"
    # A second processor that differs: only the first one is read.
    return one.format(0) + "\n" + one.format(1).replace(flags, "fpu")


@pytest.mark.parametrize("vendor,family,model,flags,expected", [
    ("AuthenticAMD", 23, 1, "sse avx fma avx2", 16),       # Zen 1 (EPYC 7001): 128-bit pipes
    ("AuthenticAMD", 23, 49, "sse avx fma avx2", 32),      # Zen 2
    ("AuthenticAMD", 25, 17, "avx fma avx2 avx512f", 32),  # Zen 4: AVX-512 on 256-bit pipes
    ("GenuineIntel", 6, 106, "avx fma avx2 avx512f", 64),  # Ice Lake server
    ("GenuineIntel", 6, 63, "avx fma avx2", 32),           # Haswell
])
def test_host_peak_counts_the_fma_pipes_not_just_the_isa(vendor, family, model, flags, expected):
    from mnv2_tvm.targets import flops_per_cycle

    per_cycle, why = flops_per_cycle(_cpuinfo(vendor, family, model, flags))
    assert per_cycle == expected and why


@pytest.mark.slow
def test_the_fastest_host_build_is_the_blocked_variant_only_where_its_schedules_are_shipped(tmp_path, monkeypatch):
    from mnv2_tvm import targets

    host = targets.host_target_name()
    blocked = f"{host}-nchw8c"
    # Both x86 host kinds ship NCHW8c schedules; `targets` marks that build beside the host's own.
    assert targets.fastest_host_target_name() == blocked
    listing = mnv2("targets").stdout.splitlines()
    assert any(line.startswith(f"* {host} ") for line in listing)
    assert any(line.startswith(f"+ {blocked} ") for line in listing)
    assert f"`--target {blocked}`" in listing[-1]
    # Compiling for `host` (the default) names the faster build.
    proc = mnv2("compile", "mobilenet_v2", "--width", "0.35", "--resolution", "32", "-o", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert f"note: the fastest build with shipped schedules on this host is `--target {blocked}`" in proc.stdout

    monkeypatch.setattr(targets, "SCHEDULES_DIR", tmp_path)
    assert targets.fastest_host_target_name() == host  # no folder
    (tmp_path / blocked).mkdir()
    records = tmp_path / blocked / targets.RECORD_FILE
    records.write_text("")
    assert targets.fastest_host_target_name() == host  # an empty database is no schedules
    records.write_text((targets.REPO_ROOT / "schedules" / blocked / targets.RECORD_FILE).read_text())
    assert targets.fastest_host_target_name() == blocked


def test_android_without_ndk_says_what_to_install(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TVM_NDK_CC"}
    proc = subprocess.run([*CLI, "compile", "mobilenet_v2", "--target", "pixel2", "-o", tmp_path / "b"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(proc, "TVM_NDK_CC")


def test_wrong_weights_file(tmp_path):
    import torch

    torch.save({"foo": torch.zeros(3)}, tmp_path / "w.pth")
    proc = mnv2("export", "mobilenet_v2", "--weights", tmp_path / "w.pth", "-o", tmp_path / "m.onnx")
    assert_one_line_error(proc, "does not fit this model")
    assert not (tmp_path / "m.onnx").exists()


def test_export_writes_an_onnx_file_that_onnxruntime_runs(tmp_path):
    import onnxruntime as ort

    proc = mnv2("export", "mobilenet_v2", "--width", "0.35", "--resolution", "96", "-o", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (out,) = sess.run(None, {"input": np.zeros((1, 3, 96, 96), np.float32)})
    assert out.shape == (1, 1000)


@pytest.mark.slow
def test_run_with_an_image_and_saved_outputs(host_bundles, tmp_path):
    from PIL import Image

    img = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(img)
    proc = mnv2("run", host_bundles("mobilenet_v2"), "--input", img, "--time")
    assert proc.returncode == 0, proc.stderr
    assert "1. class" in proc.stdout and "latency" in proc.stdout
    proc = mnv2("run", host_bundles("deeplabv3"), "--input", img, "--save", tmp_path / "mask.png")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "mask.png") as mask:
        assert mask.size == (SMALL["deeplabv3"]["resolution"],) * 2 and mask.mode == "P"
    proc = mnv2("run", host_bundles("ssdlite"), "--save", tmp_path / "boxes.png")
    assert proc.returncode == 0 and "detections" in proc.stdout
    assert "final outputs match PyTorch's" in proc.stdout and "post-processing" in proc.stdout
    assert (tmp_path / "boxes.png").stat().st_size > 0


@pytest.mark.parametrize("model", list(SMALL))
def test_run_gives_final_outputs_that_match_pytorchs(model, host_bundles):
    """On the reference input: detections inside the image (there are some), a full mask, top-5."""
    from mnv2_tvm.run import run_bundle

    result = run_bundle(host_bundles(model))
    assert result["agreement"]["ok"], result["agreement"]
    res = SMALL[model]["resolution"]
    if model == "ssdlite":
        dets = result["detections"]
        assert 0 < len(dets) <= 100
        assert all(0 <= v <= res for d in dets for v in d["box"])
        assert all(d["box"][0] < d["box"][2] and d["box"][1] < d["box"][3] for d in dets)
        assert all(d["class"] >= 1 and d["score"] > 0.3 for d in dets)
    elif model == "deeplabv3":
        assert result["mask_shape"] == [res, res] and abs(sum(result["classes"].values()) - 1) < 1e-9
    else:
        assert len(result["top"]) == 5 and result["top"][0]["p"] >= result["top"][-1]["p"]


def test_run_refuses_unreadable_image(host_bundles, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line_error(mnv2("run", host_bundles("mobilenet_v2"), "--input", junk), "cannot be read as an image")


def test_run_refuses_a_library_for_another_architecture(host_bundles, tmp_path):
    import shutil

    from mnv2_tvm import bundle

    b = tmp_path / "b"
    shutil.copytree(host_bundles("mobilenet_v2"), b)
    m = json.loads((b / "manifest.json").read_text())
    lib = bytearray((b / "model.so").read_bytes())
    lib[18:20] = (0xB7).to_bytes(2, "little")  # claim aarch64
    (b / "model.so").write_bytes(bytes(lib))
    m["library_sha256"] = bundle.sha256(b / "model.so")
    (b / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(mnv2("run", b), "built for aarch64, not x86_64")


def test_sigterm_while_tuning_stops_like_a_first_ctrl_c():
    """A KeyboardInterrupt raised inside TVM's callbacks comes back as a bare RuntimeError (a
    traceback, not a report): SIGTERM during a run only asks it to stop at its next safe point."""
    import os
    import signal

    from mnv2_tvm.cli import _sigterm_as_interrupt
    from mnv2_tvm.tuning.interrupt import Sigint

    old = signal.getsignal(signal.SIGTERM)
    try:
        _sigterm_as_interrupt()
        with Sigint() as run:
            os.kill(os.getpid(), signal.SIGTERM)
            assert run.hit and run.reason is None  # stopping, nothing raised
            with pytest.raises(KeyboardInterrupt):
                Sigint.check()  # the safe point
        with pytest.raises(KeyboardInterrupt):  # outside a run: unwinds at once
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
    finally:
        signal.signal(signal.SIGTERM, old)
