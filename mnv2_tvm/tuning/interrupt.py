"""Ctrl-C while tuning: stop at the next safe point, never between a record and its fsync."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Sigint:
    """SIGINT handling while tuning.

    The first Ctrl-C only sets ``hit``; the run stops at the next safe point (:meth:`check`, after
    a measured batch or between tasks). Raising at once is not safe: TVM polls for signals inside
    its parallel evolutionary search, and a KeyboardInterrupt thrown there ends in
    ``std::terminate`` (the process dies without its report). A second Ctrl-C raises at once,
    though never between writing a record and its fsync (:meth:`deferred`). A KeyboardInterrupt
    raised inside a Python callback that C++ called comes back from tvm_ffi as a bare
    ``RuntimeError``; ``hit`` tells the two apart.
    """

    active: Sigint | None = None

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
        me = Sigint.active
        if me is not None and me.hit:
            raise KeyboardInterrupt

    def __enter__(self) -> Sigint:
        if threading.current_thread() is threading.main_thread() and Sigint.active is None:
            self._old = signal.signal(signal.SIGINT, self._handler)
            Sigint.active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        if Sigint.active is self:
            signal.signal(signal.SIGINT, self._old)
            Sigint.active = None

    @staticmethod
    @contextlib.contextmanager
    def deferred() -> Iterator[None]:
        me = Sigint.active
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
