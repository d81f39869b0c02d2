"""MetaSchedule tuning (TVM 0.27) with durable, resumable records shared per target.

Records live in one directory per target, in the two JSON-lines files of MetaSchedule's
``JSONDatabase`` (``database_workload.json``, ``database_tuning_record.json``), so the stock
``ms.database.JSONDatabase`` can read them. Next to them: ``meta.json`` (TVM version and
target), ``tune.log`` (TVM's own logging) and ``.lock`` (one tuning process at a time).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import microkernels, tvm_compat
from .lower import OPAQUE, legalize_conv2d, legalize_resize2d
from .targets import RECORD_FILE

tvm_compat.check()

__all__ = [
    "ApplyReport",
    "RecordsDatabase",
    "RecordsError",
    "RecordsWarning",
    "RunnerSpec",
    "TaskReport",
    "TuneReport",
    "allocate_trials",
    "compile_kernels",
    "compile_with_records",
    "extract_tasks",
    "kernels_module",
    "open_records",
    "prepacks_weights",
    "prune",
    "tune",
]

WORKLOAD_FILE = "database_workload.json"
META_FILE = "meta.json"
LOG_FILE = "tune.log"
LOCK_FILE = ".lock"
#: Per workload, its best schedule timed with the parallel loop as tuned and with output rows
#: outermost (``microkernels.rows_outermost``); compile reorders where the second is not slower
#: than ``ROW_ORDER_TOLERANCE`` × the first. Written by ``tune`` after its search.
ROW_ORDER_FILE = "row_order.json"
#: Timed alone a reordered kernel may be this much slower and still gain in place: alone it
#: cannot show what the order is for (each thread finding the rows it reads in its own cache).
#: MobileNetV2 on 2 threads, reordering the kernels within 1.1× / 1.25× / any: 0.98 / 0.92 / 0.91×
#: ORT; SSDLite within 1.1× / any: 1.00 / 0.89× (README, session 13). Beyond 2× it is the code
#: around the loop that got slower, not the loop.
ROW_ORDER_TOLERANCE = 2.0
RECORDS_FORMAT = "mnv2-tvm-records/1"

#: Trials every task gets before the rest of the budget is split by importance.
MIN_TRIALS_PER_TASK = 8
#: Upper bound of candidates per MetaSchedule iteration (one build+run batch). Each iteration
#: costs a full evolutionary search (seconds), so a task's budget is mostly run in one or two.
TRIALS_PER_ITER = 32
#: Keyword arguments of ``ms.search_strategy.EvolutionarySearch`` (MetaSchedule defaults when
#: empty); tests shrink the population to keep tiny runs fast.
SEARCH_KWARGS: dict[str, Any] = {}
_FAILED_RUN_SECS = tvm_compat.FAILED_RUN_SECS

_log = logging.getLogger(__name__)


class RecordsError(Exception):
    """A records directory can't be used (other target/TVM version, unwritable, locked, ...)."""


class RecordsWarning(UserWarning):
    """A line of a records file was skipped."""


# --------------------------------------------------------------------------- targets, meta


def _as_target(target: tvm.target.Target | str | dict) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def _target_config(target: tvm.target.Target) -> dict:
    return json.loads(str(target))


def _target_key(target: tvm.target.Target | dict) -> str:
    """Identity of a target for records; ``num-cores`` (a tuning hint) is left out."""

    def strip(cfg: dict) -> dict:
        cfg = {k: v for k, v in cfg.items() if k != "num-cores"}
        if isinstance(cfg.get("host"), dict):
            cfg["host"] = strip(cfg["host"])
        return cfg

    cfg = target if isinstance(target, dict) else _target_config(target)
    return json.dumps(strip(cfg), sort_keys=True)


def _with_num_cores(target: tvm.target.Target, local: bool) -> tvm.target.Target:
    """MetaSchedule needs ``num-cores``; add this machine's count for local runs."""
    cfg = _target_config(target)
    if "num-cores" in cfg:
        return target
    if not local:
        raise ValueError(
            f"target {target} has no 'num-cores'; MetaSchedule needs the board's core count, "
            'e.g. add "num-cores": 4 to the target'
        )
    cfg["num-cores"] = ms.utils.cpu_count(logical=False)
    return tvm.target.Target(cfg)


def _tvm_release(version: str) -> str:
    """``0.27.0.post1`` -> ``0.27.0``: post/dev/local suffixes don't change the record format."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return m.group(0) if m else version


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via temp file + fsync + rename: readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _read_meta(records_dir: Path) -> dict | None:
    path = records_dir / META_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordsError(f"cannot read {path}: {e.strerror}") from e
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise RecordsError(f"{path} is not valid JSON ({e}); refusing to use {records_dir}") from e
    return meta


def _new_meta(target: tvm.target.Target) -> dict:
    return {
        "format": RECORDS_FORMAT,
        "tvm_version": tvm.__version__,
        "target": _target_config(target),
        "target_str": str(target),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_meta(meta: dict, target: tvm.target.Target | None, records_dir: Path) -> None:
    fmt = meta.get("format")
    if fmt != RECORDS_FORMAT:
        raise RecordsError(f"{records_dir}: unknown records format {fmt!r} in {META_FILE}")
    theirs = str(meta.get("tvm_version", "?"))
    if _tvm_release(theirs) != _tvm_release(tvm.__version__):
        raise RecordsError(
            f"{records_dir} holds records of TVM {theirs}, this is TVM {tvm.__version__}; "
            "use another records dir"
        )
    if target is not None and _target_key(meta.get("target", {})) != _target_key(target):
        raise RecordsError(
            f"{records_dir} holds records for target {meta.get('target_str', meta.get('target'))}, "
            f"not {target}; use one records dir per target"
        )


# --------------------------------------------------------------------------- database


def _split_lines(path: Path) -> tuple[list[tuple[int, bytes]], bytes, int, bytes]:
    """Return (complete lines with 1-based numbers, torn tail, size of the complete part, raw)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], b"", 0, b""
    cut = raw.rfind(b"\n") + 1
    body, tail = raw[:cut], raw[cut:]
    lines = [(i + 1, ln) for i, ln in enumerate(body.split(b"\n")[:-1])] if body else []
    return lines, tail, cut, raw


def workload_digests(records_dir: Path) -> dict[str, str]:
    """For each workload (by the structural hash its line in the workload file starts with), a
    digest of its record lines: what a model compiled from these records depends on. Plain file
    reading, no TVM: cheap enough to check every point of a report against."""
    by_index: dict[int, str] = {}
    for i, (_, line) in enumerate(_split_lines(records_dir / WORKLOAD_FILE)[0]):
        # A line is ["<hash>", "<base64>"]; only the hash is needed, not the (large) module.
        head = line[: line.find(b",")]
        by_index[i] = head.strip(b'[" ').decode(errors="replace")
    digests: dict[str, Any] = {}
    for _, line in _split_lines(records_dir / RECORD_FILE)[0]:
        try:
            shash = by_index[int(line[1 : line.find(b",")])]
        except (KeyError, ValueError):
            continue  # a line the database skips too
        digests.setdefault(shash, hashlib.sha256()).update(line + b"\n")
    return {h: d.hexdigest() for h, d in digests.items()}


def records_digest_for(digests: dict[str, str], workloads: list[str]) -> str:
    """One digest over the records of ``workloads`` (see :func:`workload_digests`)."""
    h = hashlib.sha256()
    for w in sorted(workloads):
        h.update(f"{w}:{digests.get(w, '-')}\n".encode())
    return h.hexdigest()[:16]


