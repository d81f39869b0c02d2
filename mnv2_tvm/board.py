"""Boards over SSH (paramiko): status, start / stop of a TVM RPC server, port forwards, and the
SSH-only runner path.

The RPC server on a board listens on the board's loopback only. The host reaches it through
an SSH port forward it holds itself, so RPC never listens on the board's network. With a
tracker, the board's server reaches the host's tracker through a reverse forward and reports
an address on the host's loopback, which a same-port forward makes good.

``stop`` ends exactly what ``start`` started: start runs the server under ``setsid`` and writes
its process group id and the leader's start time to a state file on the board; stop kills that
group only, and only if the leader is still the process it started.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import select
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import paramiko

#: Where state, logs and uploaded bundles live on the board, relative to the login's home.
BOARD_DIR = ".cache/mnv2-tvm"
SSH_TIMEOUT_S = 30.0
#: Seconds without any answer to SSH keepalive probes after which the link counts as dead. A
#: link that drops silently (no FIN/RST: a NAT or Wi-Fi drop, a pulled cable) never errors at
#: the TCP level; probes every third of this catch it. Generous: a busy slow link delays answers.
SSH_ALIVE_TIMEOUT_S = 60.0
#: Seconds to wait when a fresh connection is tried only to stop what a dead link left running.
CLEANUP_CONNECT_TIMEOUT_S = 15.0
#: Seconds a link may take to answer one keepalive before cleanup after a failure counts it dead.
CLEANUP_PROBE_S = 10.0
#: `import tvm` takes 3-6 s under qemu and ~2 s on a Pi 4; a busy board can triple that.
SERVER_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUNTIME_PIP = "pip install apache-tvm=={v} (aarch64 wheel; runtime-only is enough: see README)"
_names = itertools.count()


# --------------------------------------------------------------------------- targets and options


@dataclass(frozen=True)
class SshTarget:
    """``USER@HOST[:PORT]`` as given to ``--ssh``."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, value: str) -> SshTarget:
        user, at, rest = value.rpartition("@")
        if not at or not user or not rest:
            raise UserError(f"--ssh takes USER@HOST[:PORT] (e.g. pi@raspberrypi.local), not {value!r}")
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", rest)
        if not m:
            raise UserError(f"--ssh: cannot read host and port from {rest!r}")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or 22)
        if not 0 < port < 65536:
            raise UserError(f"--ssh: port {port} is out of range")
        return cls(user, host, port)

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH names this host in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + ("" if self.port == 22 else f":{self.port}")


@dataclass(frozen=True)
class SshOptions:
    identity: Path | None = None  # private key; None: ssh-agent and ~/.ssh/id_*
    known_hosts: Path | None = None  # None: ~/.ssh/known_hosts
    trust_host_key: str | None = None  # "SHA256:..." to accept (and record) an unknown host key
    board_python: str = "python3"  # the interpreter on the board that has the TVM runtime
    timeout: float = SSH_TIMEOUT_S
    keepalive: float = SSH_ALIVE_TIMEOUT_S  # the link is dead after this long without an answer (0: never)

    @property
    def known_hosts_file(self) -> Path:
        return self.known_hosts or Path.home() / ".ssh" / "known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --------------------------------------------------------------------------- the connection


class _UnknownHostKey(Exception):
    def __init__(self, name: str, key_type: str, fp: str) -> None:
        super().__init__(name)
        self.name, self.key_type, self.fp = name, key_type, fp


def _append_known_host(path: Path, name: str, key: paramiko.PKey) -> None:
    from paramiko.hostkeys import HostKeyEntry

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = HostKeyEntry([name], key).to_line()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)


def _request_lock(transport: paramiko.Transport) -> threading.Lock:
    """The lock every waited-for global request on ``transport`` must hold.

    paramiko keeps a single ``completion_event`` per transport for global requests: two at once
    (a keepalive probe and a port-forward request) would replace each other's event, and one of
    them would wait for ever.
    """
    lock = getattr(transport, "_mnv2_request_lock", None)
    if lock is None:
        lock = transport._mnv2_request_lock = threading.Lock()  # type: ignore[attr-defined]
    return lock


def _answers(transport: paramiko.Transport, timeout: float) -> bool:
    """Whether the peer answers one keepalive request within ``timeout`` s."""
    answered = threading.Event()

    def probe() -> None:
        with contextlib.suppress(Exception), _request_lock(transport):
            # OpenSSH answers an unknown request with REQUEST_FAILURE: any answer proves the link.
            transport.global_request("keepalive@openssh.com", wait=True)
        answered.set()

    threading.Thread(target=probe, name="ssh keepalive probe", daemon=True).start()
    return answered.wait(timeout) and transport.is_active()


