"""``points.jsonl``: the finished points of a compare run, which is what makes it resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..targets import EMULATED_SUBDIR, RECORD_FILE, WORKLOAD_FILE

POINTS_FILE = "points.jsonl"
VARIANTS = ("untuned", "tuned")


def point_key(label: str, variant: str) -> str:
    return f"{label}|{variant}"


def records_fingerprint(records_dir: Path) -> str | None:
    """Digest of the records files, or None when there are none (tuned points depend on it)."""
    import hashlib

    h = hashlib.sha256()
    found = False
    # compile reads a board's records and those of the emulated core beside them (emulated/)
    for name in (WORKLOAD_FILE, RECORD_FILE, f"{EMULATED_SUBDIR}/{WORKLOAD_FILE}", f"{EMULATED_SUBDIR}/{RECORD_FILE}"):
        p = records_dir / name
        try:
            data = p.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            data = b""
        except OSError as e:
            raise UserError(f"cannot read tuning records {p}: {e.strerror}") from None
        found |= bool(data)
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16] if found else None


class PointStore:
    """``points.jsonl``: one finished point per line, appended, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.points: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        lines: list[str] = []
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        torn = bool(raw) and not raw.endswith(b"\n")
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "key" not in rec:
                    raise ValueError
            except ValueError:
                self.dropped += 1
                continue
            self.points[rec["key"]] = rec
            lines.append(line)
        if self.dropped or torn:
            # A run killed mid-write leaves a torn last line; appending after it would glue the
            # next record to it, so keep only the whole records.
            from ..bundle import write_atomic

            write_atomic(path, "".join(ln + "\n" for ln in lines).encode())

    def add(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.points[rec["key"]] = rec

    def discard(self, key: str) -> None:
        """Forget a stale point (it will be measured again and appended; the last line wins)."""
        self.points.pop(key, None)


def passes_of(rec: dict[str, Any]) -> list[float]:
    # Points of reports written before passes existed have one pass: their median.
    return list(rec.get("passes_ms") or ([rec["latency_ms"]] if rec.get("latency_ms") else []))
