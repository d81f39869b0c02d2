"""Where a search starts: schedules written by hand, schedules of similar workloads refitted, and a
cost model trained on the database before the first candidate is measured."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tvm
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from ..kernels import schedules
from .interrupt import Sigint
from .records import FAILED_RUN_SECS, short_error, trace_key
from .runner import measured
from .tasks import Task, task_importance

if TYPE_CHECKING:
    from .session import Session

_log = logging.getLogger(__name__)


#: Records per workload the cost model is trained on before tuning (see :func:`warm_start`).
WARM_RECORDS_PER_WORKLOAD = 24


def warm_start(cost_model: Any, dbs: list[Any], target: tvm.target.Target, ncores: int) -> tuple[int, int]:
    """Train the cost model on what the databases already hold, for every workload in them.

    MetaSchedule shares records between models only for identical workloads; a new width or
    resolution has almost none. Its cost model, though, reads features of the loop nest (tile
    sizes, vector lengths, bytes touched), which carry over between shapes of the same kind of
    kernel on the same CPU, and largely between cores of one architecture (it learns each
    workload's times relative to that workload's best): trained first, it ranks even a task's
    first candidates instead of guessing. Returns (records, workloads) used.
    """
    batches = []
    for workload, records in (pair for db in dbs for pair in db.sample_records(WARM_RECORDS_PER_WORKLOAD)):
        cands, results = [], []
        for rec in records:
            try:
                cands.append(rec.as_measure_candidate())
            except Exception:  # noqa: BLE001 - a trace that no longer replays teaches nothing
                continue
            results.append(ms.runner.RunnerResult([float(x) for x in rec.run_secs], None))
        if cands:
            batches.append((workload, cands, results))
        Sigint.check()
    # Collect every group, then train once (each training starts from scratch).
    tvm_compat.update_cost_model_once(
        cost_model, [(ms.TuneContext(mod=workload.mod, target=target, num_threads=ncores), cands, results)
                     for workload, cands, results in batches])
    return sum(len(c) for _, c, _ in batches), len(batches)


#: Schedules of other workloads tried on a task that has no records (see :func:`seed_from_similar`).
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


def _finished(task: Task, schedules: list[Any], tried: set[str]) -> list[Any]:
    """Schedules postprocessed as MetaSchedule finishes its own candidates (parallel, vectorise,
    packed weights), those whose trace is in ``tried`` or that fail postprocessing left out;
    ``tried`` gains the rest."""
    ctx = ms.TuneContext(mod=task.mod, target=task.target, space_generator="post-order-apply",
                         task_name=task.name, num_threads=1)
    out = []
    for sch in schedules:
        key = trace_key(sch.trace)
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


def _measure_schedules(sess: Session, i: int, cands: list[Any], builder: Any, run: Any, what: str) -> None:
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
    runner_results, measured_built = [], []
    for sch, b, a in zip(cands, built, args_info):
        rr = next(results) if b.error_msg is None else ms.runner.RunnerResult(None, b.error_msg)
        if not (measured(b) and measured(rr)):
            continue  # the run stopped before measuring it: no record, measured on resume
        runner_results.append(rr)
        measured_built.append(b)
        if rr.error_msg is not None:
            _log.warning("task %s: %s failed: %s", task.name, what, short_error(Exception(rr.error_msg)))
        secs = rr.run_secs if rr.error_msg is None and rr.run_secs else [FAILED_RUN_SECS]
        sess.db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [float(x) for x in secs], task.target, a))
    sess.keys(i).update(trace_key(c.trace) for c in cands)
    for b in built:
        if b.artifact_path:
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.dirname(b.artifact_path))
    sess.on_batch(measured_built, runner_results)


def seed_from_templates(sess: Session, builder: Any, run: Any) -> int:
    """Measure the hand-written schedules of :mod:`..kernels.schedules` for the tasks they fit, most
    time first; those the database holds already are not measured again. Evolutionary search
    then starts from the best of them. They share what this run's budget leaves once every other
    task is sure of its minimum, so a small budget still reaches every kernel. Returns trials run."""
    importance = task_importance(sess.tasks, sess.best)
    written = {i: c for i, c in enumerate(schedules.candidates(t.mod, t.target) for t in sess.tasks) if c}
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


def seed_from_similar(sess: Session, builder: Any, run: Any) -> int:
    """Give tasks the best schedules of the nearest workloads of the same kind in the database
    (another width, resolution or model) and in the databases transferred from (another core
    of the same architecture, :attr:`Session.sources`), refitted to their shapes, measured and recorded like
    any trial. MetaSchedule shares records only between identical workloads; a refitted schedule
    is a far better start than a random one, and evolutionary search then begins from it (the
    database's best seed its population).

    Tasks without records come first. Then, while this run's budget lasts, tasks that already
    have records, most time first: a few rounds of evolutionary search on a small budget can end
    far from what a neighbour found with more (MobileNetV2 0.35/160, tuned before its neighbours
    were, ran slower than 0.35/192). A schedule the database holds for the task already is not
    measured again, so a rerun measures nothing new. Returns trials run."""
    by_kind: dict[tuple, list[tuple[list, Any, bool]]] = {}
    for db in sess.sources:
        own = db is sess.db
        for workload, records in db.sample_records(1):
            blocks = _sblocks(workload.mod)
            by_kind.setdefault(_kernel_kind(blocks), []).append((blocks, records[0], own))
    importance = task_importance(sess.tasks, sess.best)
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
        sources = sorted(((_shape_distance(blocks, b), not own, r)
                          for b, r, own in by_kind.get(_kernel_kind(blocks), [])), key=lambda s: s[:2])
        # Not the task's own best; the same workload's best on another core is the nearest of all,
        # and then the only seed: neighbours' schedules would only spend trials it has beaten there.
        sources = [(d, r) for d, other, r in sources if d > 0 or other or not has[i]]
        sources = [r for d, r in (sources[:1] if sources and sources[0][0] == 0 else sources)]
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
