"""MetaSchedule tuning (TVM 0.27) into durable, resumable records shared per target.

One concept per module, in the order a run uses them:

- :mod:`.records`: the records folder: database (append + fsync, torn lines), meta, lock, prune
- :mod:`.tasks`: what a task is (fusion policy, pre-packed weights, workload keys)
- :mod:`.builder`: persistent build workers
- :mod:`.runner`: where candidates are measured (this machine, boards over RPC)
- :mod:`.search`: trials per task and the evolutionary search that spends them
- :mod:`.seeding`: hand-written schedules, refitted schedules of similar workloads, warm start
- :mod:`.row_order`: the loop-order table tuning fills and compile reads
- :mod:`.progress`: progress line, report table, peak memory, TVM's log
- :mod:`.session`: one run from start to end (:func:`tune`, :func:`tune_model`)

The names below are loaded on first use, so importing one early module (compile reads
:mod:`.records` and :mod:`.tasks`) does not load the later ones. Settings that tests change
(``search.SEARCH_KWARGS``, ``search.TRIALS_PER_ITER``) are set on their module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .progress import TaskReport, TuneReport, fmt_duration
    from .records import (
        LOG_FILE,
        META_FILE,
        RECORD_FILE,
        RECORDS_FORMAT,
        WORKLOAD_FILE,
        RecordsDatabase,
        RecordsError,
        RecordsWarning,
        open_records,
        prune,
        records_digest_for,
        workload_digests,
    )
    from .runner import MeasureBackend, RunnerSpec
    from .search import allocate_trials
    from .session import tune, tune_model
    from .tasks import extract_tasks, prepacks_weights

_EXPORTS = {
    "records": ("LOG_FILE", "META_FILE", "RECORD_FILE", "RECORDS_FORMAT", "WORKLOAD_FILE", "RecordsDatabase",
                "RecordsError", "RecordsWarning", "open_records", "prune", "records_digest_for",
                "workload_digests"),
    "tasks": ("extract_tasks", "prepacks_weights"),
    "runner": ("MeasureBackend", "RunnerSpec"),
    "search": ("allocate_trials",),
    "progress": ("TaskReport", "TuneReport", "fmt_duration"),
    "session": ("tune", "tune_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
