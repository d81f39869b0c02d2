"""tune → compile with records → run, through the CLI on a real (tiny) MobileNetV2 config."""

import pytest
import json
import os
import subprocess
import sys

import numpy as np

from mnv2_tvm import bundle, targets
from mnv2_tvm.bundle import Runner

pytestmark = pytest.mark.slow  # the virtual board, tuning or a benchmark: minutes, not seconds

CLI = [sys.executable, "-m", "mnv2_tvm.cli"]
MODEL = ["mobilenet_v2", "--width", "0.35", "--resolution", "96"]


def run(*args, timeout=1800):  # a hang guard: 33 tasks on a loaded 2-core machine take ~12 min
    env = dict(os.environ, TVM_NUM_THREADS="2")
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_tune_then_compile_applies_every_record_and_keeps_parity(tmp_path):
    # The build main.sh deploys (NCHW8c on x86 hosts): its hand-written candidates make 40 trials
    # take half the time NCHW's search does (108 s against 227 s here). NCHW search is tuned in
    # test_tune and on the emulated board (test_deploy).
    target = targets.fastest_host_target_name()
    records = tmp_path / "records"
    proc = run("tune", *MODEL, "--target", target, "--trials", 40, "--records", records)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best µs" in proc.stderr  # the per-task table
    assert (records / "database_tuning_record.json").stat().st_size > 0
    assert (records / "tune.log").exists()
    lines_before = (records / "database_tuning_record.json").read_text().count("\n")

    again = run("tune", *MODEL, "--target", target, "--trials", 40, "--records", records)
    assert again.returncode == 0
    # The same total again: already done, nothing measured twice.
    assert (records / "database_tuning_record.json").read_text().count("\n") == lines_before

    proc = run("compile", *MODEL, "--target", target, "--records", records, "-o", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "untuned" not in proc.stderr
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["tuning"]["tuned"] and m["tuning"]["fallback"] == []
    assert m["tuning"]["records_digest"]
    x, expected = bundle.reference(tmp_path / "b")
    assert np.abs(Runner(tmp_path / "b").run(x) - expected).max() <= 1e-4
    # Compiling read the records and wrote none.
    assert (records / "database_tuning_record.json").read_text().count("\n") == lines_before


def test_tune_refuses_records_of_another_target(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    import tvm

    from mnv2_tvm.tuning import RECORDS_FORMAT

    meta = {"format": RECORDS_FORMAT, "tvm_version": tvm.__version__, "target_str": "rpi4b",
            "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}}
    (records / "meta.json").write_text(json.dumps(meta))
    proc = run("tune", *MODEL, "--trials", 4, "--records", records, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "one records dir per target" in proc.stderr
    assert json.loads((records / "meta.json").read_text()) == meta
