"""Bad input and internal TVM failures as a user meets them: one line on stderr, exit code 2, no
traceback, and nothing already written lost (the TVM case names a log file with the whole story)."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "mnv2_tvm.cli"]
SMALL_MODEL = ["mobilenet_v2", "--width", "0.35", "--resolution", "96"]
LOG_LINE = re.compile(r"\(full log: (?P<path>[^)]+\.log)\)$")


def mnv2(*args, env_extra: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(stderr: str) -> list[str]:
    """stderr without tune's progress lines (``[tune] ...``), which a non-terminal gets as lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[tune]")]


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("mnv2-tvm: error:") and needle in lines[0], lines[0]
    return lines[0]


def png_declaring(width: int, height: int) -> bytes:
    """A valid 69-byte PNG whose header declares ``width`` x ``height`` RGB pixels: what a
    decompression bomb looks like before anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("factor", [3, 1.2], ids=["over-twice-the-limit", "over-the-limit"])
def test_run_refuses_a_decompression_bomb_image(host_bundles, tmp_path, factor):
    """Over twice Pillow's limit it raises DecompressionBombError; between once and twice it only
    warns (and would decode): both are refused in one line."""
    from PIL import Image

    side = int((Image.MAX_IMAGE_PIXELS * factor) ** 0.5) + 1
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(side, side))
    if factor > 2:  # Pillow itself on this file, which it reads as a PNG of that size
        with pytest.raises(Image.DecompressionBombError):
            Image.open(bomb)
    else:
        with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb) as img:
            assert img.size == (side, side)
    line = assert_one_line_error(mnv2("run", host_bundles("mobilenet_v2"), "--input", bomb),
                                 "refused as a possible decompression bomb")
    assert f"{side * side:,} pixels" in line and "scale it down" in line


# --------------------------------------------------------------------------- board run --input


@pytest.fixture
def board_run(monkeypatch, capsys):
    """``mnv2-tvm board run BUNDLE --ssh u@h --input PATH`` in this process, with the SSH connection
    replaced by a stand-in: the input is read before anything goes to the board."""
    from mnv2_tvm import board, cli

    class NoBoard:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    sent = []
    monkeypatch.setattr(board, "BoardConnection", NoBoard)
    monkeypatch.setattr(board, "run_bundle_ssh", lambda *a, **k: sent.append(a) or (np.zeros(1), {}))
    monkeypatch.setattr(cli, "_sigterm_as_interrupt", lambda: None)

    def run(path: Path) -> tuple[int, str, list]:
        status = cli.main(["board", "run", "some-bundle", "--ssh", "pi@board.invalid", "--input", str(path)])
        return status, capsys.readouterr().err, sent

    return run


def _npy_with_header(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


BAD_NPY = {
    "missing": (None, "does not exist"),
    "folder": ("dir", "is a folder"),
    "garbage": (b"this is not numpy at all\n" * 4, "not a readable .npy array"),
    "truncated": (_npy_with_header((1, 3, 96, 96)) + b"\0" * 100, "not a readable .npy array"),
    "huge-header": (_npy_with_header((10**6, 10**6, 100)), "not a readable .npy array (MemoryError)"),
    "an-image": (png_declaring(100_000, 100_000), "not a readable .npy array"),
}


@pytest.mark.parametrize("case", list(BAD_NPY))
def test_board_run_refuses_a_missing_or_malformed_npy(board_run, tmp_path, case):
    content, needle = BAD_NPY[case]
    path = tmp_path / "x.npy"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    status, err, sent = board_run(path)
    assert status == 2 and not sent
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mnv2-tvm: error: --input") and needle in lines[0], err


def test_board_run_refuses_an_object_array(board_run, tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"code": "runs on load"}], dtype=object), allow_pickle=True)
    status, err, sent = board_run(path)
    assert status == 2 and not sent and "not a readable .npy array" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_board_run_malformed_npy_on_the_virtual_board(virtual_board, tmp_path):
    """The same through a real SSH connection, as a subprocess."""
    b = virtual_board()
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    proc = mnv2("board", "run", tmp_path / "no-bundle-needed", "--ssh", f"{b.user}@{b.host}:{b.ssh_port}",
                "-i", b.key_path, "--known-hosts", b.known_hosts, "--input", bad, timeout=300)
    assert_one_line_error(proc, "not a readable .npy array")


# --------------------------------------------------------------------------- internal TVM errors


def _target_toml(path: Path, target: str) -> Path:
    path.write_text(f'name = "test target"\ntarget = {target}\narch = "x86_64"\n'
                    "[device]\ncores = 2\nclock_ghz = 2.0\n")
    return path


def _records_for(toml: Path, folder: Path, lines: int = 2) -> Path:
    """A records folder for ``toml``'s target holding real records: the first ``lines`` workloads
    of a shipped host folder and their records (for other kernels than the test model's)."""
    from mnv2_tvm import targets
    from mnv2_tvm.tuning.records import open_records

    open_records(folder, targets.load(str(toml)).tvm_target(), writable=True).close()
    shipped = next((d for d in sorted(targets.SCHEDULES_DIR.glob("x86-64-*"))
                    if (d / targets.RECORD_FILE).is_file() and (d / targets.WORKLOAD_FILE).is_file()), None)
    if shipped is not None:
        with open(shipped / targets.WORKLOAD_FILE, "rb") as f:
            workloads = [f.readline() for _ in range(lines)]
        with open(shipped / targets.RECORD_FILE, "rb") as f:
            records = [ln for ln in f if int(ln[1:ln.index(b",")]) < lines]
        (folder / targets.WORKLOAD_FILE).write_bytes(b"".join(workloads))
        (folder / targets.RECORD_FILE).write_bytes(b"".join(records))
    return folder


def _check_log(line: str, *needles: str) -> Path:
    m = LOG_LINE.search(line)
    assert m, line
    log = Path(m["path"])
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "command: mnv2-tvm" in text
    for needle in needles:
        assert needle in text, needle
    return log


def test_compile_turns_an_internal_tvm_error_into_one_line_and_a_log(tmp_path):
    """An LLVM triple TVM accepts as a target but cannot generate code for fails deep in TVM's
    codegen (InternalError, after TVM logged an error line of its own on fd 2)."""
    toml = _target_toml(tmp_path / "badtriple.toml", '{ kind = "llvm", mtriple = "bogus-unknown-nowhere" }')
    records = _records_for(toml, tmp_path / "records")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"an": "earlier bundle"}\n')
    before, bundle_before = snapshot(records), snapshot(bundle)
    logs = tmp_path / "logs"
    proc = mnv2("compile", *SMALL_MODEL, "--target", toml, "--records", records, "-o", bundle,
                env_extra={"MNV2_TVM_LOG_DIR": str(logs)})
    line = assert_one_line_error(proc, "TVM failed while compiling mobilenet_v2-0.35-96 for badtriple: ")
    assert "bogus-unknown-nowhere" in line
    log = _check_log(line, "InternalError", "llvm_instance", "TVM's output on stderr before the failure")
    assert log.parent == logs and log.name.startswith("compile-")
    assert snapshot(records) == before and snapshot(bundle) == bundle_before