def _record_json(record: ms.database.TuningRecord) -> Any:
    """A record as plain JSON, like ``TuningRecord.as_json`` but also for traces that rewrite a
    layout: their IndexMap inputs become the JSON-graph string that
    ``TuningRecord.from_json`` parses back (the stock Python helper raises on them)."""

    def plain(obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            return obj.value
        if isinstance(obj, tvm.ir.Array):
            return [plain(x) for x in obj]
        if isinstance(obj, tvm.ir.Map):
            return {plain(k): plain(v) for k, v in obj.items()}
        if isinstance(obj, tvm.tirx.IndexMap):
            return tvm.ir.save_json(obj)
        raise TypeError(f"cannot write a {type(obj).__name__} in a tuning record")

    return plain(tvm_compat.tuning_record_as_json(record))


def _sort_key(first_inst: str | None, secs: list[float]) -> float:
    """A record's place among its workload's: mean run time, or inf when it is not valid (the
    rule of C++ ``TuningRecordNode::IsValid``: a trace that does more than enter postprocessing,
    and some run that did not fail)."""
    if first_inst in (None, "EnterPostproc") or all(v == _FAILED_RUN_SECS for v in secs):
        return math.inf
    return sum(secs) / len(secs)


def _record_key(record: ms.database.TuningRecord) -> float:
    insts = record.trace.insts
    secs = [float(s.value) if hasattr(s, "value") else float(s) for s in record.run_secs or ()]
    return _sort_key(insts[0].kind.name if len(insts) else None, secs)


def _raw_key(obj: Any) -> float:
    """:func:`_record_key` of a record line's JSON, without parsing its trace."""
    trace, secs = obj[0], obj[1]
    insts = trace[0]
    if not isinstance(insts, list) or not isinstance(secs, (list, type(None))):
        raise ValueError("expected [trace, run_secs, ...]")
    return _sort_key(insts[0][0] if insts else None, [float(v) for v in secs or ()])


class _LazyRecord:
    """A record line kept as JSON until asked for: ``TuningRecord.from_json`` replays the trace
    (~8 ms a record), and a compile queries a few dozen of the hundreds a shared database holds."""

    __slots__ = ("obj", "workload", "lineno")

    def __init__(self, obj: Any, workload: ms.database.Workload, lineno: int) -> None:
        self.obj, self.workload, self.lineno = obj, workload, lineno


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _PeakMemory:
    """The peak of this process's RSS plus that of the descendants started while it runs (the
    builder workers, a local runner), sampled every ``interval`` s on a thread while tuning runs.
    Children that were there before (servers a calling program keeps) are not tuning's and are left
    out; so are builder workers kept from an earlier tune in the same process (``_POOLS``), which
    only a program that tunes twice has. A sum of RSS counts the pages the processes share (libtvm)
    once per process, so it over-states what the machine needs."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.processes = 1
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tune-peak-rss", daemon=True)

    def _children(self) -> list[Any]:
        import psutil

        return psutil.Process().children(recursive=True)

    def sample(self) -> None:
        import psutil

        total, n = psutil.Process().memory_info().rss, 1
        for child in self._children():
            if child.pid in self._before:
                continue
            with contextlib.suppress(psutil.Error):  # it may end between the listing and the read
                total += child.memory_info().rss
                n += 1
        if total > self.peak_bytes:
            self.peak_bytes, self.processes = total, n

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> _PeakMemory:
        self._before = {p.pid for p in self._children()}
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class _Sigint:
    """SIGINT handling while tuning.

    The first Ctrl-C only sets ``hit``; the run stops at the next safe point (:meth:`check`, after
    a measured batch or between tasks). Raising at once is not safe: TVM polls for signals inside
    its parallel evolutionary search, and a KeyboardInterrupt thrown there ends in
    ``std::terminate`` (the process dies without its report). A second Ctrl-C raises at once,
    though never between writing a record and its fsync (:meth:`deferred`). A KeyboardInterrupt
    raised inside a Python callback that C++ called comes back from tvm_ffi as a bare
    ``RuntimeError``; ``hit`` tells the two apart.
    """

    active: _Sigint | None = None

    def __init__(self) -> None:
        self.hit = False
        self._depth = 0
        self._pending = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.hit:
            self.hit = True
            with contextlib.suppress(Exception):
                sys.stderr.write("\n[tune] stopping after the batch being measured (Ctrl-C again: at once)\n")
            return
        if self._depth:
            self._pending = True
            return
        raise KeyboardInterrupt

    @staticmethod
    def check() -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed (call where stopping is safe)."""
        me = _Sigint.active
        if me is not None and me.hit:
            raise KeyboardInterrupt

    def __enter__(self) -> _Sigint:
        if threading.current_thread() is threading.main_thread() and _Sigint.active is None:
            self._old = signal.signal(signal.SIGINT, self._handler)
            _Sigint.active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        if _Sigint.active is self:
            signal.signal(signal.SIGINT, self._old)
            _Sigint.active = None

    @staticmethod
    @contextlib.contextmanager
    def deferred() -> Iterator[None]:
        me = _Sigint.active
        if me is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        me._depth += 1
        try:
            yield
        finally:
            me._depth -= 1
            if not me._depth and me._pending:
                me._pending = False
                raise KeyboardInterrupt


@derived_object
class RecordsDatabase(ms.database.PyDatabase):
    """MetaSchedule database on JSONDatabase-format files; each commit is fsync'd at once.

    Loading skips (with a :class:`RecordsWarning` naming file and line) lines that don't parse,
    including an incomplete last line left by a killed process. When writable, such a torn tail
    is cut off before appending. ``writable=False`` keeps new commits in memory only.
    """

    def __init__(self, records_dir: str | os.PathLike, writable: bool = True) -> None:
        super().__init__()
        self.records_dir = Path(records_dir)
        self.writable = writable
        self.path_workload = self.records_dir / WORKLOAD_FILE
        self.path_tuning_record = self.records_dir / RECORD_FILE
        self._workloads: list[ms.database.Workload | None] = []  # by line index in the file
        self._canon: list[int] = []  # line index -> index of the first equal workload
        self._by_hash: dict[int, list[int]] = {}
        # per workload, (mean secs or inf, seq, record) sorted; a record may still be a _LazyRecord
        self._records: dict[int, list[tuple[float, int, Any]]] = {}
        self._n_records = 0
        self._seq = 0
        self._last: tuple[Any, int] | None = None
        self._fd_workload: int | None = None
        self._fd_record: int | None = None
        self.skipped_lines = 0
        self.digest = ""
        self.write_error: str | None = None  # set when appending a line failed (e.g. disk full)
        # Structural hashes of the workloads asked for (hit or miss), as the workload file writes
        # them: what a compiled model depends on, so a report can tell when its records changed.
        self.queried: set[str] = set()
        self._load()

    # ---- loading
    def _warn(self, path: Path, lineno: int, what: str) -> None:
        self.skipped_lines += 1
        warnings.warn(f"{path}:{lineno}: {what}; line skipped", RecordsWarning, stacklevel=4)

    def _load(self) -> None:
        digest = hashlib.sha256()
        wl_lines, wl_tail, wl_size, wl_raw = _split_lines(self.path_workload)
        rec_lines, rec_tail, rec_size, rec_raw = _split_lines(self.path_tuning_record)
        digest.update(wl_raw)
        digest.update(b"\0")
        digest.update(rec_raw)
        self.digest = digest.hexdigest()
        for lineno, raw in wl_lines:
            wkl = None
            try:
                wkl = ms.database.Workload.from_json(json.loads(raw))
            except Exception as e:  # noqa: BLE001 - any parse failure means "skip this line"
                self._warn(self.path_workload, lineno, f"unreadable workload ({_short(e)})")
            self._add_workload(wkl)
        if wl_tail:
            self._warn(self.path_workload, len(wl_lines) + 1, "incomplete last line")
        for lineno, raw in rec_lines:
            try:
                obj = json.loads(raw)
                if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
                    raise ValueError("expected [workload_index, record]")
                idx = obj[0]
                if not 0 <= idx < len(self._workloads) or self._workloads[idx] is None:
                    raise ValueError(f"no readable workload #{idx}")
                idx = self._canon[idx]
                key = _raw_key(obj[1])
            except Exception as e:  # noqa: BLE001
                self._warn(self.path_tuning_record, lineno, f"unreadable tuning record ({_short(e)})")
                continue
            self._add_record(idx, _LazyRecord(obj[1], self._workloads[idx], lineno), key)
        if rec_tail:
            self._warn(self.path_tuning_record, len(rec_lines) + 1, "incomplete last line")
        if self.writable:
            self._open_for_append(self.path_workload, wl_size, bool(wl_tail))
            self._open_for_append(self.path_tuning_record, rec_size, bool(rec_tail))

    def _open_for_append(self, path: Path, good_size: int, torn: bool) -> None:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if torn:  # cut the incomplete line a killed writer left, so appends start clean
            os.ftruncate(fd, good_size)
            os.fsync(fd)
        if created:
            _fsync_dir(path.parent)
        if path.name == WORKLOAD_FILE:
            self._fd_workload = fd
        else:
            self._fd_record = fd

    def _add_workload(self, wkl: ms.database.Workload | None) -> int:
        idx = len(self._workloads)
        self._workloads.append(wkl)
        self._canon.append(idx)
        if wkl is not None:
            h = tvm_ffi.structural_hash(wkl.mod)
            same = self._lookup(wkl.mod, h)
            if same is not None:
                self._canon[idx] = same
            else:
                self._by_hash.setdefault(h, []).append(idx)
        return idx

    def _add_record(self, idx: int, record: Any, key: float | None = None) -> None:
        key = _record_key(record) if key is None else key
        self._seq += 1
        bisect.insort(self._records.setdefault(idx, []), (key, self._seq, record), key=lambda t: t[:2])
        self._n_records += 1

    def _parsed(self, idx: int, entries: list[tuple[float, int, Any]]) -> list[tuple[float, int, Any]]:
        """``entries`` (of workload ``idx``) with their records parsed; a line whose trace does not
        parse is dropped with the same warning a malformed line gets at load."""
        out = []
        for key, seq, rec in entries:
            if isinstance(rec, _LazyRecord):
                try:
                    parsed = ms.database.TuningRecord.from_json(rec.obj, rec.workload)
                except Exception as e:  # noqa: BLE001
                    self._warn(self.path_tuning_record, rec.lineno, f"unreadable tuning record ({_short(e)})")
                    self._records[idx] = [t for t in self._records[idx] if t[2] is not rec]
                    self._n_records -= 1
                    continue
                self._records[idx] = [(key, seq, parsed) if t[2] is rec else t for t in self._records[idx]]
                rec = parsed
            out.append((key, seq, rec))
        return out

    def _lookup(self, mod: tvm.IRModule, h: int | None = None) -> int | None:
        h = tvm_ffi.structural_hash(mod) if h is None else h
        for idx in self._by_hash.get(h, ()):
            if tvm_ffi.structural_equal(self._workloads[idx].mod, mod):
                return idx
        return None

    def _index_of(self, workload: ms.database.Workload) -> int | None:
        if self._last is not None and self._last[0].same_as(workload):
            return self._last[1]
        idx = self._lookup(workload.mod)
        if idx is not None:
            self._last = (self._workloads[idx], idx)
        return idx

    def _append(self, fd: int | None, obj: Any) -> None:
        """Append one JSON line and fsync; SIGINT waits until the line is complete.

        A failed write (disk full, I/O error) is cut back to the last complete line, remembered in
        ``write_error`` (MetaSchedule calls this from C++, which may rewrap the exception) and
        raised as a one-line :class:`RecordsError`.
        """
        if fd is None:
            return
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with _Sigint.deferred():
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # no torn line: earlier records stay loadable
                self.write_error = f"cannot write to records dir {self.records_dir}: {e.strerror or e}"
                raise RecordsError(self.write_error) from None

    # ---- MetaSchedule Database interface
    def has_workload(self, mod: tvm.IRModule) -> bool:
        h = tvm_ffi.structural_hash(mod)
        self.queried.add(str(h))
        return self._lookup(mod, h) is not None

    def commit_workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        idx = self._lookup(mod)
        if idx is None:
            wkl = ms.database.Workload(mod)
            self._append(self._fd_workload, wkl.as_json())
            idx = self._add_workload(wkl)
        return self._workloads[idx]

    def commit_tuning_record(self, record: ms.database.TuningRecord) -> None:
        idx = self._index_of(record.workload)
        if idx is None:
            self.commit_workload(record.workload.mod)
            idx = self._index_of(record.workload)
        self._append(self._fd_record, [idx, _record_json(record)])
        self._add_record(idx, record)

    def get_top_k(self, workload: ms.database.Workload, top_k: int) -> list[ms.database.TuningRecord]:
        if top_k < 0:
            raise ValueError("top_k must be non-negative")
        idx = self._index_of(workload)
        if idx is None or top_k == 0:
            return []
        while True:  # a dropped unparsable record lets the next one in
            best = [t for t in self._records.get(idx, []) if t[0] != math.inf][:top_k]
            parsed = self._parsed(idx, best)
            if len(parsed) == len(best):
                return [r for _, _, r in parsed]

    def get_all_tuning_records(self) -> list[ms.database.TuningRecord]:
        return [r for idx in sorted(self._records) for _, _, r in self._parsed(idx, self._records[idx])]

    def __len__(self) -> int:
        return self._n_records

    # ---- helpers for this package
    def workload_stats(self, mod: tvm.IRModule) -> tuple[int, float | None]:
        """(number of records, best valid mean run time in seconds or None) for a workload."""
        idx = self._lookup(mod)
        if idx is None:
            return 0, None
        recs = self._records.get(idx, [])
        best = recs[0][0] if recs and recs[0][0] != math.inf else None
        return len(recs), best

    def records_of(self, mod: tvm.IRModule) -> list[ms.database.TuningRecord]:
        """Every record of a workload, failed ones included, best first."""
        idx = self._lookup(mod)
        return [] if idx is None else [r for _, _, r in self._parsed(idx, self._records.get(idx, []))]

    def sample_records(self, per_workload: int) -> list[tuple[ms.database.Workload, list[ms.database.TuningRecord]]]:
        """Per workload, up to ``per_workload`` valid records spread from best to worst (a cost
        model learns from the contrast, not from the best alone)."""
        out = []
        for idx in sorted(self._records):
            valid = [t for t in self._records[idx] if t[0] != math.inf]
            if len(valid) > per_workload:
                step = (len(valid) - 1) / max(1, per_workload - 1)  # one per workload: the best
                valid = [valid[round(k * step)] for k in range(per_workload)]
            valid = [r for _, _, r in self._parsed(idx, valid)]
            if valid:
                out.append((self._workloads[idx], valid))
        return out

    def close(self) -> None:
        for name in ("_fd_workload", "_fd_record"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def rewrite_top_k(self, top_k: int) -> tuple[int, int]:
        """Keep the best ``top_k`` valid records per workload; atomically rewrite the record file."""
        if not self.writable:
            raise RecordsError("database opened read-only")
        lines, kept = [], 0
        for idx in sorted(self._records):
            best = [t for t in self._records[idx] if t[0] != math.inf][:top_k]
            self._records[idx] = best
            kept += len(best)
            lines += [json.dumps([idx, r.obj if isinstance(r, _LazyRecord) else _record_json(r)], separators=(",", ":"))
                      + "\n" for _, _, r in best]
        before = self._n_records
        if self._fd_record is not None:
            os.close(self._fd_record)
            self._fd_record = None
        _atomic_write(self.path_tuning_record, "".join(lines).encode())
        self._fd_record = os.open(self.path_tuning_record, os.O_WRONLY | os.O_APPEND)
        self._n_records = kept
        return before, kept


class _Records:
    """An opened records dir: database + lock (when writable)."""

    def __init__(self, db: Any, lock_fd: int | None) -> None:
        self.db = db
        self.lock_fd = lock_fd

    def close(self) -> None:
        self.db.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None


def _has_files(records_dir: Path) -> bool:
    """Whether the dir has a non-empty workload or record file."""
    files = (records_dir / WORKLOAD_FILE, records_dir / RECORD_FILE)
    return any(f.is_file() and f.stat().st_size > 0 for f in files)


def open_records(
    records_dir: str | os.PathLike, target: tvm.target.Target | None, *, writable: bool
) -> _Records:
    """Open (and, if writable, create and lock) a records dir after checking its ``meta.json``.

    Raises :class:`RecordsError` for another target or TVM version, an unwritable dir, or a dir
    another tuning process holds; nothing is written before the checks pass. A dir without
    ``meta.json`` (e.g. a stock MetaSchedule work dir) is adopted if its records are for ``target``.
    """
    records_dir = Path(records_dir)
    target = _as_target(target) if target is not None else None
    if writable:
        try:
            records_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordsError(f"cannot create records dir {records_dir}: {e.strerror or e}") from e
        if not os.access(records_dir, os.W_OK | os.X_OK):
            raise RecordsError(f"records dir {records_dir} is not writable")
    elif not records_dir.is_dir():
        raise RecordsError(f"records dir {records_dir} does not exist")
    meta = _read_meta(records_dir)
    if meta is not None:
        _check_meta(meta, target, records_dir)
    elif _has_files(records_dir):
        if target is None:
            raise RecordsError(f"{records_dir} has records but no {META_FILE}")
        probe = RecordsDatabase(str(records_dir), writable=False)
        foreign = {_target_key(r.target) for r in probe.get_all_tuning_records() if r.target is not None}
        foreign.discard(_target_key(target))
        if foreign:
            raise RecordsError(
                f"{records_dir} has records for another target ({sorted(foreign)[0]}) and no "
                f"{META_FILE}; use another records dir"
            )
    if not writable:
        return _Records(RecordsDatabase(str(records_dir), writable=False), None)
    try:
        lock_fd = os.open(records_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RecordsError(f"records dir {records_dir} is not writable: {e.strerror}") from e
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RecordsError(f"records dir {records_dir} is in use by another tuning process") from e
        if meta is None:
            if target is None:
                raise RecordsError(f"{records_dir} has no {META_FILE}")
            _atomic_write(records_dir / META_FILE, json.dumps(_new_meta(target), indent=2).encode())
        db = RecordsDatabase(str(records_dir), writable=True)
    except OSError as e:
        os.close(lock_fd)
        raise RecordsError(f"cannot write to records dir {records_dir}: {e.strerror or e}") from e
    except BaseException:
        os.close(lock_fd)
        raise
    return _Records(db, lock_fd)


# --------------------------------------------------------------------------- module, tasks


def _prepare(mod: tvm.IRModule, params: dict[str, Any] | None) -> tvm.IRModule:
    """Bind params (name -> numpy/Tensor) and decompose inference ops; same for tune and compile."""
    if params:
        bound = {
            k: v if isinstance(v, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(v))
            for k, v in params.items()
        }
        mod = relax.transform.BindParams("main", bound)(mod)
    return relax.transform.DecomposeOpsForInference()(mod)


@dataclass
class _Task:
    name: str
    weight: int
    flops: float
    mod: tvm.IRModule  # normalized workload module (what MetaSchedule commits)
    target: tvm.target.Target


def prepacks_weights(target: tvm.target.Target) -> bool:
    """Whether kernels for ``target`` read their weights in a layout chosen by tuning.

    On CPUs a tuned conv reads its weights tile by tile; with the weights marked layout-free,
    MetaSchedule may pick a packed layout (RewriteLayout) and compile folds the repacking into
    the constants once, instead of the kernel gathering strided weights on every call.
    """
    return _as_target(target).kind.name == "llvm"


def _fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalise and fuse as MetaSchedule's ``zero`` pipeline does; the one place that decides
    what a tuning task is, for extraction and compilation alike."""
    legal = tvm.transform.Sequential([
        relax.transform.LegalizeOps({"relax.nn.conv2d": legalize_conv2d, "relax.image.resize2d": legalize_resize2d}),
        relax.transform.AnnotateTIROpPattern(),
    ])(mod)
    fused = tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(_gathers_unfused(legal))
    if prepacks_weights(target):
        fused = relax.transform.AttachAttrLayoutFreeBuffers()(fused)
    return fused


#: A concatenation of at least this many tensors is a kernel of its own.
GATHER_INPUTS = 3


def _gathers_unfused(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each concatenation of ``GATHER_INPUTS`` or more tensors kept out of fusion.

    Fused, SSDLite's output (six heads, each transposed and reshaped, concatenated, boxes
    decoded, scores through a sigmoid, concatenated again) was one kernel in which every output
    element walked a chain of selects over all heads with 64-bit index arithmetic: 5.3 ms of
    28 per inference on one thread, where ONNX Runtime's separate ops take 0.4 ms. Apart, each
    piece is a plain copy or element-wise kernel (4.8 ms less before any tuning). Two-way
    concatenations (DeepLab's ASPP) stay fusable: nothing slow came of them.
    """
    gathers = [(gv, func) for gv, func in mod.functions.items()
               if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith("concatenate")
               and len(func.params) > GATHER_INPUTS]  # params: the inputs, then the output
    if not gathers:
        return mod
    out = mod.clone()  # an IRModule is changed in place
    for gv, func in gathers:
        out[gv] = func.with_attr("op_pattern", OPAQUE)
    return out


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target, params: dict | None = None) -> list[_Task]:
    """The tuning tasks of ``mod`` for ``target``, keyed as the records store them."""
    fused = _fuse(_prepare(mod, params), _as_target(target))
    tasks = []
    for t in ms.relax_integration.extract_tasks(fused, target):
        wmod = tvm_compat.normalize_workload(t.dispatched[0])
        if wmod["main"].attrs and wmod["main"].attrs.get("tirx.is_scheduled", False):
            continue
        try:
            flops = float(tvm.s_tir.analysis.estimate_tir_flops(wmod))
        except Exception:  # noqa: BLE001 - flops only steer the budget split
            flops = 1.0
        tasks.append(_Task(t.task_name, int(t.weight), max(flops, 1.0), wmod, t.target))
    return tasks


def allocate_trials(total: int, importance: list[float], min_per_task: int = MIN_TRIALS_PER_TASK,
                    done: list[int] | None = None) -> list[int]:
    """Split ``total`` trials over tasks, one at a time (so it is monotone in ``total``); the
    ``done`` trials a task already has count as given to it. Returns each task's total.

    First every task is brought to ``min_per_task`` (the task with fewest trials first, the
    more important on ties), then
    each further trial goes to the task with the highest ``sqrt(importance) / (trials + 0.5)``.
    """
    n = len(importance)
    alloc = list(done) if done is not None else [0] * n
    left = total - sum(alloc)
    if n == 0 or left <= 0:
        return alloc
    pri = [math.sqrt(max(float(x), 0.0)) + 1e-12 for x in importance]
    while left > 0 and min(alloc) < min_per_task:
        i = min((j for j in range(n) if alloc[j] < min_per_task), key=lambda j: (alloc[j], -pri[j]))
        alloc[i] += 1
        left -= 1
    while left > 0:
        i = max(range(n), key=lambda j: pri[j] / (alloc[j] + 0.5))
        alloc[i] += 1
        left -= 1
    return alloc


def _importance(tasks: list[_Task], best: list[float | None]) -> list[float]:
    """A task's share of the end-to-end time once measured (weight × best time), else its
    FLOPs converted at the median measured rate: depthwise and memory-bound kernels take far
    more time than their FLOPs say, and time is what tuning can win back."""
    rates = sorted(b / t.flops for t, b in zip(tasks, best) if b is not None)
    if not rates:
        return [t.weight * t.flops for t in tasks]
    rate = rates[len(rates) // 2]
    return [t.weight * (b if b is not None else t.flops * rate) for t, b in zip(tasks, best)]


# --------------------------------------------------------------------------- runner, builder


@dataclass(frozen=True)
class RunnerSpec:
    """Where candidates are measured: ``local`` (this machine) or ``rpc`` (via an RPC tracker)."""

    kind: Literal["local", "rpc"] = "local"
    tracker_host: str | None = None
    tracker_port: int | None = None
    key: str | None = None
    session_timeout_sec: int = 60
    number: int = 3
    repeat: int = 1
    min_repeat_ms: int = 100
    enable_cpu_cache_flush: bool = False
    timeout_sec: float = 30.0  # local runs
    max_workers: int = 1  # parallel RPC sessions (boards under the key)
    # Link candidates here with this compiler and upload the .so, so a board needs only the
    # TVM runtime (no tar, gzip or C++ compiler there).
    cross_compiler: str | None = None
    # How long a candidate waits for a free board (or for a restarted tracker) before it is
    # recorded as failed; the tracker itself would make it wait for ever.
    board_wait_sec: float = 120.0
    # MetaSchedule's f_run_evaluator (session, rt_mod, device, evaluator_config, args) -> secs.
    f_run_evaluator: Callable[..., list[float]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("local", "rpc"):
            raise ValueError(f"runner kind must be 'local' or 'rpc', not {self.kind!r}")
        if self.kind == "rpc" and not (self.tracker_host and self.tracker_port and self.key):
            raise ValueError("an RPC runner needs tracker_host, tracker_port and key")

    @classmethod
    def rpc(cls, tracker_host: str, tracker_port: int, key: str, **kw: Any) -> RunnerSpec:
        """RPC-tracker runner spec."""
        return cls(kind="rpc", tracker_host=tracker_host, tracker_port=int(tracker_port), key=key, **kw)

    @property
    def artifact_format(self) -> str:
        """``tar`` for RPC (the server links it), ``so`` locally."""
        return "tar" if self.kind == "rpc" else "so"

    def evaluator_config(self) -> ms.runner.EvaluatorConfig:
        return ms.runner.EvaluatorConfig(
            number=self.number,
            repeat=self.repeat,
            min_repeat_ms=self.min_repeat_ms,
            enable_cpu_cache_flush=self.enable_cpu_cache_flush,
        )

    def make_runner(self) -> ms.runner.Runner:
        """Create the MetaSchedule runner."""
        if self.kind == "rpc":
            # Not the stock RPCRunner: it has no client-side deadline, so a hung board hangs the run.
            from .remote import bounded_rpc_runner

            return bounded_rpc_runner(
                self.tracker_host, self.tracker_port, self.key,
                session_timeout_sec=self.session_timeout_sec,
                evaluator_config=self.evaluator_config(),
                max_workers=self.max_workers,
                f_upload_module=_host_linked_upload(self.cross_compiler) if self.cross_compiler else None,
                f_run_evaluator=self.f_run_evaluator,
                board_wait_s=self.board_wait_sec,
            )
        return ms.runner.LocalRunner(timeout_sec=self.timeout_sec, evaluator_config=self.evaluator_config())


def _host_linked_upload(cross_compiler: str) -> Callable[..., Any]:
    from .remote import host_linked_upload

    return host_linked_upload(cross_compiler)


def _builder_worker_init(cpu_only: bool) -> None:
    """Runs once per builder worker: the slow import that LocalBuilder repeats per batch."""
    tvm_compat.import_tensor_intrinsics(cpu_only)


def _builder_worker_noop() -> int:
    return os.getpid()


def _builder_worker_build(mod: Any, target: Any, fmt: str) -> str:
    """Build one candidate (as MetaSchedule's default_build) and export it; return the path."""
    import os as _os
    import tempfile as _tempfile

    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    if target.kind.name == "llvm":  # as default_build, with the pipeline compile uses
        import tvm.s_tir.tensor_intrin  # noqa: F401
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        rt_mod = tvm.tirx.build(mod, target=target, pipeline=microkernels.tir_pipeline())
    else:
        rt_mod = default_build(mod, target, None)
    out_dir = _tempfile.mkdtemp(prefix="mnv2tvm-build-")
    if fmt == "tar":
        from tvm.support import tar

        path = _os.path.join(out_dir, "tvm_tmp_mod.tar")
        rt_mod.export_library(path, fcompile=tar.tar)
    else:
        path = _os.path.join(out_dir, "tvm_tmp_mod.so")
        rt_mod.export_library(path)
    return path


def _build_one(args: tuple) -> str:
    return _builder_worker_build(*args)


_POOLS: dict[tuple[int, float, bool], Any] = {}
_POOLS_LOCK = threading.Lock()
#: Per pool (by id), the futures of its workers' first job: they have started once these are done.
_WARMUP: dict[int, list[Any]] = {}


def _shared_pool(max_workers: int, timeout_sec: float, cpu_only: bool) -> Any:
    """A process-wide builder pool per (workers, timeout): later tune() calls skip the warm-up."""
    import atexit

    import cloudpickle

    from tvm.support.popen_pool import PopenPoolExecutor

    key = (max_workers, float(timeout_sec), cpu_only)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            # Workers unpickle our functions by value, so they need not import this package.
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
            pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=_builder_worker_init,
                                     initargs=(cpu_only,))
            if not _POOLS:
                atexit.register(_shutdown_pools)
            _POOLS[key] = pool
            # Start every worker now so the slow import overlaps with task preparation.
            _WARMUP[id(pool)] = [pool.submit(_builder_worker_noop) for _ in range(max_workers)]
        return pool


def _kill_pool(pool: Any) -> None:
    """Stop a pool now, even with work in flight (see :func:`tvm_compat.kill_popen_pool`)."""
    tvm_compat.kill_popen_pool(pool, _WARMUP.pop(id(pool), ()))


def _shutdown_pools(key: tuple[int, float, bool] | None = None) -> None:
    """Kill builder workers (all pools, or one)."""
    with _POOLS_LOCK:
        keys = list(_POOLS) if key is None else [key]
        pools = [_POOLS.pop(k) for k in keys if k in _POOLS]
    for pool in pools:
        _kill_pool(pool)


@derived_object
class PersistentBuilder(ms.builder.PyBuilder):
    """Builder whose worker processes live across batches (and tune() calls) and import
    ``tvm.s_tir.tensor_intrin`` once, in the pool initializer."""

    def __init__(self, max_workers: int = 2, timeout_sec: float = 60.0, artifact_format: str = "so",
                 cpu_only: bool = False) -> None:
        super().__init__()
        self.max_workers = max(1, int(max_workers))
        self.timeout_sec = float(timeout_sec)
        self.artifact_format = artifact_format
        self.cpu_only = cpu_only
        self.pool = _shared_pool(self.max_workers, self.timeout_sec, cpu_only)

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        from tvm.support.popen_pool import StatusKind

        results = []
        args = [(bi.mod, bi.target, self.artifact_format) for bi in build_inputs]
        for res in self.pool.map_with_error_catching(_build_one, args):
            if res.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"PersistentBuilder: timeout after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"PersistentBuilder: {res.value!r}"))
        return results

    def discard(self) -> None:
        """Kill this builder's workers (after an interruption: they may be mid-build)."""
        _shutdown_pools((self.max_workers, self.timeout_sec, self.cpu_only))


# --------------------------------------------------------------------------- reports


@dataclass
class TaskReport:
    """One tuning task of the module."""

    name: str
    weight: int
    flops: float
    trials: int  # measured in this session
    trials_total: int  # records in the database for this workload (all sessions, all models)
    best_us: float | None  # best valid measured mean, µs
    build_errors: int = 0
    run_errors: int = 0
    exhausted: bool = False  # its search found no unmeasured schedule left: no more trials given

    @property
    def weighted_us(self) -> float | None:
        return None if self.best_us is None else self.best_us * self.weight


@dataclass
class TuneReport:
    """Outcome of :func:`tune`."""

    target: str
    records_dir: str
    trials_requested: int
    tasks: list[TaskReport]
    trials_run: int
    trials_in_db_before: int
    trials_in_db_after: int
    tasks_covered_before: int
    wall_time_s: float
    interrupted: bool = False
    already_done: bool = False
    first_trial_s: float | None = None  # from the call to the first measured batch
    message: str = ""
    #: Peak RSS of the tuning process and its workers summed (:class:`_PeakMemory`), and how many
    #: processes that peak counted; None where not sampled (nothing to tune).
    peak_rss_mb: float | None = None
    peak_rss_processes: int = 0
    #: Sum over tasks of weight × best µs; None until every task has a valid measurement.
    estimated_e2e_us: float | None = field(init=False)
    tasks_without_measurement: int = field(init=False)

    def __post_init__(self) -> None:
        parts = [t.weighted_us for t in self.tasks]
        self.tasks_without_measurement = sum(p is None for p in parts)
        self.estimated_e2e_us = None if not parts or None in parts else float(sum(parts))

    def table(self) -> str:
        """Per-task table: trials, best µs and share of the estimated end-to-end time."""
        known = sum(t.weighted_us or 0.0 for t in self.tasks)
        head = f"{'#':>3}  {'task':<40} {'wt':>3} {'trials':>11} {'best µs':>10} {'share':>6}"
        rows = [head, "-" * len(head)]
        for i, t in enumerate(self.tasks):
            best = f"{t.best_us:10.2f}" if t.best_us is not None else f"{'-':>10}"
            share = f"{100 * t.weighted_us / known:5.1f}%" if t.weighted_us and known else f"{'-':>6}"
            trials = f"{t.trials}/{t.trials_total}" + ("*" if t.exhausted else "")
            rows.append(f"{i:>3}  {t.name[:40]:<40} {t.weight:>3} {trials:>11} {best} {share}")
        rows.append("-" * len(head))
        est = self.estimated_e2e_us
        est_s = f"{est:.1f} µs" if est is not None else f"n/a ({self.tasks_without_measurement} unmeasured)"
        rows.append(
            f"{self.trials_run} trials this session (trials/total above; in db for this model "
            f"{self.trials_in_db_before} -> {self.trials_in_db_after}; {self.tasks_covered_before}/{len(self.tasks)} "
            f"tasks had records before); estimated end-to-end {est_s}; "
            f"{self.wall_time_s:.0f} s" + (" [interrupted]" if self.interrupted else "")
            + (f"; peak RSS {self.peak_rss_mb / 1024:.2f} GB in all ({self.peak_rss_processes} processes)"
               if self.peak_rss_mb else "")
        )
        if any(t.exhausted for t in self.tasks):
            rows.append("* search space used up: its share went to the other tasks")
        return "\n".join(rows)


@dataclass
class ApplyReport:
    """What :func:`compile_with_records` applied."""

    tuned: list[str]
    fallback: list[str]
    records_digest: str | None  # sha256 of workload file + NUL + record file as read
    records_dir: str | None
    untuned: bool = field(default=False)
    # Structural hashes of every kernel's workload looked up in the records (see workload_digest)
    workloads: list[str] = field(default_factory=list)
    # Kernels whose parallel loop runs over output rows outermost (ROW_ORDER_FILE)
    rows_outermost: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- progress, logging


def fmt_duration(sec: float | None) -> str:
    """Seconds as MM:SS or H:MM:SS (``--:--`` when unknown)."""
    if sec is None or not math.isfinite(sec):
        return "--:--"
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Progress:
    """One live line on stderr (TTY), or a line per batch at most every 10 s otherwise."""

    def __init__(self, stream: io.TextIOBase | None, total: int, t0: float) -> None:
        self.stream = stream
        self.total = total
        self.t0 = t0
        self.done = 0
        self._mark: tuple[float, int] | None = None  # (time, done) at the first measured batch
        self.est_us: float | None = None
        self.unmeasured = 0
        self.task = ""
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last_print = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.stream is not None and self.tty:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def _line(self) -> str:
        now = time.monotonic()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = None
        if self._mark is not None and self.done > self._mark[1]:
            eta = (now - self._mark[0]) / (self.done - self._mark[1]) * (self.total - self.done)
        elif self.done >= self.total:
            eta = 0.0
        est = "--" if self.est_us is None else f"{self.est_us:.1f}µs"
        if self.unmeasured and self.est_us is not None:
            est += f" (+{self.unmeasured} untimed)"
        return (
            f"[tune] {self.done}/{self.total} trials {pct:3.0f}% | {fmt_duration(now - self.t0)} elapsed"
            f" | ETA {fmt_duration(eta)} | est {est} | {self.task[:28]}"
        )

    def _write(self, final: bool = False) -> None:
        if self.stream is None:
            return
        with self._lock:
            try:
                if self.tty:
                    self.stream.write("\r\x1b[2K" + self._line() + ("\n" if final else ""))
                else:
                    now = time.monotonic()
                    if final or now - self._last_print >= 10.0:
                        self.stream.write(self._line() + "\n")
                        self._last_print = now
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def note(self, text: str) -> None:
        """A line of its own above the live one."""
        if self.stream is None:
            return
        with self._lock:
            try:
                self.stream.write(("\r\x1b[2K" if self.tty else "") + f"[tune] {text}\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._write()

    def update(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)
            if self._mark is None and self.done:
                self._mark = (time.monotonic(), self.done)
        self._write()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._write(final=True)


@contextlib.contextmanager
def _tvm_logs_to(log_path: Path, want_console: bool) -> Iterator[io.TextIOBase | None]:
    """Send TVM's Python and C++ (fd 2) logging to ``log_path``; yield a stream to the real stderr."""
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    own_logger = logging.getLogger(__name__)
    saved = [(lg, lg.level, lg.propagate, lg.handlers[:]) for lg in (ms_logger, own_logger)]
    for lg in (ms_logger, own_logger):
        lg.handlers = [handler]  # e.g. no console handler MetaSchedule's create_loggers may have left
        lg.setLevel(logging.INFO)
        lg.propagate = False
    console: io.TextIOBase | None = None
    saved_fd = None
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        stderr_fd = None
    try:
        if stderr_fd == 2:
            sys.stderr.flush()
            saved_fd = os.dup(2)
            if want_console:
                console = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        elif want_console:
            console = sys.stderr
        yield console
    finally:
        if saved_fd is not None:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        if console is not None and console is not sys.stderr:
            console.close()
        for lg, level, prop, handlers in saved:
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = prop
        with contextlib.suppress(OSError):  # e.g. disk full: the log is best effort, not the error to report
            handler.close()


@derived_object
class _BatchCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, fn: Callable[[list, list], None]) -> None:
        super().__init__()
        self.fn = fn

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
              runner_results: Any) -> None:
        self.fn(list(builder_results), list(runner_results))


@derived_object
class _Unmeasured(ms.search_strategy.PySearchStrategy):
    """Evolutionary search that never hands back a schedule the database already holds.

    Its initial population holds the database's best traces, but it only remembers what it
    measured itself (a TODO in MetaSchedule's evolutionary_search.cc), so an unchanged best can
    come out of evolution and be measured again: on a rerun, and in every round here, since each
    round is a fresh search (:func:`_tune_task`). So it is asked for as many more candidates as
    database traces can enter its population, and those already measured are dropped.
    """

    def __init__(self, inner: Any, measured: set[str]) -> None:
        super().__init__()
        self.inner = inner
        self.measured = measured  # _trace_key of every schedule of the task in the database
        self.want = self.asked = 0

    def _initialize_with_tune_context(self, context: Any) -> None:
        tvm_compat.initialize_search_strategy(self.inner, context)

    def pre_tuning(self, max_trials: int, num_trials_per_iter: int, design_spaces: list, database: Any = None,
                   cost_model: Any = None) -> None:
        self.want = num_trials_per_iter
        inner = self.inner
        extra = min(len(self.measured), math.ceil(inner.population_size * inner.init_measured_ratio))
        self.asked = num_trials_per_iter + extra
        inner.pre_tuning(max_trials + extra, self.asked, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self) -> list | None:
        cands = self.inner.generate_measure_candidates()
        if cands is None:
            return None
        keyed = [(_trace_key(c.sch.trace), c) for c in cands]
        fresh = [(k, c) for k, c in keyed if k not in self.measured]
        if not fresh and len(cands) < self.asked:
            return None  # nothing left that is not measured: the space is used up
        if len(fresh) > self.want:
            # Best predicted first, its epsilon-greedy random picks last: keep both parts.
            rands = int(self.want * self.inner.eps_greedy)
            fresh = fresh[: self.want - rands] + (fresh[len(fresh) - rands :] if rands else [])
        self.measured.update(k for k, _ in fresh)
        return [c for _, c in fresh]

    def notify_runner_results(self, measure_candidates: list, results: list) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self) -> Any:
        return _Unmeasured(self.inner.clone(), self.measured)


# --------------------------------------------------------------------------- tune


class _Session:
    """State of one tune() call: the plan, the per-task counters and the report."""

    def __init__(self, db: Any, tasks: list[_Task], trials: int, target: tvm.target.Target, records_dir: Path,
                 t0: float) -> None:
        self.db, self.tasks, self.trials, self.t0 = db, tasks, trials, t0
        self.target, self.records_dir = target, records_dir
        stats = [db.workload_stats(t.mod) for t in tasks]
        self.existing = [n for n, _ in stats]
        self.best = [b for _, b in stats]  # seconds, best valid mean so far
        self.covered_before = sum(b is not None for b in self.best)
        # Every task is brought to the minimum even when records of other models already fill
        # the total (the tasks they share are tuned, the others are not). A total too small for
        # that lowers the minimum to what it affords per task, never to nothing.
        self.least = min(MIN_TRIALS_PER_TASK, max(1, trials // max(1, len(tasks)))) if trials > 0 else 0
        self.floor = sum(max(e, self.least) for e in self.existing)
        self.remaining = max(0, max(self.floor, trials) - sum(self.existing))  # what this run measures
        self.measured = [0] * len(tasks)  # as seen by the batch callback (progress)
        self.errors = [[0, 0] for _ in tasks]  # build, run
        self.first_trial: float | None = None
        self.current = 0
        self.bar: _Progress | None = None
        self.interrupted = False
        self.transfer = False  # train the cost model on the database first (_warm_start)
        self.exhausted: set[int] = set()  # tasks with no unmeasured schedule left to find
        self._keys: dict[int, set[str]] = {}

    def keys(self, i: int) -> set[str]:
        """The schedules (:func:`_trace_key`) the database holds for task ``i``, kept up to date
        by whatever measures in this run, so that nothing is measured twice."""
        if i not in self._keys:
            self._keys[i] = {_trace_key(r.trace) for r in self.db.records_of(self.tasks[i].mod)}
        return self._keys[i]

    def plan(self) -> Iterator[list[int]]:
        """This run's budgets per task, in phases, ``trials`` in all with what the records hold
        (more where every task needs its minimum).

        Phase 1 brings every task to the minimum, so every kernel has a measured time early
        (and the estimate is complete); phase 2 then splits the rest by measured time share
        (:func:`_importance`), planned only once phase 1 has run. A task whose search space runs
        out leaves what it did not use to the others, in a further phase.
        """
        done = [n for n, _ in (self.db.workload_stats(t.mod) for t in self.tasks)]  # seeds count
        first = allocate_trials(self.floor, _importance(self.tasks, self.best), done=done)
        yield [a - d for a, d in zip(first, done)]
        while True:
            used_up = len(self.exhausted)
            stats = [self.db.workload_stats(t.mod) for t in self.tasks]
            done = [n for n, _ in stats]
            importance = _importance(self.tasks, [b for _, b in stats])
            live = [i for i in range(len(self.tasks)) if i not in self.exhausted]  # the rest cannot use more
            part = allocate_trials(self.trials - sum(d for i, d in enumerate(done) if i in self.exhausted),
                                   [importance[i] for i in live], done=[done[i] for i in live])
            final = list(done)
            for i, a in zip(live, part):
                final[i] = a
            budgets = [a - d for a, d in zip(final, done)]
            if not any(b > 0 for b in budgets):
                return
            yield budgets
            if len(self.exhausted) == used_up:
                return

    def estimate(self) -> tuple[float | None, int]:
        known = [self.tasks[i].weight * b * 1e6 for i, b in enumerate(self.best) if b is not None]
        return (sum(known) if known else None), sum(b is None for b in self.best)

    def on_batch(self, builder_results: list, runner_results: list) -> None:
        i = self.current
        if self.first_trial is None:
            self.first_trial = time.monotonic() - self.t0
        self.measured[i] += len(runner_results)
        for br, rr in zip(builder_results, runner_results):
            if br.error_msg is not None:
                self.errors[i][0] += 1
            elif rr.error_msg is not None:
                self.errors[i][1] += 1
        self.best[i] = self.db.workload_stats(self.tasks[i].mod)[1]
        if self.bar is not None:
            est, untimed = self.estimate()
            self.bar.update(done=sum(self.measured), est_us=est, unmeasured=untimed)
        _Sigint.check()  # the batch's records are on disk

    def report(self, message: str) -> TuneReport:
        after = [self.db.workload_stats(t.mod) for t in self.tasks]
        run = [max(0, a[0] - e) for a, e in zip(after, self.existing)]  # we hold the lock: all ours
        return TuneReport(
            target=str(self.target),
            records_dir=str(self.records_dir),
            trials_requested=self.trials,
            tasks=[
                TaskReport(
                    name=t.name,
                    weight=t.weight,
                    flops=t.flops,
                    trials=run[i],
                    trials_total=after[i][0],
                    best_us=None if after[i][1] is None else after[i][1] * 1e6,
                    build_errors=self.errors[i][0],
                    run_errors=self.errors[i][1],
                    exhausted=i in self.exhausted,
                )
                for i, t in enumerate(self.tasks)
            ],
            trials_run=sum(run),
            trials_in_db_before=sum(self.existing),
            trials_in_db_after=sum(n for n, _ in after),
            tasks_covered_before=self.covered_before,
            wall_time_s=time.monotonic() - self.t0,
            interrupted=self.interrupted,
            already_done=self.remaining == 0,
            first_trial_s=self.first_trial,
            message=message,
        )


def _search_kwargs(budget: int) -> dict[str, Any]:
    """Evolutionary search settings for a task's budget. With only a few candidates to measure,
    MetaSchedule's default search (512 schedules evolved 4 times, seconds per task) costs more
    than the measurements and its breadth is wasted; :data:`SEARCH_KWARGS` overrides either."""
    light = {"population_size": 128, "init_min_unmeasured": 16, "genetic_num_iters": 2} if budget < 4 else {}
    return {**light, **SEARCH_KWARGS}


def _tune_task(sess: _Session, i: int, budget: int, seed: int, builder: Any, run: Any, callbacks: list,
               cost_model: Any, ncores: int) -> None:
    task = sess.tasks[i]
    sess.current = i
    if sess.bar is not None:
        est, untimed = sess.estimate()
        sess.bar.update(task=task.name, est_us=est, unmeasured=untimed)
    # One round per scheduler call, so that a task whose search space is used up stops at the
    # first round well short of what it asked for: MetaSchedule would search again until the
    # budget is sent, each round (minutes for SSDLite's big fused output kernel) yielding the
    # one candidate left.
    start = sess.measured[i]
    for k in range(math.ceil(budget / TRIALS_PER_ITER)):
        chunk = min(TRIALS_PER_ITER, budget - (sess.measured[i] - start))
        before = sess.measured[i]
        ctx = ms.TuneContext(
            mod=task.mod,
            target=task.target,
            space_generator="post-order-apply",
            search_strategy=_Unmeasured(ms.search_strategy.EvolutionarySearch(**_search_kwargs(chunk)),
                                        sess.keys(i)),
            task_name=task.name,
            logger=logging.getLogger(f"tvm.s_tir.meta_schedule.mnv2_tvm.task{i:02d}_{task.name[:60]}"),
            rand_state=(seed + k) & 0x7FFFFFFF,
            num_threads=ncores,
        ).clone()
        ms.task_scheduler.RoundRobin().tune(
            tasks=[ctx],
            task_weights=[float(task.weight)],
            # The scheduler stops once it has sent this many: 1 means after the first round,
            # whatever that round's size (the search strategy asks for up to `chunk`).
            max_trials_global=1,
            max_trials_per_task=chunk,
            num_trials_per_iter=chunk,
            builder=builder,
            runner=run,
            measure_callbacks=callbacks,
            database=sess.db,
            cost_model=cost_model,
        )
        # Well short, not just short: a big space's round can come back a candidate or two under
        # what it asked for (duplicates), and stopping such a task would starve it.
        if 2 * (sess.measured[i] - before) < chunk:
            sess.exhausted.add(i)
            _log.info("task %s: search space used up after %d new trials", task.name, sess.measured[i] - start)
            break
    _log.info("task %s: %d/%d trials measured", task.name, sess.measured[i], budget)


#: Records per workload the cost model is trained on before tuning (see :func:`_warm_start`).
WARM_RECORDS_PER_WORKLOAD = 24


def _warm_start(cost_model: Any, db: Any, target: tvm.target.Target, ncores: int) -> tuple[int, int]:
    """Train the cost model on what the database already holds, for every workload in it.

    MetaSchedule shares records between models only for identical workloads; a new width or
    resolution has almost none. Its cost model, though, reads features of the loop nest (tile
    sizes, vector lengths, bytes touched), which carry over between shapes of the same kind of
    kernel on the same CPU: trained first, it ranks even a task's first candidates instead of
    guessing. Returns (records, workloads) used.
    """
    batches = []
    for workload, records in db.sample_records(WARM_RECORDS_PER_WORKLOAD):
        cands, results = [], []
        for rec in records:
            try:
                cands.append(rec.as_measure_candidate())
            except Exception:  # noqa: BLE001 - a trace that no longer replays teaches nothing
                continue
            results.append(ms.runner.RunnerResult([float(x) for x in rec.run_secs], None))
        if cands:
            batches.append((workload, cands, results))
        _Sigint.check()
    # Collect every group, then train once (each training starts from scratch).
    tvm_compat.update_cost_model_once(
        cost_model, [(ms.TuneContext(mod=workload.mod, target=target, num_threads=ncores), cands, results)
                     for workload, cands, results in batches])
    return sum(len(c) for _, c, _ in batches), len(batches)


#: Schedules of other workloads tried on a task that has no records (see :func:`_seed_from_similar`).
SEEDS_PER_TASK = 3


def _sblocks(mod: tvm.IRModule) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """Each block of a workload: its name and (iterator kind, extent) per iterator."""
    sch = tvm.s_tir.Schedule(mod)
    out = []
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        blk = sch.get(rv)
        out.append((blk.name_hint, tuple((int(iv.iter_type), int(iv.dom.extent)) for iv in blk.iter_vars)))
    return out


def _kernel_kind(blocks: list) -> tuple:
    """What a workload computes, without its sizes: block names, iterator kinds, and which
    iterators are trivial (a 1x1 conv and a depthwise conv differ there, not in names)."""
    return tuple((name, tuple((kind, extent == 1) for kind, extent in its)) for name, its in blocks)


def _shape_distance(a: list, b: list) -> float:
    """How far two workloads of one kind are apart: Σ |log extent ratio| over all iterators."""
    return sum(abs(math.log(x[1] / y[1])) for (_, ia), (_, ib) in zip(a, b) for x, y in zip(ia, ib))


def _fit_tile(extent: int, old: list[int], max_innermost: int) -> list[int]:
    """Factors of ``extent`` (as many as ``old``), each as near as it can be to ``old``'s,
    fitted from the innermost out (the inner tiles are what vectorisation and caches see);
    the innermost at most ``max_innermost``, as the sampling instruction demands."""
    new = [1] * len(old)
    rest = extent
    for i in range(len(old) - 1, 0, -1):
        want = max(1, old[i])
        cap = max_innermost if i == len(old) - 1 and max_innermost > 0 else rest
        new[i] = min((d for d in range(1, min(rest, cap) + 1) if rest % d == 0),
                     key=lambda d: (abs(math.log(d / want)), -d))
        rest //= new[i]
    new[0] = rest
    return new


def _refit_decisions(sch: tvm.s_tir.Schedule) -> Callable[..., Any]:
    """A decision provider that fits another workload's tile sizes to this one's loops."""
    def decide(inst: Any, inputs: list, attrs: list, decision: Any) -> Any:
        if inst.kind.name == "SamplePerfectTile":
            extent = int(sch.get(inputs[0]).extent)
            old = [int(d) for d in decision]
            if math.prod(old) != extent:
                return _fit_tile(extent, old, int(attrs[1]))
        return decision
    return decide


def _trace_key(trace: Any) -> str:
    """A schedule's identity: its instructions and decisions, postprocessing left out."""
    return str(trace.as_json(remove_postproc=True))


def _finished(task: _Task, schedules: list[Any], tried: set[str]) -> list[Any]:
    """Schedules postprocessed as MetaSchedule finishes its own candidates (parallel, vectorise,
    packed weights), those whose trace is in ``tried`` or that fail postprocessing left out;
    ``tried`` gains the rest."""
    ctx = ms.TuneContext(mod=task.mod, target=task.target, space_generator="post-order-apply",
                         task_name=task.name, num_threads=1)
    out = []
    for sch in schedules:
        key = _trace_key(sch.trace)
        if key in tried:
            continue
        try:
            sch.enter_postproc()
            if not all(p.apply(sch) for p in ctx.space_generator.postprocs):
                continue
        except Exception:  # noqa: BLE001 - a schedule postprocessing rejects is no candidate
            continue
        tried.add(key)
        out.append(sch)
    return out


def _measure_schedules(sess: _Session, i: int, cands: list[Any], builder: Any, run: Any, what: str) -> None:
    """Build, time and record schedules we wrote for task ``i``, as MetaSchedule records its trials."""
    task = sess.tasks[i]
    sess.current = i
    if sess.bar is not None:
        sess.bar.update(task=task.name)
    # As MetaSchedule measures a candidate: with the argument shapes after RewriteLayout.
    args_info = [ms.arg_info.ArgInfo.from_entry_func(c.mod, remove_preproc=True) for c in cands]
    built = builder.build([ms.builder.BuilderInput(c.mod, task.target) for c in cands])
    device = tvm_compat.device_type_name(task.target)
    inputs = [ms.runner.RunnerInput(b.artifact_path, device, a)
              for b, a in zip(built, args_info) if b.error_msg is None]
    results = iter(f.result() for f in run.run(inputs)) if inputs else iter(())
    workload = sess.db.commit_workload(task.mod)
    runner_results = []
    for sch, b, a in zip(cands, built, args_info):
        rr = next(results) if b.error_msg is None else ms.runner.RunnerResult(None, b.error_msg)
        runner_results.append(rr)
        if rr.error_msg is not None:
            _log.warning("task %s: %s failed: %s", task.name, what, _short(Exception(rr.error_msg)))
        secs = rr.run_secs if rr.error_msg is None and rr.run_secs else [1e10]
        sess.db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [float(x) for x in secs], task.target, a))
    sess.keys(i).update(_trace_key(c.trace) for c in cands)
    for b in built:
        if b.artifact_path:
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.dirname(b.artifact_path))
    sess.on_batch(built, runner_results)


