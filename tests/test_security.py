"""No hint, doc or default binds TVM RPC beyond loopback (or a board's own address).

TVM's RPC has neither authentication nor encryption: whoever reaches a server runs code as its
user (docs/security.md). TVM's own ``rpc_server`` and ``rpc_tracker`` listen on every interface
unless given ``--host``; so every command line this project prints or runs names a loopback host,
and the functions that start servers and forwards default to 127.0.0.1.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Text that binds, or tells the user to bind, on every interface.
ALL_INTERFACES = [
    re.compile(r"--(host|rpc|rpc-tracker|tracker|custom-addr)[=\s\"',]+(0\.0\.0\.0|::(?![\w.:]))"),
    re.compile(r"\bhost\s*(:\s*str\s*)?=\s*['\"](0\.0\.0\.0|::)['\"]"),
    re.compile(r"\.bind\(\(\s*['\"](0\.0\.0\.0|::|)['\"]"),
    re.compile(r"\bListenAddress\s+(0\.0\.0\.0|::)"),
    re.compile(r"(?<![\w.])0\.0\.0\.0:\d+"),
]
#: In Python source, any string that is the all-interfaces address.
PY_LITERAL = re.compile(r"['\"](0\.0\.0\.0|::)['\"]")
#: ``python -m tvm.exec.rpc_server|rpc_tracker`` as a command (in backticks, a string or a list).
TVM_EXEC = re.compile(r"-m\"?,?\s*\"?tvm\.exec\.rpc_(server|tracker)")
LOOPBACK_HOST = re.compile(r"--host[=\s\"',]+(127\.0\.0\.1|localhost|::1|self\.host)\b")
#: Lines that name the address only to say what is avoided.
ALLOWED = {
    ("scripts/virtual_board.py", "openssh-server's postinst would start a host sshd on 0.0.0.0:22"),
}


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("mnv2_tvm/**/*.py"), *(p for p in ROOT.glob("scripts/*") if p.is_file())]
    for p in ROOT.glob("docs/**/*"):
        if p.is_file() and p.suffix in (".md", ".txt", ".csv", ".json", ".toml", ".sh", ".py"):
            if p.suffix == ".json" and p.parent == ROOT / "docs" / "results":
                continue  # measured data, not text anyone follows
            files.append(p)
    return sorted(set(files))


def _allowed(rel: str, line: str) -> bool:
    return any(rel == f and s in line for f, s in ALLOWED)


def _without_literal_spans(line: str) -> str:
    """``line`` without RST ``double-backtick`` spans: docstrings name modules there, they give no command."""
    return re.sub(r"``[^`]*``", "", line)


def test_no_text_binds_rpc_or_ssh_beyond_loopback():
    hits = []
    for path in scanned_files():
        rel = str(path.relative_to(ROOT))
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _allowed(rel, line):
                continue
            bad = [p.pattern for p in ALL_INTERFACES if p.search(line)]
            if path.suffix == ".py" and PY_LITERAL.search(line):
                bad.append("the all-interfaces address as a string")
            if bad:
                hits.append(f"{rel}:{i}: {line.strip()}  [{bad[0]}]")
    assert not hits, "binds or tells users to bind on every interface:\n" + "\n".join(hits)


def test_every_tvm_server_or_tracker_command_names_a_loopback_host():
    """TVM's servers listen on 0.0.0.0 by default: a command without ``--host`` is one that does."""
    hits = []
    for path in scanned_files():
        rel = str(path.relative_to(ROOT))
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            text = _without_literal_spans(line)
            if TVM_EXEC.search(text) and not LOOPBACK_HOST.search(text):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "TVM RPC commands without --host 127.0.0.1:\n" + "\n".join(hits)


def test_the_scan_sees_what_it_is_meant_to_catch():
    """The patterns themselves: each of these would bind beyond loopback."""
    bad = ['`python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`', 'Tracker(host="0.0.0.0")',
           's.bind(("", 0))', "ListenAddress 0.0.0.0", "start a server on 0.0.0.0:9090",
           "--rpc-tracker=0.0.0.0:9190", "def start(host: str = '::'):"]
    for line in bad:
        assert any(p.search(line) for p in ALL_INTERFACES), line
    assert TVM_EXEC.search("`python3 -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key k`")
    assert not LOOPBACK_HOST.search("`python3 -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key k`")
    assert TVM_EXEC.search('[sys.executable, "-m", "tvm.exec.rpc_tracker", "--port", "9190"]')
    assert not TVM_EXEC.search(_without_literal_spans("Start ``python3 -m tvm.exec.rpc_server`` on the board"))


# --------------------------------------------------------------------------- defaults


def test_local_tracker_and_free_ports_default_to_loopback():
    from mnv2_tvm import remote

    assert inspect.signature(remote.LocalTracker).parameters["host"].default == "127.0.0.1"
    assert remote.LocalTracker().host == "127.0.0.1"
    assert inspect.signature(remote.free_port).parameters["host"].default == "127.0.0.1"


class _RecordingConnection:
    """Stands in for a BoardConnection: records the command that would start the server, then stops."""

    def __init__(self) -> None:
        from mnv2_tvm.board import SshOptions

        self.target = "pi@board"
        self.opts = SshOptions()
        self.commands: list[str] = []

    def board_path(self, *parts: str) -> str:
        return "/".join(["/home/pi/.cache/mnv2-tvm", *parts])

    def run(self, cmd: str, timeout: float = 0) -> tuple[int, str, str]:
        return 1, "", ""  # no state file: no server of that name yet

    def check(self, cmd: str, what: str, timeout: float = 0) -> str:
        from mnv2_tvm.errors import UserError

        self.commands.append(cmd)
        raise UserError("stopped before anything runs")


@pytest.mark.parametrize("tracker", [None, "127.0.0.1:40123"])
def test_the_board_rpc_server_binds_the_boards_loopback(tracker):
    from mnv2_tvm import board
    from mnv2_tvm.errors import UserError

    conn = _RecordingConnection()
    with pytest.raises(UserError, match="stopped before"):
        board.start_server(conn, "sec", tracker=tracker, key="rpi4b" if tracker else None)  # type: ignore[arg-type]
    (cmd,) = conn.commands
    assert "tvm.exec.rpc_server" in cmd and "--host 127.0.0.1" in cmd
    assert "0.0.0.0" not in cmd
    if tracker:  # the address the tracker hands out: the board's loopback, reached through SSH
        assert "--custom-addr 127.0.0.1" in cmd


def test_ssh_forwards_listen_on_loopback_only():
    from mnv2_tvm import board

    fwd = board.LocalForward(object(), "127.0.0.1", 9)  # type: ignore[arg-type]  (no connection is made)
    try:
        assert fwd.listener.getsockname()[0] == "127.0.0.1"
    finally:
        fwd.close()

    class Transport:
        asked: list[str] = []

        def request_port_forward(self, address: str, port: int, handler: object = None) -> int:
            self.asked.append(address)
            return 40000

        def cancel_port_forward(self, address: str, port: int) -> None:
            pass

    t = Transport()
    board.ReverseForward(t, "127.0.0.1", 9190).close()  # type: ignore[arg-type]
    assert t.asked == ["127.0.0.1"]  # on the board's loopback, not its network
