"""The durable tuning database of one target: append + fsync, torn-line recovery, lock, prune, meta.

Records live in one folder per target (:func:`mnv2_tvm.targets.records_dir`), in the two JSON-lines files of
MetaSchedule's ``JSONDatabase`` (``database_workload.json``, ``database_tuning_record.json``), so
the stock ``ms.database.JSONDatabase`` can read them. Next to them: ``meta.json`` (TVM version and
target), ``tune.log`` (TVM's own logging), ``row_order.json`` (:mod:`.row_order`) and ``.lock``
(one tuning process at a time).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from ..bundle import fsync_dir, write_atomic
from ..targets import EMULATED_SUBDIR, RECORD_FILE, WORKLOAD_FILE
from .interrupt import Sigint

tvm_compat.check()

__all__ = ["RECORD_FILE", "WORKLOAD_FILE", "RecordsDatabase", "RecordsError", "RecordsWarning", "open_records", "prune",
           "records_digest_for", "workload_digests"]

META_FILE = "meta.json"
LOG_FILE = "tune.log"
LOCK_FILE = ".lock"
RECORDS_FORMAT = "mnv2-tvm-records/1"
#: MetaSchedule's run time of a failed measurement (see :mod:`mnv2_tvm.tvm_compat`).
FAILED_RUN_SECS = tvm_compat.FAILED_RUN_SECS


class RecordsError(Exception):
    """A records directory can't be used (other target/TVM version, unwritable, locked, ...)."""


class RecordsWarning(UserWarning):
    """A line of a records file was skipped."""


# --------------------------------------------------------------------------- targets, meta


def as_target(target: tvm.target.Target | str | dict) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def target_config(target: tvm.target.Target) -> dict:
    return json.loads(str(target))


def target_key(target: tvm.target.Target | dict) -> str:
    """Identity of a target for records; ``num-cores`` (a tuning hint) is left out."""

    def strip(cfg: dict) -> dict:
        cfg = {k: v for k, v in cfg.items() if k != "num-cores"}
        if isinstance(cfg.get("host"), dict):
            cfg["host"] = strip(cfg["host"])
        return cfg

    cfg = target if isinstance(target, dict) else target_config(target)
    return json.dumps(strip(cfg), sort_keys=True)