def _seed_from_templates(sess: _Session, builder: Any, run: Any) -> int:
    """Measure the hand-written schedules of :mod:`.microkernels` for the tasks they fit, most
    time first; those the database holds already are not measured again. Evolutionary search
    then starts from the best of them. They share what this run's budget leaves once every other
    task is sure of its minimum, so a small budget still reaches every kernel. Returns trials run."""
    importance = _importance(sess.tasks, sess.best)
    written = {i: c for i, c in enumerate(microkernels.candidates(t.mod, t.target) for t in sess.tasks) if c}
    reserve = sum(max(0, sess.least - n) for i, n in enumerate(sess.existing) if i not in written)
    budget = sess.remaining - reserve
    if budget <= 0:
        return 0
    # Postprocessed only now: the budget may leave no room for any.
    fits = {i: _finished(sess.tasks[i], c, set(sess.keys(i))) for i, c in written.items()}
    if not any(fits.values()):
        return 0
    per_task = max(1, budget // sum(1 for c in fits.values() if c))
    start = sum(sess.measured)
    for i in sorted(fits, key=lambda j: -importance[j]):
        cands = fits[i][:min(per_task, budget - (sum(sess.measured) - start))]
        if cands:
            _measure_schedules(sess, i, cands, builder, run, "a hand-written schedule")
    return sum(sess.measured) - start


def _seed_from_similar(sess: _Session, builder: Any, run: Any) -> int:
    """Give tasks the best schedules of the nearest workloads of the same kind in the database
    (another width, resolution or model), refitted to their shapes, measured and recorded like
    any trial. MetaSchedule shares records only between identical workloads; a refitted schedule
    is a far better start than a random one, and evolutionary search then begins from it (the
    database's best seed its population).

    Tasks without records come first. Then, while this run's budget lasts, tasks that already
    have records, most time first: a few rounds of evolutionary search on a small budget can end
    far from what a neighbour found with more (MobileNetV2 0.35/160, tuned before its neighbours
    were, ran slower than 0.35/192). A schedule the database holds for the task already is not
    measured again, so a rerun measures nothing new. Returns trials run."""
    by_kind: dict[tuple, list[tuple[list, Any]]] = {}
    for workload, records in sess.db.sample_records(1):
        blocks = _sblocks(workload.mod)
        by_kind.setdefault(_kernel_kind(blocks), []).append((blocks, records[0]))
    importance = _importance(sess.tasks, sess.best)
    has = [bool(sess.existing[i] or sess.measured[i]) for i in range(len(sess.tasks))]
    order = ([i for i in range(len(sess.tasks)) if not has[i]]
             + sorted((i for i in range(len(sess.tasks)) if has[i]), key=lambda j: -importance[j]))
    start = sum(sess.measured)
    for i in order:
        task = sess.tasks[i]
        room = sess.remaining - sum(sess.measured)
        if has[i] and room <= 0:
            break
        blocks = _sblocks(task.mod)
        sources = sorted(((_shape_distance(blocks, b), r) for b, r in by_kind.get(_kernel_kind(blocks), [])),
                         key=lambda s: s[0])
        sources = [r for d, r in sources if d > 0 or not has[i]]  # not the task's own best
        if not sources:
            continue
        tried = set(sess.keys(i))
        cands = []
        for record in sources[:SEEDS_PER_TASK]:
            sch = tvm.s_tir.Schedule(task.mod, debug_mask=0)
            try:
                record.trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=_refit_decisions(sch))
            except Exception:  # noqa: BLE001 - a schedule that does not carry over is no seed
                continue
            cands.append(sch)
        cands = _finished(task, cands, tried)
        if has[i]:
            cands = cands[:room]
        if cands:
            _measure_schedules(sess, i, cands, builder, run, "a refitted schedule")
    return sum(sess.measured) - start


