"""board.py against the virtual aarch64 board's real sshd: host keys, auth, runtime checks and
the RPC server's start / stop / tunnel. No bundles here (see test_deploy.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from board_fixture import Board, BoardFactory
from mnv2_tvm import board as B
from mnv2_tvm import remote
from mnv2_tvm.cli import main
from mnv2_tvm.errors import UserError

pytestmark = pytest.mark.slow  # the virtual board, tuning or a benchmark: minutes, not seconds


@pytest.fixture(scope="module")
def vboard(virtual_board: BoardFactory) -> Iterator[Board]:
    b = virtual_board()
    yield b
    virtual_board.stop(b)


def target_of(b: Board) -> B.SshTarget:
    return B.SshTarget(b.user, b.host, b.ssh_port)


def opts_of(b: Board, **kw) -> B.SshOptions:
    return B.SshOptions(**{"identity": b.key_path, "known_hosts": b.known_hosts, **kw})


def ssh_args(b: Board) -> list[str]:
    return ["--ssh", f"{b.user}@{b.host}:{b.ssh_port}", "-i", str(b.key_path), "--known-hosts", str(b.known_hosts)]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def group_alive(pgid: int) -> bool:
    """The virtual board runs on this kernel, so its processes are visible here."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                return True
    return False


# --------------------------------------------------------------------------- parsing


def test_ssh_target_parsing() -> None:
    assert B.SshTarget.parse("pi@raspberrypi.local") == B.SshTarget("pi", "raspberrypi.local", 22)
    assert B.SshTarget.parse("root@127.0.0.1:2222") == B.SshTarget("root", "127.0.0.1", 2222)
    assert B.SshTarget.parse("pi@[fe80::1]:22").host == "fe80::1"
    assert B.SshTarget.parse("root@127.0.0.1:2222").known_hosts_name == "[127.0.0.1]:2222"
    for bad in ("raspberrypi.local", "@host", "pi@", "pi@host:99999"):
        with pytest.raises(UserError, match="--ssh"):
            B.SshTarget.parse(bad)


# --------------------------------------------------------------------------- SSH faults


