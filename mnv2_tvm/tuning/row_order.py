"""The loop-order table of a records folder (``row_order.json``): which tuned kernels run with
output rows outermost in their parallel loop (:mod:`..kernels.loop_order`).

Tuning fills it after its search, timing each task's best schedule both ways with the builder
and runner it measured with; compile reads it (:func:`rows_outermost_kernels`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from ..kernels import loop_order
from .records import short_error, trace_key
from .tasks import Task, workload_key

#: Per workload, its best schedule timed with the parallel loop as tuned and with output rows
#: outermost (``loop_order.rows_outermost``); compile reorders where the second is not slower
#: than ``ROW_ORDER_TOLERANCE`` × the first. Written by ``tune`` after its search.
ROW_ORDER_FILE = "row_order.json"
#: Timed alone a reordered kernel may be this much slower and still gain in place: alone it
#: cannot show what the order is for (each thread finding the rows it reads in its own cache);
#: the measurements behind the bound are in docs/results.md (row order). Beyond 2× it is the
#: code around the loop that got slower, not the loop.
ROW_ORDER_TOLERANCE = 2.0

_log = logging.getLogger(__name__)


def read_row_order(records_dir: Path) -> dict[str, dict]:
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
    if not entry or best is None or entry.get("schedule") != schedule_digest(best.trace):
        return False
    a, b = entry.get("as_tuned_us"), entry.get("rows_outermost_us")
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and b <= ROW_ORDER_TOLERANCE * a


def schedule_digest(trace: Any) -> str:
    return hashlib.sha256(trace_key(trace).encode()).hexdigest()[:16]


def best_record(db: Any, mod: tvm.IRModule) -> Any:
    recs = db.records_of(mod)
    return recs[0] if recs and recs[0].run_secs and all(math.isfinite(float(x)) for x in recs[0].run_secs) \
        and float(recs[0].run_secs[0]) < 1e9 else None


def rows_outermost_kernels(fused: tvm.IRModule, db: Any, records_dir: Path) -> set[str]:
    """Names of the kernels of ``fused`` that compile with output rows outermost: those whose
    best record was timed both ways (:func:`time_row_order`) and stayed within tolerance."""
    order = read_row_order(records_dir)
    if not order:
        return set()
    out = set()
    for gv, func in fused.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            wmod = tvm_compat.normalize_workload(func)
            key = workload_key(wmod)
            if key in order and _reorders(order[key], best_record(db, wmod)):
                out.add(gv.name_hint)
    return out


def row_order_pending(db: Any, tasks: list[Task], records_dir: Path) -> tuple[dict, list]:
    """``ROW_ORDER_FILE``'s entries, and the tasks whose best schedule has yet to be timed both
    ways: (key, schedule digest, task, kernel as tuned, kernel with rows outermost)."""
    order = read_row_order(records_dir)
    pending = []
    for task in tasks:
        best = best_record(db, task.mod)
        if best is None:
            continue
        key, digest = workload_key(task.mod), schedule_digest(best.trace)
        if order.get(key, {}).get("schedule") == digest:
            continue
        sch = tvm.s_tir.Schedule(task.mod, debug_mask=0)
        try:
            best.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as e:  # noqa: BLE001 - a record that no longer applies keeps the tuned order
            _log.warning("task %s: best record does not apply: %s", task.name, short_error(e))
            continue
        tuned = tvm.IRModule({"main": sch.mod["main"].with_attr("tirx.is_scheduled", True)})
        rows, changed = loop_order.rows_outermost(tuned)
        if changed:
            pending.append((key, digest, task, tuned, rows))
        else:
            order[key] = {"schedule": digest, "task": task.name, "rows_outermost": "not applicable"}
    return order, pending


def time_row_order(order: dict, pending: list, records_dir: Path, builder: Any, run: Any,
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
                _log.warning("timing a loop order failed: %s", short_error(Exception(error)))
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
