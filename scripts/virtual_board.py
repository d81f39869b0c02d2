#!/usr/bin/env python3
"""Virtual aarch64 board: an emulated Raspberry-Pi-like target for tests and CI.

The board is an arm64 Debian bookworm rootfs run with qemu-user through binfmt_misc.
An sshd inside the chroot listens on 127.0.0.1 only; the TVM runtime (runtime-only,
no compiler library) is installed in /opt/tvm-site.  Timings on this board mean
nothing, but numerics and the SSH/RPC deployment protocols are real: cross-compiled
libraries really execute as ARM code.

Subcommands::

    setup  [--root DIR]                              # idempotent, cached by a stamp
    start  [--root DIR] [--name N] [--ssh-port P]    # prints the state JSON
    stop   [--root DIR] [--name N]
    status [--root DIR] [--name N]                   # exit 0 if running, 3 if not

The board directory defaults to ~/.cache/mnv2-tvm/virtual-board, or
$MNV2_TVM_BOARD_DIR.  Needs root (chroot, mount, binfmt_misc).

Standard library only on purpose: CI calls this before any project dependency is
importable, and it must not import the mnv2_tvm package.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Bump when the recipe below changes, so that cached boards are rebuilt.
RECIPE_VERSION = "1"

SUITE = "bookworm"
HOST_PACKAGES = [
    "qemu-user-static",
    "binfmt-support",
    "mmdebstrap",
    "arch-test",
    "g++-aarch64-linux-gnu",
    "openssh-server",
    "openssh-client",
]
# --variant=extract only unpacks; package scripts are not run, which keeps the build
# at ~15 s instead of minutes of emulated maintainer scripts.  Configuration that
# those scripts would do is done by hand in configure_rootfs().
ROOTFS_PACKAGES = [
    "python3",
    "libstdc++6",
    "openssh-server",
    "openssh-sftp-server",
    "bash",
    "coreutils",
    "util-linux",
    "procps",
    "base-passwd",
    "base-files",
    "libc-bin",
    "dash",
    "grep",
    "sed",
]
# tvm-ffi pinned: newer tvm-ffi releases segfault in ToJSONGraph (see shared notes).
BOARD_WHEELS = [
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "numpy",
    "cloudpickle",
    "psutil",
]
PIP_PLATFORM_ARGS = [
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_aarch64",
    "--platform", "manylinux2014_aarch64",
    "--python-version", "3.11",
    "--implementation", "cp",
]
# Removing these makes TVM fall back to runtime-only mode: 143 MB instead of ~400 MB
# and `import tvm` in 3-6 s under qemu.  A board only ever runs prebuilt libraries.
STRIPPED_LIBS = ["libtvm_compiler.so", "libtvm_runtime_cuda.so"]

BOARD_SITE = "/opt/tvm-site"
SSHD_CONFIG = "/etc/ssh/sshd_config_mnv2"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
LISTEN_HOST = "127.0.0.1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40


class BoardError(RuntimeError):
    """A failure to report to the user without a traceback."""


def log(msg: str) -> None:
    # Progress goes to stderr so that stdout stays machine-readable (start prints JSON).
    print(f"[virtual-board] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- layout


class Layout:
    """Paths inside one board directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.rootfs = self.root / "rootfs"
        self.wheels = self.root / "wheels"
        self.keys = self.root / "keys"
        self.client_key = self.keys / "id_ed25519"
        self.logs = self.root / "logs"
        self.stamps = self.root / "stamps"
        self.instances = self.root / "instances"
        self.setup_stamp = self.root / "setup.done"
        self.lock_file = self.root / ".lock"

    def state_file(self, name: str) -> Path:
        return self.instances / f"{name}.json"

    def known_hosts(self, name: str) -> Path:
        return self.instances / f"{name}.known_hosts"

    def sshd_log(self, name: str) -> Path:
        return self.instances / f"{name}.sshd.log"