def test_status_describes_the_board(vboard: Board, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["board", "status", *ssh_args(vboard), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "aarch64" and info["uname_m"] == "aarch64"
    assert info["tvm"].startswith("0.27") and info["runtime_only"] is True
    assert info["emulated"] is True  # qemu-user: the ARM userland sees this x86 host's cpuinfo
    assert info["servers"] == []


def test_unknown_host_key_is_refused_with_its_fingerprint(vboard: Board, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    pub = (vboard.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    import base64
    import hashlib

    expected = "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(pub[1])).digest()).decode().rstrip("=")
    with pytest.raises(UserError) as err:
        B.BoardConnection(target_of(vboard), opts_of(vboard, known_hosts=kh))
    msg = str(err.value)
    assert f"is not in {kh}" in msg and f"--trust-host-key {expected}" in msg and "\n" not in msg
    with pytest.raises(UserError, match="is not in"):
        B.BoardConnection(target_of(vboard), opts_of(vboard, known_hosts=kh, trust_host_key="SHA256:notthisone"))
    # The exact fingerprint is trusted and recorded; the next connection needs no flag.
    B.BoardConnection(target_of(vboard), opts_of(vboard, known_hosts=kh, trust_host_key=expected)).close()
    assert kh.read_text().split()[:2] == [f"[127.0.0.1]:{vboard.ssh_port}", "ssh-ed25519"]
    B.BoardConnection(target_of(vboard), opts_of(vboard, known_hosts=kh)).close()


def test_changed_host_key_is_refused(vboard: Board, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{vboard.ssh_port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n")
    with pytest.raises(UserError, match=r"host key CHANGED .*ssh-keygen -R"):
        B.BoardConnection(target_of(vboard), opts_of(vboard, known_hosts=kh))


def test_wrong_port_and_non_ssh_port(vboard: Board) -> None:
    port = remote.free_port()
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"connection refused on port {port}"):
        B.BoardConnection(B.SshTarget("root", "127.0.0.1", port), opts_of(vboard))
    with socket.socket() as srv:  # something that is not sshd
        srv.bind(("127.0.0.1", 0))
        srv.listen(2)

        def answer() -> None:
            conn, _ = srv.accept()
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(UserError, match="an SSH server"):
            B.BoardConnection(B.SshTarget("root", "127.0.0.1", srv.getsockname()[1]), opts_of(vboard, timeout=5))
    assert time.monotonic() - t0 < 30


def test_wrong_key_fails_authentication(vboard: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stranger = keygen(tmp_path / "stranger")
    args = ["board", "status", "--ssh", f"root@127.0.0.1:{vboard.ssh_port}", "-i", str(stranger),
            "--known-hosts", str(vboard.known_hosts)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "authentication failed with key" in err and "authorized_keys" in err


def test_board_without_runtime_or_with_another_version(vboard: Board, capsys: pytest.CaptureFixture[str]) -> None:
    # The same board seen through a Python that lacks the runtime...
    bare = opts_of(vboard, board_python="env -u PYTHONPATH python3")
    with B.BoardConnection(target_of(vboard), bare) as conn:
        info = B.probe(conn)
        with pytest.raises(UserError, match=r"has no TVM runtime .* pip install apache-tvm=="):
            B.check_runtime(info, conn.target)
    assert main(["board", "start", *ssh_args(vboard), "--board-python", "env -u PYTHONPATH python3",
                 "--name", "noruntime"]) == 2
    assert "has no TVM runtime" in capsys.readouterr().err
    assert not (vboard.root / "root/.cache/mnv2-tvm/rpc-noruntime").exists()
    # ...and through one that finds another release first.
    fake = f"/tmp/faketvm-{os.getpid()}"
    with B.BoardConnection(target_of(vboard), opts_of(vboard)) as conn:
        conn.check(f"mkdir -p {fake}/tvm && echo '__version__ = \"0.26.0\"' > {fake}/tvm/__init__.py", "fake tvm")
        try:
            other = B.SshOptions(identity=vboard.key_path, known_hosts=vboard.known_hosts,
                                 board_python=f"env PYTHONPATH={fake}:/opt/tvm-site python3")
            with B.BoardConnection(target_of(vboard), other) as c2:
                info = B.probe(c2)
            assert info["tvm"] == "0.26.0"
            with pytest.raises(UserError, match=r"has TVM 0.26.0, this host 0.27.*same release"):
                B.check_runtime(info, conn.target)
        finally:
            conn.check(f"rm -rf {fake}", "cleanup")


# --------------------------------------------------------------------------- RPC server lifecycle


def test_start_stop_ends_exactly_what_start_started(vboard: Board, capsys: pytest.CaptureFixture[str]) -> None:
    base = vboard.root / "root/.cache/mnv2-tvm"
    names = [f"a{os.getpid()}", f"b{os.getpid()}"]
    pgids = {}
    try:
        for name in names:
            assert main(["board", "start", *ssh_args(vboard), "--name", name]) == 0
            out = capsys.readouterr().out
            assert f"bound to the board's 127.0.0.1:" in out
            pgids[name] = json.loads((base / f"rpc-{name}/state.json").read_text())["pgid"]
            assert group_alive(pgids[name])
        assert main(["board", "start", *ssh_args(vboard), "--name", names[0]]) == 2
        assert "already runs" in capsys.readouterr().err
        assert main(["board", "status", *ssh_args(vboard)]) == 0
        status = capsys.readouterr().out
        assert all(f"RPC server {n!r}: alive" in status for n in names)
        # Stopping one leaves the other running.
        assert main(["board", "stop", *ssh_args(vboard), "--name", names[0]]) == 0
        assert f"stopped RPC server {names[0]!r} (process group {pgids[names[0]]})" in capsys.readouterr().out
        assert not group_alive(pgids[names[0]]) and group_alive(pgids[names[1]])
        assert not (base / f"rpc-{names[0]}").exists()
        assert main(["board", "stop", *ssh_args(vboard), "--name", names[0]]) == 0
        assert "nothing to stop" in capsys.readouterr().out
    finally:
        for name in names:
            main(["board", "stop", *ssh_args(vboard), "--name", name])
    assert not any(group_alive(p) for p in pgids.values())


def test_tunnel_holds_a_forward_until_terminated(vboard: Board) -> None:
    name = f"tun{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "mnv2_tvm.cli", "board", "tunnel", *ssh_args(vboard), "--name", name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"RPC at 127.0.0.1:(\d+) here -> the board's 127.0.0.1:(\d+) \(started\)", line)
        assert m, line + proc.stderr.read()  # type: ignore[union-attr]
        local, on_board = int(m.group(1)), int(m.group(2))
        assert local != on_board  # a real forward, not the board's own port
        sess = remote.connect("127.0.0.1", local)
        assert sess.session.cpu(0).exist
        sess.close()
        pgid = json.loads((vboard.root / f"root/.cache/mnv2-tvm/rpc-{name}/state.json").read_text())["pgid"]
        assert group_alive(pgid)
    finally:
        proc.send_signal(signal.SIGTERM)  # unwinds like Ctrl-C: the server it started is stopped
        proc.wait(timeout=90)
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert not group_alive(pgid)
    assert not (vboard.root / f"root/.cache/mnv2-tvm/rpc-{name}").exists()
    with pytest.raises(UserError, match="refused"):
        remote.connect("127.0.0.1", local, timeout=5)
