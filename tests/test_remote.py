"""RPC sessions and bench statistics on this host: TVM's own tracker and servers, no board.

Everything here runs natively (x86-64), so it is quick; the emulated board is in test_deploy.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnv2_tvm import remote
from mnv2_tvm.bench import BenchSettings, TimingStats, Where, bench_bundle, gflops, percentile
from mnv2_tvm.errors import UserError


@contextlib.contextmanager
def host_rpc_server(tmp_path: Path, tracker: str | None = None, key: str = "") -> Iterator[int]:
    """``python -m tvm.exec.rpc_server`` on 127.0.0.1 in its own process group; yields its port."""
    port = remote.free_port()
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
           "--port-end", str(port + 1)]
    if tracker:
        cmd += ["--tracker", tracker, "--key", key]
    log = tmp_path / f"rpc-{port}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "bind to" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "RPC server did not start"
            time.sleep(0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracker() -> Iterator[remote.LocalTracker]:
    with remote.LocalTracker() as t:
        yield t


# --------------------------------------------------------------------------- pure functions


def test_hostport_parsing_names_the_flag() -> None:
    assert remote.parse_hostport("127.0.0.1:9190", "--rpc") == ("127.0.0.1", 9190)
    assert remote.parse_hostport("[::1]:9190", "--rpc") == ("::1", 9190)
    for bad in ("9190", "host:", "host:port", "host:70000"):
        with pytest.raises(UserError, match="--rpc-tracker takes HOST:PORT"):
            remote.parse_hostport(bad, "--rpc-tracker")


def test_network_addresses_get_one_warning_line_and_loopback_none() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.53"):
        assert remote.is_loopback(host) is True and remote.exposure_warning(host, 9090, "RPC server") is None
    for host in ("0.0.0.0", "10.1.2.3", "192.168.1.20", "2001:db8::1"):
        line = remote.exposure_warning(host, 9090, "RPC server")
        assert line is not None and "\n" not in line and line.startswith("mnv2-tvm: warning:")
        assert f"{host}:9090" in line and "unauthenticated" in line and "--ssh" in line
    # an unresolvable name gets the connection error alone, not a warning in front of it
    assert remote.is_loopback("no-such-host.invalid") is None
    assert remote.exposure_warning("no-such-host.invalid", 9090, "RPC server") is None


def test_timing_statistics_agree_with_numpy() -> None:
    rng = np.random.default_rng(1)
    secs = list(rng.uniform(0.010, 0.020, size=17))
    stats = TimingStats.from_seconds(secs)
    ms = np.array(secs) * 1e3
    assert stats.mean_ms == pytest.approx(ms.mean())
    assert stats.median_ms == pytest.approx(np.median(ms))
    assert stats.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert stats.std_ms == pytest.approx(ms.std(ddof=1))
    assert stats.min_ms == pytest.approx(ms.min()) and stats.max_ms == pytest.approx(ms.max())
    assert stats.repeats == 17
    assert TimingStats.from_seconds([0.002]).std_ms == 0.0
    assert percentile([1, 2, 3, 4], 50) == statistics.median([1, 2, 3, 4])
    # 300M MAdds in 7.5 ms: 80 GFLOP/s (a multiply-add is two FLOPs).
    assert gflops(300_000_000, 0.0075) == pytest.approx(80.0)


def test_bench_settings_are_validated() -> None:
    with pytest.raises(UserError, match="--repeat must be at least 1"):
        BenchSettings(repeat=0)
    with pytest.raises(UserError, match="--cache-flush applies to the per-kernel timings"):
        BenchSettings(cache_flush=True)
    with pytest.raises(UserError, match="exactly one of --rpc"):
        Where().check()
    with pytest.raises(UserError, match="got --rpc and --rpc-tracker"):
        Where(rpc=("h", 1), tracker=("h", 2)).check()


# --------------------------------------------------------------------------- connection faults


def test_closed_port_is_refused_at_once() -> None:
    port = remote.free_port()
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"RPC server 127.0.0.1:{port}: connection to 127.0.0.1:{port} refused"):
        remote.connect("127.0.0.1", port)
    assert time.monotonic() - t0 < 5


def test_port_that_never_answers_is_bounded() -> None:
    # A listener that accepts and says nothing: TVM's own client would wait for ever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        import tvm.rpc  # noqa: F401 - before the clock: on a loaded 2-core machine the import alone takes ~10 s
        t0 = time.monotonic()
        with pytest.raises(UserError, match="no answer within 2 s"):
            remote.connect("127.0.0.1", port, timeout=2)
        assert time.monotonic() - t0 < 10


def test_a_step_without_answer_is_given_up_and_its_socket_shut_down() -> None:
    """A peer that stays connected and says nothing (a silently dropped link): the call is given
    up within the bound, and the session's socket is shut down so the abandoned call ends too
    (otherwise it would hold the session, and freeing remote objects on the way out would hang)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        peer, _ = srv.accept()
        sess = remote.RemoteSession(None, "", f"127.0.0.1:{port}", "rpc", endpoint=("127.0.0.1", port))
        ended = threading.Event()

        def blocked() -> bytes:
            try:
                return client.recv(1)
            finally:
                ended.set()

        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"the timing runs: no answer within 1 s; the board hung") as err:
            sess.call(blocked, "the timing runs", 1.0, "check the board")
        assert time.monotonic() - t0 < 5 and ended.is_set() and "\n" not in str(err.value)
        peer.settimeout(5)
        assert peer.recv(1) == b""  # the other end saw the shutdown
        client.close()
        peer.close()
        assert sess.call(lambda: 42, "a quick step", 1.0, "") == 42