def _workload_key(func: tvm.tirx.PrimFunc | tvm.IRModule) -> str:
    """A kernel's workload as the records key it: the structural hash MetaSchedule's
    ApplyDatabase and :func:`extract_tasks` look it up by."""
    mod = func if isinstance(func, tvm.IRModule) else tvm_compat.normalize_workload(func)
    return str(tvm_ffi.structural_hash(mod))


def _read_row_order(records_dir: Path) -> dict[str, dict]:
    path = records_dir / ROW_ORDER_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return {k: v for k, v in data.items() if isinstance(v, dict)}
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable ({e}); kernels keep the loop order they were tuned with", stacklevel=2)
        return {}


def _reorders(entry: dict | None, best: Any) -> bool:
    """Whether a kernel whose best record is ``best`` runs with output rows outermost."""
    if not entry or best is None or entry.get("schedule") != _schedule_digest(best.trace):
        return False
    a, b = entry.get("as_tuned_us"), entry.get("rows_outermost_us")
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and b <= ROW_ORDER_TOLERANCE * a


def _schedule_digest(trace: Any) -> str:
    return hashlib.sha256(_trace_key(trace).encode()).hexdigest()[:16]


def _best_record(db: Any, mod: tvm.IRModule) -> Any:
    recs = db.records_of(mod)
    return recs[0] if recs and recs[0].run_secs and all(math.isfinite(float(x)) for x in recs[0].run_secs) \
        and float(recs[0].run_secs[0]) < 1e9 else None


