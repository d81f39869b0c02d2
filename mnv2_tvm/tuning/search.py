"""The search: how many trials each task gets, and the rounds of evolutionary search that spend them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import tvm_compat
from .records import trace_key

if TYPE_CHECKING:
    from .session import Session

#: Trials every task gets before the rest of the budget is split by importance.
MIN_TRIALS_PER_TASK = 8
#: Upper bound of candidates per MetaSchedule iteration (one build+run batch). Each iteration
#: costs a full evolutionary search (seconds), so a task's budget is mostly run in one or two.
TRIALS_PER_ITER = 32
#: Keyword arguments of ``ms.search_strategy.EvolutionarySearch`` (MetaSchedule defaults when
#: empty); tests shrink the population to keep tiny runs fast.
SEARCH_KWARGS: dict[str, Any] = {}

_log = logging.getLogger(__name__)


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


@derived_object
class BatchCallback(ms.measure_callback.PyMeasureCallback):
    """Hands every measured batch to ``fn`` (the session's counters, progress line and Ctrl-C check)."""

    def __init__(self, fn: Callable[[list, list], None]) -> None:
        super().__init__()
        self.fn = fn

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
              runner_results: Any) -> None:
        self.fn(list(builder_results), list(runner_results))


@derived_object
class MeasuredOnly(ms.measure_callback.PyMeasureCallback):
    """Hands ``callbacks`` only the candidates that were measured (:func:`.runner.measured`).

    A candidate the run stopped before measuring (Ctrl-C, or no board within the board wait) is
    no record, no trial and nothing for the cost model: it is measured on resume. ``always`` (the
    removal of build artifacts) sees every candidate. A batch that lost some is the run stopping:
    the check for Ctrl-C follows, after the measured ones are recorded.
    """

    def __init__(self, callbacks: list, always: list = ()) -> None:
        super().__init__()
        self.callbacks, self.always = list(callbacks), list(always)

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
              runner_results: Any) -> None:
        from .interrupt import Sigint
        from .runner import measured

        for cb in self.always:
            cb.apply(task_scheduler, task_id, measure_candidates, builder_results, runner_results)
        keep = [i for i, (b, r) in enumerate(zip(builder_results, runner_results)) if measured(b) and measured(r)]
        if len(keep) == len(runner_results):
            kept = (measure_candidates, builder_results, runner_results)
        else:
            kept = tuple([xs[i] for i in keep] for xs in (measure_candidates, builder_results, runner_results))
        if keep:
            for cb in self.callbacks:
                cb.apply(task_scheduler, task_id, *kept)
        if len(keep) < len(runner_results):
            Sigint.check()


@derived_object
class _Unmeasured(ms.search_strategy.PySearchStrategy):
    """Evolutionary search that never hands back a schedule the database already holds.

    Its initial population holds the database's best traces, but it only remembers what it
    measured itself (a TODO in MetaSchedule's evolutionary_search.cc), so an unchanged best can
    come out of evolution and be measured again: on a rerun, and in every round here, since each
    round is a fresh search (:func:`tune_task`). So it is asked for as many more candidates as
    database traces can enter its population, and those already measured are dropped.
    """

    def __init__(self, inner: Any, measured: set[str]) -> None:
        super().__init__()
        self.inner = inner
        self.measured = measured  # trace_key of every schedule of the task in the database
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
        keyed = [(trace_key(c.sch.trace), c) for c in cands]
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


def _search_kwargs(budget: int) -> dict[str, Any]:
    """Evolutionary search settings for a task's budget. With only a few candidates to measure,
    MetaSchedule's default search (512 schedules evolved 4 times, seconds per task) costs more
    than the measurements and its breadth is wasted; :data:`SEARCH_KWARGS` overrides either."""
    light = {"population_size": 128, "init_min_unmeasured": 16, "genetic_num_iters": 2} if budget < 4 else {}
    return {**light, **SEARCH_KWARGS}


def tune_task(sess: Session, i: int, budget: int, seed: int, builder: Any, run: Any, callbacks: list,
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
