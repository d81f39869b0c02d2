"""Internal TVM failures at the CLI boundary: one line for the user, TVM's whole story in a log file.

An error raised inside TVM (``tvm.error.InternalError``, a ``ValueError`` from TVM's C++ checks, an
assertion in one of its passes) is nothing the user's arguments explain: it carries a C++
backtrace, often a screen of IR, and is what a bug report needs. ``compile`` and ``tune`` print
one line naming the command, TVM's message and a log file that holds the full traceback, TVM's
own output before the failure and the versions involved, then exit with code 2. Tuning records
are appended and fsynced one by one as they are measured, so a failure leaves every record
written before it in place.

Log files: ``$MNV2_TVM_LOG_DIR/<verb>-<YYYYmmdd-HHMMSS>-<pid>.log``, by default under
``~/.cache/mnv2-tvm/logs/``; when that folder cannot be written, the system's temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Environment variable naming the folder for failure logs.
LOG_DIR_ENV = "MNV2_TVM_LOG_DIR"
#: Commands whose TVM failures become one line and a log, and the words that line uses.
VERBS = {"compile": "compiling", "tune": "tuning"}
#: Commands during which TVM's output on file descriptor 2 is held back (see :func:`tvm_output_held`).
#: ``tune`` sends it to ``tune.log`` in its records folder itself.
HELD = ("compile",)
_TVM_PACKAGES = ("tvm", "tvm_ffi")
_NATIVE_SUFFIXES = (".cc", ".cpp", ".cxx", ".h", ".hpp", ".cu", ".pxi", ".pyx")
_ATTR = "_mnv2_tvm_held_output"
MAX_MESSAGE = 240


def log_dir() -> Path:
    """Where failure logs go: ``$MNV2_TVM_LOG_DIR`` or ``~/.cache/mnv2-tvm/logs``."""
    env = os.environ.get(LOG_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "mnv2-tvm" / "logs"


def _package_dirs() -> list[str]:
    dirs = []
    for name in _TVM_PACKAGES:
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return dirs


def _is_tvm_frame(filename: str, dirs: list[str]) -> bool:
    if filename.startswith("python/tvm_ffi/") or filename.endswith(_NATIVE_SUFFIXES):
        return True  # tvm_ffi's Cython layer, and the C++ frames it appends to a traceback
    path = os.path.abspath(filename)
    return any(path.startswith(d) for d in dirs)


def from_tvm(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside TVM: a TVM error type, or raised in a TVM frame deeper
    than the last frame of this package (an error our code raised, also when TVM called it back,
    is not TVM's)."""
    if type(exc).__module__.split(".")[0] in _TVM_PACKAGES:
        return True
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frames = traceback.extract_tb(exc.__traceback__)
    last_ours = max((i for i, f in enumerate(frames) if os.path.abspath(f.filename).startswith(ours)), default=-1)
    dirs = _package_dirs()
    return any(_is_tvm_frame(f.filename, dirs) for f in frames[last_ours + 1:])


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message that is not part of a backtrace, shortened for one line."""
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith(("Traceback", "File ", "Stack trace")) or line[:1].isdigit() and ": " in line[:6]:
            continue
        return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 1] + "…"
    return type(exc).__name__


def describe(args: Any) -> str:
    """``mobilenet_v2-0.35-96 for rpi4b``: what the command was building."""
    what = str(getattr(args, "model", "the model"))
    with contextlib.suppress(Exception):
        from .models import ModelConfig

        what = ModelConfig(args.model, args.width, args.resolution, args.num_classes, args.output_stride).label
    target = str(getattr(args, "target", "") or "")
    if target.endswith(".toml"):
        target = Path(target).stem
    return f"{what} for {target}" if target else what


def _versions() -> str:
    parts = [f"Python {platform.python_version()}", platform.platform()]
    for name in ("mnv2_tvm", *_TVM_PACKAGES):
        mod = sys.modules.get(name)
        if mod is not None:
            parts.append(f"{name} {getattr(mod, '__version__', '?')}")
    return ", ".join(parts)


def write_log(verb: str, exc: BaseException, argv: list[str] | None = None, output: str = "") -> Path:
    """Write the full account of ``exc`` to a new log file and return its path (raises OSError
    only when neither the log folder nor the temporary folder can be written)."""
    argv = sys.argv if argv is None else argv
    text = "".join([
        f"command: {shlex.join(['mnv2-tvm', *argv[1:]])}\n",
        f"working directory: {os.getcwd()}\n",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n",
        f"versions: {_versions()}\n\n",
        *traceback.format_exception(exc),
    ])
    if output:
        text += "\nTVM's output on stderr before the failure:\n" + output + ("" if output.endswith("\n") else "\n")
    name = f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        folder = log_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{name}.log"
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        fd, tmp = tempfile.mkstemp(prefix=f"mnv2-tvm-{name}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return Path(tmp)


def report(args: Any, exc: BaseException) -> str | None:
    """For a TVM failure in ``compile`` or ``tune``: write the log, return the one line to print.
    None for anything else, which the caller re-raises."""
    command = getattr(args, "command", None)
    if command not in VERBS or not isinstance(exc, Exception) or not from_tvm(exc):
        return None
    try:
        where = f"full log: {write_log(command, exc, output=getattr(exc, _ATTR, ''))}"
    except OSError as e:
        where = f"no log written: {e.strerror or e}"
    return f"TVM failed while {VERBS[command]} {describe(args)}: {first_line(exc)} ({where})"


@contextlib.contextmanager
def tvm_output_held(command: str) -> Iterator[None]:
    """Hold what TVM's C++ writes to file descriptor 2 while ``command`` runs (it logs warnings and
    errors there directly, ahead of the exception that carries the same story).

    Python's ``sys.stderr`` keeps writing to the terminal. When the command ends normally or with
    an error of its own, the held output follows on stderr; when TVM fails, it goes into the
    failure log instead, so the user reads one line.
    """
    try:
        on_fd2 = command in HELD and sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # e.g. a test's captured stream
        on_fd2 = False
    if not on_fd2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    hold = tempfile.TemporaryFile()
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    previous = sys.stderr
    os.dup2(hold.fileno(), 2)
    sys.stderr = real
    failure: BaseException | None = None
    try:
        yield
    except BaseException as e:
        failure = e
        raise
    finally:
        with contextlib.suppress(Exception):
            real.flush()
        sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(Exception):
            real.close()
        hold.seek(0)
        held = hold.read().decode("utf-8", errors="replace")
        hold.close()
        kept = False
        if isinstance(failure, Exception) and from_tvm(failure):
            with contextlib.suppress(Exception):
                setattr(failure, _ATTR, held)
                kept = True
        if held and not kept:
            sys.stderr.write(held)
            sys.stderr.flush()
