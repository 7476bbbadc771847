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
from collections.abc import Callable, Sequence
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

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.goal if self.op == ">=" else self.measured <= self.goal

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": None if self.measured is None else round(float(self.measured), 4),
            "goal": f"{self.op} {self.goal:g}{self.unit}",
            "met": self.met,
            "note": self.note,
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