class LinkWatch:
    """Declares an SSH link dead when it stops answering, and closes it (OpenSSH's
    ServerAliveInterval / ServerAliveCountMax, which paramiko lacks).

    paramiko's own ``set_keepalive`` sends packets that need no answer: they keep NAT mappings
    warm but never notice a peer that went silent. Here a probe that wants an answer goes out
    every ``timeout / 3`` s; without an answer for ``timeout`` s the transport is closed, so every
    channel and port forward on it ends with EOF instead of waiting for ever.
    """

    def __init__(self, transport: paramiko.Transport, timeout: float, where: str,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.transport = transport
        self.timeout = timeout
        self.where = where
        self.on_lost = on_lost
        self.lost: str | None = None
        self._stop = threading.Event()
        self._interval = max(timeout / 3, 0.2)
        transport.set_keepalive(max(1, int(self._interval)))
        self._thread = threading.Thread(target=self._loop, name=f"ssh keepalive {where}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if not self.transport.is_active():
                self._declare(f"the SSH connection to {self.where} was closed by the board or the network")
                return
            if not _answers(self.transport, self.timeout - self._interval) and not self._stop.is_set():
                self._declare(f"the SSH link to {self.where} went silent (no answer to keepalives for "
                              f"{self.timeout:.0f} s): the board hung or the network dropped it")
                # Closing ends every channel and forward on it at once; a blocked reader gets EOF.
                with contextlib.suppress(Exception):
                    self.transport.close()
                return

    def _declare(self, reason: str) -> None:
        if self._stop.is_set() or self.lost is not None:
            return
        self.lost = reason
        if self.on_lost is not None:
            with contextlib.suppress(Exception):
                self.on_lost(reason)

    def stop(self) -> None:
        self._stop.set()


class BoardConnection:
    """One authenticated SSH connection to a board, host key verified; a link that stops
    answering for ``opts.keepalive`` s is closed and ``on_lost(reason)`` called."""

    def __init__(self, target: SshTarget, opts: SshOptions, on_lost: Callable[[str], None] | None = None) -> None:
        import paramiko

        self.target = target
        self.opts = opts
        kh = opts.known_hosts_file
        if opts.known_hosts is not None and not kh.is_file():
            raise UserError(f"--known-hosts file {kh} does not exist")
        if opts.identity is not None and not Path(opts.identity).is_file():
            raise UserError(f"--identity key file {opts.identity} does not exist")

        class Policy(paramiko.MissingHostKeyPolicy):
            # Unknown keys are refused unless the user passed this exact fingerprint.
            def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
                fp = fingerprint(key)
                if opts.trust_host_key is None or opts.trust_host_key.strip() != fp:
                    raise _UnknownHostKey(hostname, key.get_name(), fp)
                client.get_host_keys().add(hostname, key.get_name(), key)
                _append_known_host(kh, hostname, key)
                print(f"note: trusted {hostname} ({key.get_name()} {fp}); recorded in {kh}", file=sys.stderr)

        client = paramiko.SSHClient()
        if kh.is_file():
            try:
                client.load_host_keys(str(kh))
            except (OSError, paramiko.SSHException) as e:
                raise UserError(f"cannot read known_hosts file {kh}: {e}") from None
        client.set_missing_host_key_policy(Policy())
        where = f"SSH to {target}"
        try:
            client.connect(
                target.host, port=target.port, username=target.user,
                key_filename=str(opts.identity) if opts.identity else None,
                look_for_keys=opts.identity is None, allow_agent=True,
                timeout=opts.timeout, banner_timeout=opts.timeout, auth_timeout=opts.timeout,
            )
        except _UnknownHostKey as e:
            client.close()
            raise UserError(
                f"{where}: host key of {e.name} is not in {kh} ({e.key_type} {e.fp}); if that is the board's key "
                f"(check on the board: ssh-keygen -lf /etc/ssh/ssh_host_{e.key_type.replace('ssh-', '')}_key.pub), "
                f"trust it with --trust-host-key {e.fp}") from None
        except paramiko.BadHostKeyException as e:
            client.close()
            raise UserError(
                f"{where}: the host key CHANGED (now {fingerprint(e.key)}, {kh} has {fingerprint(e.expected_key)}); "
                f"if the board was reinstalled remove its line from {kh} (ssh-keygen -R '{target.known_hosts_name}'), "
                "otherwise do not connect") from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise UserError(f"{where}: the key {opts.identity} is encrypted; load it into ssh-agent "
                            f"(ssh-add {opts.identity}) and try again without --identity") from None
        except paramiko.AuthenticationException:
            client.close()
            key = f"key {opts.identity}" if opts.identity else "ssh-agent / ~/.ssh keys"
            raise UserError(f"{where}: authentication failed with {key}; put the public key in the board's "
                            f"~{target.user}/.ssh/authorized_keys (ssh-copy-id -i KEY.pub -p {target.port} {target.user}@"
                            f"{target.host}) or pass the right --identity") from None
        except socket.gaierror as e:
            client.close()
            raise UserError(f"{where}: cannot resolve {target.host!r} ({e.strerror}); check the name") from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            client.close()
            raise UserError(f"{where}: connection refused on port {target.port}; is sshd running there, and is "
                            "that the right port (USER@HOST:PORT)?") from None
        except TimeoutError:
            client.close()
            raise UserError(f"{where}: no answer within {opts.timeout:.0f} s; is the board on and reachable?") from None
        except paramiko.SSHException as e:
            client.close()
            raise UserError(f"{where}: {e} (is port {target.port} an SSH server?)") from None
        except OSError as e:
            client.close()
            raise UserError(f"{where}: {e.strerror or e}") from None
        self.client = client
        self._home: str | None = None
        self.watch: LinkWatch | None = None
        transport = client.get_transport()
        if opts.keepalive > 0 and transport is not None:
            self.watch = LinkWatch(transport, opts.keepalive, str(target), on_lost)

    def link_lost(self) -> str | None:
        """Why the link is gone (silent for too long, or closed under us); None while it is up."""
        if self.watch is not None and self.watch.lost:
            return self.watch.lost
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            return f"the SSH connection to {self.target} was closed by the board or the network"
        return None

    def answers(self, timeout: float) -> bool:
        """Whether the board answers a keepalive within ``timeout`` s (False once the link is closed)."""
        transport = self.client.get_transport()
        return transport is not None and transport.is_active() and _answers(transport, timeout)

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise UserError(f"the SSH connection to {self.target} was closed")
        return transport

    def run(self, cmd: str, timeout: float = 120.0) -> tuple[int, str, str]:
        """Run a shell command on the board: (exit code, stdout, stderr)."""
        import paramiko

        try:
            _, out, err = self.client.exec_command(cmd, timeout=timeout)
            # Drain both before the exit status: a full pipe would deadlock.
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), stdout, stderr
        except (TimeoutError, paramiko.SSHException, OSError) as e:
            raise UserError(f"command on {self.target} did not finish within {timeout:.0f} s or the connection "
                            f"broke ({type(e).__name__}): {cmd[:80]}") from None

    def check(self, cmd: str, what: str, timeout: float = 120.0) -> str:
        rc, out, err = self.run(cmd, timeout)
        if rc != 0:
            tail = (err.strip() or out.strip()).splitlines()[-3:]
            raise UserError(f"{what} failed on {self.target} (exit {rc}): {' | '.join(tail)}")
        return out

    @property
    def home(self) -> str:
        if self._home is None:
            self._home = self.check('printf %s "$HOME"', "reading $HOME").strip() or "/tmp"
        return self._home

    def board_path(self, *parts: str) -> str:
        return "/".join([self.home.rstrip("/"), BOARD_DIR, *parts])

    @contextlib.contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        try:
            client = self.client.open_sftp()
        except Exception as e:  # noqa: BLE001 - paramiko raises SSHException or EOFError
            raise UserError(f"SFTP to {self.target} failed ({e}); does its sshd enable the sftp subsystem?") from None
        try:
            yield client
        finally:
            client.close()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        self.client.close()

    def __enter__(self) -> BoardConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- what is on the board

_PROBE = r"""
import json, os, platform, sys
r = {"machine": platform.machine(), "python": platform.python_version(), "executable": sys.executable,
     "cpus": os.cpu_count()}
try:
    r["boot_id"] = open("/proc/sys/kernel/random/boot_id").read().strip()
    r["netns"] = os.readlink("/proc/self/ns/net")
except OSError:
    pass
try:
    info = open("/proc/cpuinfo").read()
except OSError:
    info = ""
# qemu-user shows the host's /proc/cpuinfo: an ARM userland over an x86 CPU list is emulated.
r["emulated"] = r["machine"] not in ("x86_64", "i686") and ("GenuineIntel" in info or "AuthenticAMD" in info)
model = ""
try:
    model = open("/proc/device-tree/model").read().strip("\0\n ")
except OSError:
    for line in info.splitlines():
        if line.startswith("Model"):
            model = line.split(":", 1)[1].strip()
r["model"] = model
try:
    import numpy
    r["numpy"] = numpy.__version__
except Exception as e:
    r["numpy_error"] = type(e).__name__ + ": " + str(e)
try:
    import tvm
    r["tvm"] = tvm.__version__
    r["tvm_path"] = os.path.dirname(tvm.__file__)
    try:
        import tvm.base
        r["runtime_only"] = bool(getattr(tvm.base, "_RUNTIME_ONLY", False))
    except Exception:
        pass
except Exception as e:
    r["tvm_error"] = type(e).__name__ + ": " + str(e).splitlines()[0] if str(e) else type(e).__name__
print("MNV2PROBE" + json.dumps(r))
"""


def normalise_arch(machine: str) -> str:
    """``uname -m`` → the names bundles use (x86_64, aarch64, arm)."""
    return {"arm64": "aarch64", "armv7l": "arm", "armv8l": "arm", "armv6l": "arm", "amd64": "x86_64"}.get(machine, machine)


def host_tvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:  # a source build
        import tvm

        return tvm.__version__


def release(version: str) -> str:
    """``0.27.0.post1`` → ``0.27.0``: post/dev/local suffixes keep the RPC protocol."""
    m = re.match(r"\d+(?:\.\d+){0,2}", version)
    return m.group(0) if m else version


def probe(conn: BoardConnection) -> dict[str, Any]:
    """Architecture, Python, TVM runtime, NumPy and whether the board is an emulator."""
    rc, out, err = conn.run("uname -m", timeout=60)
    machine = out.strip() if rc == 0 else "unknown"
    py = conn.opts.board_python
    rc, out, err = conn.run(f"{py} -c {shlex.quote(_PROBE)}", timeout=180)
    line = next((ln for ln in out.splitlines() if ln.startswith("MNV2PROBE")), None)
    if line is None:
        if rc == 127 or "not found" in err:
            raise UserError(f"board {conn.target} has no {py!r}; install Python 3 there (sudo apt install python3) "
                            "or name the interpreter with --board-python")
        raise UserError(f"probing board {conn.target} with {py!r} failed (exit {rc}): "
                        f"{(err.strip() or out.strip()).splitlines()[-1:]}")
    info = json.loads(line[len("MNV2PROBE"):])
    info["uname_m"] = machine
    info["arch"] = normalise_arch(machine)
    info["ssh"] = str(conn.target)
    return info


def check_runtime(info: dict[str, Any], target: SshTarget | str) -> None:
    """Refuse a board without the TVM runtime, or with another TVM release than ours."""
    ours = host_tvm_version()
    if "tvm" not in info:
        raise UserError(f"board {target} has no TVM runtime for {info.get('executable', 'python3')} "
                        f"({info.get('tvm_error', 'import tvm failed')}); on the board: "
                        + RUNTIME_PIP.format(v=ours))
    if release(info["tvm"]) != release(ours):
        raise UserError(f"board {target} has TVM {info['tvm']}, this host {ours}: RPC and libraries need the same "
                        f"release; on the board: " + RUNTIME_PIP.format(v=ours))
    if "numpy" not in info:
        raise UserError(f"board {target} has no NumPy for {info.get('executable', 'python3')}; "
                        "on the board: pip install numpy")


def shares_loopback(info: dict[str, Any]) -> bool:
    """True when the board runs on this very kernel and network namespace (a chroot, like the
    virtual board): its 127.0.0.1 is ours, so a port it binds there cannot be forwarded to the
    same port here (and need not be)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        return False
    return info.get("boot_id") == boot_id and info.get("netns") == netns


# --------------------------------------------------------------------------- RPC server on the board


@dataclass
class ServerState:
    """What ``start`` wrote on the board (``~/.cache/mnv2-tvm/rpc-NAME/state.json``)."""

    name: str
    pgid: int
    start_time: str  # field 22 of /proc/PID/stat: tells a recycled pid apart
    port: int  # on the board's loopback
    workdir: str
    tracker: str | None = None  # as the board reaches it (through a reverse forward)
    key: str | None = None
    started: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def _read_state(conn: BoardConnection, name: str) -> ServerState | None:
    path = conn.board_path(f"rpc-{name}", "state.json")
    rc, out, _ = conn.run(f"cat {shlex.quote(path)} 2>/dev/null", timeout=60)
    if rc != 0 or not out.strip():
        return None
    try:
        return ServerState(**json.loads(out))
    except (ValueError, TypeError):
        raise UserError(f"{path} on {conn.target} is damaged; remove it (and end the server by hand)") from None


# One small Python program runs on the board for liveness and stopping: portable (no procps
# flags), and it reads /proc the same way everywhere.
_GROUP = r"""
import os, signal, sys, time
pgid, start, action, wait = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
def stat(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
def members():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = stat(d)
            if f and int(f[2]) == pgid and f[0] not in "ZX":
                out.append(int(d))
    return out
lead = stat(pgid)
if lead is not None and lead[19] != start:
    print("RECYCLED"); sys.exit(0)
if action == "status":
    print("ALIVE" if members() else "GONE"); sys.exit(0)
for sig, t in ((signal.SIGTERM, wait), (signal.SIGKILL, wait)):
    if not members():
        break
    try:
        os.killpg(pgid, sig)
        if sig == signal.SIGTERM:
            os.killpg(pgid, signal.SIGCONT)  # a stopped member acts on SIGTERM only once continued
    except ProcessLookupError:
        break
    end = time.time() + t
    while members() and time.time() < end:
        time.sleep(0.1)
left = members()
print("LEFT " + " ".join(map(str, left)) if left else "STOPPED")
"""


def server_status(conn: BoardConnection, state: ServerState) -> str:
    """``ALIVE``, ``GONE`` or ``RECYCLED`` (the pid now belongs to another process)."""
    out = conn.check(f"{conn.opts.board_python} -c {shlex.quote(_GROUP)} {state.pgid} {state.start_time} status 0",
                     "checking the RPC server", timeout=120)
    return out.strip().split()[-1] if out.strip() else "GONE"


def leader_status(conn: BoardConnection, state: ServerState) -> str:
    """``ALIVE`` while the server's own process (its group's leader, which listens and registers)
    runs, ``STOPPED`` while it is stopped (SIGSTOP, a debugger: registered at the tracker, it
    answers nothing), else ``GONE``. A shell test of ``/proc``, no Python: the keeper asks this
    while a tuning run waits, and an interpreter under emulation takes seconds to start."""
    q = shlex.quote
    out = conn.check(f"s=$(sed 's/.*) //' /proc/{int(state.pgid)}/stat 2>/dev/null); set -- $s; "
                     f"if [ \"$1\" != Z ] && [ \"${{20:-}}\" = {q(state.start_time)} ]; then "
                     f"case \"$1\" in T|t) echo STOPPED;; *) echo ALIVE;; esac; else echo GONE; fi",
                     "checking the RPC server", timeout=60)
    last = out.strip().rsplit("\n", 1)[-1] if out.strip() else "GONE"
    return last if last in ("ALIVE", "STOPPED") else "GONE"


def extra_runtime(conn: BoardConnection, info: dict[str, Any]) -> str | None:
    """``libtvm_runtime_extra.so`` of a runtime-only install, if present.

    A runtime-only ``import tvm`` does not load it, yet MetaSchedule's RPC runner needs its
    ``tvm.contrib.random.random_fill_for_measure`` on the server to fill candidate inputs.
    """
    if not info.get("runtime_only") or not info.get("tvm_path"):
        return None
    path = f"{info['tvm_path']}/lib/libtvm_runtime_extra.so"
    rc, _, _ = conn.run(f"test -f {shlex.quote(path)}", timeout=60)
    return path if rc == 0 else None


def start_server(conn: BoardConnection, name: str, *, port: int | None = None, tracker: str | None = None,
                 key: str | None = None, load_library: str | None = None,
                 ready_timeout: float = SERVER_READY_TIMEOUT_S,
                 on_started: Callable[[ServerState], None] | None = None,
                 guard: Callable[[], contextlib.AbstractContextManager[bool]] | None = None) -> ServerState:
    """Start ``python3 -m tvm.exec.rpc_server`` on the board's 127.0.0.1, detached, in its own
    process group, and wait until it listens. With ``tracker`` (an address the board reaches)
    it registers there under ``key`` and reports 127.0.0.1 as its address. A previous server's
    log under that name is kept as ``rpc.log.prev``.

    ``on_started(state)`` hears of the process group as soon as it exists, before it listens, so
    that whoever may have to stop it knows it. ``guard()`` is entered around the launch and that
    call, and yields whether to launch at all: a keeper starting a server while its owner stops
    can then never leave one behind that the owner does not know of."""
    _check_name(name)
    old = _read_state(conn, name)
    if old is not None and server_status(conn, old) == "ALIVE":
        raise UserError(f"an RPC server named {name!r} already runs on {conn.target} (port {old.port}); stop it "
                        f"with `mnv2-tvm board stop --ssh {conn.target} --name {name}` or pick another --name")
    workdir = conn.board_path(f"rpc-{name}")
    first = port or 9090
    last = first + 1 if port else 9200
    args = ["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(first), "--port-end", str(last)]
    if tracker:
        args += ["--tracker", tracker, "--key", key or "", "--custom-addr", "127.0.0.1"]
    if load_library:
        args += ["--load-library", load_library]
    q = shlex.quote
    # Only a fully detached command lets the exec channel close: `;` not `&&` before setsid,
    # and no stream left connected to the channel. setsid makes the server a group leader.
    # The pid and its /proc entry (the start time that tells a recycled pid apart) in one go, once
    # setsid has made it a group leader (for a moment after the fork it is still in the shell's group).
    cmd = (f"mkdir -p {q(workdir)}; cd {q(workdir)} || exit 1; rm -f state.json; "
           "if [ -f rpc.log ]; then mv -f rpc.log rpc.log.prev; fi; "
           f"setsid {conn.opts.board_python} {' '.join(q(a) for a in args)} > rpc.log 2>&1 < /dev/null & "
           "pid=$!; i=0; while [ $i -lt 40 ]; do "
           "g=$(sed 's/.*) //' /proc/$pid/stat 2>/dev/null | cut -d' ' -f3); "
           "if [ -z \"$g\" ] || [ \"$g\" = \"$pid\" ]; then break; fi; i=$((i+1)); sleep 0.05; done; "
           "echo; echo $pid; cat /proc/$pid/stat 2>/dev/null || true")
    with guard() if guard is not None else contextlib.nullcontext(True) as go:
        if not go:
            raise UserError(f"not starting an RPC server on {conn.target}: stopping")
        out = conn.check(cmd, "starting the RPC server", timeout=60)
        lines = out.strip().splitlines()
        pid_line = next((i for i, ln in enumerate(lines) if ln.strip().isdigit()), None)
        if pid_line is None:
            raise UserError(f"starting the RPC server on {conn.target} printed {out!r}, not a pid")
        pid = int(lines[pid_line])
        stat = " ".join(lines[pid_line + 1:])
        fields = stat.rsplit(")", 1)[1].split() if ")" in stat else []
        if len(fields) < 20:
            log = conn.run(f"cat {q(workdir)}/rpc.log", timeout=30)[1].strip().splitlines()[-3:]
            raise UserError(f"the RPC server on {conn.target} exited at once: {' | '.join(log) or 'no log'}")
        state = ServerState(name, pid, fields[19], 0, workdir, tracker, key)
        if on_started is not None:
            on_started(state)
    if int(fields[2]) != pid:
        _stop_group(conn, state)
        raise UserError(f"setsid did not make the RPC server on {conn.target} a process group leader "
                        f"(pgid {fields[2]} != pid {pid}); stopped it")
    # Wait for the bind line, not the port: a bare connect would be taken as an RPC client.
    wait = (f"for i in $(seq 1 {int(ready_timeout * 4)}); do "
            f"grep -o 'bind to [^ ]*' {q(workdir)}/rpc.log && exit 0; "
            f"kill -0 {pid} 2>/dev/null || break; sleep 0.25; done; tail -n 5 {q(workdir)}/rpc.log; exit 1")
    rc, out, _ = conn.run(wait, timeout=ready_timeout + 30)
    m = re.search(r"bind to \S+:(\d+)", out)
    if rc != 0 or not m:
        _stop_group(conn, state)
        tail = " | ".join(ln for ln in out.strip().splitlines()[-3:])
        raise UserError(f"the RPC server on {conn.target} did not come up within {ready_timeout:.0f} s "
                        f"(stopped it): {tail or 'no log'}")
    state.port = int(m.group(1))
    with conn.sftp() as sftp, sftp.open(f"{workdir}/state.json", "w") as f:
        f.write(state.to_json())
    return state


def _stop_group(conn: BoardConnection, state: ServerState) -> str:
    out = conn.check(
        f"{conn.opts.board_python} -c {shlex.quote(_GROUP)} {state.pgid} {state.start_time} stop {STOP_TIMEOUT_S / 2}",
        "stopping the RPC server", timeout=STOP_TIMEOUT_S * 2 + 60).strip()
    result = out.splitlines()[-1] if out else "STOPPED"
    if result.startswith("LEFT"):
        raise UserError(f"processes {result[5:]} of the RPC server group {state.pgid} on {conn.target} survived "
                        "SIGKILL; look at them on the board")
    return result


def stop_server(conn: BoardConnection, name: str) -> ServerState | None:
    """Stop the server ``start_server(name)`` started and remove its folder; None if there was none."""
    _check_name(name)
    state = _read_state(conn, name)
    if state is None:
        return None
    _stop_group(conn, state)
    conn.check(f"rm -rf {shlex.quote(state.workdir)}", "removing the server's folder", timeout=60)
    return state


def list_servers(conn: BoardConnection) -> list[tuple[ServerState, str]]:
    """Servers started by mnv2-tvm on this board and whether each still runs."""
    rc, out, _ = conn.run(f"ls -d {shlex.quote(conn.board_path())}/rpc-*/ 2>/dev/null", timeout=60)
    found = []
    for line in out.split():
        name = line.rstrip("/").rsplit("/rpc-", 1)[-1]
        if NAME_RE.match(name):
            state = _read_state(conn, name)
            if state is not None:
                found.append((state, server_status(conn, state)))
    return found


# --------------------------------------------------------------------------- port forwards


def _pump(sock: socket.socket, chan: Any, stop: threading.Event) -> None:
    """Copy bytes both ways between a socket and an SSH channel until either side closes."""
    try:
        while not stop.is_set():
            ready, _, _ = select.select([sock, chan], [], [], 0.5)
            if sock in ready:
                data = sock.recv(1 << 16)
                if not data:
                    break
                chan.sendall(data)
            if chan in ready:
                data = chan.recv(1 << 16)
                if not data:
                    break
                sock.sendall(data)
    except (OSError, EOFError):
        pass
    except Exception:  # noqa: BLE001 - paramiko.SSHException when the transport dies
        pass
    finally:
        with contextlib.suppress(Exception):
            chan.close()
        with contextlib.suppress(OSError):
            sock.close()


class LocalForward:
    """This host's 127.0.0.1:``port`` → ``dest_host:dest_port`` as the board sees it (ssh -L)."""

    def __init__(self, transport: paramiko.Transport, dest_host: str, dest_port: int, local_port: int = 0) -> None:
        self.transport = transport
        self.dest = (dest_host, dest_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(("127.0.0.1", local_port))
        except OSError as e:
            self.listener.close()
            raise UserError(f"cannot listen on 127.0.0.1:{local_port} for the SSH forward ({e.strerror}); "
                            "pick another --local-port") from None
        self.listener.listen(16)
        self.listener.settimeout(0.5)
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, name=f"forward :{self.port}", daemon=True)
        self._accept.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.settimeout(None)
            try:
                chan = self.transport.open_channel("direct-tcpip", self.dest, peer, timeout=SSH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - refused by sshd, or nothing listens on the board
                sock.close()
                continue
            t = threading.Thread(target=_pump, args=(sock, chan, self._stop), daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(2)


class ReverseForward:
    """The board's 127.0.0.1:``port`` → ``to_host:to_port`` on this side (ssh -R)."""

    def __init__(self, transport: paramiko.Transport, to_host: str, to_port: int) -> None:
        import paramiko

        self.transport = transport
        self.to = (to_host, to_port)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            with _request_lock(transport):
                self.port = int(transport.request_port_forward("127.0.0.1", 0, handler=self._handler))
        except paramiko.SSHException as e:
            raise UserError(f"the board's sshd refused a reverse port forward ({e}); allow it with "
                            "`AllowTcpForwarding yes` in its sshd_config") from None

    def _handler(self, chan: Any, origin: tuple, server: tuple) -> None:
        try:
            sock = socket.create_connection(self.to, timeout=10)
        except OSError:
            chan.close()
            return
        sock.settimeout(None)
        t = threading.Thread(target=_pump, args=(sock, chan, self._stop), daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception), _request_lock(self.transport):
            self.transport.cancel_port_forward("127.0.0.1", self.port)
        for t in self._threads:
            t.join(2)


class Tunnel:
    """SSH port forwards held by a helper process, ``python -m mnv2_tvm.board --tunnel``.

    Not threads in this process: TVM's RPC client frees remote objects with a blocking round
    trip while holding the GIL, so a paramiko forward in the same process (pure Python) can never
    carry that round trip's answer and the client deadlocks. The helper runs in its own process
    group, takes commands as JSON lines on stdin, and exits when stdin closes, so it cannot
    outlive a parent that dies.
    """

    def __init__(self, target: SshTarget, opts: SshOptions, timeout: float | None = None) -> None:
        import subprocess

        self.target = target
        self.timeout = timeout or opts.timeout + 30
        self.lost: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mnv2_tvm.board", "--tunnel"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True,  # its own group: close() kills it and nothing else
        )
        cfg = {"user": target.user, "host": target.host, "port": target.port,
               "identity": str(opts.identity) if opts.identity else None,
               "known_hosts": str(opts.known_hosts_file), "timeout": opts.timeout, "keepalive": opts.keepalive}
        try:
            self._call(cfg)
        except BaseException:
            self.close()
            raise

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise UserError(f"the SSH tunnel helper for {self.target} has exited") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise UserError(f"the SSH tunnel helper for {self.target} did not answer within {self.timeout:.0f} s")
        reply = json.loads(line)
        if "lost" in reply:  # the link died while we asked
            self.lost = reply["lost"]
            raise UserError(self.lost)
        if "error" in reply:
            raise UserError(reply["error"])
        return reply

    def link_lost(self, wait: float = 1.0) -> str | None:
        """Why the helper's SSH link died (it says so on stdout before closing it), or None.

        The RPC client sees only EOF on its forwarded socket; this tells a dead link apart from a
        dead server. ``wait``: how long to give a report that may be on its way.
        """
        if self.lost is None and self.proc.stdout is not None and not self.proc.stdout.closed:
            with contextlib.suppress(OSError, ValueError):
                if select.select([self.proc.stdout], [], [], wait)[0]:
                    line = self.proc.stdout.readline()
                    if line:
                        self.lost = json.loads(line).get("lost")
        return self.lost

    def local(self, dest_host: str, dest_port: int, local_port: int = 0) -> int:
        """Forward this host's 127.0.0.1:``local_port`` (0: any) to dest as the board sees it."""
        return int(self._call({"local": [dest_host, dest_port, local_port]})["port"])

    def reverse(self, to_host: str, to_port: int) -> int:
        """Forward a port on the board's 127.0.0.1 to ``to_host:to_port`` here; returns that port."""
        return int(self._call({"reverse": [to_host, to_port]})["port"])

    def close(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]


def _tunnel_main() -> int:
    """The helper process behind :class:`Tunnel`."""

    out_lock = threading.Lock()  # replies and the keepalive thread's report share stdout

    def reply(obj: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    cfg = json.loads(sys.stdin.readline() or "{}")
    try:
        conn = BoardConnection(SshTarget(cfg["user"], cfg["host"], int(cfg["port"])),
                               SshOptions(identity=Path(cfg["identity"]) if cfg.get("identity") else None,
                                          known_hosts=Path(cfg["known_hosts"]), timeout=float(cfg["timeout"]),
                                          keepalive=float(cfg.get("keepalive", SSH_ALIVE_TIMEOUT_S))),
                               on_lost=lambda reason: reply({"lost": reason}))
    except UserError as e:
        reply({"error": str(e)})
        return 2
    reply({"ok": True})
    forwards: list[LocalForward | ReverseForward] = []
    try:
        for line in sys.stdin:  # EOF: the parent closed us or died
            msg = json.loads(line)
            try:
                if "local" in msg:
                    host, port, local_port = msg["local"]
                    forwards.append(LocalForward(conn.transport, host, int(port), int(local_port)))
                else:
                    host, port = msg["reverse"]
                    forwards.append(ReverseForward(conn.transport, host, int(port)))
                reply({"port": forwards[-1].port})
            except UserError as e:
                reply({"error": str(e)})
    finally:
        for f in reversed(forwards):
            f.close()
        conn.close()
    return 0


# --------------------------------------------------------------------------- a board, opened


@dataclass
class OpenBoard:
    """A board with a running RPC server reachable at 127.0.0.1:``local_port`` on this host.

    With ``open_board(keep_alive=True)``, ``conn`` and ``server`` are replaced when the keeper
    (``keeper``) reconnects or restarts the server."""

    conn: BoardConnection
    info: dict[str, Any]
    server: ServerState
    local_port: int
    started: bool  # False when we attached to a server someone else started
    key: str | None = None
    keeper: ServerKeeper | None = None

    @property
    def target(self) -> SshTarget:
        return self.conn.target

    def identity(self) -> dict[str, Any]:
        keep = ("arch", "uname_m", "model", "python", "tvm", "emulated", "cpus")
        return {"ssh": str(self.conn.target), **{k: self.info.get(k) for k in keep}}


def unique_name(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()[:20]}-{os.getpid()}-{next(_names)}"


@dataclass
class _Held:
    """What :func:`open_board` holds on a board and stops on the way out; a keeper swaps them."""

    conn: BoardConnection
    tunnel: Tunnel | None = None
    state: ServerState | None = None
    started: bool = False
    tracker_on_board: str | None = None  # the reverse forward the server reaches the tracker through
    lock: threading.RLock = field(default_factory=threading.RLock)


#: Seconds between the keeper's looks at the tracker.
KEEP_POLL_S = 1.0
#: Seconds the kept server may be missing from the tracker before the keeper looks at the board.
KEEP_GRACE_S = 2.0
#: Seconds the kept server may run unregistered (it reconnects to a restarted tracker by itself)
#: before the keeper restarts it.
KEEP_UNREGISTERED_S = 30.0
#: Seconds between attempts while the board cannot be reached or the server does not start.
KEEP_RETRY_S = 3.0
#: Seconds between the keeper's looks at the registered server's process on the board: a stopped
#: server stays registered at the tracker and hangs every session it is handed.
KEEP_LOOK_S = 10.0


class ServerKeeper:
    """Keeps the RPC server :func:`open_board` started registered at the tracker, for as long as
    the caller uses it (``tune --ssh``): a board the tuner started is the tuner's to keep alive.

    It watches the tracker (a local, cheap question) every :data:`KEEP_POLL_S` s. When the server
    is missing from it for :data:`KEEP_GRACE_S` s, it looks at the board: an SSH link or tunnel
    that dropped is reconnected and the forwards re-opened; a server that is gone (killed,
    crashed, or its tracker path lost with the link) is started again under the same name, port
    and key. It keeps trying every :data:`KEEP_RETRY_S` s while the board cannot be reached; how
    long that may last is the caller's to bound (the tuning runner's board wait). ``on_event``
    hears each restart and each failed attempt, one line each.
    """

    def __init__(self, held: _Held, board: OpenBoard, target: SshTarget, opts: SshOptions,
                 tracker: tuple[str, int], key: str, name: str, on_event: Callable[[str], None] | None) -> None:
        self.held, self.board, self.target, self.opts = held, board, target, opts
        self.tracker, self.key, self.name = tracker, key, name
        self.on_event = on_event
        self.shares = shares_loopback(board.info)
        self.port = board.server.port  # the board's port the tracker hands out (kept across restarts)
        self.restarts = 0
        self.problem: str | None = None  # the last failed attempt, while it lasts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"keep RPC server on {target}", daemon=True)

    def start(self) -> ServerKeeper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; a restart in progress is abandoned (its server is the cleanup's to stop)."""
        self._stop.set()
        self._thread.join(timeout)

    def _say(self, text: str) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(text)

    def _registered(self) -> bool | None:
        from .remote import boards_under, tracker_summary

        try:
            return boards_under(tracker_summary(*self.tracker, timeout=5), self.key) > 0
        except Exception:  # noqa: BLE001 - the tracker is not the keeper's to revive
            return None

    def _loop(self) -> None:
        missing_since: float | None = None
        last_look = time.monotonic()
        while not self._stop.wait(KEEP_POLL_S):
            registered = self._registered()
            if registered is None:
                continue
            now = time.monotonic()
            if registered:
                missing_since, self.problem = None, None
                if now - last_look < KEEP_LOOK_S:
                    continue
                last_look = now
            else:
                missing_since = missing_since or now
                if now - missing_since < KEEP_GRACE_S:
                    continue
            try:
                if registered:
                    self._unstick()
                elif self._revive(now - missing_since):
                    missing_since = None
                else:
                    self._stop.wait(KEEP_RETRY_S)  # alive, reconnecting to the tracker by itself
            except Exception as e:  # noqa: BLE001 - UserError, or paramiko on a link that just died
                if self._stop.is_set():
                    return
                problem = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                if problem != self.problem:
                    self._say(f"cannot restart the RPC server on {self.target} yet ({problem}); trying again "
                              f"every {KEEP_RETRY_S:.0f} s")
                self.problem = problem
                self._stop.wait(KEEP_RETRY_S)

    def _unstick(self) -> None:
        """A registered server that is stopped is restarted: it would hang every session."""
        held = self.held
        if held.state is None or leader_status(held.conn, held.state) != "STOPPED":
            return
        self._stop_old()
        self._restart("was stopped (SIGSTOP) and answered nothing")

    def _link_down(self) -> str | None:
        held = self.held
        tunnel = held.tunnel
        if tunnel is not None and (tunnel.proc.poll() is not None or tunnel.link_lost(0)):
            return tunnel.lost or f"the SSH tunnel to {self.target} closed"
        return held.conn.link_lost()

    def _revive(self, missing_for: float) -> bool:
        """Bring the server back if it needs it; whether it was (re)started."""
        held = self.held
        lost = self._link_down()
        if lost is not None:
            self._relink()
            self._stop_old()
            self._restart(f"was cut off ({lost})")
            return True
        if leader_status(held.conn, held.state) == "ALIVE":
            if missing_for < KEEP_UNREGISTERED_S:
                return False
            self._stop_old()
            self._restart(f"stayed unregistered at the tracker for {missing_for:.0f} s")
            return True
        self._stop_old()  # what is left of its group (a session process)
        # Its state is stale now: without it, start_server skips a second look at the group.
        held.conn.run(f"rm -f {shlex.quote(held.state.workdir)}/state.json", timeout=60)
        self._restart("died")
        return True

    def _relink(self) -> None:
        """A new SSH connection and tunnel (with the tracker's reverse forward) for the dead ones."""
        conn = BoardConnection(self.target, self.opts)
        try:
            tunnel = Tunnel(self.target, self.opts)
            try:
                tracker_on_board = f"127.0.0.1:{tunnel.reverse(*self.tracker)}"
            except BaseException:
                tunnel.close()
                raise
        except BaseException:
            conn.close()
            raise
        with self.held.lock:
            old_conn, old_tunnel = self.held.conn, self.held.tunnel
            self.held.conn, self.held.tunnel, self.held.tracker_on_board = conn, tunnel, tracker_on_board
            self.board.conn = conn
        for old in (old_tunnel, old_conn):
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()

    def _stop_old(self) -> None:
        """Stop the kept server's group if it still runs (cut off from the tracker, or wedged)."""
        state = self.held.state
        if state is not None:
            with contextlib.suppress(UserError):
                _stop_group(self.held.conn, state)

    def _restart(self, why: str) -> None:
        held = self.held
        assert held.tunnel is not None

        def started(state: ServerState) -> None:
            with held.lock:
                held.state = state  # the cleanup stops this group, even mid-start
                self.board.server = state

        @contextlib.contextmanager
        def guard() -> Iterator[bool]:
            # The owner's cleanup reads held.state under this lock after stopping the keeper: a
            # server is either launched and known to it, or not launched at all.
            with held.lock:
                yield not self._stop.is_set()

        library = extra_runtime(held.conn, self.board.info)
        try:
            state = start_server(held.conn, self.name, port=self.port, tracker=held.tracker_on_board, key=self.key,
                                 load_library=library, on_started=started, guard=guard)
        except UserError as e:
            if "cannot bind" not in str(e) or self._stop.is_set():
                raise
            state = start_server(held.conn, self.name, port=_free_port_here(), tracker=held.tracker_on_board,
                                 key=self.key, load_library=library, on_started=started, guard=guard)
        if not self.shares:
            # The tracker hands out the board's port; the same port must reach it from this side.
            with contextlib.suppress(UserError):  # already forwarded: the same port, the same tunnel
                held.tunnel.local("127.0.0.1", state.port, state.port)
        started(state)
        self.port = state.port
        self.restarts += 1
        self.problem = None
        self._say(f"the RPC server on {self.target} {why}: restarted it (process group {state.pgid}, "
                  f"port {state.port})")


@contextlib.contextmanager
def open_board(target: SshTarget, opts: SshOptions, *, name: str | None = None, tracker: tuple[str, int] | None = None,
               key: str | None = None, attach: bool = False, local_port: int = 0,
               precheck: Callable[[dict[str, Any]], None] | None = None, keep_alive: bool = False,
               on_event: Callable[[str], None] | None = None) -> Iterator[OpenBoard]:
    """Connect, check the runtime, start an RPC server (or attach to the one named ``name``) and
    forward a port to it; on exit stop what was started here and nothing else.

    With ``tracker`` (host, port) on this side, the server registers there under ``key``;
    ``keep_alive`` then has a :class:`ServerKeeper` restart it (and reconnect) whenever it drops
    out of the tracker, telling ``on_event``.
    ``precheck(info)`` may refuse the board (by raising) before anything is started on it.
    When the SSH link dies under the caller, the caller's error becomes one line saying so, and
    the server is stopped over a fresh connection if the board can still be reached.
    """
    held = _Held(BoardConnection(target, opts))
    keeper: ServerKeeper | None = None
    failure: BaseException | None = None
    try:
        conn = held.conn
        info = probe(conn)
        if precheck is not None:
            precheck(info)
        check_runtime(info, target)
        name = _check_name(name) if name else unique_name("session")
        existing = _read_state(conn, name) if attach else None
        held.tunnel = tunnel = Tunnel(target, opts)
        if existing is not None and server_status(conn, existing) == "ALIVE":
            if tracker and not existing.tracker:
                raise UserError(f"the RPC server {name!r} on {target} was started without a tracker; stop it or "
                                "use another --name")
            held.state = existing
        elif tracker:
            held.tracker_on_board = f"127.0.0.1:{tunnel.reverse(*tracker)}"
            # The tracker hands out (127.0.0.1, the server's port): the same port must reach the
            # board from this side, so pick one free here and have the board bind exactly it.
            for attempt in range(3):
                try:
                    held.state = start_server(conn, name, port=local_port or _free_port_here(),
                                              tracker=held.tracker_on_board, key=key,
                                              load_library=extra_runtime(conn, info))
                    break
                except UserError as e:
                    if "cannot bind" not in str(e) or local_port or attempt == 2:
                        raise
            held.started = True
        else:
            held.state = start_server(conn, name, load_library=extra_runtime(conn, info))
            held.started = True
        state = held.state
        assert state is not None
        if tracker and shares_loopback(info):
            port = state.port  # the board's loopback is ours: its port needs no forward
        else:
            port = tunnel.local("127.0.0.1", state.port, state.port if tracker else local_port)
        ob = OpenBoard(conn, info, state, port, held.started, key)
        if keep_alive and tracker and held.started:
            ob.keeper = keeper = ServerKeeper(held, ob, target, opts, tracker, key or "", name, on_event).start()
        yield ob
    except BaseException as e:
        failure = e
        raise
    finally:
        if keeper is not None:
            keeper.stop()
        with held.lock:
            conn, tunnel, state, started = held.conn, held.tunnel, held.state, held.started
        # Asked before the tunnel closes: its helper reports a dead link before it closes it.
        lost = (tunnel.link_lost(0.2 if failure else 0) if tunnel is not None else None) or conn.link_lost()
        if failure is not None and lost is None and not conn.answers(CLEANUP_PROBE_S):
            # Keepalives off or not due yet: without this, cleanup would wait on a silent link.
            lost = (f"the SSH link to {target} went silent (no answer to a keepalive within {CLEANUP_PROBE_S:.0f} s "
                    "after the failure): the board hung or the network dropped it")
        if tunnel is not None:
            tunnel.close()
        problem = _stop_started(conn, state, relink=lost is not None) if started and state is not None else None
        conn.close()
        stop_hint = f"stop it with `mnv2-tvm board stop --ssh {target} --name {state.name}`" if state else ""
        if lost is not None and isinstance(failure, Exception):
            if problem:
                lost += (f"; the RPC server {state.name!r} started there may still run ({problem}): {stop_hint} "
                         "once the board is reachable")
            elif started:
                lost += "; stopped the RPC server started there over a new connection"
            raise UserError(lost) from None
        if problem:
            print(f"warning: the RPC server {state.name!r} started on {target} may still run ({problem}); "
                  f"{stop_hint} once the board is reachable", file=sys.stderr)
            if failure is None:
                raise UserError(problem)


def _stop_started(conn: BoardConnection, state: ServerState, relink: bool) -> str | None:
    """Stop the server ``open_board`` started and remove its folder; the problem, or None.

    ``relink``: the connection is dead (or silent), so try one fresh, short-lived connection.
    """
    fresh: BoardConnection | None = None
    try:
        if relink:
            fresh = BoardConnection(conn.target, dataclasses.replace(
                conn.opts, timeout=min(conn.opts.timeout, CLEANUP_CONNECT_TIMEOUT_S)))
        use = fresh or conn
        _stop_group(use, state)
        use.run(f"rm -rf {shlex.quote(state.workdir)}", timeout=60)
    except UserError as e:
        return str(e)
    finally:
        if fresh is not None:
            fresh.close()
    return None


def _free_port_here() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the SSH-only runner path


def run_bundle_ssh(conn: BoardConnection, bundle_dir: Path, x: Any | None = None, *, check: bool = True,
                   keep: bool = False, timeout: float = 600.0) -> tuple[Any, dict[str, Any]]:
    """Without RPC: SFTP the bundle (and ``x`` as in.npy), run ``python3 runner.py BUNDLE --input in.npy
    --output out.npy`` on the board, fetch the output. Returns (output, the runner's JSON)."""
    import io

    import numpy as np

    from . import bundle

    bundle_dir = Path(bundle_dir)
    manifest = bundle.load_manifest(bundle_dir)
    bundle.verify_library(bundle_dir, manifest)
    info = probe(conn)
    if info["arch"] != manifest["arch"]:
        raise UserError(f"bundle {bundle_dir} is built for {manifest['arch']} but {conn.target} is {info['uname_m']}: "
                        f"compile it for this board's target")
    check_runtime(info, conn.target)
    remote = conn.board_path("bundles", f"{manifest['library_sha256'][:16]}-{os.getpid()}")
    files = [bundle.MANIFEST, manifest["library"], bundle.RUNNER, bundle.POSTPROCESS, bundle.REFERENCE]
    q = shlex.quote
    conn.check(f"mkdir -p {q(remote)}", "creating the bundle folder")
    try:
        with conn.sftp() as sftp:
            for name in files:
                if (bundle_dir / name).is_file():
                    sftp.put(str(bundle_dir / name), f"{remote}/{name}")
            args = ""
            if x is not None:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(x, dtype=manifest["input"]["dtype"]))
                with sftp.open(f"{remote}/in.npy", "wb") as f:
                    f.write(buf.getvalue())
                args += " --input in.npy"
            cmd = (f"cd {q(remote)} && {conn.opts.board_python} {bundle.RUNNER} . {args} --output out.npy"
                   + (" --check" if check else ""))
            rc, out, err = conn.run(cmd, timeout=timeout)
            if rc != 0:
                tail = (err.strip() or out.strip()).splitlines()[-2:]
                raise UserError(f"runner.py failed on {conn.target} (exit {rc}): {' | '.join(tail)}")
            with sftp.open(f"{remote}/out.npy", "rb") as f:
                f.prefetch()
                output = np.load(io.BytesIO(f.read()))
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if not keep:
            conn.run(f"rm -rf {q(remote)}", timeout=60)
    return output, result


if __name__ == "__main__" and sys.argv[1:] == ["--tunnel"]:
    sys.exit(_tunnel_main())
