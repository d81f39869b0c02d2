"""One tuning run from start to end: the plan of trials per task, the driver that seeds, searches
and times loop orders, and the entry points :func:`tune` and :func:`tune_model`."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tvm
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from .builder import PersistentBuilder
from .interrupt import Sigint
from .progress import PeakMemory, Progress, TaskReport, TuneReport, tvm_logs_to
from .records import BOARD_MEASUREMENT, LOG_FILE, RecordsError, as_target, open_records, trace_key
from .row_order import row_order_pending, time_row_order
from .runner import MeasureBackend, RunnerSpec, stop_runner
from .search import MIN_TRIALS_PER_TASK, BatchCallback, MeasuredOnly, allocate_trials, tune_task
from .seeding import seed_from_similar, seed_from_templates, warm_start
from .tasks import Task, extract_tasks, task_importance, with_num_cores

if TYPE_CHECKING:
    from ..models import ModelConfig
    from ..targets import TargetSpec

_log = logging.getLogger(__name__)


class Session:
    """State of one tune() call: the plan, the per-task counters and the report."""

    def __init__(self, db: Any, tasks: list[Task], trials: int, target: tvm.target.Target, records_dir: Path,
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
        self.bar: Progress | None = None
        self.interrupted = False
        self.transfer = False  # train the cost model on the database first (warm_start)
        self.sources: list[Any] = [db]  # databases transfer learns from: this one, then other targets'
        self.exhausted: set[int] = set()  # tasks with no unmeasured schedule left to find
        self._keys: dict[int, set[str]] = {}

    def keys(self, i: int) -> set[str]:
        """The schedules (:func:`trace_key`) the database holds for task ``i``, kept up to date
        by whatever measures in this run, so that nothing is measured twice."""
        if i not in self._keys:
            self._keys[i] = {trace_key(r.trace) for r in self.db.records_of(self.tasks[i].mod)}
        return self._keys[i]

    def plan(self) -> Iterator[list[int]]:
        """This run's budgets per task, in phases, ``trials`` in all with what the records hold
        (more where every task needs its minimum).

        Phase 1 brings every task to the minimum, so every kernel has a measured time early
        (and the estimate is complete); phase 2 then splits the rest by measured time share
        (:func:`task_importance`), planned only once phase 1 has run. A task whose search space runs
        out leaves what it did not use to the others, in a further phase.
        """
        done = [n for n, _ in (self.db.workload_stats(t.mod) for t in self.tasks)]  # seeds count
        first = allocate_trials(self.floor, task_importance(self.tasks, self.best), done=done)
        yield [a - d for a, d in zip(first, done)]
        while True:
            used_up = len(self.exhausted)
            stats = [self.db.workload_stats(t.mod) for t in self.tasks]
            done = [n for n, _ in stats]
            importance = task_importance(self.tasks, [b for _, b in stats])
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
        Sigint.check()  # the batch's records are on disk

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


def _run_session(sess: Session, runner: MeasureBackend, num_builder_workers: int, seed: int | None) -> None:
    """Tune the tasks one after another, each with its exact budget (most important first), in
    the phases of :meth:`Session.plan`."""
    tasks = sess.tasks
    builder = run = None
    try:
        cpu_only = sess.target.kind.name == "llvm"
        tvm_compat.import_tensor_intrinsics(cpu_only)  # before the builder's workers and TuneContext import them all
        builder = PersistentBuilder(num_builder_workers, artifact_format=runner.artifact_format, cpu_only=cpu_only)
        run = runner.make_runner()
        if sess.bar is not None:
            sess.bar.waiting = getattr(run, "waiting", None)  # a runner that waits for boards says so
        ncores = ms.utils.cpu_count(logical=True)
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=ncores, tree_method="auto")
        t = time.monotonic()
        written = seed_from_templates(sess, builder, run)
        if written:
            _log.info("%d hand-written schedules measured (%.1f s)", written, time.monotonic() - t)
            if sess.bar is not None:
                sess.bar.note(f"{written} hand-written schedules (register-tiled convolutions) measured "
                              f"({time.monotonic() - t:.0f} s)")
        if sess.transfer:
            t = time.monotonic()
            n, groups = warm_start(cost_model, sess.sources, sess.target, ncores)
            if n:
                _log.info("cost model trained on %d records of %d workloads in the database (%.1f s)",
                          n, groups, time.monotonic() - t)
                if sess.bar is not None:
                    sess.bar.note(f"cost model trained on {n} records of {groups} workloads already in "
                                  f"the database ({time.monotonic() - t:.0f} s)")
            t = time.monotonic()
            seeded = seed_from_similar(sess, builder, run)
            if seeded:
                _log.info("%d schedules of similar workloads measured (%.1f s)", seeded,
                          time.monotonic() - t)
                if sess.bar is not None:
                    sess.bar.note(f"{seeded} schedules of similar workloads refitted to the tasks and "
                                  f"measured ({time.monotonic() - t:.0f} s)")
        callbacks = [MeasuredOnly(
            [
                ms.measure_callback.AddToDatabase(),  # RecordsDatabase fsyncs each record
                ms.measure_callback.UpdateCostModel(),
                BatchCallback(sess.on_batch),  # last: it raises on Ctrl-C
            ],
            always=[ms.measure_callback.RemoveBuildArtifact()],
        )]
        # A fresh stream per task and phase; a phase follows phase 2 only when a task ran out.
        seeds = ms.utils.fork_seed(seed, n=(len(tasks) + 2) * len(tasks))
        for phase, budgets in enumerate(sess.plan()):
            importance = task_importance(tasks, sess.best)
            # Untimed tasks first: one measurement each completes the estimate, and a run
            # interrupted in phase 1 leaves no kernel without a schedule.
            for i in sorted(range(len(tasks)), key=lambda j: (sess.best[j] is not None, -importance[j])):
                Sigint.check()
                if budgets[i] > 0:
                    tune_task(sess, i, budgets[i], seeds[phase * len(tasks) + i], builder, run, callbacks,
                              cost_model, ncores)
        if cpu_only:
            Sigint.check()
            order, pending = row_order_pending(sess.db, tasks, sess.records_dir)
            time_row_order(order, pending, sess.records_dir, builder, run,
                           sess.bar.note if sess.bar is not None else None)
    except BaseException:
        if builder is not None:
            builder.discard()  # may be mid-build
        raise
    finally:
        if run is not None:
            stop_runner(run)


def _row_order_alone(sess: Session, runner: MeasureBackend, num_builder_workers: int, console: Any) -> None:
    """:func:`time_row_order` for a database whose search is done (records tuned before the
    loop order was timed, or by an older version)."""
    order, pending = row_order_pending(sess.db, sess.tasks, sess.records_dir)
    if not pending:
        return
    builder = run = None
    try:
        tvm_compat.import_tensor_intrinsics(True)
        builder = PersistentBuilder(num_builder_workers, artifact_format=runner.artifact_format, cpu_only=True)
        run = runner.make_runner()
        note = (lambda m: console.write(f"[tune] {m}\n")) if console is not None else None
        time_row_order(order, pending, sess.records_dir, builder, run, note)
    finally:
        if run is not None:
            stop_runner(run)


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: Path,
    trials: int,
    *,
    params: dict | None = None,
    runner: MeasureBackend | None = None,
    num_builder_workers: int = 2,
    progress: bool = True,
    seed: int | None = None,
    transfer: bool = False,
    transfer_from: Sequence[Path] = (),
) -> TuneReport:
    """Tune every task of ``mod`` (MetaSchedule, XGBoost cost model) until ``records_dir`` holds
    ``trials`` measurements for them; only the remainder is run.

    With ``transfer`` the cost model is first trained on the records the database holds for
    other workloads too (:func:`warm_start`), so a new config starts from what the CPU taught
    earlier runs, and tasks are first given the best schedules of the nearest workloads of their
    kind, refitted to their shapes and measured: every task without records, then tasks with
    records while the budget lasts (:func:`seed_from_similar`). ``transfer_from`` adds other
    targets' records folders (read only) to learn from the same way: another core of the same
    architecture, e.g. an A72's records for an A76 (implies ``transfer``).

    ``trials`` is split over the tasks (:func:`allocate_trials`); records of a task's workload
    already in the database (from any run or model) count toward that task's share, up to the
    share. Ctrl-C stops the run; committed records stay and the report has ``interrupted=True``.
    """
    t0 = time.monotonic()
    if trials < 0:
        raise ValueError("trials must be >= 0")
    runner = runner or RunnerSpec()
    target = with_num_cores(as_target(target), runner.on_this_machine)
    records_dir = Path(records_dir)
    measurement = getattr(runner, "measurement", None)  # None: measured on hardware ("board")
    opened = open_records(records_dir, target, writable=True,  # warnings go to the console
                          measurement=measurement or BOARD_MEASUREMENT)
    others = []
    try:
        for folder in transfer_from:
            others.append(open_records(folder, None, writable=False))
        with tvm_logs_to(records_dir / LOG_FILE, progress) as console, Sigint() as sigint:
            sess = Session(opened.db, extract_tasks(mod, target, params), trials, target, records_dir, t0)
            sess.transfer = transfer or bool(others)
            sess.sources += [o.db for o in others]
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
            where = getattr(runner, "description", None)
            if console is not None and where:
                console.write(f"[tune] measuring on the {where} core model: modelled cost, not measured; records "
                              f"labelled {measurement} in {records_dir}\n")
            sess.bar = Progress(console, total, t0, where=where) if progress else None
            memory = PeakMemory()
            try:
                with memory:
                    _run_session(sess, runner, num_builder_workers, seed)
                sess.interrupted = sigint.reason is not None  # stopped by the runner where no check came
                if opened.db.write_error:  # in case MetaSchedule swallowed the commit's exception
                    raise RecordsError(opened.db.write_error)
            except BaseException as err:  # noqa: BLE001 - a KeyboardInterrupt may arrive as RuntimeError
                if opened.db.write_error:  # arrives from C++ rewrapped; say it in one line
                    raise RecordsError(f"{opened.db.write_error}; the {len(opened.db)} records written before "
                                       "are kept, free space and run again to continue") from None
                if not (sigint.hit or isinstance(err, KeyboardInterrupt)):
                    raise
                sess.interrupted = True
                _log.warning("%s after %d trials", f"stopped: {sigint.reason}" if sigint.reason else
                             "interrupted by the user", sum(sess.measured), exc_info=err)
            finally:
                if sess.bar is not None:
                    sess.bar.close()
            why = sigint.reason or "interrupted"
            rep = sess.report(f"{why}; records so far are kept, run again to resume" if sess.interrupted else "done")
            rep.stop_reason = sigint.reason if sess.interrupted else None
            rep.peak_rss_mb, rep.peak_rss_processes = memory.peak_bytes / 2**20, memory.processes
            if console is not None:
                console.write(rep.table() + "\n")
                if rep.interrupted:
                    console.write(f"[tune] {rep.message}\n")
            return rep
    finally:
        for o in others:
            o.close()
        opened.close()


def tune_model(cfg: ModelConfig, spec: TargetSpec, records_dir: Path, trials: int, *, frontend: str = "torch",
               weights: Path | None = None, tracker: tuple[str, int] | None = None, rpc_key: str | None = None,
               seed: int = 0, progress: bool = True, transfer: bool = False,
               runner: MeasureBackend | None = None, transfer_from: Sequence[Path] = (),
               board_wait_s: float | None = None) -> TuneReport:
    """Build a model config, lower it and tune it for a target spec (the CLI's ``tune``).

    ``tracker`` measures on the boards registered under ``rpc_key`` at that RPC tracker, and stops
    the run (``report.stop_reason``) when none has answered for ``board_wait_s`` (default
    :attr:`RunnerSpec.board_wait_sec`); ``runner`` measures another way (e.g.
    :class:`.emulated.EmulatedBackend`); without either, candidates run on this machine.
    """
    from ..errors import UserError
    from ..lower import to_relax
    from ..models import build

    mod = to_relax(build(cfg, seed=seed, weights=weights), cfg, frontend, spec.layout)
    if tracker:
        wait = {} if board_wait_s is None else {"board_wait_sec": float(board_wait_s)}
        runner = RunnerSpec.rpc(tracker[0], tracker[1], rpc_key or spec.rpc_key,
                                cross_compiler=spec.cross_compiler, **wait)
    try:
        report = tune(mod, spec.tvm_target(), Path(records_dir), trials, runner=runner, progress=progress,
                      transfer=transfer, transfer_from=transfer_from)
    except RecordsError as e:
        raise UserError(str(e)) from None
    if not progress:  # with progress on, tune() already printed the table
        print(report.table(), file=sys.stderr)
    return report