def default_root() -> Path:
    env = os.environ.get("MNV2_TVM_BOARD_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mnv2-tvm" / "virtual-board"


@contextlib.contextmanager
def board_lock(lay: Layout) -> Iterator[None]:
    """Serialise setup/start/stop across processes (parallel pytest sessions, CI)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    with open(lay.lock_file, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def require_root() -> None:
    if os.geteuid() != 0:
        raise BoardError("needs root (chroot, mount, binfmt_misc)")


def run(
    cmd: list[str],
    *,
    log_file: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; its chatter goes to log_file so progress output stays short."""
    full_env = dict(os.environ, **(env or {}))
    if log_file is None:
        proc = subprocess.run(cmd, env=full_env, text=True, capture_output=True, check=False)
        output = proc.stdout + proc.stderr
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, env=full_env, text=True, stdout=fh, stderr=subprocess.STDOUT, check=False)
        output = log_file.read_text(errors="replace")
    if check and proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
        where = f" (log: {log_file})" if log_file else ""
        raise BoardError(f"command failed ({proc.returncode}){where}: {' '.join(cmd)}\n{tail}")
    return proc


# --------------------------------------------------------------------------- setup


def missing_host_packages() -> list[str]:
    missing = []
    for pkg in HOST_PACKAGES:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or proc.stdout.strip() != "installed":
            missing.append(pkg)
    return missing


def install_host_packages(lay: Layout) -> None:
    missing = missing_host_packages()
    if not missing:
        return
    log(f"apt: installing {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    apt_log = lay.logs / "apt.log"
    # openssh-server's postinst would start a host sshd on 0.0.0.0:22 on a machine
    # without a policy-rc.d; only the chrooted sshd on 127.0.0.1 is wanted.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# temporary, written by virtual_board.py\nexit 101\n")
        policy.chmod(0o755)
    try:
        run(["apt-get", "update"], log_file=apt_log, env=env)
        run(
            ["apt-get", "install", "-y", "--no-install-recommends", *HOST_PACKAGES],
            log_file=apt_log,
            env=env,
        )
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = BINFMT_DIR / "qemu-aarch64"


def binfmt_ok() -> bool:
    """qemu-aarch64 registered, enabled and with the F (fix-binary) flag.

    F makes the kernel open the interpreter at registration, so ARM programs run
    inside a chroot that has no qemu binary of its own.
    """
    try:
        text = BINFMT_ENTRY.read_text()
    except OSError:
        return False
    flags = re.search(r"^flags:\s*(\S*)", text, re.MULTILINE)
    return text.startswith("enabled") and flags is not None and "F" in flags.group(1)


def ensure_binfmt(lay: Layout) -> None:
    if binfmt_ok():
        return
    log("binfmt: registering qemu-aarch64")
    if not (BINFMT_DIR / "register").exists():
        # Containers without systemd do not mount it, and policy-rc.d stops
        # binfmt-support's init script from doing so at install time.
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], log_file=lay.logs / "binfmt.log")
    run(["update-binfmts", "--enable", "qemu-aarch64"], log_file=lay.logs / "binfmt.log", check=False)
    if not binfmt_ok():
        # --enable is a no-op for an entry that was never imported.
        run(["update-binfmts", "--import", "qemu-aarch64"], log_file=lay.logs / "binfmt.log", check=False)
        run(["update-binfmts", "--enable", "qemu-aarch64"], log_file=lay.logs / "binfmt.log", check=False)
    if not binfmt_ok():
        raise BoardError(
            f"qemu-aarch64 binfmt handler is not enabled with flag F ({BINFMT_ENTRY}); "
            f"see {lay.logs / 'binfmt.log'}"
        )
    run(["arch-test", "arm64"], log_file=lay.logs / "binfmt.log")


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            # Mount points escape spaces as \040; our paths have none worth decoding.
            mnt = line.split()[1]
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


def build_rootfs(lay: Layout) -> None:
    log("rootfs: mmdebstrap --variant=extract (arm64 bookworm)")
    new = lay.root / "rootfs.new"
    for stale in (new, lay.rootfs):
        if stale.exists():
            if mounts_under(stale):
                raise BoardError(f"refusing to delete {stale}: still has mounts {mounts_under(stale)}")
            shutil.rmtree(stale)
    run(
        [
            "mmdebstrap",
            "--mode=root",
            "--arch=arm64",
            "--variant=extract",
            "--components=main",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            SUITE,
            str(new),
        ],
        log_file=lay.logs / "mmdebstrap.log",
    )
    new.rename(lay.rootfs)


