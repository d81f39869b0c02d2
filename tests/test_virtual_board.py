"""End-to-end tests of the virtual aarch64 board (scripts/virtual_board.py).

They exercise the real deployment path: SSH with a verified host key into an
emulated arm64 userland, the runtime-only TVM wheel there, and a cross-compiled
Relax library executed as ARM code behind TVM RPC (directly and via a tracker).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paramiko
import pytest

# conftest.py puts tests/ on sys.path and star-imports the board fixtures
# (virtual_board_setup, virtual_board) from board_fixture.
from board_fixture import SCRIPT, Board, BoardFactory

pytestmark = pytest.mark.slow  # the virtual board, tuning or a benchmark: minutes, not seconds

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
EM_AARCH64 = 183
SHAPE = (4, 8)
# `import tvm` alone takes 3-6 s under qemu; a busy 2-core machine can triple that.
RPC_READY_TIMEOUT_S = 120


# --------------------------------------------------------------------------- helpers


def sh(client: paramiko.SSHClient, cmd: str, timeout: float = 120.0) -> str:
    """Run cmd on the board; return stdout, fail the test on a non-zero exit."""
    _, out, err = client.exec_command(cmd, timeout=timeout)
    # Read before asking for the exit status: a full pipe would otherwise deadlock.
    stdout = out.read().decode()
    stderr = err.read().decode()
    rc = out.channel.recv_exit_status()
    assert rc == 0, f"board command failed ({rc}): {cmd}\n{stdout}{stderr}"
    return stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_rpc_server(client: paramiko.SSHClient, port: int, workdir: str, extra: str = "") -> int:
    """Start a detached TVM RPC server on the board; return its process group id.

    Only a fully detached command lets the exec channel close (see shared notes):
    `cd DIR; setsid CMD > log 2>&1 < /dev/null & echo $!`.  setsid makes the server
    the leader of its own group, which is what stop_rpc_server kills.
    """
    cmd = (
        f"mkdir -p {workdir}; cd {workdir}; "
        f"setsid python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port {port} --port-end {port + 1} {extra}"
        " > rpc.log 2>&1 < /dev/null & echo $!"
    )
    return int(sh(client, cmd, timeout=30).strip())


def wait_rpc_server(client: paramiko.SSHClient, pgid: int, workdir: str) -> None:
    # Wait for the bind line rather than probing the port: a bare connect would
    # be taken as an RPC client by the server.
    wait = (
        f"for i in $(seq 1 {RPC_READY_TIMEOUT_S * 4}); do "
        f"grep -q 'bind to' {workdir}/rpc.log && exit 0; "
        f"kill -0 {pgid} 2>/dev/null || break; sleep 0.25; done; cat {workdir}/rpc.log; exit 1"
    )
    sh(client, wait, timeout=RPC_READY_TIMEOUT_S + 30)


def start_rpc_server(client: paramiko.SSHClient, port: int, workdir: str, extra: str = "") -> int:
    pgid = launch_rpc_server(client, port, workdir, extra)
    wait_rpc_server(client, pgid, workdir)
    return pgid


def stop_rpc_server(client: paramiko.SSHClient, pgid: int) -> None:
    """Kill exactly the server's process group (its popen workers hold the port too)."""
    # The members turn into zombies until the host's init reaps them; only live
    # (non-Z) members count.
    alive = f"ps -o stat= --sid {pgid} | grep -qv '^Z'"
    sh(
        client,
        f"kill -TERM -- -{pgid} 2>/dev/null; "
        f"for i in $(seq 1 40); do {alive} || exit 0; sleep 0.25; done; "
        f"kill -KILL -- -{pgid} 2>/dev/null; sleep 0.5; ! {alive}",
        timeout=60,
    )


