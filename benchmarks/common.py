"""Shared helpers for the benchmark sections: timing, targets and the section interface.

Every section module in ``benchmarks/`` exposes ``run(ctx: Context) -> dict`` returning::

    {"results": {...},            # whatever the section measured (JSON-serialisable)
     "targets": [Target(...).to_dict(), ...],
     "skipped": "why" | None}     # only when the whole section could not run (e.g. no GPU)

``benchmarks/run.py`` calls the sections in order, collects their targets into one list and
writes ``benchmarks/results/<date>.json`` and ``.md``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DATA = REPO / "data" / "pneumoniamnist.npz"


@dataclasses.dataclass
class Context:
    """What every section gets.

    Attributes:
        quick: Smoke mode: fewer repeats, fewer batches, smaller data. Numbers are not meaningful.
        work_dir: A scratch folder the section may write into (deleted after the run).
        repeats: Interleaved repeats per timing (median reported).
        source: The dataset to use (the bundled PneumoniaMNIST).
        shared: Cross-section cache (e.g. a prepared dataset folder, a pipeline run folder).
    """

    quick: bool
    work_dir: Path
    repeats: int
    source: Path = BUNDLED_DATA
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Target:
    """One goal from issue #6: ``measured`` against ``goal`` with ``op`` ('>=' or '<=')."""

    name: str
    measured: float | None
    goal: float
    op: str = ">="
    unit: str = ""
    note: str = ""
    # Why the target fails whatever ``measured`` says (e.g. some runs behind it crashed).
    failed: str = ""

    @property
    def met(self) -> bool | None:
        if self.failed:
            return False
        if self.measured is None:
            return None
        return self.measured >= self.goal if self.op == ">=" else self.measured <= self.goal

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": None if self.measured is None else round(float(self.measured), 4),
            "goal": f"{self.op} {self.goal:g}{self.unit}",
            "met": self.met,
            "note": " ".join(filter(None, [self.note, f"(not met: {self.failed})"]))
            if self.failed
            else self.note,
        }


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Time each callable ``repeats`` times, interleaved (A B C A B C ...), after ``warmup`` calls.

    Returns ``{name: {"median_s", "min_s", "max_s", "samples_s"}}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in samples.items()}


def paired_rounds(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    alternate: bool = True,
    between: Callable[[], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time every callable once per round, ``repeats`` rounds, for :func:`paired_ratio`.

    ``warmup`` untimed rounds come first, then the timed ones. Counting all rounds from 0, round
    ``i`` runs the callables in the given order when ``i`` is even and in reverse order when it
    is odd (with ``alternate``): A B C, C B A, A B C, ... No side always runs first or last, and
    over two rounds a drift within the run weighs on both sides of a pair alike; use an even
    ``repeats``. Sample ``i`` of every side comes from timed round ``i``, so samples of two sides
    with the same index were taken back to back, under the same conditions.

    A callable may return the seconds to record (a number, e.g. measured inside the call up to a
    mark, so as to leave out a teardown); otherwise the wall time of the call is recorded.
    ``between()``, when given, runs untimed after every call (e.g. ``gc.collect``).

    Returns:
        ``{name: {"median_s", "min_s", "max_s", "samples_s", "wall_samples_s"}}`` in the order
        of ``fns``: :func:`summarize` of the recorded seconds, plus the wall time of every call.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        order = names[::-1] if alternate and i % 2 else names
        for name in order:
            start = time.perf_counter()
            reported = fns[name]()
            wall = time.perf_counter() - start
            if between is not None:
                between()
            if i < warmup:
                continue
            own = isinstance(reported, (int, float)) and not isinstance(reported, bool)
            samples[name].append(float(reported) if own else wall)
            walls[name].append(wall)
    return {
        name: {
            **summarize(samples[name]),
            "wall_samples_s": [round(v, 6) for v in walls[name]],
        }
        for name in names
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """The median of the per-round ratios ``numerator[i] / denominator[i]``, and their spread.

    Samples with the same index must come from the same round (see :func:`paired_rounds`). For
    "A's throughput over B's" on the same work per call, pass B's seconds as ``numerator`` and
    A's as ``denominator``. Each ratio compares two calls timed back to back, which cancels what
    moved both (drift over the run, another process, a clock change); a ratio of the two sides'
    medians does not, as the medians may come from different rounds. The median of the ratios
    also shrugs off a minority of rounds where only one side was disturbed.

    Returns:
        ``{"median", "q1", "q3", "min", "max", "n", "ratios", "ratio_of_medians"}``: ``q1`` and
        ``q3`` are the quartiles of the per-round ratios (inclusive method; both the ratio
        itself for one round), ``ratio_of_medians`` is ``median(numerator) /
        median(denominator)``, kept for comparison.

    Raises:
        ValueError: no rounds, sequences of different lengths, or a sample that is not > 0.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            "Arguments `numerator` and `denominator` must be non-empty and of the same length. "
            f"Received: {len(numerator)} and {len(denominator)} samples"
        )
    if min(*numerator, *denominator) <= 0:
        raise ValueError("Every sample must be > 0 seconds.")
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return {
        "median": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
        "min": min(ratios),
        "max": max(ratios),
        "n": len(ratios),
        "ratios": [round(r, 6) for r in ratios],
        "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
    }


def summarize(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "samples_s": [round(v, 6) for v in values],
    }


def prepared_dataset(ctx: Context) -> Path:
    """The bundled source prepared with the default ``DataConfig`` (once per run, shared).

    Cached in ``ctx.shared["prepared"]``: sections that train on the real data use this one.
    """
    if "prepared" not in ctx.shared:
        from cycleprune import data
        from cycleprune.config import DataConfig

        out = ctx.work_dir / "prepared"
        data.prepare_dataset(ctx.source, out, DataConfig())
        ctx.shared["prepared"] = out
    return Path(ctx.shared["prepared"])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
