"""RPC sessions with boards: direct (``--rpc HOST:PORT``), through a tracker (``--rpc-tracker
HOST:PORT --rpc-key KEY``), or to a port that an SSH forward (board.py) holds on this host.

Everything here speaks TVM's own RPC and tracker protocols (``tvm.rpc``, ``tvm.rpc.base``).
What this module adds is bounded waits and one-line errors that say what to do: TVM's client
blocks for ever on a port that accepts but never answers, and a tracker request waits for ever
when every board under a key is busy.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")

#: Seconds to wait for a TCP connection or an RPC handshake.
CONNECT_TIMEOUT_S = 30.0
#: Seconds to wait for a free board behind a tracker.
DEFAULT_WAIT_S = 120.0
#: Seconds this side waits for the board to answer one remote step (upload, load, a run) when
#: nothing better is known: a large library over a slow link, or a first run on a slow board.
STEP_TIMEOUT_S = 300.0


@dataclass
class RemoteSession:
    """A live RPC session and who is on the other end."""

    session: Any  # tvm.rpc.RPCSession
    key: str  # the tracker key, or "" for a direct session
    address: str  # host:port the session was opened to (after a tracker: the board's)
    via: str  # "rpc", "tracker HOST:PORT" or "ssh USER@HOST:PORT"
    info: dict[str, Any] = field(default_factory=dict)  # what else is known: arch, python, ...
    endpoint: tuple[str, int] | None = None  # where the RPC socket is connected (address may be prettier)

    def close(self) -> None:
        # Dropping the last reference closes the socket; the server then ends the session.
        self.session = None

    def call(self, fn: Callable[[], T], what: str, timeout: float, hint: str) -> T:
        """``fn()`` (remote calls on this RPC connection), given up after ``timeout`` s without an answer.

        On giving up the session's socket is shut down: the abandoned call then fails at once
        instead of holding the session, and the remote objects freed on the way out (each a
        blocking round trip made while holding the GIL) fail too instead of hanging the exit.
        """
        return bounded(fn, timeout, f"board {self.address}: {what}",
                       f"the board hung or the link to it dropped silently; gave up the session; {hint}",
                       on_timeout=self.sever)

    def sever(self) -> int:
        """Shut down this process's TCP connections to ``endpoint``; how many there were."""
        if self.endpoint is None:
            return 0
        return sever_connections(*self.endpoint)

    def identity(self) -> dict[str, Any]:
        return {"key": self.key or None, "address": self.address, "via": self.via, **self.info}


def parse_hostport(value: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), or a UserError naming the flag."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} takes HOST:PORT (e.g. 127.0.0.1:9190), not {value!r}")
    return host, int(port)


def is_loopback(host: str) -> bool | None:
    """Whether every address ``host`` resolves to is this machine's loopback; None if it does not resolve."""
    import ipaddress

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return None
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def exposure_warning(host: str, port: int, what: str) -> str | None:
    """One warning line when ``what`` at host:port is reached over the network instead of a tunnel.

    TVM's RPC has neither authentication nor encryption: whoever reaches such a server can upload
    and run any code on the board, and reads every tensor on the way.
    """
    if is_loopback(host) is not False:  # an unresolvable name fails with its own error right after
        return None
    return (f"mnv2-tvm: warning: the {what} at {host}:{port} is reachable from other hosts; TVM RPC is "
            "unauthenticated and unencrypted (anyone who reaches it can run code on the board): prefer "
            "--ssh USER@BOARD, which keeps the server on the board's 127.0.0.1 behind an SSH tunnel")


