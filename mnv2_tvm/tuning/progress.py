"""What a tuning run shows: the live progress line, the per-task report and table, peak memory,
and where TVM's own logging goes (the records folder's ``tune.log``)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PeakMemory:
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

    def __enter__(self) -> PeakMemory:
        self._before = {p.pid for p in self._children()}
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass
class TaskReport:
    """One tuning task of the module."""

    name: str
    weight: int
    flops: float
    trials: int  # measured in this run
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
    #: Why the run stopped when it was not Ctrl-C (e.g. no board answered within the board wait).
    stop_reason: str | None = None
    already_done: bool = False
    first_trial_s: float | None = None  # from the call to the first measured batch
    message: str = ""
    #: Peak RSS of the tuning process and its workers summed (:class:`PeakMemory`), and how many
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
            f"{self.trials_run} trials this run (trials/total above; in db for this model "
            f"{self.trials_in_db_before} -> {self.trials_in_db_after}; {self.tasks_covered_before}/{len(self.tasks)} "
            f"tasks had records before); estimated end-to-end {est_s}; "
            f"{self.wall_time_s:.0f} s" + (" [interrupted]" if self.interrupted else "")
            + (f"; peak RSS {self.peak_rss_mb / 1024:.2f} GB in all ({self.peak_rss_processes} processes)"
               if self.peak_rss_mb else "")
        )
        if any(t.exhausted for t in self.tasks):
            rows.append("* search space used up: its share went to the other tasks")
        return "\n".join(rows)


def fmt_duration(sec: float | None) -> str:
    """Seconds as MM:SS or H:MM:SS (``--:--`` when unknown)."""
    if sec is None or not math.isfinite(sec):
        return "--:--"
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One live line on stderr (TTY), or a line per batch at most every 10 s otherwise.

    While ``waiting()`` says something (the runner waits for a board), the line says that in place
    of the ETA, and a non-TTY stream gets it every 10 s even though no batch completes."""

    def __init__(self, stream: io.TextIOBase | None, total: int, t0: float, where: str | None = None) -> None:
        self.stream = stream
        self.where = where  # where candidates are measured, when not on the hardware (e.g. "emulated Cortex-A72")
        self.waiting: Callable[[], str | None] | None = None
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
        if self.stream is not None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def _waiting(self) -> str | None:
        try:
            return self.waiting() if self.waiting is not None else None
        except Exception:  # noqa: BLE001 - a status line must never stop the run
            return None

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
        waiting = self._waiting()
        return (
            f"[tune] {self.done}/{self.total} trials {pct:3.0f}% | {fmt_duration(now - self.t0)} elapsed"
            + (f" | {waiting}" if waiting else f" | ETA {fmt_duration(eta)} | est {est}")
            + (f" {self.where}" if self.where else "") + f" | {self.task[:28]}"
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
            if self.tty or self._waiting():
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
def tvm_logs_to(log_path: Path, want_console: bool) -> Iterator[io.TextIOBase | None]:
    """Send TVM's Python and C++ (fd 2) logging to ``log_path``; yield a stream to the real stderr."""
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    own_logger = logging.getLogger(__package__)  # every tuning module logs below it
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