def ensure_client_key(lay: Layout) -> bool:
    """Create the key tests log in with; True if it is new (authorized_keys is stale)."""
    if lay.client_key.exists() and lay.client_key.with_suffix(".pub").exists():
        return False
    lay.keys.mkdir(parents=True, exist_ok=True)
    lay.keys.chmod(0o700)
    for p in (lay.client_key, lay.client_key.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mnv2-tvm-virtual-board", "-f", str(lay.client_key)])
    return True


def sshd_config_text() -> str:
    # The port comes from `sshd -p` at start so that several instances share it.
    return f"""\
# Written by scripts/virtual_board.py: loopback only, key-only root login.
ListenAddress {LISTEN_HOST}
HostKey {HOST_KEY}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
# sshd -D would otherwise write /run/sshd.pid, which concurrent instances share.
PidFile none
# Tests open several sessions at once; the default 10:30:100 drops some under qemu.
MaxStartups 50:30:100
Subsystem sftp internal-sftp
SetEnv PYTHONPATH={BOARD_SITE}
"""


def configure_rootfs(lay: Layout) -> None:
    """Do by hand what the skipped maintainer scripts would have done."""
    log("rootfs: configuring users, sshd, keys")
    fs = lay.rootfs
    etc = fs / "etc"
    passwd = (fs / "usr/share/base-passwd/passwd.master").read_text()
    # Login shell for the exec channel; no /etc/shadow, so the "*" password
    # field only forbids password logins, which key-only auth never uses.
    passwd = re.sub(r"^root:[^\n]*$", "root:*:0:0:root:/root:/bin/bash", passwd, flags=re.MULTILINE)
    # Unprivileged user for sshd's privilege separation.
    passwd += "sshd:*:100:65534::/run/sshd:/usr/sbin/nologin\n"
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text((fs / "usr/share/base-passwd/group.master").read_text())
    (etc / "hostname").write_text("virtual-board\n")
    (etc / "hosts").write_text("127.0.0.1 localhost virtual-board\n::1 localhost\n")

    for d, mode in (("run/sshd", 0o755), ("tmp", 0o1777), ("var/tmp", 0o1777), ("root/.ssh", 0o700)):
        p = fs / d
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(mode)
    (fs / "root").chmod(0o700)

    host_key = fs / HOST_KEY.lstrip("/")
    if not host_key.exists():
        host_key.with_suffix(".pub").unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtual-board", "-f", str(host_key)])
    auth = fs / "root/.ssh/authorized_keys"
    auth.write_text(lay.client_key.with_suffix(".pub").read_text())
    auth.chmod(0o600)
    (fs / SSHD_CONFIG.lstrip("/")).write_text(sshd_config_text())
    # The ARM ldconfig runs under qemu through binfmt; it builds ld.so.cache.
    run(["chroot", str(fs), "/sbin/ldconfig"], log_file=lay.logs / "configure.log")
    # sshd -t validates the config and the host key the same way start will use them.
    run(["chroot", str(fs), "/usr/sbin/sshd", "-t", "-f", SSHD_CONFIG], log_file=lay.logs / "configure.log")


def download_wheels(lay: Layout) -> None:
    log("wheels: pip download (aarch64, cp311)")
    new = lay.root / "wheels.new"
    shutil.rmtree(new, ignore_errors=True)
    run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(new), *PIP_PLATFORM_ARGS, *BOARD_WHEELS],
        log_file=lay.logs / "wheels.log",
    )
    shutil.rmtree(lay.wheels, ignore_errors=True)
    new.rename(lay.wheels)