def one_line(err: BaseException) -> str:
    """The informative line of a TVM error (they carry C++ traces and blank lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):  # TVM puts the message after the trace
        if "Check failed" in ln or "Error" in ln or "error" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


def bounded(fn: Callable[[], T], timeout: float, what: str, hint: str,
            on_timeout: Callable[[], Any] | None = None) -> T:
    """Run ``fn`` in a helper thread and give up after ``timeout`` seconds.

    TVM's RPC client blocks in C++ without a timeout (e.g. on a port that accepts and then says
    nothing); a daemon thread lets us raise a clear error instead of hanging. The abandoned
    thread dies with the process. ``on_timeout`` (also run on Ctrl-C) should unblock it, e.g.
    by shutting its socket down; it is then given a few seconds to finish.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=target, name=f"bounded: {what}", daemon=True)
    th.start()
    try:
        th.join(timeout)
    except BaseException:
        if on_timeout is not None:
            on_timeout()
            th.join(5)
        raise
    if th.is_alive():
        if on_timeout is not None:
            on_timeout()
            th.join(5)
        raise UserError(f"{what}: no answer within {timeout:.0f} s; {hint}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def sever_connections(host: str, port: int) -> int:
    """Shut down (both ways) every TCP socket of this process connected to host:port.

    TVM's RPC client keeps its socket in C++ with no timeout and no handle for Python; this
    finds it among the process's descriptors. A reader blocked on it gets EOF at once.
    """
    try:
        peers = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (not Linux): nothing to do
        return 0
    n = 0
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                    peer = sock.getpeername()
                    if peer[1] == port and peer[0] in peers:
                        sock.shutdown(socket.SHUT_RDWR)  # acts on the shared socket, not only this dup
                        n += 1
            except OSError:
                pass
    return n


def probe_tcp(host: str, port: int, what: str, hint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with a clear message, when nothing listens at host:port."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror as e:
        raise UserError(f"{what}: cannot resolve host {host!r} ({e.strerror}); check the name") from None
    except ConnectionRefusedError:
        raise UserError(f"{what}: connection to {host}:{port} refused (nothing listens there); {hint}") from None
    except TimeoutError:
        raise UserError(f"{what}: {host}:{port} did not answer within {timeout:.0f} s (unreachable or "
                        f"filtered); {hint}") from None
    except OSError as e:
        raise UserError(f"{what}: cannot reach {host}:{port} ({e.strerror or e}); {hint}") from None


def connect(host: str, port: int, *, key: str = "", session_timeout: float = 0,
            timeout: float = CONNECT_TIMEOUT_S, via: str = "rpc") -> RemoteSession:
    """A direct RPC session to a server at host:port (``--rpc``)."""
    from tvm import rpc

    what = f"RPC server {host}:{port}"
    hint = "let `mnv2-tvm bench --ssh USER@BOARD` start one on the board's loopback, or start one with " \
           "`mnv2-tvm board start --ssh USER@BOARD` and reach it through `mnv2-tvm board tunnel`"
    probe_tcp(host, port, what, hint, timeout)
    try:
        sess = bounded(lambda: rpc.connect(host, port, key, session_timeout=session_timeout),
                       timeout, what, "is that port really a TVM RPC server?")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM raises InternalError/TVMError with a C++ trace
        msg = one_line(e)
        if "is not TVM RPC server" in msg:
            raise UserError(f"{what} answers but is not a TVM RPC server: wrong port?") from None
        if "mismatch" in msg.lower() or "key" in msg.lower():
            raise UserError(f"{what} refused the session ({msg}); a server registered with a tracker only "
                            "serves sessions the tracker hands out: use --rpc-tracker HOST:PORT --rpc-key KEY") from None
        raise UserError(f"{what}: {msg}") from None
    return RemoteSession(sess, key, f"{host}:{port}", via, endpoint=(host, port))


class _TrackerClient:
    """A connection to a TVM RPC tracker, with a socket timeout on every exchange.

    Same messages as ``tvm.rpc.TrackerSession`` (through ``tvm.rpc.base``); it exists because
    ``TrackerSession.request`` waits for ever for a free board and hides which board it got.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        from tvm.rpc import base

        self.base = base
        self.addr = f"{host}:{port}"
        probe_tcp(host, port, f"RPC tracker {self.addr}",
                  "start one here with `python3 -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190`", timeout)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(self.sock, 4))[0]
        except OSError:
            self.sock.close()
            raise UserError(f"{self.addr} accepted a connection but did not answer as an RPC tracker; "
                            "wrong port?") from None
        if magic != base.RPC_TRACKER_MAGIC:
            self.sock.close()
            raise UserError(f"{self.addr} is not a TVM RPC tracker; wrong port?")

    def call(self, *msg: Any, timeout: float) -> Any:
        self.sock.settimeout(timeout)
        self.base.sendjson(self.sock, list(msg))
        return self.base.recvjson(self.sock)

    def summary(self, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
        value = self.call(self.base.TrackerCode.SUMMARY, timeout=timeout)
        if value[0] != self.base.TrackerCode.SUCCESS:
            raise UserError(f"RPC tracker {self.addr} answered {value!r} to a summary request")
        return value[1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def tracker_summary(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """The tracker's ``summary()``: ``queue_info`` {key: {free, pending}} and ``server_info``."""
    client = _TrackerClient(host, port, timeout)
    try:
        return client.summary(timeout)
    finally:
        client.close()


def boards_under(summary: dict[str, Any], key: str) -> int:
    """How many servers are registered under ``key`` in a tracker summary."""
    return sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{key}")


def request(host: str, port: int, key: str, *, wait_s: float = DEFAULT_WAIT_S, session_timeout: float = 0,
            timeout: float = CONNECT_TIMEOUT_S) -> RemoteSession:
    """A session to a free board under ``key`` at a tracker, waiting at most ``wait_s`` for one."""
    from tvm import rpc

    client = _TrackerClient(host, port, timeout)
    where = f"RPC tracker {client.addr}"
    try:
        summary = client.summary(timeout)
        queue = summary.get("queue_info", {})
        if key not in queue and boards_under(summary, key) == 0:
            known = ", ".join(sorted(queue)) or "none"
            raise UserError(f"no board is registered under key {key!r} at {where} (keys there: {known}); "
                            f"start one with `mnv2-tvm board tunnel --ssh USER@BOARD --rpc-tracker {client.addr} "
                            f"--rpc-key {key}` or, for this machine, `python3 -m tvm.exec.rpc_server --host 127.0.0.1 "
                            f"--tracker {client.addr} --key {key}`")
        try:
            value = client.call(client.base.TrackerCode.REQUEST, key, "", 1, timeout=wait_s)
        except TimeoutError:
            n = boards_under(summary, key)
            raise UserError(f"no free board under key {key!r} at {where} within {wait_s:.0f} s "
                            f"({n} registered, all busy); try again later or wait longer with --wait") from None
        except OSError as e:
            raise UserError(f"{where} dropped the connection while we waited for a board ({e}); "
                            "is the tracker still running?") from None
    finally:
        client.close()
    if value[0] != client.base.TrackerCode.SUCCESS:
        raise UserError(f"{where} refused the request for key {key!r}: {value!r}")
    url, bport, matchkey = value[1]
    try:
        sess = bounded(lambda: rpc.connect(url, bport, matchkey, session_timeout=session_timeout),
                       timeout, f"board {url}:{bport} (key {key!r})",
                       "the tracker lists it but it does not answer; is the board's server reachable from here?")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"board {url}:{bport} handed out by {where} (key {key!r}) refused the session: "
                        f"{one_line(e)}") from None
    return RemoteSession(sess, key, f"{url}:{bport}", f"tracker {client.addr}", endpoint=(url, int(bport)))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    """Poll until something accepts on host:port; False on timeout or when ``alive()`` says no."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


class LocalTracker:
    """A TVM RPC tracker on this host's loopback, in its own process group.

    ``tune --ssh`` needs one because MetaSchedule's RPC runner only talks to trackers; tests use
    it for a board farm. ``stop()`` ends exactly the group it started.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> LocalTracker:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", self.host, "--port", str(self.port),
             "--port-end", str(self.port + 1), "--silent"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # its own group: stop() kills it and nothing else
        )
        if not wait_for_port(self.host, self.port, timeout, alive=lambda: self.proc.poll() is None):
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()[-400:]
            self.stop()
            raise UserError(f"the RPC tracker on {self.address} did not start: {err.decode(errors='replace').strip()}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> LocalTracker:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_registered(host: str, port: int, key: str, count: int = 1, timeout: float = 60.0) -> int:
    """Wait until ``count`` boards are registered under ``key``; return how many are."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n = boards_under(tracker_summary(host, port), key)
        if n >= count:
            return n
        if time.monotonic() > deadline:
            raise UserError(f"only {n} of {count} board(s) registered under key {key!r} at the tracker "
                            f"{host}:{port} after {timeout:.0f} s; see the boards' rpc.log")
        time.sleep(0.25)


@contextlib.contextmanager
def session_errors(where: str, hint: str) -> Iterator[None]:
    """Turn a TVM error raised mid-session into a UserError naming the board."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM errors carry no useful type
        msg = one_line(e)
        if "RPCSessionTimeoutError" in msg or session_lost(msg):
            raise UserError(f"lost the RPC session with {where} ({msg}): the server died or was stopped; "
                            f"{hint}") from None
        raise UserError(f"{where}: {msg}") from None


#: What TVM's RPC client says when the other end is gone: the server closed the socket
#: (``code=kShutdown``, or ``code=1`` in older builds), a reset, a refused or failed connect.
_LOST = re.compile(r"code=(?:1|kShutdown)\b|[Cc]losed|Broken pipe|reset|EOF|Connect to \S+ failed|[Cc]onnection|"
                   r"[Ss]ocket|recv|send")


def session_lost(message: str) -> bool:
    """Whether an RPC error says the session or connection is gone (the server died, was killed or
    became unreachable), rather than that the remote call itself failed. A session the server
    ended at its own timeout (``RPCSessionTimeoutError``) is not lost: the server is there."""
    return "RPCSessionTimeoutError" not in message and bool(_LOST.search(message))


#: Seconds a request waits for a board before it asks the tracker whether any is registered.
WAIT_PROBE_S = 2.0


def request_board(host: str, port: int, key: str, wait_s: float, stopped: Callable[[], bool],
                  on_wait: Callable[[str], None] | None = None) -> tuple[str, int, str]:
    """(url, port, matchkey) of a free board under ``key``, retrying a tracker that is down or restarting,
    until ``wait_s`` has passed or ``stopped()`` says so (the tuning runner's per-candidate request).

    ``on_wait(reason)`` hears, every few seconds, why no board came: the tracker is unreachable, or
    no board is registered under the key (boards that are only busy are not reported), so a
    caller can say that it waits for a board rather than for a result.
    """
    from tvm.rpc import base

    deadline = time.monotonic() + wait_s
    last = "no free board"
    probe_at = time.monotonic() + WAIT_PROBE_S

    def waiting(reason: str | None = None) -> None:
        nonlocal probe_at
        if on_wait is None or time.monotonic() < probe_at:
            return
        probe_at = time.monotonic() + WAIT_PROBE_S
        if reason is None:
            try:
                n = boards_under(tracker_summary(host, port, timeout=5), key)
            except (UserError, OSError, ValueError) as e:
                n, reason = 0, str(e)
            if n:
                return
            reason = reason or f"no board registered under key {key!r} at the tracker {host}:{port}"
        on_wait(reason)

    while not stopped() and time.monotonic() < deadline:
        try:
            client = _TrackerClient(host, port, timeout=min(CONNECT_TIMEOUT_S, max(1.0, deadline - time.monotonic())))
        except UserError as e:
            last = str(e)
            waiting(last)
            time.sleep(1.0)
            continue
        try:
            base.sendjson(client.sock, [base.TrackerCode.REQUEST, key, "", 1])
            # Short reads so that a stopped run (tune's cleanup) is not held up for the whole wait.
            client.sock.settimeout(1.0)
            while not stopped() and time.monotonic() < deadline:
                try:
                    value = base.recvjson(client.sock)
                except TimeoutError:
                    waiting()
                    continue
                if value[0] != base.TrackerCode.SUCCESS:
                    raise UserError(f"RPC tracker {host}:{port} refused the request for key {key!r}: {value!r}")
                url, bport, matchkey = value[1]
                return str(url), int(bport), str(matchkey)
        except OSError as e:  # the tracker went away while we waited: ask the next one on that port
            last = f"RPC tracker {host}:{port} dropped the connection ({e})"
        finally:
            client.close()
    if stopped():
        raise UserError(f"stopped while waiting for a board under key {key!r}")
    if last == "no free board":
        with contextlib.suppress(Exception):
            n = boards_under(tracker_summary(host, port, timeout=5), key)
            last = f"{n} registered, all busy" if n else "none registered: every board there died or stopped"
    raise UserError(f"no free board under key {key!r} at RPC tracker {host}:{port} within {wait_s:.0f} s ({last})")


#: Seconds a candidate may run past its session timeout before its worker is killed. The server
#: enforces ``session_timeout_sec`` itself; this margin only has to cover the round trips around it.
RUNNER_MARGIN_S = 10.0