def _rows_outermost_kernels(fused: tvm.IRModule, db: Any, records_dir: Path) -> set[str]:
    """Names of the kernels of ``fused`` that compile with output rows outermost: those whose
    best record was timed both ways (:func:`_time_row_order`) and stayed within tolerance."""
    order = _read_row_order(records_dir)
    if not order:
        return set()
    out = set()
    for gv, func in fused.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            wmod = tvm_compat.normalize_workload(func)
            key = _workload_key(wmod)
            if key in order and _reorders(order[key], _best_record(db, wmod)):
                out.add(gv.name_hint)
    return out


def _row_order_pending(db: Any, tasks: list[_Task], records_dir: Path) -> tuple[dict, list]:
    """``ROW_ORDER_FILE``'s entries, and the tasks whose best schedule has yet to be timed both
    ways: (key, schedule digest, task, kernel as tuned, kernel with rows outermost)."""
    order = _read_row_order(records_dir)
    pending = []
    for task in tasks:
        best = _best_record(db, task.mod)
        if best is None:
            continue
        key, digest = _workload_key(task.mod), _schedule_digest(best.trace)
        if order.get(key, {}).get("schedule") == digest:
            continue
        sch = tvm.s_tir.Schedule(task.mod, debug_mask=0)
        try:
            best.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as e:  # noqa: BLE001 - a record that no longer applies keeps the tuned order
            _log.warning("task %s: best record does not apply: %s", task.name, _short(e))
            continue
        tuned = tvm.IRModule({"main": sch.mod["main"].with_attr("tirx.is_scheduled", True)})
        rows, changed = microkernels.rows_outermost(tuned)
        if changed:
            pending.append((key, digest, task, tuned, rows))
        else:
            order[key] = {"schedule": digest, "task": task.name, "rows_outermost": "not applicable"}
    return order, pending