def test_tune_refuses_a_triple_llvm_does_not_know_before_writing(tmp_path):
    """MetaSchedule's builder segfaults on such a triple (TVM 0.27): tune refuses it first."""
    toml = _target_toml(tmp_path / "badtriple.toml", '{ kind = "llvm", mtriple = "bogus-unknown-nowhere" }')
    records = _records_for(toml, tmp_path / "records")
    before = snapshot(records)
    proc = mnv2("tune", *SMALL_MODEL, "--target", toml, "--records", records, "--trials", 2)
    line = assert_one_line_error(proc, f"{toml}: mtriple 'bogus-unknown-nowhere' names an architecture")
    assert "aarch64" in line and snapshot(records) == before


@pytest.mark.slow
def test_tune_turns_an_internal_tvm_error_into_one_line_and_keeps_the_records(tmp_path):
    """A core count TVM parses but MetaSchedule rejects when it builds a task's search space:
    InternalError in the middle of a tuning session, with the records folder open and locked."""
    toml = _target_toml(tmp_path / "nocores.toml", '{ kind = "llvm", mcpu = "x86-64-v3", "num-cores" = -1 }')
    records = _records_for(toml, tmp_path / "records")
    before = snapshot(records)
    proc = mnv2("tune", *SMALL_MODEL, "--target", toml, "--records", records, "--trials", 2,
                env_extra={"MNV2_TVM_LOG_DIR": str(tmp_path / "logs")})
    line = assert_one_line_error(proc, "TVM failed while tuning mobilenet_v2-0.35-96 for nocores: ")
    _check_log(line, "InternalError", "num-cores")
    after = snapshot(records)
    log_name = "tune.log"  # TVM's own log of the session is appended to, never rewritten
    assert after.pop(log_name).startswith(before.pop(log_name, b""))
    assert after == before


def test_only_errors_raised_inside_tvm_count_as_tvm_failures():
    import argparse

    import tvm

    from mnv2_tvm import failures

    try:
        tvm.target.Target({"kind": "c", "num-cores": 2})  # a ValueError raised in TVM's C++
    except ValueError as e:
        tvm_error = e
    try:
        int("x")  # a ValueError of ours
    except ValueError as e:
        own_error = e
    assert failures.from_tvm(tvm_error) and not failures.from_tvm(own_error)
    assert failures.first_line(tvm_error).startswith("Unknown config option 'num-cores'")
    args = argparse.Namespace(command="madds", model="mobilenet_v2")
    assert failures.report(args, tvm_error) is None  # other commands keep their behaviour
