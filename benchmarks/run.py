"""Run the benchmark sections of issue #6 and write ``benchmarks/results/<date>.{json,md}``.

Usage::

    python -m benchmarks.run                       # everything (make bench)
    python -m benchmarks.run --quick               # smoke check (make bench QUICK=1)
    python -m benchmarks.run --only throughput latency
    python -m benchmarks.run --out /tmp/bench

``BENCH_QUICK=1`` in the environment is the same as ``--quick``. Sections run in
:data:`SECTIONS` order, each a module ``benchmarks/<name>.py`` with ``run(ctx) -> dict`` (see
:mod:`benchmarks.common`); a missing module is left out. A section that raises is recorded as an
error (message and the tail of the traceback) and the others still run; the exit status is 1
when any section failed.

Output, in ``--out`` (default ``benchmarks/results/``): ``<YYYY-MM-DD>.json`` (UTC date;
``quick-<YYYY-MM-DD>.json`` in quick mode, git-ignored), written atomically, and a Markdown
rendering ``.md`` beside it. With ``--only``, the sections run are merged into that day's file
when one exists (each section keeps its own ``ran_at`` and ``commit``), so that sections rerun
separately do not wipe the others. The JSON::

    {"schema": 1, "machine": {...}, "quick": bool,
     "targets": [{"name", "measured", "goal", "met", "note", "section"}, ...],
     "sections": {name: {"results", "targets", "skipped", "error", "wall_s", "ran_at", "commit"}}}
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Context

SCHEMA = 1
SECTIONS = (
    "data_scaling",
    "throughput",
    "pruning_overhead",
    "latency",
    "lr_range",
    "pipeline_overhead",
    "compression",
    "gpu",
)
DEFAULT_OUT = REPO / "benchmarks" / "results"
QUICK_REPEATS = 2
GPU_CHILD_TIMEOUT_S = 2 * 3600  # the gpu section's child process (minutes on a GPU)
FULL_REPEATS = 5
_TRACEBACK_LINES = 25

SectionFn = Callable[[Context], Mapping[str, Any]]


def discover() -> dict[str, SectionFn]:
    """The ``run`` function of every section module that exists, in :data:`SECTIONS` order."""
    found = {}
    for name in SECTIONS:
        if importlib.util.find_spec(f"benchmarks.{name}") is not None:
            found[name] = _lazy(name)
    return found


def _lazy(name: str) -> SectionFn:
    def run(ctx: Context) -> Mapping[str, Any]:
        return importlib.import_module(f"benchmarks.{name}").run(ctx)

    return run


def run_sections(
    ctx: Context, sections: Mapping[str, SectionFn], host: str | None = None
) -> dict[str, dict[str, Any]]:
    """Run each section, catching its errors; returns ``{name: record}``.

    Each record names its own commit, whether the tree was dirty, and ``host`` (see
    :func:`host_line`): merged runs (``--only``) keep where each section ran.
    """
    commit, dirty = _git_commit(), _git_dirty()
    records = {}
    for name, fn in sections.items():
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        record: dict[str, Any] = {"results": None, "targets": [], "skipped": None, "error": None}
        try:
            out = fn(ctx)
            record.update(
                results=out.get("results"),
                targets=list(out.get("targets") or []),
                skipped=out.get("skipped"),
            )
        except Exception as err:  # a failed section must not stop the others
            lines = traceback.format_exc().rstrip().splitlines()
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = "\n".join(lines[-_TRACEBACK_LINES:])
            print(f"[bench] {name} FAILED: {record['error']}", file=sys.stderr, flush=True)
        record["wall_s"] = round(time.perf_counter() - started, 2)
        record["ran_at"] = _now()
        record["commit"] = commit
        record["git_dirty"] = dirty
        record["host"] = host
        records[name] = record
        status = "error" if record["error"] else "skipped" if record["skipped"] else "ok"
        print(f"[bench] {name}: {status} in {record['wall_s']} s", file=sys.stderr, flush=True)
    return records


def collect_targets(sections: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every section's targets, in section order, each with a ``section`` key."""
    return [
        {**target, "section": name}
        for name, record in sections.items()
        for target in record.get("targets") or []
    ]


def machine_record() -> dict[str, Any]:
    """CPU, cores, affinity, RAM, versions, GPUs and git state of this run."""
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    commit, dirty = _git_commit(), _git_dirty()
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "affinity": affinity,
        "affinity_count": len(affinity) if affinity is not None else None,
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "tf_keras": version("tf_keras"),
        "tfmot": version("tensorflow-model-optimization"),
        "ai_edge_litert": version("ai-edge-litert"),
        "gpus": _gpus(),
        "tf_threads": _tf_threads(),
        "git_commit": commit,
        "git_dirty": dirty,
        "started_utc": _now(),
    }


