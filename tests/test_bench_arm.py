"""scripts/bench_arm.py: TVM, ONNX Runtime and ncnn side by side on the emulated core.

The slow tests run the quick MobileNetV2 configuration on the real emulator (qemu-aarch64 with the
mnv2cost plugin on the virtual board's userland; the peers' aarch64 wheels from the registry):
about three minutes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnv2_tvm.emulate import peers
from mnv2_tvm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_arm.py"
ENGINES = ("tvm_tuned", "tvm_untuned", "onnxruntime", "ncnn")


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=REPO)


def load_script():
    spec = importlib.util.spec_from_file_location("bench_arm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- bad input (no emulator)


@pytest.mark.parametrize("args, words", [
    (["--models", "mobilenet_v2,resnet50"], ["'resnet50'", "mobilenet_v2, ssdlite, deeplabv3"]),
    (["--models", ","], ["empty"]),
    (["--models", "ssdlite,ssdlite"], ["twice"]),
    (["--threads", "4"], ["TVMBackendParallelLaunch", "tvm_tuned_x4"]),
    (["--width", "wide"], ["--width"]),
    (["--width", "9", "--models", "mobilenet_v2"], ["width 9"]),
    (["--resolution", "100", "--models", "mobilenet_v2"], ["resolution 100"]),
    (["--target", "x86-64-avx2"], ["aarch64"]),
])
def test_bad_arguments_are_one_line_and_exit_2(args, words):
    proc = run_script(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_arm: "), proc.stderr
    assert proc.stdout == ""
    for w in words:
        assert w in lines[0]


def test_cpuinfo_shows_the_boards_cores():
    text = peers.cpuinfo_text("cortex-a72", 4)
    assert text.count("CPU part\t: 0xd08") == 4 and "processor\t: 3" in text
    assert "asimddp" in peers.cpuinfo_text("cortex-a76", 4)
    with pytest.raises(UserError, match="aarch64 Cortex"):
        peers.cpuinfo_text("max", 1)


def test_an_unreachable_registry_is_one_line_naming_the_setup():
    stderr = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError('<...>: Failed to "
              "establish a new connection: [Errno 111] Connection refused')': /simple/ncnn/\n"
              "ERROR: Could not find a version that satisfies the requirement ncnn==1.0\n"
              "ERROR: No matching distribution found for ncnn==1.0\n")
    e = peers._pip_error("ncnn==1.0", stderr)
    assert isinstance(e, peers.RegistryUnreachable)
    assert "\n" not in str(e) and "unreachable" in str(e) and "Connection refused" in str(e)
    assert "setup_emulator.sh" in str(e)
    other = peers._pip_error("ncnn==1.0", "ERROR: No matching distribution found for ncnn==1.0\n")
    assert not isinstance(other, peers.RegistryUnreachable) and "no wheel" in str(other)


def test_peers_refuse_more_than_one_thread():
    with pytest.raises(UserError, match="TVMBackendParallelLaunch"):
        peers.measure_peer("rpi4b", peers.PeerModel("onnxruntime", Path("m.onnx")), (1, 3, 96, 96), threads=4)


def test_ratios_outputs_and_the_docs_table():
    m = load_script()
    row = {"tvm_tuned": {"ms": 2.0, "cycles": 3e6, "figure": "modelled", "output_sum": 1.0, "tasks_tuned": "3/3"},
           "tvm_untuned": {"ms": 5.0, "cycles": 7.5e6, "figure": "modelled", "output_sum": 1.0004},
           "onnxruntime": {"ms": 4.0, "cycles": 6e6, "figure": "modelled", "output_sum": 0.9999},
           "ncnn": {"error": "pnnx could not convert it"},
           "tvm_tuned_x4": {"ms": 0.8, "cycles": 1.2e6, "figure": "modelled", "threads": 4},
           "published": {"XNNPACK": {"ms": 46.0, "figure": "published", "board": "Raspberry Pi 4"}}}
    assert m.ratios(row) == {"tvm_tuned/best_peer": 0.5, "tvm_untuned/tvm_tuned": 2.5, "tvm_tuned/tvm_tuned_x4": 2.5}
    assert m.outputs_agree(row) is True
    assert m.outputs_agree({**row, "onnxruntime": {**row["onnxruntime"], "output_sum": 1.5}}) is False
    row["ratios"] = m.ratios(row)
    meta = {"target": "rpi4b", "core": "Cortex-A72", "cores": 4, "threads": 1, "threads_note": "1 thread",
            "date": "2026-12-07", "cpu_model": "modelled", "command": "python scripts/bench_arm.py", "conditions": "c",
            "note": "n"}
    doc = m.docs_result({"mobilenet_v2-1.0-224": row}, meta)
    assert doc["kind"] == "tables" and all(doc["meta"][k] for k in ("date", "cpu_model", "command"))
    rows = doc["tables"][0]["rows"]
    assert ["mobilenet_v2-1.0-224", "ncnn", "failed", "", "", "", "pnnx could not convert it"] in rows
    assert any(r[1] == "XNNPACK" and r[2] == "published" for r in rows)
    text = m.table({"mobilenet_v2-1.0-224": row}, meta)
    assert "published" in text and "failed" in text and "0.50x" in text


# ---------------------------------------------------------------------- on the emulator


@pytest.fixture(scope="module")
def emulator(virtual_board_setup):
    subprocess.run(["bash", str(REPO / "scripts" / "setup_emulator.sh")], check=True)
    status = peers.ensure_peers()
    return Path(virtual_board_setup) / "rootfs", status


@pytest.fixture(scope="module")
def quick_run(emulator, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-arm")
    proc = run_script("--quick", "--models", "mobilenet_v2", "--json", str(out / "out.json"), "--work",
                      str(out / "build"), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, json.loads((out / "out.json").read_text())


@pytest.mark.slow
def test_quick_run_has_every_engine_with_figures_or_an_error(quick_run):
    out, proc, data = quick_run
    assert set(data) == {"meta", "mobilenet_v2-0.35-96"}
    assert data["meta"]["threads"] == 1 and data["meta"]["target"] == "rpi4b" and data["meta"]["core"] == "Cortex-A72"
    row = data["mobilenet_v2-0.35-96"]
    for engine in ENGINES:
        entry = row[engine]
        if "error" in entry:
            assert isinstance(entry["error"], str) and entry["error"] and "\n" not in entry["error"]
        else:
            assert entry["figure"] == "modelled" and entry["ms"] > 0 and entry["cycles"] > 0
            assert entry["threads"] == 1
    # The TVM engines use the package's own path; both compile here, so they must have figures.
    assert "ms" in row["tvm_tuned"] and "ms" in row["tvm_untuned"]
    assert row["tvm_tuned_x4"]["threads"] == 4
    assert "published" not in row  # only MobileNetV2 1.0/224 has published figures
    assert (out / "out.png").stat().st_size > 0
    assert "MODELLED" in proc.stdout and "mobilenet_v2-0.35-96" in proc.stdout
    # Same model, same input: every engine that ran computes the same output.
    assert row["outputs_agree"] in (True, None)


@pytest.mark.slow
def test_a_peers_cost_is_the_same_in_two_runs(quick_run, emulator):
    _, _, data = quick_run
    _, status = emulator
    engine = next((e for e in ("onnxruntime", "ncnn") if not status.get(e)), None)
    if engine is None:
        pytest.skip(f"no peer installs here: {status}")
    first = data["mobilenet_v2-0.35-96"][engine]
    assert "error" not in first, first
    from mnv2_tvm.models import ModelConfig

    cfg = ModelConfig("mobilenet_v2", 0.35, 96)
    folder = peers.peers_dir() / "models" / cfg.label
    model = peers.PeerModel(engine, folder / (f"{cfg.label}.onnx" if engine == "onnxruntime" else f"{cfg.label}.ncnn.param"))
    again = peers.measure_peer("rpi4b", model, cfg.input_shape)
    assert again.ok, again.error
    assert again.fingerprint() == first["fingerprint"]
    assert again.cycles == first["cycles"] and again.instructions == first["instructions"]


@pytest.mark.slow
def test_the_engines_clock_imports_are_found(emulator):
    from mnv2_tvm.emulate.guest import elf_plt_slots

    libs = list((peers.site_dir("onnxruntime") / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"))
    if not libs:
        pytest.skip("onnxruntime is not installed for the guest")
    slots = elf_plt_slots(str(libs[0]), ("_ZNSt6chrono3_V212system_clock3nowEv", "clock_gettime", "no_such_function"))
    assert set(slots) == {"_ZNSt6chrono3_V212system_clock3nowEv", "clock_gettime"}
    assert all(v > 0 for v in slots.values())
