"""Deployment end to end against the virtual aarch64 board: cross-compiled bundles of all three
models, bench over SSH + RPC with parity vs PyTorch on the emulated ARM CPU, the SSH-only runner,
a tracker with two boards, faults mid-benchmark, a tiny remote tuning run, OpenCL and Android
builds. Timings measured here are those of qemu and are never checked or reported.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from board_fixture import Board, BoardFactory, left_on
from conftest import SMALL
from mnv2_tvm import board as B
from mnv2_tvm import bundle, remote
from mnv2_tvm.bench import BenchSettings, Where, bench_bundle, run_bench
from mnv2_tvm.cli import main
from mnv2_tvm.errors import UserError

pytestmark = pytest.mark.slow  # the virtual board, tuning or a benchmark: minutes, not seconds

EM_AARCH64 = 183
FAST = BenchSettings(number=1, repeat=2)  # numbers under qemu mean nothing: just exercise the path


# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def vboard(virtual_board: BoardFactory) -> Iterator[Board]:
    b = virtual_board()
    yield b
    virtual_board.stop(b)


@pytest.fixture(scope="module")
def rpi_bundles(tmp_path_factory: pytest.TempPathFactory, virtual_board_setup: Path) -> dict[str, Path]:
    """The three models, small, cross-compiled for the Raspberry Pi 4 target (untuned); DeepLab at both output strides."""
    from mnv2_tvm import targets
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.models import ModelConfig

    root = tmp_path_factory.mktemp("rpi4b")
    configs = {**SMALL, "deeplabv3-os8": {**SMALL["deeplabv3"], "output_stride": 8}}
    out = {}
    for name, cfg in configs.items():
        out[name] = root / name
        compile_bundle(ModelConfig(**cfg), targets.load("rpi4b"), out[name], records_dir=root / "no-records")
    return out


def target_of(b: Board) -> B.SshTarget:
    return B.SshTarget(b.user, b.host, b.ssh_port)


def opts_of(b: Board) -> B.SshOptions:
    return B.SshOptions(identity=b.key_path, known_hosts=b.known_hosts)


def ssh_args(b: Board) -> list[str]:
    return ["--ssh", f"{b.user}@{b.host}:{b.ssh_port}", "-i", str(b.key_path), "--known-hosts", str(b.known_hosts)]


def ours_left_on(b: Board) -> list[str]:
    """What this test process started on the board and is still there."""
    return left_on(b.root, os.getpid())


# --------------------------------------------------------------------------- bundles and parity


def test_cross_compiled_bundles_are_aarch64(rpi_bundles: dict[str, Path]) -> None:
    for model, path in rpi_bundles.items():
        m = bundle.load_manifest(path)
        head = (path / m["library"]).read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64, model
        assert m["arch"] == "aarch64" and m["target"] == "rpi4b"
        assert (path / "runner.py").is_file() and (path / "reference.npz").is_file()


def test_bench_a_model_over_ssh_from_the_cli(vboard: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench MODEL --target rpi4b --ssh ...`: compile, start the board's server, tunnel, check, time, stop."""
    cfg = SMALL["mobilenet_v2"]
    rc = main(["bench", "mobilenet_v2", "--width", str(cfg["width"]), "--resolution", str(cfg["resolution"]),
               "--target", "rpi4b", "-o", str(tmp_path / "b"), *ssh_args(vboard), "--number", "1", "--repeat", "2",
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["parity_ok"] and out["max_abs_error"] <= 1e-4
    assert out["board"]["arch"] == "aarch64" and out["board"]["uname_m"] == "aarch64"
    assert out["board"]["via"] == f"ssh {vboard.user}@{vboard.host}:{vboard.ssh_port}"
    assert out["emulated"] is True and any("emulated" in n for n in out["notes"])
    assert out["timing"]["repeats"] == 2 and out["madds"] > 0
    assert ours_left_on(vboard) == []


def test_ssdlite_and_deeplab_match_pytorch_on_the_board(vboard: Board, rpi_bundles: dict[str, Path]) -> None:
    with B.open_board(target_of(vboard), opts_of(vboard)) as ob:
        assert ob.info["arch"] == "aarch64" and ob.local_port != ob.server.port
        for model in ("ssdlite", "deeplabv3", "deeplabv3-os8"):
            sess = remote.connect("127.0.0.1", ob.local_port, via="ssh")
            result = run_bench(rpi_bundles[model], sess, BenchSettings(number=1, repeat=1), emulated=True)
            sess.close()
            assert result.max_abs_error <= 1e-4, model
            assert "EMULATED BOARD" in result.table()
    assert ours_left_on(vboard) == []


def test_ssh_only_runner_path(vboard: Board, rpi_bundles: dict[str, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """No RPC at all: SFTP the bundle, `python3 runner.py BUNDLE --input in.npy --output out.npy`, fetch.
    The board returns final outputs: detections after NMS, DeepLab's mask (OS 16 and 8), top-5."""
    with B.BoardConnection(target_of(vboard), opts_of(vboard)) as conn:
        finals = {name: B.run_bundle_ssh(conn, rpi_bundles[name], check=True)[1]
                  for name in ("ssdlite", "deeplabv3", "deeplabv3-os8")}
    for name, result in finals.items():
        assert result["arch"] == "aarch64" and result["final_agreement"]["ok"], (name, result)
    dets = finals["ssdlite"]["final"]["detections"]
    assert dets and all(0 <= v <= SMALL["ssdlite"]["resolution"] for d in dets for v in d["box"])
    assert finals["deeplabv3-os8"]["final"]["mask_shape"] == [SMALL["deeplabv3"]["resolution"]] * 2
    path = rpi_bundles["mobilenet_v2"]
    x, expected = bundle.reference(path)
    with B.BoardConnection(target_of(vboard), opts_of(vboard)) as conn:
        out, result = B.run_bundle_ssh(conn, path, x, check=True)
    assert result["arch"] == "aarch64" and result["max_abs_error"] <= 1e-4
    assert len(result["final"]["top"]) == 5 and result["final_agreement"]["ok"]
    assert np.abs(out - expected).max() <= 1e-4
    np.save(tmp_path / "in.npy", x)
    assert main(["board", "run", str(path), *ssh_args(vboard), "--input", str(tmp_path / "in.npy"),
                 "--output", str(tmp_path / "out.npy")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output_shape"] == list(expected.shape)
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-4
    assert not list((vboard.root / "root/.cache/mnv2-tvm/bundles").glob(f"*-{os.getpid()}"))


def test_bundle_for_another_architecture_is_refused_before_upload(vboard: Board, host_bundles,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = host_bundles("mobilenet_v2")
    capsys.readouterr()  # the fixture's compile warnings
    assert main(["bench", str(path), *ssh_args(vboard)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is built for x86_64" in err and "is aarch64: compile it for this board's target" in err
    assert "\n" not in err and ours_left_on(vboard) == []
    with B.BoardConnection(target_of(vboard), opts_of(vboard)) as conn, pytest.raises(UserError, match="x86_64"):
        B.run_bundle_ssh(conn, path)


def test_direct_rpc_to_a_started_server(vboard: Board, rpi_bundles: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`board start`, then `bench --rpc HOST:PORT` (the virtual board's loopback is this host's)."""
    import shutil

    # The profile reads the bundle alone: the weights its manifest names may be gone.
    path = tmp_path / "bundle"
    shutil.copytree(rpi_bundles["mobilenet_v2"], path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "weights": str(tmp_path / "gone.pt")}))
    name = f"direct{os.getpid()}"
    assert main(["board", "start", *ssh_args(vboard), "--name", name]) == 0
    try:
        port = json.loads((vboard.root / f"root/.cache/mnv2-tvm/rpc-{name}/state.json").read_text())["port"]
        capsys.readouterr()
        assert main(["bench", str(path), "--rpc", f"127.0.0.1:{port}", "--number", "1",
                     "--repeat", "1", "--profile", "--cache-flush", "--json"]) == 0
        captured = capsys.readouterr()
        assert "rebuilding" not in captured.err and "profile: skipped" not in captured.err
        out = json.loads(captured.out)
        assert out["parity_ok"] and out["board"]["address"] == f"127.0.0.1:{port}"
        # Every kernel of the model timed alone on the board, with how often main calls it.
        rows = out["profile"]
        assert len(rows) > 20 and sum(r["calls"] for r in rows) > 30
        assert sorted(r["name"] for r in rows) == sorted(k["name"] for k in manifest["kernels"]["table"])
        assert all(r["ms_per_call"] > 0 and r["total_ms"] == pytest.approx(r["calls"] * r["ms_per_call"])
                   for r in rows)
        assert any(r["name"].startswith("fused_conv2d") for r in rows)
        # The sshd port speaks SSH, not RPC.
        assert main(["bench", str(rpi_bundles["mobilenet_v2"]), "--rpc", f"127.0.0.1:{vboard.ssh_port}"]) == 2
        assert "is not a TVM RPC server: wrong port?" in capsys.readouterr().err
    finally:
        assert main(["board", "stop", *ssh_args(vboard), "--name", name]) == 0


# --------------------------------------------------------------------------- tracker, two boards


def test_tracker_with_two_boards_on_one_key(virtual_board: BoardFactory, vboard: Board,
                                            rpi_bundles: dict[str, Path]) -> None:
    second = virtual_board()
    key = f"farm{os.getpid()}"
    try:
        with remote.LocalTracker() as tracker, \
                B.open_board(target_of(vboard), opts_of(vboard), tracker=(tracker.host, tracker.port), key=key) as a, \
                B.open_board(target_of(second), opts_of(second), tracker=(tracker.host, tracker.port), key=key) as b:
            assert remote.wait_registered(tracker.host, tracker.port, key, count=2, timeout=90) == 2
            # Both boards are handed out at once...
            s1 = remote.request(tracker.host, tracker.port, key, wait_s=60)
            s2 = remote.request(tracker.host, tracker.port, key, wait_s=60)
            ports = {a.server.port, b.server.port}
            assert {int(s1.address.rsplit(":", 1)[1]), int(s2.address.rsplit(":", 1)[1])} == ports
            # ...a third request finds none free and gives up at the bound.
            t0 = time.monotonic()
            with pytest.raises(UserError, match=rf"no free board under key '{key}' .* within 3 s \(2 registered"):
                remote.request(tracker.host, tracker.port, key, wait_s=3)
            assert time.monotonic() - t0 < 20
            # Release one; bench through the tracker while the other stays held: it lands on the freed board.
            freed = s2.address
            s2.close()
            del s2
            result = bench_bundle(rpi_bundles["mobilenet_v2"], Where(tracker=(tracker.host, tracker.port), key=key,
                                                                     wait_s=90), FAST)
            assert result.max_abs_error <= 1e-4 and result.board["address"] == freed and result.board["key"] == key
            s1.close()
            del s1
    finally:
        virtual_board.stop(second)
    assert ours_left_on(vboard) == []


# --------------------------------------------------------------------------- faults mid-benchmark


def test_server_killed_mid_benchmark(vboard: Board, rpi_bundles: dict[str, Path]) -> None:
    """Kill the board's RPC server while time_evaluator runs: one clear error, no hang, nothing left."""
    base = vboard.root / "root/.cache/mnv2-tvm"
    killed = {}

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for state in base.glob(f"rpc-session-*-{os.getpid()}-*/state.json"):
                log = state.parent / "rpc.log"
                if "load_module" in log.read_text():
                    time.sleep(3)  # past the parity run, into the timing loop
                    pgid = json.loads(state.read_text())["pgid"]
                    client = vboard.ssh()
                    try:
                        client.exec_command(f"kill -KILL -- -{pgid}")[1].channel.recv_exit_status()
                    finally:
                        client.close()
                    killed["pgid"] = pgid
                    return
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        # ~0.1 s per run under qemu: a minute of timing, far longer than the kill takes to land.
        bench_bundle(rpi_bundles["mobilenet_v2"], Where(ssh=target_of(vboard), ssh_opts=opts_of(vboard)),
                     BenchSettings(number=20, repeat=30))
    th.join(5)
    assert killed, "the killer never found the server"
    assert time.monotonic() - t0 < 240
    msg = str(err.value)
    assert "lost the RPC session" in msg and "died" in msg and "\n" not in msg
    assert ours_left_on(vboard) == []


# --------------------------------------------------------------------------- remote tuning


def _tiny_module():
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class One:
        @R.function
        def main(x: R.Tensor((1, 64), "float32"), w: R.Tensor((64, 32), "float32")) -> R.Tensor((1, 32), "float32"):  # type: ignore[valid-type]
            with R.dataflow():
                z = R.matmul(x, w)
                R.output(z)
            return z

    return One


def test_remote_tuning_through_a_tracker_writes_records(vboard: Board, tmp_path: Path) -> None:
    """A few MetaSchedule trials of one task, measured on the board behind a tracker."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from mnv2_tvm import tuning as T
    from mnv2_tvm.tuning.runner import host_linked_upload

    @dataclass(frozen=True)
    class HostLinked(T.RunnerSpec):
        # The virtual board has no gzip or C++ compiler to link MetaSchedule's .tar artifacts,
        # so candidates are linked here (tuning.runner.host_linked_upload).
        def make_runner(self):  # type: ignore[override]
            return ms.runner.RPCRunner(
                ms.runner.RPCConfig(tracker_host=self.tracker_host, tracker_port=self.tracker_port,
                                    tracker_key=self.key, session_timeout_sec=int(self.session_timeout_sec)),
                evaluator_config=self.evaluator_config(), max_workers=self.max_workers,
                f_upload_module=host_linked_upload("aarch64-linux-gnu-g++"))

    key = f"tune{os.getpid()}"
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2})
    with remote.LocalTracker() as tracker, \
            B.open_board(target_of(vboard), opts_of(vboard), tracker=(tracker.host, tracker.port), key=key):
        remote.wait_registered(tracker.host, tracker.port, key)
        runner = HostLinked(kind="rpc", tracker_host=tracker.host, tracker_port=tracker.port, key=key,
                            session_timeout_sec=120, number=1, min_repeat_ms=0)
        report = T.tune(_tiny_module(), target, tmp_path / "records", 3, runner=runner, progress=False, seed=0,
                        num_builder_workers=1)
    assert report.trials_run == 3 and len(report.tasks) == 1
    assert report.tasks[0].run_errors == 0 and report.tasks[0].best_us is not None
    lines = (tmp_path / "records" / T.RECORD_FILE).read_text().splitlines()
    assert len(lines) == 3
    assert ours_left_on(vboard) == []


def test_tune_model_over_ssh(vboard: Board, tmp_path: Path) -> None:
    """`tune --ssh` end to end through tuning's own RPC runner (tune_model)."""
    from mnv2_tvm import tuning as T

    # The virtual board has no gzip or g++: this passes only because candidates are linked here.
    cfg = SMALL["mobilenet_v2"]
    assert main(["tune", "mobilenet_v2", "--width", str(cfg["width"]), "--resolution", str(cfg["resolution"]),
                 "--target", "rpi4b", "--trials", "4", "--records", str(tmp_path / "records"), *ssh_args(vboard)]) == 0
    assert (tmp_path / "records" / T.RECORD_FILE).read_text().strip()
    assert ours_left_on(vboard) == []


# --------------------------------------------------------------------------- other targets


def test_opencl_target_compiles_with_embedded_kernels(tmp_path: Path, virtual_board_setup: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = SMALL["mobilenet_v2"]
    out = tmp_path / "mali"
    assert main(["compile", "mobilenet_v2", "--width", str(cfg["width"]), "--resolution", str(cfg["resolution"]),
                 "--target", "rk3399-mali", "-o", str(out), "--records", str(tmp_path / "none")]) == 0
    assert "no OpenCL device here can run them" in capsys.readouterr().out
    m = bundle.load_manifest(out)
    lib = (out / m["library"]).read_bytes()
    assert bundle.elf_arch(out / m["library"]) == "aarch64" and m["device_kind"] == "opencl"
    assert lib.count(b"__kernel void") > 10  # the OpenCL C source is embedded in the library


def test_android_without_the_ndk_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compile", "mobilenet_v2", "--width", "0.35", "--resolution", "96", "--target", "pixel2",
            "-o", str(tmp_path / "android")]
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    t0 = time.monotonic()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "links with the Android NDK: install the NDK and set TVM_NDK_CC" in err and "\n" not in err
    monkeypatch.setenv("TVM_NDK_CC", str(tmp_path / "no-such-clang++"))
    assert main(args) == 2
    assert "is not an executable compiler" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30  # refused before any compiling