def tvm_release(version: str) -> str:
    """``0.27.0.post1`` -> ``0.27.0``: post/dev/local suffixes don't change the record format."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return m.group(0) if m else version


def read_meta(records_dir: Path) -> dict | None:
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


#: How a folder's records were measured (meta ``measurement``): on the hardware itself (a board,
#: or this machine for a host target), or ``emulated:<core> (model <version>)`` (:mod:`.emulated`).
#: A folder holds one kind; a meta without the key predates it and was measured on hardware.
BOARD_MEASUREMENT = "board"


def measurement_of(meta: dict | None) -> str:
    return str((meta or {}).get("measurement", BOARD_MEASUREMENT))


def _new_meta(target: tvm.target.Target, measurement: str = BOARD_MEASUREMENT) -> dict:
    return {
        "format": RECORDS_FORMAT,
        "tvm_version": tvm.__version__,
        "target": target_config(target),
        "target_str": str(target),
        "measurement": measurement,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_measurement(meta: dict | None, measurement: str, records_dir: Path) -> None:
    """Refuse to add ``measurement``-kind records to a folder holding the other kind."""
    theirs = measurement_of(meta)
    if meta is None or theirs == measurement:
        return
    if measurement == BOARD_MEASUREMENT:
        raise RecordsError(f"{records_dir} holds records measured on an emulated core ({theirs}); a board's "
                           "records go to another folder (emulated ones live in <target records>/emulated/, "
                           "where compile takes a board's record over them)")
    if theirs.startswith("emulated:") and measurement.startswith("emulated:"):
        raise RecordsError(f"{records_dir} holds costs of {theirs}, not {measurement}: costs of another core model "
                           "are not comparable; tune into another --tuning-records folder and start from these "
                           f"schedules with --transfer-from {records_dir}")
    raise RecordsError(f"{records_dir} holds records measured by {theirs}, not {measurement}: emulated and real "
                       "measurements are not mixed; use another --tuning-records folder")


def check_meta(meta: dict, target: tvm.target.Target | None, records_dir: Path) -> None:
    fmt = meta.get("format")
    if fmt != RECORDS_FORMAT:
        raise RecordsError(f"{records_dir}: unknown records format {fmt!r} in {META_FILE}")
    theirs = str(meta.get("tvm_version", "?"))
    if tvm_release(theirs) != tvm_release(tvm.__version__):
        raise RecordsError(
            f"{records_dir} holds records of TVM {theirs}, this is TVM {tvm.__version__}; "
            "use another records dir"
        )
    if target is not None and target_key(meta.get("target", {})) != target_key(target):
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
    reading, no TVM: cheap enough to check every point of a report against. The emulated core's
    records beside a board's (``emulated/``) count too: compile reads both."""
    digests: dict[str, Any] = {}
    for folder, tag in ((records_dir, b""), (records_dir / EMULATED_SUBDIR, EMULATED_SUBDIR.encode() + b"/")):
        by_index: dict[int, str] = {}
        for i, (_, line) in enumerate(_split_lines(folder / WORKLOAD_FILE)[0]):
            # A line is ["<hash>", "<base64>"]; only the hash is needed, not the (large) module.
            head = line[: line.find(b",")]
            by_index[i] = head.strip(b'[" ').decode(errors="replace")
        for _, line in _split_lines(folder / RECORD_FILE)[0]:
            try:
                shash = by_index[int(line[1 : line.find(b",")])]
            except (KeyError, ValueError):
                continue  # a line the database skips too
            digests.setdefault(shash, hashlib.sha256()).update(tag + line + b"\n")
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
    if first_inst in (None, "EnterPostproc") or all(v == FAILED_RUN_SECS for v in secs):
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


