"""OpenCL targets' kernels run on PoCL (pyopencl) and match the same ops built for the CPU.

Every kernel of the small MobileNetV2, SSDLite and DeepLab for both GPU targets; a corrupted
kernel and a cut-short launch are caught; the command's exit codes.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SMALL
from mnv2_tvm import bundle, opencl, targets
from mnv2_tvm.cli import main
from mnv2_tvm.models import ModelConfig

GPU_TARGETS = ("rk3399-mali", "adreno640")
SMALL_ARGS = ["--width", "0.35", "--resolution", "96"]


def _has_device() -> bool:
    try:
        opencl.open_device()
    except Exception:  # noqa: BLE001
        return False
    return True


needs_device = pytest.mark.skipif(not _has_device(), reason="no OpenCL device (apt-get install pocl-opencl-icd)")


@pytest.fixture(scope="module")
def device():
    return opencl.open_device()


@pytest.fixture(scope="module")
def programs():
    """Compiled OpenCL programs per (target, model), built on first use."""
    built = {}

    def get(target: str, model: str) -> opencl.Program:
        if (target, model) not in built:
            cfg = ModelConfig(**SMALL[model])
            built[target, model] = opencl.build_program(cfg, targets.load(target), records_dir=None)
        return built[target, model]

    return get


@pytest.fixture(scope="module")
def tiny(device):
    """A conv + bias + ReLU6 and a global pool from PyTorch, compiled for the Mali target: seconds."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from mnv2_tvm.compile import kernels_module
    from mnv2_tvm.tuning.tasks import prepare

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU6(),
                              torch.nn.AdaptiveAvgPool2d(1)).eval()
    with torch.no_grad():
        ep = torch.export.export(net, (torch.zeros(1, 8, 12, 12),))
    mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
    target = targets.load("rk3399-mali").tvm_target()
    with opencl.Capture() as cap:
        executable = opencl.build(kernels_module(prepare(mod, None), target), target)
    return cap.program(executable)


# --------------------------------------------------------------------------- fast


def test_split_kernels_cuts_as_the_runtime_does():
    source = ("#pragma header dropped by the runtime\n// Function: a_kernel\n__kernel void a_kernel();\n"
              "__kernel void b_kernel();\n__kernel void a_kernel() {}\n// Function: b_kernel\n"
              "__kernel void b_kernel() {}\n")
    parts = opencl.split_kernels(source)
    assert list(parts) == ["a_kernel", "b_kernel"]
    assert parts["a_kernel"].startswith("__kernel void a_kernel();") and "b_kernel() {}" not in parts["a_kernel"]
    assert parts["b_kernel"] == "__kernel void b_kernel() {}\n"


def test_error_is_relative_to_the_output_scale_and_nan_is_a_mismatch():
    ref = np.array([4.0, -2.0, 1.0], np.float32)
    assert opencl._error(ref, ref.copy()) == 0.0
    assert opencl._error(ref, ref + np.float32(4e-4)) == pytest.approx(1e-4, rel=1e-3)
    unwritten = ref.copy()
    unwritten[1] = np.nan  # outputs start as NaN: an element no kernel wrote
    assert opencl._error(ref, unwritten) == float("inf")
    assert opencl._error(np.zeros(3, np.float32), np.full(3, 1e-5, np.float32)) == pytest.approx(1e-5)