def _time_row_order(order: dict, pending: list, records_dir: Path, builder: Any, run: Any,
                    note: Callable[[str], None] | None = None) -> None:
    """Time each pending kernel as tuned and with output rows outermost, alone, as the search
    measures (same builder and runner: the host or the board), and write both times to
    ``ROW_ORDER_FILE`` (replaced whole, never half-written)."""
    t = time.monotonic()
    mods = [m for *_, tuned, rows in pending for m in (tuned, rows)]
    targets = [task.target for _, _, task, _, _ in pending for _ in (0, 1)]
    if mods:
        # The first kernel a runner times pays for its start (the thread pool, page faults: a
        # 3 µs layout transform took 828 µs): time it once more first and drop that.
        mods, targets = mods[:1] + mods, targets[:1] + targets
        args_info = [ms.arg_info.ArgInfo.from_entry_func(m, remove_preproc=True) for m in mods]
        built = builder.build([ms.builder.BuilderInput(m, tg) for m, tg in zip(mods, targets)])
        device = tvm_compat.device_type_name(targets[0])
        inputs = [ms.runner.RunnerInput(b.artifact_path, device, a)
                  for b, a in zip(built, args_info) if b.error_msg is None]
        results = iter([f.result() for f in run.run(inputs)] if inputs else [])
        times = []
        for b in built:
            rr = next(results) if b.error_msg is None else None
            error = b.error_msg if rr is None else rr.error_msg
            if error is not None:
                _log.warning("timing a loop order failed: %s", _short(Exception(error)))
            secs = rr.run_secs if rr is not None and rr.error_msg is None and rr.run_secs else None
            times.append(float(np.median([float(x) for x in secs])) * 1e6 if secs else None)
            if b.artifact_path:
                with contextlib.suppress(OSError):
                    shutil.rmtree(os.path.dirname(b.artifact_path))
        times = times[1:]
        kept = 0
        for j, (key, digest, task, _, _) in enumerate(pending):
            a, b = times[2 * j], times[2 * j + 1]
            if a is None or b is None:
                _log.warning("task %s: could not time its loop orders; it keeps the tuned one", task.name)
                continue
            order[key] = {"schedule": digest, "task": task.name, "as_tuned_us": round(a, 2),
                          "rows_outermost_us": round(b, 2)}
            kept += b <= ROW_ORDER_TOLERANCE * a
        _log.info("loop orders of %d kernels timed, %d reordered (%.1f s)", len(pending), kept, time.monotonic() - t)
        if note is not None:
            note(f"{len(pending)} kernels timed with output rows outermost in their parallel loop, "
                 f"{kept} kept so ({time.monotonic() - t:.0f} s)")
    tmp = records_dir / (ROW_ORDER_FILE + ".tmp")
    tmp.write_text(json.dumps(order, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, records_dir / ROW_ORDER_FILE)


def _run_session(sess: _Session, runner: RunnerSpec, num_builder_workers: int, seed: int | None) -> None:
    """Tune the tasks one after another, each with its exact budget (most important first), in
    the phases of :meth:`_Session.plan`."""
    tasks = sess.tasks
    builder = run = None
    try:
        cpu_only = sess.target.kind.name == "llvm"
        tvm_compat.import_tensor_intrinsics(cpu_only)  # before the builder's workers and TuneContext import them all
        builder = PersistentBuilder(num_builder_workers, artifact_format=runner.artifact_format, cpu_only=cpu_only)
        run = runner.make_runner()
        ncores = ms.utils.cpu_count(logical=True)
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=ncores, tree_method="auto")
        t = time.monotonic()
        written = _seed_from_templates(sess, builder, run)
        if written:
            _log.info("%d hand-written schedules measured (%.1f s)", written, time.monotonic() - t)
            if sess.bar is not None:
                sess.bar.note(f"{written} hand-written schedules (register-tiled convolutions) measured "
                              f"({time.monotonic() - t:.0f} s)")
        if sess.transfer:
            t = time.monotonic()
            n, groups = _warm_start(cost_model, sess.db, sess.target, ncores)
            if n:
                _log.info("cost model trained on %d records of %d workloads in the database (%.1f s)",
                          n, groups, time.monotonic() - t)
                if sess.bar is not None:
                    sess.bar.note(f"cost model trained on {n} records of {groups} workloads already in "
                                  f"the database ({time.monotonic() - t:.0f} s)")
            t = time.monotonic()
            seeded = _seed_from_similar(sess, builder, run)
            if seeded:
                _log.info("%d schedules of similar workloads measured (%.1f s)", seeded,
                          time.monotonic() - t)
                if sess.bar is not None:
                    sess.bar.note(f"{seeded} schedules of similar workloads refitted to the tasks and "
                                  f"measured ({time.monotonic() - t:.0f} s)")
        callbacks = [
            ms.measure_callback.AddToDatabase(),  # RecordsDatabase fsyncs each record
            _BatchCallback(sess.on_batch),
            ms.measure_callback.RemoveBuildArtifact(),
            ms.measure_callback.UpdateCostModel(),
        ]
        # A fresh stream per task and phase; a phase follows phase 2 only when a task ran out.
        seeds = ms.utils.fork_seed(seed, n=(len(tasks) + 2) * len(tasks))
        for phase, budgets in enumerate(sess.plan()):
            importance = _importance(tasks, sess.best)
            # Untimed tasks first: one measurement each completes the estimate, and a run
            # interrupted in phase 1 leaves no kernel without a schedule.
            for i in sorted(range(len(tasks)), key=lambda j: (sess.best[j] is not None, -importance[j])):
                _Sigint.check()
                if budgets[i] > 0:
                    _tune_task(sess, i, budgets[i], seeds[phase * len(tasks) + i], builder, run, callbacks,
                               cost_model, ncores)
        if cpu_only:
            _Sigint.check()
            order, pending = _row_order_pending(sess.db, tasks, sess.records_dir)
            _time_row_order(order, pending, sess.records_dir, builder, run,
                            sess.bar.note if sess.bar is not None else None)
    except BaseException:
        if builder is not None:
            builder.discard()  # may be mid-build
        raise
    finally:
        if run is not None and hasattr(run, "pool"):
            _kill_pool(run.pool)


