"""Batches sized in time: what a job costs, learned as the worker runs, and the cut.

A batch is cut to about ``budget_s`` seconds of work rather than to a count of jobs, so the
work a pool process holds is bounded in milliseconds whatever the model: a high job that
arrives behind bulk work waits for at most about one budget, the last photos of a run are
spread over every pool process instead of one process holding 64 of them, and a version
nobody has measured yet starts with a batch of one job.

A job's cost depends on what it asks for and what it carries, not only on its model
version, so jobs are weighed by a :data:`Kind`: the model and version it names, whether it
asks for an explanation (a gradient pass per step), and the size of what it carries (the
base64 length of its image in powers of two, or ``path`` for a file the worker reads): a
28x28 PNG decodes in microseconds, a 4000x3000 JPEG in about 45 ms.

For each kind the model keeps a moving estimate of the seconds per job at each batch size
(in powers of two: a forward pass of 64 costs less per image than one of 1). A batch's
measured time is spread over its kinds in proportion to what was predicted for them, and
each estimate moves a step towards what was seen. Once a kind's cost is known, a batch goes
past the budget by at most one job: the first job of a batch is always taken, and each
next one only if the total stays within the budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

#: What a job's cost depends on: model, version, explained, input size class.
Kind: TypeAlias = tuple[Any, Any, bool, int | str]

#: How far one batch moves an estimate towards what it measured.
STEP = 0.3


def kind_of(job: Any) -> Kind:
    """The kind of a job as it travels (its wire dict); odd fields give an odd kind, which is
    harmless: the batch function refuses the job, and its cost is learned like any other."""
    if not isinstance(job, dict):
        return (None, None, False, 0)
    image = job.get("image")
    carried: int | str = len(image).bit_length() if isinstance(image, str) else "path"
    model, version = job.get("model"), job.get("version")
    return (
        model if isinstance(model, str) else None,
        version if isinstance(version, str) else None,
        job.get("explain") is True,
        carried,
    )


def size_class(n: int) -> int:
    """The batch-size class an estimate is kept under: 1, 2-3, 4-7, 8-15, ..."""
    return n.bit_length()


class CostModel:
    """Seconds per job for each :data:`Kind` and batch-size class, learned from batches."""

    #: Most kinds remembered: senders choose model names, so the table is bounded.
    MAX_KINDS = 4096

    def __init__(self, step: float = STEP) -> None:
        self.step = step
        self._per_job: dict[Kind, dict[int, float]] = {}

    def per_job(self, kind: Kind, n: int) -> float | None:
        """Seconds a job of ``kind`` costs in a batch holding ``n`` of them; None if unknown.

        An unmeasured size class borrows the nearest smaller one measured (a job costs no
        less in a bigger batch: the guess errs towards smaller batches), else the nearest
        bigger one.
        """
        table = self._per_job.get(kind)
        if not table:
            return None
        wanted = size_class(n)
        known = table.get(wanted)
        if known is not None:
            return known
        smaller = [c for c in table if c < wanted]
        return table[max(smaller)] if smaller else table[min(table)]

    def predict(self, counts: Mapping[Kind, int]) -> float | None:
        """Seconds a batch of ``counts`` jobs of each kind should take; None if any is unknown."""
        total = 0.0
        for kind, n in counts.items():
            cost = self.per_job(kind, n)
            if cost is None:
                return None
            total += n * cost
        return total

    def observe(self, counts: Mapping[Kind, int], seconds: float) -> None:
        """A batch of ``counts`` jobs of each kind took ``seconds``: move the estimates.

        Kinds already known get their predicted share of the time, scaled so the shares add
        up to what was measured; kinds not known yet share what is left, per job.
        """
        if not counts or seconds <= 0:
            return
        predicted = {kind: self.per_job(kind, n) for kind, n in counts.items()}
        known = sum(n * (predicted[kind] or 0.0) for kind, n in counts.items()
                    if predicted[kind] is not None)  # fmt: skip
        unknown_jobs = sum(n for kind, n in counts.items() if predicted[kind] is None)
        if unknown_jobs:
            left = max(seconds - known, seconds * 0.1)
            scale = (seconds - left) / known if known else 0.0
            new_each = left / unknown_jobs
        else:
            scale = seconds / known if known else 0.0
            new_each = 0.0
        for kind, n in counts.items():
            guess = predicted[kind]
            seen = new_each if guess is None else guess * scale
            if seen <= 0:
                continue
            self._update(kind, size_class(n), seen)

    def _update(self, kind: Kind, size: int, seen: float) -> None:
        table = self._per_job.get(kind)
        if table is None:
            if len(self._per_job) >= self.MAX_KINDS:
                self._per_job.clear()  # rare: a flood of model names; relearn
            table = self._per_job[kind] = {}
        old = table.get(size)
        table[size] = seen if old is None else old + self.step * (seen - old)


class Cut:
    """A batch being filled to a time budget: add jobs while they fit (see :meth:`fits`)."""

    def __init__(self, costs: CostModel, budget_s: float, most_jobs: int) -> None:
        self.costs = costs
        self.budget_s = budget_s
        self.most_jobs = most_jobs
        self.counts: dict[Kind, int] = {}
        self.jobs = 0
        self.seconds = 0.0
        self.closed = False

    def fits(self, kind: Kind) -> bool:
        """Whether one more job of ``kind`` goes in; if so it is counted in.

        The first job always goes in (a batch has at least one). After it, a job goes in while
        the batch holds fewer than ``most_jobs`` and its predicted time stays within the
        budget (a budget of 0 counts jobs only). A job of a kind not measured yet goes in
        only first, alone: a batch of one teaches what that kind costs. Once a job does not
        fit, nothing more does.
        """
        if self.closed or self.jobs >= self.most_jobs:
            self.closed = True
            return False
        n = self.counts.get(kind, 0)
        if self.budget_s <= 0:
            self._count(kind, n)
            return True
        cost = self.costs.per_job(kind, n + 1)
        if cost is None:
            self.closed = True  # unknown: learn from a batch of one
            if self.jobs == 0:
                self._count(kind, n)
                return True
            return False
        before = n * (self.costs.per_job(kind, n) or 0.0) if n else 0.0
        seconds = self.seconds - before + (n + 1) * cost
        if self.jobs and seconds > self.budget_s:
            self.closed = True
            return False
        self._count(kind, n)
        self.seconds = seconds
        return True

    def _count(self, kind: Kind, n: int) -> None:
        self.counts[kind] = n + 1
        self.jobs += 1
