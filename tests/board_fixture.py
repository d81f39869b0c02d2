"""Pytest fixtures for the virtual aarch64 board (scripts/virtual_board.py).

Make them visible by importing the two fixtures into tests/conftest.py or a test
module (``from board_fixture import virtual_board, virtual_board_setup``; use
``tests.board_fixture`` if tests/ becomes a package), or via ``pytest_plugins``
in the top-level conftest.

Public API:

* ``virtual_board_setup`` (session): runs ``virtual_board.py setup`` once and
  returns the board directory (``Path``).  Skips when not root; fails loudly if
  setup fails, because CI runs as root and a silently skipped board would hide a
  broken deployment path.
* ``virtual_board`` (session): a ``BoardFactory``.  ``virtual_board()`` or
  ``virtual_board(name="x")`` starts one board instance and returns a ``Board``;
  ``virtual_board.stop(board)`` stops it early; the rest are stopped at session end.
  Several boards may run at once (same rootfs, separate sshd ports).

Only the standard library is imported at module level, so collecting tests does
not pay for paramiko or TVM.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import paramiko

__all__ = ["Board", "BoardFactory", "left_on", "virtual_board", "virtual_board_setup"]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "virtual_board.py"
SETUP_TIMEOUT_S = 900
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Board:
    """One running board: an sshd on ``host:ssh_port`` inside the arm64 rootfs."""

    host: str
    ssh_port: int
    user: str
    key_path: Path
    known_hosts: Path
    root: Path  # the board's rootfs as seen from the host
    name: str = ""
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def ssh(self, timeout: float = 60.0) -> paramiko.SSHClient:
        """A paramiko client that trusts only the board's generated host key."""
        import paramiko  # deferred: only tests that talk to a board need it

        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            self.host,
            port=self.ssh_port,
            username=self.user,
            key_filename=str(self.key_path),
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
        return client


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _root_args(board_dir: Path) -> list[str]:
    return ["--root", str(board_dir)]


class BoardFactory:
    """Starts board instances on demand and stops every one it started."""

    def __init__(self, board_dir: Path) -> None:
        self.board_dir = board_dir
        self._boards: dict[str, Board] = {}
        # pid in the name keeps parallel pytest sessions sharing one board dir apart.
        self._names = (f"pytest-{os.getpid()}-{i}" for i in itertools.count())

    def __call__(self, name: str | None = None) -> Board:
        name = name or next(self._names)
        proc = _script("start", *_root_args(self.board_dir), "--name", name, timeout=START_TIMEOUT_S)
        if proc.returncode != 0:
            pytest.fail(f"virtual board {name!r} failed to start:\n{proc.stderr}{proc.stdout}", pytrace=False)
        state = json.loads(proc.stdout)
        board = Board(
            host=state["host"],
            ssh_port=int(state["port"]),
            user=state["user"],
            key_path=Path(state["key_path"]),
            known_hosts=Path(state["known_hosts"]),
            root=Path(state["rootfs"]),
            name=name,
            state=state,
        )
        self._boards[name] = board
        return board

    def stop(self, board: Board) -> None:
        self._boards.pop(board.name, None)
        proc = _script("stop", *_root_args(self.board_dir), "--name", board.name, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"virtual board {board.name!r} failed to stop:\n{proc.stderr}")

    def stop_all(self) -> None:
        errors = []
        for board in list(self._boards.values()):
            try:
                self.stop(board)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(str(exc))
        if errors:
            raise RuntimeError("\n".join(errors))


def _board_dir() -> Path:
    env = os.environ.get("MNV2_TVM_BOARD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mnv2-tvm" / "virtual-board"


@pytest.fixture(scope="session")
def virtual_board_setup() -> Path:
    """Set up (or reuse the cached) virtual board; returns the board directory."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the virtual board needs root on Linux (chroot, mount, binfmt_misc)")
    board_dir = _board_dir()
    proc = _script("setup", *_root_args(board_dir), timeout=SETUP_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"virtual board setup failed:\n{proc.stderr}{proc.stdout}", pytrace=False)
    return board_dir


@pytest.fixture(scope="session")
def virtual_board(virtual_board_setup: Path) -> Iterator[BoardFactory]:
    """Factory fixture: ``virtual_board(name=None) -> Board``."""
    factory = BoardFactory(virtual_board_setup)
    yield factory
    factory.stop_all()


def left_on(board_root: Path, pid: int) -> list[str]:
    """What the mnv2-tvm process ``pid`` started on the board and is still there: server and
    bundle folders named after it, and processes working in them (the board shares this kernel,
    so /proc shows them)."""
    base = board_root / "root/.cache/mnv2-tvm"
    tag = f"-{pid}-"
    left = [str(p) for p in base.glob(f"rpc-*{tag}*")] + [str(p) for p in base.glob(f"bundles/*-{pid}")]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if tag in cwd and str(base) in cwd and state not in "ZX":
                left.append(f"pid {entry.name} in {cwd}")
    return left
