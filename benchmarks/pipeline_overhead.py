"""Section 6: what kfp.local orchestration costs on top of the stages' own compute.

The real pipeline (:func:`pipelines.local.run_local`, ``small`` preset; quick: ``smoke``) runs in
a fresh pipeline root. Three clocks:

- *wall*: around ``run_local``, end to end (what a user waits for: kfp.local's set-up, every
  task, and the run folder's assembly);
- *task walls*: each task's subprocess, from kfp.local's "Executing task" to its "finished"
  log line (``summary.json`` ``pipeline.task_seconds``, and intervals recorded here);
- *compute*: the seconds each component spends inside its one library call, which the
  components time with ``time.perf_counter`` around that call and ``summary.json`` reports as
  ``seconds`` per stage (every stage records them but ``list_sparsities``, which only reads the
  config and returns a list parameter, with no artifact to carry them: its whole task counts as
  overhead, which it is).

kfp.local runs the ``ParallelFor`` branches two at a time, so the stages' compute can add up to
more than the wall and ``(wall - compute) / wall`` understates the overhead (it can go negative).
The target therefore uses the serial-equivalent share of time that is not compute::

    overhead = 1 - compute / (sum of task walls + (wall - time covered by some task))

which equals ``(wall - compute) / wall`` when the tasks run one after another. Both are
reported. A second run with unchanged inputs in the same pipeline root measures kfp.local's
cache; ``summary.json`` ``pipeline.cached`` says which stages it served. Unlike the other
sections, each of the two runs is one sample (a run of the ``small`` preset takes minutes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Target, interleaved

# Where a stage's task imports TensorFlow: before its timer starts (every TF stage now), or
# inside its timed work, where the import would count as compute.
TF_BEFORE_CALL = ("prepare_data", "find_lr", "train", "prune", "compress", "evaluate")
TF_IN_CALL: tuple[str, ...] = ()
IMPORTS = {
    "python + kfp": "import kfp.dsl.executor_main",
    "python + kfp + tensorflow": "import kfp.dsl.executor_main, cycleprune.compat",
}


def bench_config(quick: bool):
    """The ``small`` preset with the bundled data's class names.

    Quick: ``smoke`` with one pruned variant and one TFLite format (no SavedModel), the
    fewest tasks the graph allows (13); at ~4 s of process start and imports per task it still
    takes over a minute a run on two cores.
    """
    from cycleprune.cli import BUNDLED_CLASS_NAMES
    from cycleprune.config import preset

    config = preset("smoke" if quick else "small")
    config = config.replace(data=dataclasses.replace(config.data, class_names=BUNDLED_CLASS_NAMES))
    if quick:
        config = config.replace(
            prune=dataclasses.replace(config.prune, sparsities=(0.5,)),
            compress=dataclasses.replace(
                config.compress, quantizations=("dynamic",), saved_model=False
            ),
        )
    return config


# ---- pure arithmetic (tested in tests/test_benchmark_sections.py)


def stage_compute(seconds: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, float]:
    """Library-call seconds per stage from ``summary.json`` ``seconds``: variants summed,
    ``total`` and the ``exclude`` stages (e.g. served from cache) left out."""
    skip = {"total", *exclude}
    out = {}
    for stage, value in seconds.items():
        if stage in skip:
            continue
        values = value.values() if isinstance(value, Mapping) else [value]
        out[stage] = float(sum(v for v in values if v is not None))
    return out


def interval_union(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def overhead_figures(
    wall: float,
    task_seconds: Mapping[str, list[float]],
    compute: Mapping[str, float],
    busy: float,
) -> dict[str, Any]:
    """The overhead arithmetic of one pipeline run.

    Args:
        wall: End-to-end seconds.
        task_seconds: ``{stage: [task wall, ...]}`` of the tasks that ran.
        compute: ``{stage: library-call seconds}`` of the same tasks.
        busy: Seconds during which at least one task ran (union of the task intervals).

    Returns:
        ``compute_s``, ``task_s`` (sum of task walls), ``in_tasks_s`` (task walls minus
        compute), ``between_tasks_s`` (wall minus busy), ``naive`` (``(wall - compute) / wall``)
        and ``serial`` (``1 - compute / (task_s + between_tasks_s)``), plus ``stages``: per
        stage ``tasks``, ``task_s``, ``compute_s``, ``overhead_s``.
    """
    if wall <= 0:
        raise ValueError(f"wall must be > 0. Received: {wall=}")
    compute_s = float(sum(compute.values()))
    task_s = float(sum(sum(v) for v in task_seconds.values()))
    between = max(wall - busy, 0.0)
    stages = {}
    for stage in sorted(set(task_seconds) | set(compute)):
        walls = task_seconds.get(stage, [])
        spent = compute.get(stage, 0.0)
        stages[stage] = {
            "tasks": len(walls),
            "task_s": round(sum(walls), 3),
            "compute_s": round(spent, 3),
            "overhead_s": round(sum(walls) - spent, 3),
        }
    budget = task_s + between
    return {
        "wall_s": wall,
        "compute_s": compute_s,
        "task_s": task_s,
        "in_tasks_s": task_s - compute_s,
        "between_tasks_s": between,
        "tasks": sum(len(v) for v in task_seconds.values()),
        "naive": (wall - compute_s) / wall,
        "serial": 1.0 - compute_s / budget if budget > 0 else None,
        "stages": stages,
    }


# ---- running the pipeline


class _TaskClock(logging.Filter):
    """Start and end time of every task, from kfp.local's log lines (as pipelines.local does)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[tuple[int, str], float] = {}
        self.intervals: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        from pipelines.local import _ANSI, _FINISHED, _STARTED

        message = _ANSI.sub("", record.getMessage())
        now = time.monotonic()
        with self.lock:
            if match := _STARTED.match(message):
                self.open[(record.thread, match[1])] = now
            elif match := _FINISHED.match(message):
                began = self.open.pop((record.thread, match[1]), None)
                if began is not None:
                    self.intervals.append((match[1], began, now))
        return True