def _row_order_alone(sess: _Session, runner: RunnerSpec, num_builder_workers: int, console: Any) -> None:
    """:func:`_time_row_order` for a database whose search is done (records tuned before the
    loop order was timed, or by an older version)."""
    order, pending = _row_order_pending(sess.db, sess.tasks, sess.records_dir)
    if not pending:
        return
    builder = run = None
    try:
        tvm_compat.import_tensor_intrinsics(True)
        builder = PersistentBuilder(num_builder_workers, artifact_format=runner.artifact_format, cpu_only=True)
        run = runner.make_runner()
        note = (lambda m: console.write(f"[tune] {m}\n")) if console is not None else None
        _time_row_order(order, pending, sess.records_dir, builder, run, note)
    finally:
        if run is not None and hasattr(run, "pool"):
            _kill_pool(run.pool)


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: Path,
    trials: int,
    *,
    params: dict | None = None,
    runner: RunnerSpec | None = None,
    num_builder_workers: int = 2,
    progress: bool = True,
    seed: int | None = None,
    transfer: bool = False,
) -> TuneReport:
    """Tune every task of ``mod`` (MetaSchedule, XGBoost cost model) until ``records_dir`` holds
    ``trials`` measurements for them; only the remainder is run.

    With ``transfer`` the cost model is first trained on the records the database holds for
    other workloads too (:func:`_warm_start`), so a new config starts from what the CPU taught
    earlier runs, and tasks are first given the best schedules of the nearest workloads of their
    kind, refitted to their shapes and measured: every task without records, then tasks with
    records while the budget lasts (:func:`_seed_from_similar`).

    ``trials`` is split over the tasks (:func:`allocate_trials`); records of a task's workload
    already in the database (from any run or model) count toward that task's share, up to the
    share. Ctrl-C stops the run; committed records stay and the report has ``interrupted=True``.
    """
    t0 = time.monotonic()
    if trials < 0:
        raise ValueError("trials must be >= 0")
    runner = runner or RunnerSpec()
    target = _with_num_cores(_as_target(target), runner.kind == "local")
    records_dir = Path(records_dir)
    opened = open_records(records_dir, target, writable=True)  # warnings go to the console
    try:
        with _tvm_logs_to(records_dir / LOG_FILE, progress) as console, _Sigint() as sigint:
            sess = _Session(opened.db, extract_tasks(mod, target, params), trials, target, records_dir, t0)
            sess.transfer = transfer
            total = sess.remaining
            if not sess.tasks:
                return sess.report("no tunable tasks in this module")
            if total == 0:
                rep = sess.report(f"already tuned: {sum(sess.existing)} trials in {records_dir} for the "
                                  f"{len(sess.tasks)} tasks (asked for {trials}); nothing to run")
                if console is not None:
                    console.write(f"[tune] {rep.message}\n")
                if target.kind.name == "llvm":
                    _row_order_alone(sess, runner, num_builder_workers, console)
                return rep
            _log.info("tuning %d tasks for %s: %d trials requested, %d in db, running %d",
                      len(sess.tasks), target, trials, sum(sess.existing), total)
            if console is not None and sess.covered_before:
                # Records are shared by exact workload: other configs and models cover some tasks.
                console.write(f"[tune] {sess.covered_before} of {len(sess.tasks)} tasks already have records in "
                              f"{records_dir} ({sum(sess.existing)} trials, from this or other models)\n")
            sess.bar = _Progress(console, total, t0) if progress else None
            memory = _PeakMemory()
            try:
                with memory:
                    _run_session(sess, runner, num_builder_workers, seed)
                if opened.db.write_error:  # in case MetaSchedule swallowed the commit's exception
                    raise RecordsError(opened.db.write_error)
            except BaseException as err:  # noqa: BLE001 - a KeyboardInterrupt may arrive as RuntimeError
                if opened.db.write_error:  # arrives from C++ rewrapped; say it in one line
                    raise RecordsError(f"{opened.db.write_error}; the {len(opened.db)} records written before "
                                       "are kept, free space and run again to continue") from None
                if not (sigint.hit or isinstance(err, KeyboardInterrupt)):
                    raise
                sess.interrupted = True
                _log.warning("interrupted by the user after %d trials", sum(sess.measured), exc_info=err)
            finally:
                if sess.bar is not None:
                    sess.bar.close()
            rep = sess.report("interrupted; records so far are kept, run again to resume"
                              if sess.interrupted else "done")
            rep.peak_rss_mb, rep.peak_rss_processes = memory.peak_bytes / 2**20, memory.processes
            if console is not None:
                console.write(rep.table() + "\n")
                if rep.interrupted:
                    console.write(f"[tune] {rep.message}\n")
            return rep
    finally:
        opened.close()