def install_board_site(lay: Layout) -> None:
    log(f"wheels: installing into {BOARD_SITE} (runtime-only)")
    site = lay.rootfs / BOARD_SITE.lstrip("/")
    shutil.rmtree(site, ignore_errors=True)
    # pip runs on the host (never under qemu): the platform flags let it accept
    # aarch64 wheels for a --target install.
    run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
            "--find-links", str(lay.wheels), "--target", str(site),
            *PIP_PLATFORM_ARGS, *BOARD_WHEELS,
        ],
        log_file=lay.logs / "wheels.log",
    )
    removed = 0
    for lib in STRIPPED_LIBS:
        for p in site.rglob(lib):
            p.unlink()
            removed += 1
    if removed == 0:
        raise BoardError(f"none of {STRIPPED_LIBS} found under {site}: wheel layout changed?")


def stamp_ok(path: Path) -> bool:
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("recipe") == RECIPE_VERSION


def write_stamp(path: Path, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"recipe": RECIPE_VERSION, "time": time.time(), **extra}) + "\n")


def setup_current(lay: Layout) -> bool:
    """Cheap check (no subprocess) that a finished setup is still usable."""
    tools = ("qemu-aarch64-static", "aarch64-linux-gnu-g++", "ssh-keygen", "mmdebstrap")
    return (
        stamp_ok(lay.setup_stamp)
        and lay.rootfs.is_dir()
        and binfmt_ok()
        and all(shutil.which(t) for t in tools)
    )


def setup(lay: Layout) -> None:
    require_root()
    # Fast path: no lock, no subprocess.  The binfmt registration does not survive
    # a reboot and host tools may vanish with a new machine, so both are re-checked.
    if setup_current(lay):
        log(f"setup: cached ({lay.root})")
        return
    t0 = time.monotonic()
    with board_lock(lay):
        if setup_current(lay):
            log(f"setup: cached ({lay.root})")
            return
        lay.logs.mkdir(parents=True, exist_ok=True)
        install_host_packages(lay)
        ensure_binfmt(lay)
        new_key = ensure_client_key(lay)

        def stamp(step: str) -> Path:
            return lay.stamps / step

        # The wheel download is network-bound like mmdebstrap: overlap the two.
        wheel_error: list[Exception] = []
        wheels_thread: threading.Thread | None = None
        if not stamp_ok(stamp("wheels")):
            def fetch() -> None:
                try:
                    download_wheels(lay)
                    write_stamp(stamp("wheels"))
                except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
                    wheel_error.append(exc)

            wheels_thread = threading.Thread(target=fetch, name="wheels", daemon=True)
            wheels_thread.start()

        try:
            # Each later step depends on the rootfs it writes into, so a rebuilt
            # rootfs invalidates their stamps.
            rebuilt = False
            if not stamp_ok(stamp("rootfs")) or not lay.rootfs.is_dir():
                if any(live_instances(lay)):
                    raise BoardError("boards are running on the old rootfs: stop them first")
                for s in ("rootfs", "configure", "tvm-site"):
                    stamp(s).unlink(missing_ok=True)
                build_rootfs(lay)
                write_stamp(stamp("rootfs"))
                rebuilt = True
            if rebuilt or new_key or not stamp_ok(stamp("configure")):
                configure_rootfs(lay)
                write_stamp(stamp("configure"))
        finally:
            # Never leave a pip download running behind a failed setup.
            if wheels_thread is not None:
                wheels_thread.join()
        if wheel_error:
            raise wheel_error[0]
        fresh_wheels = wheels_thread is not None
        if rebuilt or fresh_wheels or not stamp_ok(stamp("tvm-site")):
            install_board_site(lay)
            write_stamp(stamp("tvm-site"))

        write_stamp(lay.setup_stamp, seconds=round(time.monotonic() - t0, 1))
        log(f"setup: done in {time.monotonic() - t0:.0f} s ({lay.root})")


# --------------------------------------------------------------------------- instances


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of pid (clock ticks since boot); guards against pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def read_state(lay: Layout, name: str) -> dict[str, Any] | None:
    try:
        state = json.loads(lay.state_file(name).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def state_alive(state: dict[str, Any]) -> bool:
    pgid = int(state["pgid"])
    return proc_start_time(pgid) == state["start_time"] and group_alive(pgid)


def live_instances(lay: Layout) -> Iterator[dict[str, Any]]:
    if not lay.instances.is_dir():
        return
    for f in sorted(lay.instances.glob("*.json")):
        state = read_state(lay, f.stem)
        if state is not None and state_alive(state):
            yield state


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LISTEN_HOST, 0))
        return int(s.getsockname()[1])