def test_port_of_another_service_is_named_as_such() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]

        def serve() -> None:
            for _ in range(2):  # the reachability probe, then the RPC handshake
                conn, _ = srv.accept()
                with contextlib.suppress(OSError):
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                time.sleep(0.5)
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(UserError, match="answers but is not a TVM RPC server: wrong port"):
            remote.connect("127.0.0.1", port)


def test_tracker_port_that_is_not_a_tracker(tmp_path: Path) -> None:
    with host_rpc_server(tmp_path) as port, pytest.raises(UserError, match="not a TVM RPC tracker|did not answer as"):
        remote.request("127.0.0.1", port, "x", timeout=5)


# --------------------------------------------------------------------------- tracker and sessions


@pytest.mark.slow
def test_tracker_hands_out_a_registered_server_and_bounds_the_wait(tracker: remote.LocalTracker,
                                                                    tmp_path: Path) -> None:
    key = f"host{os.getpid()}"
    with pytest.raises(UserError, match=rf"no board is registered under key 'nobody' at RPC tracker {tracker.address}"):
        remote.request(tracker.host, tracker.port, "nobody")
    with host_rpc_server(tmp_path, tracker.address, key) as port:
        assert remote.wait_registered(tracker.host, tracker.port, key, timeout=60) == 1
        # A server registered with a tracker serves only the sessions the tracker hands out.
        with pytest.raises(UserError, match="only serves sessions the tracker hands out"):
            remote.connect("127.0.0.1", port)
        held = remote.request(tracker.host, tracker.port, key, wait_s=30)
        assert held.address == f"127.0.0.1:{port}" and held.key == key
        assert held.session.cpu(0).exist
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"no free board under key '{key}' .* within 2 s \(1 registered, all busy\)"):
            remote.request(tracker.host, tracker.port, key, wait_s=2)
        assert time.monotonic() - t0 < 15
        held.close()
        del held
        # Once released, the board is handed out again (after it re-registers).
        again = remote.request(tracker.host, tracker.port, key, wait_s=60)
        assert again.address == f"127.0.0.1:{port}"
        again.close()


@pytest.mark.slow
def test_bench_through_a_tracker_on_this_host(tracker: remote.LocalTracker, tmp_path: Path, host_bundles,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundle = host_bundles("mobilenet_v2")
    key = f"bench{os.getpid()}"
    with host_rpc_server(tmp_path, tracker.address, key) as port:
        remote.wait_registered(tracker.host, tracker.port, key, timeout=60)
        from mnv2_tvm.cli import main

        rc = main(["bench", str(bundle), "--rpc-tracker", tracker.address, "--rpc-key", key,
                   "--number", "2", "--repeat", "3", "--json"])
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert out["parity_ok"] and out["max_abs_error"] <= 1e-4
        assert out["board"]["key"] == key and out["board"]["address"] == f"127.0.0.1:{port}"
        assert out["board"]["arch"] == "x86_64" and out["timing"]["repeats"] == 3
        t = out["timing"]
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"] <= t["max_ms"]
        assert out["gflops"] == pytest.approx(2 * out["madds"] / (t["median_ms"] / 1e3) / 1e9)
        # The same bundle, a table this time, direct to a plain server.
    with host_rpc_server(tmp_path) as port:
        result = bench_bundle(bundle, Where(rpc=("127.0.0.1", port)), BenchSettings(number=1, repeat=2))
        text = result.table()
        assert "parity vs PyTorch: max abs error" in text and "mean    median       p90       std       min" in text
        assert "GFLOP/s at the median" in text


def test_profile_times_the_bundles_own_kernels_and_never_builds_the_model(tmp_path: Path, host_bundles,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """bench --profile reads the kernel table and kernel library the bundle carries: with the
    weights its manifest names gone and building, lowering or compiling a model made to fail,
    every kernel is still timed, and the rows map onto every conv and linear layer."""
    import shutil

    from mnv2_tvm import bundle, compile, lower, models
    from mnv2_tvm.cli import main
    from mnv2_tvm.compare.profile import board_kernels, map_kernels
    from mnv2_tvm.madds import count

    path = tmp_path / "bundle"
    shutil.copytree(host_bundles("mobilenet_v2"), path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "weights": str(tmp_path / "gone.pt")}))
    _, table = bundle.verify_kernels(path, manifest)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("bench --profile built or compiled the model")

    with monkeypatch.context() as m:
        for module, name in ((models, "build"), (lower, "to_relax"), (compile, "compile_kernels")):
            m.setattr(module, name, refused)
        with host_rpc_server(tmp_path) as port:
            capsys.readouterr()
            rc = main(["bench", str(path), "--rpc", f"127.0.0.1:{port}", "--profile", "--number", "1",
                       "--repeat", "1", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "rebuilding" not in captured.err and "profile: skipped" not in captured.err
    out = json.loads(captured.out)
    assert out["peak_gflops"] == manifest["device"]["peak_gflops"]  # from the manifest, not the target file
    rows = out["profile"]
    assert sorted((r["name"], r["calls"], r["at"]) for r in rows) == sorted((k["name"], k["calls"], k["at"])
                                                                           for k in table)
    assert all(r["ms_per_call"] > 0 and r["total_ms"] == pytest.approx(r["calls"] * r["ms_per_call"]) for r in rows)
    lmap = map_kernels(board_kernels(rows), count(models.ModelConfig.from_dict(manifest["config"])).layers)
    assert lmap.complete, (lmap.unmatched_layers, lmap.unmatched_kernels)
