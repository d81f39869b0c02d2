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

    A measuring backend may stop the run the same way (:meth:`stop`, from any thread), e.g. when
    no board has answered for the whole board wait; ``reason`` then says why.
    """

    active: Sigint | None = None

    def __init__(self) -> None:
        self.hit = False
        self.reason: str | None = None  # set when the run was stopped by :meth:`stop`, not by Ctrl-C
        self._depth = 0
        self._pending = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.hit:
            self.hit = True
            with contextlib.suppress(Exception):
                sys.stderr.write("\n[tune] stopping: what is measured is kept, what is in flight on a board is "
                                 "dropped and measured on resume (Ctrl-C again: at once)\n")
            return
        if self._depth:
            self._pending = True
            return
        raise KeyboardInterrupt

    def interrupt(self) -> None:
        """What Ctrl-C does, for another signal (SIGTERM): the first stops at the next safe point."""
        self._handler(signal.SIGINT, None)

    @staticmethod
    def stop(reason: str) -> bool:
        """Stop the active run at its next safe point, as a first Ctrl-C does, because of ``reason``
        (callable from any thread); False when no run is active in the main thread."""
        me = Sigint.active
        if me is None:
            return False
        if not me.hit:
            me.reason = reason
            me.hit = True
        return True

    @staticmethod
    def stopping() -> bool:
        """Whether the active run is stopping (Ctrl-C, or :meth:`stop`): work in flight may be dropped."""
        me = Sigint.active
        return me is not None and me.hit

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