def host_line(machine: Mapping[str, Any], *, gpus_hidden: bool = False) -> str:
    """One line naming the machine and the devices the sections used."""
    gpus = ", ".join(g.get("device_name") or g["name"] for g in machine.get("gpus") or [])
    used = "none" if not gpus else f"{gpus} (hidden from the CPU sections)" if gpus_hidden else gpus
    return (
        f"{machine.get('cpu')}, {machine.get('affinity_count')} usable cores, TensorFlow "
        f"{machine.get('tensorflow')}; GPUs: {used}"
    )


def _hide_gpus() -> bool:
    """Hide every GPU from this process and the processes it starts; False if too late."""
    from cycleprune.compat import tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as err:  # TensorFlow already initialised its devices
        print(f"[bench] could not hide the GPUs: {err}", file=sys.stderr)
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # children: latency, data_scaling, kfp.local tasks
    return True


def _gpu_in_child(quick: bool, env: Mapping[str, str]) -> dict[str, Any]:
    """The gpu section's record, from ``python -m benchmarks.run --only gpu`` in a child."""
    started = time.perf_counter()
    print("[bench] gpu ... (child process, GPUs visible)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="cycleprune-bench-gpu-") as out:
        argv = [sys.executable, "-m", "benchmarks.run", "--only", "gpu", "--out", out]
        try:
            done = subprocess.run(
                [*argv, *(["--quick"] if quick else [])],
                cwd=REPO,
                env=dict(env),
                capture_output=True,
                text=True,
                check=False,
                timeout=GPU_CHILD_TIMEOUT_S,
            )
            status, stderr = f"exited with {done.returncode}", done.stderr
        except subprocess.TimeoutExpired as err:
            status = f"ran past {GPU_CHILD_TIMEOUT_S} s"
            raw = err.stderr or b""  # bytes, even with text=True
            stderr = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        found = sorted(Path(out).glob("*.json"))
        if found:
            return json.loads(found[0].read_text())["sections"]["gpu"]
    tail = "\n".join(stderr.rstrip().splitlines()[-_TRACEBACK_LINES:])
    return {
        "results": None,
        "targets": [],
        "skipped": None,
        "error": f"the gpu child process {status} and wrote no results",
        "traceback": tail,
        "wall_s": round(time.perf_counter() - started, 2),
        "ran_at": _now(),
        "commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "host": None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[dict[str, Any]]:
    from cycleprune.compat import tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except (ValueError, RuntimeError):
            details = {}
        gpus.append(
            {
                "name": device.name,
                "device_name": details.get("device_name"),
                "compute_capability": details.get("compute_capability"),
            }
        )
    return gpus


def _tf_threads() -> dict[str, Any]:
    """TensorFlow's intra-/inter-op thread settings (0: its default, one per usable core)."""
    from cycleprune.compat import tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        **{
            name: os.environ[name]
            for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
            if name in os.environ
        },
    }


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD")


def _git_dirty() -> bool | None:
    status = _git("status", "--porcelain")
    return None if status is None else bool(status)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Output


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (temporary file in the same folder, then rename), with
    the permissions the umask gives a new file (not ``mkstemp``'s 0600)."""
    from cycleprune import storage

    path.parent.mkdir(parents=True, exist_ok=True)
    # to_json_value converts numpy values and Paths; the sections keep their order (no sorting).
    storage.atomic_write_text(path, json.dumps(storage.to_json_value(payload), indent=2) + "\n")


def render_markdown(payload: Mapping[str, Any]) -> str:
    """The targets table, then each section's scalars (bullets) and tables."""
    machine = payload.get("machine") or {}
    title = "Benchmarks" + (
        " (quick: smoke check, numbers not meaningful)" if payload["quick"] else ""
    )
    lines = [f"# {title}", ""]
    gpus = ", ".join(g.get("device_name") or g["name"] for g in machine.get("gpus") or []) or "none"
    lines += [
        f"- date (UTC): {machine.get('started_utc')}",
        f"- commit: {machine.get('git_commit')}{' (dirty)' if machine.get('git_dirty') else ''}",
        f"- CPU: {machine.get('cpu')}, {machine.get('logical_cores')} logical cores, "
        f"{machine.get('affinity_count')} usable; RAM {machine.get('ram_gib')} GiB; GPUs: {gpus}",
        f"- TensorFlow threads: {_threads(machine.get('tf_threads'))}",
        f"- Python {machine.get('python')}, TensorFlow {machine.get('tensorflow')}, tf_keras "
        f"{machine.get('tf_keras')}, tfmot {machine.get('tfmot')}, ai-edge-litert "
        f"{machine.get('ai_edge_litert')}",
        f"- wall time: {machine.get('wall_s')} s",
        "",
        "## Targets",
        "",
    ]
    rows = [
        [t["name"], t["section"], _fmt(t["measured"]), t["goal"], _met(t["met"]), t.get("note", "")]
        for t in payload["targets"]
    ]
    lines += _table(["target", "section", "measured", "goal", "met", "note"], rows)
    runs: dict[tuple, list[str]] = {}
    for name, record in payload["sections"].items():
        key = (record.get("commit"), record.get("git_dirty"), record.get("host"))
        runs.setdefault(key, []).append(name)
    if len(runs) > 1:  # merged from runs at different commits or on different machines
        lines += ["", "Where each section ran:", ""]
        for (commit, dirty, host), names in runs.items():
            tree = f"{(commit or '?')[:7]}{' (dirty)' if dirty else ''}"
            lines.append(f"- {', '.join(names)}: commit {tree}; {host or 'machine not recorded'}")
    for name, record in payload["sections"].items():
        lines += ["", f"## {name}", ""]
        if record.get("error"):
            lines += [
                f"**Error:** `{record['error']}`",
                "",
                "```",
                record.get("traceback", ""),
                "```",
            ]
            continue
        if record.get("skipped"):
            lines.append(f"Skipped: {record['skipped']}")
            continue
        results = record.get("results") or {}
        bullets = [
            f"- {key}: {_fmt(value)}"
            for key, value in results.items()
            if value is None or isinstance(value, (str, int, float, bool))
        ]
        lines += [*bullets, f"- wall time: {record.get('wall_s')} s ({record.get('ran_at')})"]
        tables = dict(results.get("tables") or {})
        if isinstance(results.get("table"), Mapping):
            tables = {"": results["table"], **tables}
        for caption, table in tables.items():
            lines.append("")
            if caption:
                lines += [f"**{caption}**", ""]
            lines += _table(table["columns"], table["rows"])
    return "\n".join(lines) + "\n"


def _threads(threads: Mapping[str, Any] | None) -> str:
    if not threads:
        return "-"
    return ", ".join(
        f"{name} {'default' if value == 0 else value}" for name, value in threads.items()
    )


def _table(columns: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(c) for c in columns) + " |"]
    out.append("|" + "|".join("---" for _ in columns) + "|")
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def _merge(previous: Mapping[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    """The previous file's sections updated with this run's, in :data:`SECTIONS` order."""
    merged = dict(previous.get("sections") or {})
    merged.update(sections)
    first_seen = {name: i for i, name in enumerate(merged)}

    def rank(name: str) -> tuple[int, int]:
        known = SECTIONS.index(name) if name in SECTIONS else len(SECTIONS)
        return known, first_seen[name]

    return {name: merged[name] for name in sorted(merged, key=rank)}


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke check (also BENCH_QUICK=1)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    return parser.parse_args(argv)


def main(
    argv: Sequence[str] | None = None, *, sections: Mapping[str, SectionFn] | None = None
) -> int:
    """Run the benchmarks; returns the exit status (1 if a section failed, 2 on bad arguments)."""
    args = parse_args(argv)
    quick = args.quick or os.environ.get("BENCH_QUICK", "") not in ("", "0")
    available = dict(sections) if sections is not None else discover()
    if args.only:
        unknown = [name for name in args.only if name not in available]
        if unknown:
            print(
                f"Unknown section(s): {', '.join(unknown)}. Available: {', '.join(available)}",
                file=sys.stderr,
            )
            return 2
        available = {name: fn for name, fn in available.items() if name in args.only}
    started = time.perf_counter()
    machine = machine_record()
    # The CPU sections' targets are CPU figures (and latency pits Keras against 1-thread
    # TFLite): on a GPU machine they run with the GPUs hidden, and the gpu section runs in a
    # child process that sees them.
    child_env = dict(os.environ)
    hidden = bool(machine["gpus"]) and any(name != "gpu" for name in available) and _hide_gpus()
    here = {name: fn for name, fn in available.items() if not (hidden and name == "gpu")}
    work_dir = Path(tempfile.mkdtemp(prefix="cycleprune-bench-"))
    try:
        ctx = Context(
            quick=quick, work_dir=work_dir, repeats=QUICK_REPEATS if quick else FULL_REPEATS
        )
        records = run_sections(ctx, here, host_line(machine, gpus_hidden=hidden))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if hidden and "gpu" in available:
        records["gpu"] = _gpu_in_child(quick, child_env)
        records = {name: records[name] for name in available}  # section order
    machine["wall_s"] = round(time.perf_counter() - started, 1)
    date = machine["started_utc"][:10]
    stem = f"quick-{date}" if quick else date
    json_path = args.out / f"{stem}.json"
    if args.only and json_path.is_file():
        try:
            previous = json.loads(json_path.read_text())
        except ValueError:
            previous = {}
        if previous.get("schema") == SCHEMA and previous.get("quick") == quick:
            records = _merge(previous, records)
    payload = {
        "schema": SCHEMA,
        "machine": machine,
        "quick": quick,
        "targets": collect_targets(records),
        "sections": records,
    }
    write_json(json_path, payload)
    md_path = json_path.with_suffix(".md")
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(render_markdown(payload))
    os.replace(tmp, md_path)
    print(f"[bench] wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [name for name, record in payload["sections"].items() if record.get("error")]
    failed = [name for name in failed if name in available]  # only this run's sections count
    for target in payload["targets"]:
        print(
            f"  {target['name']:<48} {_fmt(target['measured']):>10}  {target['goal']:<10} "
            f"{_met(target['met'])}",
            file=sys.stderr,
        )
    if failed:
        print(f"[bench] failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