@contextlib.contextmanager
def _task_clock() -> Iterator[_TaskClock]:
    root = logging.getLogger()
    clock = _TaskClock()
    root.addFilter(clock)
    try:
        yield clock
    finally:
        root.removeFilter(clock)


def run_pipeline(ctx: Context, root: Path, out: Path) -> dict[str, Any]:
    """Run the pipeline once (``bench_config(ctx.quick)``) and time it."""
    from pipelines.local import run_local

    config = bench_config(ctx.quick)
    load_before = os.getloadavg()
    with _task_clock() as clock:
        start = time.monotonic()
        summary = run_local(
            config, source=str(ctx.source), out_dir=out, pipeline_root=root, progress=None
        )
        wall = time.monotonic() - start
    pipeline = summary["pipeline"]
    cached = list(pipeline["cached"])
    compute = stage_compute(summary["seconds"], exclude=cached)
    busy = interval_union((a, b) for _, a, b in clock.intervals)
    return {
        "run_dir": summary["run_dir"],
        "wall_s": wall,
        "kfp_wall_s": pipeline["wall_seconds"],
        "cached": cached,
        "task_seconds": pipeline["task_seconds"],
        "figures": overhead_figures(wall, pipeline["task_seconds"], compute, busy),
        "selected": summary["selected"],
        # Other processes on the machine slow the tasks down: worth knowing beside the times.
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def ensure_pipeline_run(ctx: Context) -> Path:
    """The run folder of this benchmark's pipeline run, running it if no section did yet."""
    if "pipeline_run" not in ctx.shared:
        base = ctx.work_dir / "pipeline_overhead"
        first = run_pipeline(ctx, base / "kfp-root", base / "run-1")
        ctx.shared["pipeline_run"] = first["run_dir"]
        ctx.shared["pipeline_first"] = first
    return Path(ctx.shared["pipeline_run"])


def _import_seconds(repeats: int) -> dict[str, dict[str, Any]]:
    def child(code: str):
        return lambda: subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

    return interleaved({name: child(code) for name, code in IMPORTS.items()}, repeats, warmup=1)


def run(ctx: Context) -> dict[str, Any]:
    base = ctx.work_dir / "pipeline_overhead"
    root = base / "kfp-root"
    first = ctx.shared.get("pipeline_first") or run_pipeline(ctx, root, base / "run-1")
    ctx.shared["pipeline_run"] = first["run_dir"]
    ctx.shared["pipeline_first"] = first
    second = run_pipeline(ctx, root, base / "run-2")
    imports = _import_seconds(max(1, ctx.repeats))

    figures = first["figures"]
    stages = figures["stages"]
    tf_import = imports["python + kfp + tensorflow"]["median_s"]
    kfp_import = imports["python + kfp"]["median_s"]
    tf_extra = tf_import - kfp_import
    tf_before = sum(s["tasks"] for name, s in stages.items() if name in TF_BEFORE_CALL)
    tf_in = sum(s["tasks"] for name, s in stages.items() if name in TF_IN_CALL)
    startup = figures["tasks"] * kfp_import + (tf_before + tf_in) * tf_extra
    # The same share with every TensorFlow import counted as overhead (none as compute).
    budget = figures["task_s"] + figures["between_tasks_s"]
    consistent = 1.0 - (figures["compute_s"] - tf_in * tf_extra) / budget
    rerun_ratio = second["wall_s"] / first["wall_s"]
    executed = sorted(second["task_seconds"])

    rows = []
    for name, s in stages.items():
        share = s["overhead_s"] / s["task_s"] if s["task_s"] else None
        timed = "yes" if s["compute_s"] > 0 else "no (whole task counted)"
        rows.append(
            [
                name,
                s["tasks"],
                f"{s['task_s']:.1f}",
                f"{s['compute_s']:.1f}",
                f"{s['overhead_s']:.1f}",
                "" if share is None else f"{share:.0%}",
                timed,
            ]
        )
    between = f"{figures['between_tasks_s']:.1f}"
    rows.append(["between tasks (kfp.local, run folder)", "", "", "", between, "", ""])
    rows.append(
        [
            "total (wall)",
            figures["tasks"],
            f"{figures['task_s']:.1f}",
            f"{figures['compute_s']:.1f}",
            f"{figures['task_s'] - figures['compute_s'] + figures['between_tasks_s']:.1f}",
            f"{figures['serial']:.0%}",
            "",
        ]
    )

    overhead_note = (
        f"serial-equivalent: 1 - compute {figures['compute_s']:.1f} s / (task walls "
        f"{figures['task_s']:.1f} s + between tasks {figures['between_tasks_s']:.1f} s); "
        f"wall {figures['wall_s']:.1f} s, (wall - compute) / wall = {figures['naive']:.3f} "
        f"(ParallelFor branches overlap). Process start + imports, estimated: "
        f"{figures['tasks']} tasks x python+kfp {kfp_import:.1f} s + {tf_before + tf_in} tasks x "
        f"tensorflow {tf_extra:.1f} s = {startup:.0f} s"
        + (
            f"; the {tf_in} TF imports inside timed calls count as compute (as overhead: "
            f"{consistent:.3f})"
            if tf_in
            else ""
        )
        + ". Between tasks: kfp.local itself. One run (a single sample)."
    )
    rerun_note = (
        f"one rerun {second['wall_s']:.1f} s vs first {first['wall_s']:.1f} s; cached: "
        f"{', '.join(second['cached']) or 'nothing'}; re-executed: {', '.join(executed)}. "
        "Every stage but push and report is cached (pipelines/pipeline.py CACHED_STAGES); "
        "run_local keeps the cached stages' outputs for the cache to serve."
    )
    return {
        "results": {
            "preset": "smoke" if ctx.quick else "small",
            "first_run": first,
            "rerun": second,
            "rerun_ratio": rerun_ratio,
            "imports": imports,
            "startup_estimate_s": startup,
            "overhead_tf_import_as_overhead": consistent,
            "table": {
                "columns": [
                    "stage",
                    "tasks",
                    "task wall (s)",
                    "library call (s)",
                    "overhead (s)",
                    "overhead share",
                    "library call timed",
                ],
                "rows": rows,
            },
        },
        "targets": [
            Target(
                "pipeline orchestration overhead", figures["serial"], 0.15, "<=", note=overhead_note
            ).to_dict(),
            Target("cached rerun / first run", rerun_ratio, 0.10, "<=", note=rerun_note).to_dict(),
        ],
        "skipped": None,
    }