def build_add_library(out_dir: Path) -> Path:
    """Cross-compile `x + y` as a Relax VM library for aarch64 (runs on the host)."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    @tvm.script.ir_module
    class AddModule:
        @R.function
        def main(  # TVMScript annotations are calls, which mypy cannot read
            x: R.Tensor(SHAPE, "float32"),  # type: ignore[valid-type]
            y: R.Tensor(SHAPE, "float32"),  # type: ignore[valid-type]
        ) -> R.Tensor(SHAPE, "float32"):  # type: ignore[valid-type]
            with R.dataflow():
                z = R.add(x, y)
                R.output(z)
            return z

    executable = tvm.compile(AddModule, target=tvm.target.Target(AARCH64_TARGET))
    assert isinstance(executable, relax.VMExecutable)
    path = out_dir / "add_aarch64.so"
    executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


def run_add_remotely(remote: object, lib_path: Path, seed: int) -> None:
    """Upload, load and run the add library in an RPC session; compare with numpy."""
    import tvm
    from tvm import relax

    remote.upload(str(lib_path))  # type: ignore[attr-defined]
    rlib = remote.load_module(lib_path.name)  # type: ignore[attr-defined]
    dev = remote.cpu()  # type: ignore[attr-defined]
    vm = relax.VirtualMachine(rlib, dev)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    y = rng.standard_normal(SHAPE, dtype=np.float32)
    out = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(y, dev))
    np.testing.assert_array_equal(out.numpy(), x + y)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def board(virtual_board: BoardFactory) -> Iterator[Board]:
    b = virtual_board()
    yield b
    virtual_board.stop(b)


@pytest.fixture(scope="module")
def ssh(board: Board) -> Iterator[paramiko.SSHClient]:
    client = board.ssh()
    yield client
    client.close()


@pytest.fixture(scope="module")
def add_lib(tmp_path_factory: pytest.TempPathFactory, virtual_board_setup: Path) -> Path:
    # Depends on setup for aarch64-linux-gnu-g++, which setup installs.
    path = build_add_library(tmp_path_factory.mktemp("aarch64"))
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
    return path


# --------------------------------------------------------------------------- tests


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(addr)
    return found


def test_ssh_host_key_verified_and_board_is_aarch64(board: Board, ssh: paramiko.SSHClient) -> None:
    assert sh(ssh, "uname -m").strip() == "aarch64"
    # The client side trusted the key only because it is in the generated file...
    key_line = board.known_hosts.read_text().split()
    assert key_line[0] == f"[127.0.0.1]:{board.ssh_port}" and key_line[1] == "ssh-ed25519"
    # ...and a client without it is refused instead of trusting on first use.
    stranger = paramiko.SSHClient()
    stranger.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException):
        stranger.connect(
            board.host, port=board.ssh_port, username=board.user, key_filename=str(board.key_path),
            look_for_keys=False, allow_agent=False, timeout=30,
        )
    stranger.close()
    # Loopback only: 0100007F is 127.0.0.1 in /proc/net/tcp's byte order.
    assert listening_addresses(board.ssh_port) == {"0100007F"}


def test_password_login_refused(board: Board) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(board.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            board.host, port=board.ssh_port, username=board.user, password="root",
            look_for_keys=False, allow_agent=False, timeout=30,
        )
    client.close()


def test_sftp_roundtrip(ssh: paramiko.SSHClient) -> None:
    payload = os.urandom(4096)
    with ssh.open_sftp() as sftp:
        with sftp.open("/tmp/sftp-probe.bin", "wb") as fh:
            fh.write(payload)
        with sftp.open("/tmp/sftp-probe.bin", "rb") as fh:
            assert fh.read() == payload
        sftp.remove("/tmp/sftp-probe.bin")


def test_tvm_runtime_only_on_board(ssh: paramiko.SSHClient) -> None:
    code = (
        "import json, platform, tvm, tvm.base;"
        "print(json.dumps([tvm.__version__, tvm.base._RUNTIME_ONLY, platform.machine()]))"
    )
    version, runtime_only, machine = json.loads(sh(ssh, f"python3 -c {shlex.quote(code)}"))
    assert version.startswith("0.27.0")
    assert runtime_only is True
    assert machine == "aarch64"


def test_rpc_runs_cross_compiled_relax_module(ssh: paramiko.SSHClient, add_lib: Path) -> None:
    from tvm import rpc

    port = free_port()
    pgid = start_rpc_server(ssh, port, f"/tmp/rpc-{port}")
    try:
        remote = rpc.connect("127.0.0.1", port, session_timeout=120)
        run_add_remotely(remote, add_lib, seed=0)
        del remote
    finally:
        stop_rpc_server(ssh, pgid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_two_boards_behind_one_tracker(virtual_board: BoardFactory, add_lib: Path) -> None:
    """Two concurrent boards register with one host tracker and serve sessions at once."""
    from tvm import rpc

    boards = [virtual_board(), virtual_board()]
    assert boards[0].ssh_port != boards[1].ssh_port
    tracker_port = free_port()
    tracker = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
         "--port", str(tracker_port), "--port-end", str(tracker_port + 1), "--silent"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own group, stopped below with killpg
    )
    clients: list[paramiko.SSHClient] = []
    servers: list[tuple[paramiko.SSHClient, int]] = []
    key = f"vboard{os.getpid()}"
    try:
        # Probe the port first: connect_tracker's own retry sleeps 5 s per attempt,
        # and the tracker needs a few seconds to import tvm.
        deadline = time.monotonic() + 60
        while True:
            assert tracker.poll() is None, "RPC tracker exited"
            try:
                socket.create_connection(("127.0.0.1", tracker_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "RPC tracker did not start"
                time.sleep(0.1)
        tracker_session = rpc.connect_tracker("127.0.0.1", tracker_port)
        # Launch both servers before waiting for either: each spends seconds in
        # `import tvm` under qemu, and the two boards emulate in parallel.
        workdirs = []
        for b in boards:
            client = b.ssh()
            clients.append(client)
            assert sh(client, "uname -m").strip() == "aarch64"
            port = free_port()
            extra = f"--tracker 127.0.0.1:{tracker_port} --key {key}"
            workdirs.append(f"/tmp/rpc-{port}")
            servers.append((client, launch_rpc_server(client, port, workdirs[-1], extra)))
        for (client, pgid), workdir in zip(servers, workdirs, strict=True):
            wait_rpc_server(client, pgid, workdir)

        deadline = time.monotonic() + 60
        while tracker_session.summary()["queue_info"].get(key, {}).get("free", 0) < 2:
            assert time.monotonic() < deadline, tracker_session.text_summary()
            time.sleep(0.5)

        # Hold both sessions at once: the tracker must hand out both boards.
        sessions = [tracker_session.request(key, session_timeout=120) for _ in boards]
        assert tracker_session.summary()["queue_info"][key]["free"] == 0
        for seed, remote in enumerate(sessions):
            run_add_remotely(remote, add_lib, seed=seed)
        del sessions
    finally:
        for client, pgid in servers:
            stop_rpc_server(client, pgid)
        for client in clients:
            client.close()
        os.killpg(tracker.pid, 15)
        tracker.wait(timeout=30)
        for b in boards:
            virtual_board.stop(b)


def test_cli_lifecycle(virtual_board_setup: Path) -> None:
    """start/status/stop of a named instance through the script's CLI."""
    name = f"cli-{os.getpid()}"

    def cli(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPT), command, "--root", str(virtual_board_setup), "--name", name],
            check=False, capture_output=True, text=True, timeout=180,
        )

    started = cli("start")
    assert started.returncode == 0, started.stderr
    state = json.loads(started.stdout)
    try:
        again = cli("start")
        assert again.returncode != 0 and "already running" in again.stderr
        status = cli("status")
        assert status.returncode == 0 and json.loads(status.stdout)["port"] == state["port"]
        assert os.getpgid(state["pid"]) == state["pgid"] == state["pid"]
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert cli("status").returncode == 3
    # Gone, or a zombie waiting for the machine's init to reap it (its parent,
    # the `start` process, exited long ago).
    stat = Path(f"/proc/{state['pid']}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not Path(state["known_hosts"]).exists()


def test_start_refuses_a_port_held_by_another_board(board: Board, virtual_board_setup: Path) -> None:
    """A taken port must fail the start, not adopt the other board's sshd."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "start", "--root", str(virtual_board_setup),
         "--name", f"clash-{os.getpid()}", "--ssh-port", str(board.ssh_port)],
        check=False, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0, proc.stdout
    assert "did not come up" in proc.stderr