def listening_inode(port: int) -> int | None:
    """Socket inode of the TCP listener on 127.0.0.1:port, from /proc/net/tcp."""
    want = f"0100007F:{port:04X}"  # little-endian address, as the kernel prints it
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # 0A = LISTEN
                return int(fields[9])
    return None


def owns_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == target for fd in fd_dir.iterdir())
    except OSError:
        return False


def wait_for_sshd(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """True once *our* sshd listens on the port and speaks SSH; False if it exited.

    A banner alone is not proof: with a port already taken (by another board, say)
    the banner comes from that listener while our sshd is still failing to bind.
    So the listening socket must belong to our process.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        inode = listening_inode(port)
        if inode is not None and owns_socket(proc.pid, inode):
            try:
                with socket.create_connection((LISTEN_HOST, port), timeout=5) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
        time.sleep(0.1)
    return False


def ensure_proc_mounted(lay: Layout) -> None:
    target = lay.rootfs / "proc"
    if not os.path.ismount(target):
        run(["mount", "-t", "proc", "proc", str(target)])


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start(lay: Layout, name: str, port: int | None) -> dict[str, Any]:
    require_root()
    if not stamp_ok(lay.setup_stamp):
        raise BoardError(f"board not set up in {lay.root}: run `virtual_board.py setup` first")
    if not binfmt_ok():
        raise BoardError("qemu-aarch64 binfmt handler missing (after a reboot?): run setup again")
    with board_lock(lay):
        old = read_state(lay, name)
        if old is not None and state_alive(old):
            raise BoardError(f"board {name!r} already running on port {old['port']}")
        lay.instances.mkdir(parents=True, exist_ok=True)
        ensure_proc_mounted(lay)
        attempts = 1 if port is not None else 3
        for _ in range(attempts):
            p = port if port is not None else free_port()
            sshd_log = lay.sshd_log(name)
            with open(sshd_log, "w") as log_fh:
                # setsid (start_new_session) gives sshd its own process group, which
                # `stop` kills as a whole.  chroot execs sshd, so pid == pgid == sshd.
                proc = subprocess.Popen(
                    ["chroot", str(lay.rootfs), "/usr/sbin/sshd", "-D", "-e", "-p", str(p), "-f", SSHD_CONFIG],
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            if wait_for_sshd(proc, p, START_TIMEOUT_S):
                break
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            if not any(live_instances(lay)):
                unmount_proc(lay)
            sshd_tail = tail(lay.sshd_log(name))
            lay.sshd_log(name).unlink(missing_ok=True)
            raise BoardError(f"sshd did not come up; its log ends:\n{sshd_tail}")

        pub = (lay.rootfs / (HOST_KEY.lstrip("/") + ".pub")).read_text().split()
        known_hosts = lay.known_hosts(name)
        known_hosts.write_text(f"[{LISTEN_HOST}]:{p} {pub[0]} {pub[1]}\n")
        start_time = proc_start_time(proc.pid)
        state: dict[str, Any] = {
            "name": name,
            "pid": proc.pid,
            "pgid": os.getpgid(proc.pid),
            "start_time": start_time,
            "host": LISTEN_HOST,
            "port": p,
            "user": "root",
            "key_path": str(lay.client_key),
            "known_hosts": str(known_hosts),
            "rootfs": str(lay.rootfs),
            "board_dir": str(lay.root),
            "sshd_log": str(lay.sshd_log(name)),
            "pythonpath": BOARD_SITE,
            "ssh_command": [
                "ssh", "-i", str(lay.client_key), "-p", str(p),
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", f"root@{LISTEN_HOST}",
            ],
        }
        tmp = lay.state_file(name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.rename(lay.state_file(name))
        return state


def chroot_processes(lay: Layout) -> list[int]:
    """Pids whose root directory is this board's rootfs."""
    rootfs = str(lay.rootfs.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == rootfs:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_gone(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not check():
            return True
        time.sleep(0.1)
    return not check()


def group_alive(pgid: int) -> bool:
    """True while a non-zombie process is in the group.

    killpg(pgid, 0) alone is not enough: the sshd's parent (this script) has exited,
    so its zombie lingers until the machine's init reaps it, which can take seconds.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3), fields[2] the process group (field 5).
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_group(pgid: int, start_time: int) -> None:
    def alive() -> bool:
        return group_alive(pgid)

    leader = proc_start_time(pgid)
    if leader is not None and leader != start_time:
        # The pid was recycled for an unrelated process: do not touch that group.
        log(f"stop: pgid {pgid} now belongs to another process; not killing")
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if wait_gone(alive, STOP_TIMEOUT_S):
            return
    raise BoardError(f"process group {pgid} survived SIGKILL")


def unmount_proc(lay: Layout) -> None:
    target = lay.rootfs / "proc"
    if not os.path.ismount(target):
        return
    # Anything still running inside the rootfs came in through one of our sshds
    # (connection handlers and servers they spawned run in sessions of their own,
    # not in sshd's group).  The rootfs is private to these boards, so when the
    # last board stops they are leftovers of ours and would keep proc busy.
    leftovers = chroot_processes(lay)
    if leftovers:
        log(f"stop: terminating {len(leftovers)} leftover process(es) in the rootfs: {leftovers}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in chroot_processes(lay):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if wait_gone(lambda: bool(chroot_processes(lay)), STOP_TIMEOUT_S / 2):
                break
    proc = run(["umount", str(target)], check=False)
    if proc.returncode != 0:
        log(f"stop: umount busy, detaching lazily: {proc.stderr.strip()}")
        run(["umount", "-l", str(target)])


def stop(lay: Layout, name: str) -> bool:
    """Stop one instance; False if it was not running."""
    require_root()
    with board_lock(lay):
        state = read_state(lay, name)
        was_running = state is not None and state_alive(state)
        if state is not None:
            kill_group(int(state["pgid"]), int(state["start_time"]))
        for f in (lay.state_file(name), lay.known_hosts(name), lay.sshd_log(name)):
            f.unlink(missing_ok=True)
        if lay.rootfs.is_dir() and not any(live_instances(lay)):
            unmount_proc(lay)
        return was_running


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, named: bool) -> None:
        p.add_argument(
            "--root", type=Path, default=None,
            help="board directory (default: $MNV2_TVM_BOARD_DIR or ~/.cache/mnv2-tvm/virtual-board)",
        )
        if named:
            p.add_argument("--name", default="default", help="instance name, for concurrent boards")

    common(sub.add_parser("setup", help="install tools, build rootfs and TVM runtime (cached)"), named=False)
    p_start = sub.add_parser("start", help="start an sshd board instance, print its state JSON")
    common(p_start, named=True)
    p_start.add_argument("--ssh-port", type=int, default=None, help="default: a free port")
    common(sub.add_parser("stop", help="stop an instance"), named=True)
    common(sub.add_parser("status", help="print an instance's state JSON"), named=True)
    args = parser.parse_args(argv)

    lay = Layout(args.root if args.root is not None else default_root())
    name = getattr(args, "name", "default")
    if not NAME_RE.match(name):
        parser.error(f"invalid --name {name!r}")
    try:
        if args.cmd == "setup":
            setup(lay)
        elif args.cmd == "start":
            state = start(lay, name, args.ssh_port)
            log(f"start: board {name!r} on {LISTEN_HOST}:{state['port']} (pgid {state['pgid']})")
            print(json.dumps(state, indent=2))
        elif args.cmd == "stop":
            log(f"stop: board {name!r} " + ("stopped" if stop(lay, name) else "was not running"))
        elif args.cmd == "status":
            current = read_state(lay, name)
            if current is None or not state_alive(current):
                print(f"board {name!r} not running")
                return 3
            print(json.dumps(current, indent=2))
    except BoardError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