@needs_device
def test_tiny_module_kernels_match_and_a_short_launch_is_caught(tiny, device):
    result = opencl.check(tiny, device)
    assert result.ok and result.n_kernels == len(tiny.kernels) >= 2, result.table()
    assert all(r.local_size and np.prod(r.local_size) <= 256 for r in result.rows)  # the target's max_num_threads
    # Launch the first kernel over half its NDRange: half the outputs stay NaN.
    op = tiny.ops[0]
    launch = op.launches[0]
    half = (max(launch.global_size[0] // 2 // launch.local_size[0], 1) * launch.local_size[0],
            *launch.global_size[1:])
    cut = dataclasses.replace(op, launches=[dataclasses.replace(launch, global_size=half), *op.launches[1:]])
    bad = opencl.check(dataclasses.replace(tiny, ops=[cut]), device)
    assert not bad.ok and bad.rows[0].error == float("inf") and "outputs differ" in bad.rows[0].note


def test_missing_pyopencl_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyopencl", None)  # import fails
    assert main(["check-opencl", "mobilenet_v2", *SMALL_ARGS, "--target", "rk3399-mali"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install pyopencl" in err and "\n" not in err


def test_no_opencl_device_is_a_one_line_error_naming_the_package(tmp_path):
    """With no OpenCL platform (an empty ICD folder), exit 2 before compiling."""
    env = {**os.environ, "OCL_ICD_VENDORS": str(tmp_path)}
    env.pop("PYOPENCL_CTX", None)
    proc = subprocess.run([sys.executable, "-m", "mnv2_tvm.cli", "check-opencl", "mobilenet_v2", *SMALL_ARGS,
                           "--target", "adreno640"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "no OpenCL device" in proc.stderr and "apt-get install pocl-opencl-icd" in proc.stderr


@needs_device
def test_cpu_target_or_no_target_is_refused(capsys):
    assert main(["check-opencl", "mobilenet_v2", *SMALL_ARGS, "--target", "rpi4b"]) == 2
    assert "not OpenCL" in capsys.readouterr().err
    assert main(["check-opencl", "mobilenet_v2", *SMALL_ARGS]) == 2
    assert "--target rk3399-mali, adreno640" in capsys.readouterr().err


def test_adreno_compile_without_the_ndk_names_the_check(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    assert main(["compile", "mobilenet_v2", *SMALL_ARGS, "--target", "adreno640", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "install the NDK and set TVM_NDK_CC" in err and "check-opencl MODEL --target adreno640" in err
    assert "\n" not in err


# --------------------------------------------------------------------------- every kernel of the models


@needs_device
@pytest.mark.slow
@pytest.mark.parametrize("target", GPU_TARGETS)
@pytest.mark.parametrize("model", list(SMALL))
def test_every_kernel_matches_the_cpu(programs, device, target, model):
    program = programs(target, model)
    result = opencl.check(program, device, label=target)
    print(result.summary())
    assert not program.unlaunched
    assert result.n_kernels == len(program.kernels) > 10
    assert result.ok, result.table(failed_only=True)
    assert result.worst.error <= opencl.TOLERANCE
    assert min(r.scale for r in result.rows) > 0.01  # no op's reference is (near) zero: no vacuous match


@needs_device
@pytest.mark.slow
def test_a_corrupted_kernel_is_a_mismatch(programs, device):
    """Flip one bias add into a subtraction in one kernel's OpenCL source: that kernel fails."""
    program = programs("rk3399-mali", "mobilenet_v2")
    name = next(n for n, src in program.kernels.items() if "_local_ptr[0] + param_1_ptr[" in src)
    corrupted = program.kernels[name].replace("_local_ptr[0] + param_1_ptr[", "_local_ptr[0] - param_1_ptr[", 1)
    ops = [op for op in program.ops if any(launch.kernel == name for launch in op.launches)]
    assert len(ops) == 1
    result = opencl.check(dataclasses.replace(program, ops=ops), device, sources={name: corrupted})
    assert not result.ok
    (row,) = [r for r in result.rows if r.kernel == name]
    assert not row.ok and row.error > 100 * opencl.TOLERANCE


@needs_device
@pytest.mark.slow
def test_check_opencl_command_exit_codes(programs, monkeypatch, capsys):
    """0 when every kernel matches (JSON report), 1 when one does not (here: a tolerance below
    float32's rounding)."""
    program = programs("rk3399-mali", "mobilenet_v2")
    monkeypatch.setattr(opencl, "build_program", lambda *a, **k: program)
    args = ["check-opencl", "mobilenet_v2", *SMALL_ARGS, "--target", "rk3399-mali"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["kernels"] == len(program.kernels) and report["failed"] == 0
    assert all(row["global"] and row["local"] for row in report["rows"])
    assert main([*args, "--tolerance", "1e-12", "--summary"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and out.strip().splitlines()[-1].startswith(f"{len(program.kernels)} OpenCL kernels")


@needs_device
@pytest.mark.slow
@pytest.mark.skipif(not targets.load("rk3399-mali").cross_compiler
                    or not __import__("shutil").which(targets.load("rk3399-mali").cross_compiler),
                    reason="needs the aarch64 cross compiler")
def test_a_bundle_is_checked_against_the_kernels_it_embeds(tmp_path, capsys):
    out = tmp_path / "mali"
    assert main(["compile", "mobilenet_v2", *SMALL_ARGS, "--target", "rk3399-mali", "-o", str(out),
                 "--records", str(tmp_path / "none")]) == 0
    assert f"mnv2-tvm check-opencl {out}" in capsys.readouterr().out
    assert main(["check-opencl", str(out), "--summary"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    n = int(summary.split()[0])
    assert n > 10 and f": {n} match the CPU" in summary
    # A library whose embedded kernels differ from the rebuild is refused.
    m = bundle.load_manifest(out)
    lib = out / m["library"]
    data = lib.read_bytes()
    i = data.index(b"__kernel void")
    lib.write_bytes(data[:i] + b"__kernel  oid" + data[i + len(b"__kernel void"):])
    m["library_sha256"] = bundle.sha256(lib)
    (out / bundle.MANIFEST).write_text(json.dumps(m))
    assert main(["check-opencl", str(out)]) == 2
    assert "differ from a rebuild" in capsys.readouterr().err