# --------------------------------------------------------------------------- prune, compile


def prune(records_dir: Path, top_k: int = 1) -> tuple[int, int]:
    """Keep the best ``top_k`` valid records per workload (atomic rewrite); return (before, after).

    Pruning also drops failed records, so the next :func:`tune` counts fewer trials as done.
    """
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    records_dir = Path(records_dir)
    if _read_meta(records_dir) is None and not _has_files(records_dir):
        raise RecordsError(f"{records_dir} holds no records")
    opened = open_records(records_dir, None, writable=True)
    try:
        kept = opened.db.rewrite_top_k(top_k)
        _compact_workloads(records_dir / WORKLOAD_FILE)
        return kept
    finally:
        opened.close()


def _compact_workloads(path: Path) -> None:
    """Rewrite the workload file with its modules' JSON unindented (half the size in git).

    Line for line, so record indices stay valid whichever of the two files a crash left new.
    """
    import base64
    import struct

    def compact(line: bytes) -> bytes:
        try:
            shash, blob = json.loads(line)
            raw = base64.b64decode(blob)
            (n,) = struct.unpack("<Q", raw[:8])
            if len(raw) != 8 + n:
                return line  # not the framing we know: leave it
            text = json.dumps(json.loads(raw[8:]), separators=(",", ":")).encode()
        except (ValueError, TypeError, struct.error):
            return line  # the loader warns about such a line; pruning is no place to drop it
        blob = base64.b64encode(struct.pack("<Q", len(text)) + text).decode()
        return json.dumps([shash, blob], separators=(",", ":")).encode()

    lines, tail, _, raw = _split_lines(path)
    new = b"".join(compact(ln) + b"\n" for _, ln in lines) + tail
    if new != raw:
        _atomic_write(path, new)


def kernels_module(mod: tvm.IRModule, target: tvm.target.Target, db: Any | None = None) -> tvm.IRModule:
    """The fused Relax module as it will be compiled: records of ``db`` applied and, where the
    tuned kernels read pre-packed weights, the packing folded into the constants. Its
    ``call_tir`` calls are exactly the kernels of the compiled library (``mod`` as from
    :func:`_prepare`)."""
    target = _as_target(target)
    return _applied(_fuse(mod, target), target, db)


def _applied(fused: tvm.IRModule, target: tvm.target.Target, db: Any | None) -> tvm.IRModule:
    if db is None:
        return fused
    with target, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)
        if prepacks_weights(target):
            applied = relax.transform.SplitLayoutRewritePreproc()(applied)
            applied = relax.transform.FoldConstant()(applied)
            applied = relax.transform.DeadCodeElimination(["main"])(applied)  # the folded repacking
    return applied


def _build(kernels: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    if target.kind.name != "llvm":
        # GPU kernels need the default pipeline's DLight schedules to build at all.
        return tvm.compile(kernels, target=target)
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes

    # Lower only: the default pipeline would run FuseOps again over the tuned kernels and
    # could merge them into new, unscheduled ones.
    @tvm.transform.module_pass(opt_level=0)
    def lower(m: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(dataflow_lower_passes(target) + finalize_passes(target))(m)

    with target:
        return relax.build(kernels, target=target, relax_pipeline=lower, tir_pipeline=microkernels.tir_pipeline())


def compile_with_records(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: Path | None,
    params: dict | None = None,
) -> tuple[relax.VMExecutable, ApplyReport]:
    """Compile ``mod`` with the best records of ``records_dir`` applied to its kernels.

    Without records (``records_dir`` None, missing or empty) the kernels are compiled as
    legalised (slow on CPUs); the report then says ``untuned``.
    """
    executable, report, _ = compile_kernels(mod, target, records_dir, params)
    return executable, report


def compile_kernels(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: Path | None,
    params: dict | None = None,
) -> tuple[relax.VMExecutable, ApplyReport, tvm.IRModule]:
    """:func:`compile_with_records`, also returning the module that was compiled (see
    :func:`kernels_module`), for listing the library's kernels and their argument shapes."""
    target = _as_target(target)
    prepared = _prepare(mod, params)
    rdir = Path(records_dir) if records_dir is not None else None
    if rdir is None or not rdir.is_dir() or not _has_files(rdir):
        if rdir is not None and rdir.is_dir():
            meta = _read_meta(rdir)
            if meta is not None:
                _check_meta(meta, target, rdir)
        kernels = kernels_module(prepared, target)
        names = sorted(gv.name_hint for gv, f in kernels.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
        report = ApplyReport([], names, None, None if rdir is None else str(rdir), untuned=True)
        return _build(kernels, target), report, kernels
    opened = open_records(rdir, target, writable=False)
    try:
        db = opened.db
        fused = _fuse(prepared, target)
        kernels = _applied(fused, target, db)
        # Named as the tasks are (SplitLayoutRewritePreproc renames kernels that read packed weights).
        prims = {gv.name_hint.removesuffix("_prepacked"): f
                 for gv, f in kernels.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        tuned = sorted(n for n, f in prims.items() if f.attrs and f.attrs.get("tirx.is_scheduled", False))
        fallback = sorted(n for n in prims if n not in set(tuned))
        reorder = _rows_outermost_kernels(fused, db, rdir) & set(tuned)
        kernels, reordered = microkernels.rows_outermost(
            kernels, [gv.name_hint for gv in kernels.functions if gv.name_hint.removesuffix("_prepacked") in reorder])
        report = ApplyReport(tuned, fallback, db.digest, str(rdir), untuned=not tuned, workloads=sorted(db.queried),
                             rows_outermost=sorted(n.removesuffix("_prepacked") for n in reordered))
        return _build(kernels, target), report, kernels
    finally:
        opened.close()


def tune_model(cfg: Any, spec: Any, records_dir: Path, trials: int, *, frontend: str = "torch",
               weights: Path | None = None, tracker: tuple[str, int] | None = None, rpc_key: str | None = None,
               seed: int = 0, progress: bool = True, transfer: bool = False) -> TuneReport:
    """Build a model config, lower it and tune it for a target spec (the CLI's ``tune``).

    ``tracker`` measures on the boards registered under ``rpc_key`` at that RPC tracker;
    without it candidates run on this machine.
    """
    from .errors import UserError
    from .lower import to_relax
    from .models import build

    mod = to_relax(build(cfg, seed=seed, weights=weights), cfg, frontend, spec.layout)
    runner = None
    if tracker:
        runner = RunnerSpec.rpc(tracker[0], tracker[1], rpc_key or spec.rpc_key,
                                cross_compiler=spec.cross_compiler)
    try:
        report = tune(mod, spec.tvm_target(), Path(records_dir), trials, runner=runner, progress=progress,
                      transfer=transfer)
    except RecordsError as e:
        raise UserError(str(e)) from None
    if not progress:  # with progress on, tune() already printed the table
        print(report.table(), file=sys.stderr)
    return report