def short_error(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trace_key(trace: Any) -> str:
    """A schedule's identity: its instructions and decisions, postprocessing left out."""
    return str(trace.as_json(remove_postproc=True))


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
                self._warn(self.path_workload, lineno, f"unreadable workload ({short_error(e)})")
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
                self._warn(self.path_tuning_record, lineno, f"unreadable tuning record ({short_error(e)})")
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
            fsync_dir(path.parent)
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
                    self._warn(self.path_tuning_record, rec.lineno, f"unreadable tuning record ({short_error(e)})")
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
        with Sigint.deferred():
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
        write_atomic(self.path_tuning_record, "".join(lines).encode())
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


def has_files(records_dir: Path) -> bool:
    """Whether the dir has a non-empty workload or record file."""
    files = (records_dir / WORKLOAD_FILE, records_dir / RECORD_FILE)
    return any(f.is_file() and f.stat().st_size > 0 for f in files)


def open_records(
    records_dir: str | os.PathLike, target: tvm.target.Target | None, *, writable: bool,
    measurement: str | None = None,
) -> _Records:
    """Open (and, if writable, create and lock) a records dir after checking its ``meta.json``.

    Raises :class:`RecordsError` for another target or TVM version, an unwritable dir, or a dir
    another tuning process holds; nothing is written before the checks pass. A dir without
    ``meta.json`` (e.g. a stock MetaSchedule work dir) is adopted if its records are for ``target``.
    ``measurement`` (a writer's kind, see :data:`BOARD_MEASUREMENT`) must match the folder's.
    """
    records_dir = Path(records_dir)
    target = as_target(target) if target is not None else None
    if writable:
        try:
            records_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordsError(f"cannot create records dir {records_dir}: {e.strerror or e}") from e
        if not os.access(records_dir, os.W_OK | os.X_OK):
            raise RecordsError(f"records dir {records_dir} is not writable")
    elif not records_dir.is_dir():
        raise RecordsError(f"records dir {records_dir} does not exist")
    meta = read_meta(records_dir)
    if meta is not None:
        check_meta(meta, target, records_dir)
        if measurement is not None:
            check_measurement(meta, measurement, records_dir)
    elif has_files(records_dir):
        if measurement not in (None, BOARD_MEASUREMENT):
            raise RecordsError(f"{records_dir} has records without {META_FILE} (measured on hardware?): "
                               f"{measurement} records go to another folder")
        if target is None:
            raise RecordsError(f"{records_dir} has records but no {META_FILE}")
        probe = RecordsDatabase(str(records_dir), writable=False)
        foreign = {target_key(r.target) for r in probe.get_all_tuning_records() if r.target is not None}
        foreign.discard(target_key(target))
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
            write_atomic(records_dir / META_FILE,
                         json.dumps(_new_meta(target, measurement or BOARD_MEASUREMENT), indent=2).encode())
        db = RecordsDatabase(str(records_dir), writable=True)
    except OSError as e:
        os.close(lock_fd)
        raise RecordsError(f"cannot write to records dir {records_dir}: {e.strerror or e}") from e
    except BaseException:
        os.close(lock_fd)
        raise
    return _Records(db, lock_fd)


# --------------------------------------------------------------------------- prune


def prune(records_dir: Path, top_k: int = 1) -> tuple[int, int]:
    """Keep the best ``top_k`` valid records per workload (atomic rewrite); return (before, after).

    Pruning also drops failed records, so the next :func:`tune` counts fewer trials as done.
    """
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    records_dir = Path(records_dir)
    if read_meta(records_dir) is None and not has_files(records_dir):
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
        write_atomic(path, new)


# --------------------------------------------------------------------------- board over emulated


@derived_object
class PreferringDatabase(ms.database.PyDatabase):
    """Read-only view of several records databases: per workload, the first that holds a valid
    record answers (compile: a board's records over the emulated core's, :data:`BOARD_MEASUREMENT`).

    ``sources`` maps each workload's structural hash (as ``queried``) to the index of the database
    that answered for it.
    """

    def __init__(self, dbs: list[RecordsDatabase]) -> None:
        super().__init__()
        self.dbs = list(dbs)
        self.digest = hashlib.sha256("\0".join(d.digest for d in self.dbs).encode()).hexdigest()
        self.sources: dict[str, int] = {}

    @property
    def queried(self) -> set[str]:
        return set().union(*(d.queried for d in self.dbs))

    def _answering(self, mod: tvm.IRModule) -> RecordsDatabase | None:
        for i, d in enumerate(self.dbs):
            if d.workload_stats(mod)[1] is not None:
                self.sources[str(tvm_ffi.structural_hash(mod))] = i
                return d
        return None

    def has_workload(self, mod: tvm.IRModule) -> bool:
        found = [d.has_workload(mod) for d in self.dbs]  # each notes the query
        return any(found)

    def commit_workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        d = self._answering(mod) or self.dbs[0]
        return d.commit_workload(mod)

    def commit_tuning_record(self, record: ms.database.TuningRecord) -> None:
        raise RecordsError("a preferring view of records databases is read-only")

    def get_top_k(self, workload: ms.database.Workload, top_k: int) -> list[ms.database.TuningRecord]:
        d = self._answering(workload.mod)
        return [] if d is None else d.get_top_k(d.commit_workload(workload.mod), top_k)

    def get_all_tuning_records(self) -> list[ms.database.TuningRecord]:
        return [r for d in self.dbs for r in d.get_all_tuning_records()]

    def __len__(self) -> int:
        return sum(len(d) for d in self.dbs)

    def records_of(self, mod: tvm.IRModule) -> list[ms.database.TuningRecord]:
        d = self._answering(mod)
        return [] if d is None else d.records_of(mod)
