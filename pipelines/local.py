"""Run the whole pipeline on this machine with ``kfp.local``, and collect a run folder.

The same graph as on a cluster runs here, each task a subprocess of this virtualenv
(``kfp.local.SubprocessRunner(use_venv=False)``), built without GPU requests (TensorFlow uses
a local GPU if it sees one), without retries (a local failure is a bug, not a preempted node)
and so without the run's ID in the training stages' inputs (it only names checkpoint folders for
retries; it would change their cache keys in every run); images, CPU and memory settings have no
effect here.
Task outputs live under a pipeline root that stays the same across runs (``runs/.kfp-root``), so
kfp.local's cache serves every cached stage (all but ``push`` and ``report``, see
:mod:`pipelines.pipeline`) to the next run with the same inputs: a rerun with unchanged inputs
only pushes and reports again. Each task's cache key includes a digest of the library code
(:func:`code_digest`), so an edit under ``cycleprune/`` or ``components/`` reruns everything.
After a successful run the outputs of the uncached stages are deleted (the run folder holds
copies of everything worth keeping); the cached stages' outputs stay, as the cache points to
them (delete ``runs/.kfp-root`` to reclaim the space). With ``enable_caching=False`` nothing is
read from or written to the cache, and every task output of the run is deleted.

The run folder (default ``runs/<UTC timestamp>``) is the ``report`` task's ``run`` artifact plus
run metadata: ``summary.json`` (see :mod:`cycleprune.report`; here also ``run_dir`` and
``pipeline``), ``report.html``, ``models/<variant>/`` and ``tensorboard/<run>/``.
"""

import builtins
import contextlib
import datetime
import hashlib
import importlib.util
import logging
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kfp import local

import components
import cycleprune
from components._base import DEFAULT_IMAGE
from components.parameters import pipeline_arguments
from cycleprune import redaction, storage
from cycleprune.config import Config
from cycleprune.registry import GateConfig, check_model_name
from cycleprune.report import format_table
from pipelines.pipeline import UNCACHED_STAGES, build_pipeline

__all__ = [
    "DEFAULT_PIPELINE_ROOT",
    "PipelineRunError",
    "code_digest",
    "format_table",
    "hide_docker_folder",
    "run_local",
]

DEFAULT_RUNS_DIR = Path("runs")
DEFAULT_PIPELINE_ROOT = DEFAULT_RUNS_DIR / ".kfp-root"
# Set on every task: part of kfp.local's cache key (see code_digest).
CODE_DIGEST_ENV = "CYCLEPRUNE_CODE_DIGEST"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"^Executing task '([\w-]+)'")
_FINISHED = re.compile(r"^Task '([\w-]+)' finished with status (\w+)")
_CACHED = re.compile(r"^Task ([\w-]+) cache hit")
# kfp.local's notes on settings it cannot honour here: true, and expected.
_LOCAL_NOISE = (
    (RuntimeWarning, r"You may be attemping to run a task that uses custom or non-Python"),
    (UserWarning, r"Task .* have no effect in the current local runner"),
)


def _stage(task_name: str) -> str:
    """kfp task name -> component name: ``compress-2`` -> ``compress``."""
    return re.sub(r"-\d+$", "", task_name).replace("-", "_")


class PipelineRunError(RuntimeError):
    """A task of a local run failed: the message names the task, its error and the log file."""


# The last line of a Python traceback: "module.SomeError: message".
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*)$")


def _task_error(log: str, task: str) -> str | None:
    """The exception line of ``task``'s traceback in a kfp.local log, if there is one."""
    lines = _ANSI.sub("", log).splitlines()
    end = next(
        (
            i
            for i, line in enumerate(lines)
            if f"Task '{task}' finished with status FAILURE" in line
        ),
        len(lines),
    )
    # Only the task's own lines: a task killed without a traceback must not borrow another's.
    start = max(
        (i for i, line in enumerate(lines[:end]) if f"Executing task '{task}'" in line), default=0
    )
    for line in reversed(lines[start:end]):
        match = _ERROR_LINE.match(line)
        if match:
            return match.group(1).strip()
    return None


class _Tracker(logging.Filter):
    """Watches kfp.local's log records for task start/finish/cache-hit; times each task."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        super().__init__()
        self.progress = progress
        self.started: dict[tuple[int, str], float] = {}
        self.seconds: dict[str, list[float]] = {}
        self.cached: list[str] = []
        self.lock = threading.Lock()

    def _say(self, text: str) -> None:
        if self.progress is not None:
            clock = datetime.datetime.now().strftime("%H:%M:%S")
            self.progress(f"[{clock}] {text}")

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        with self.lock:
            if match := _STARTED.match(message):
                stage = _stage(match[1])
                self.started[(record.thread, stage)] = time.monotonic()
                self._say(f"{stage}: started")
            elif match := _FINISHED.match(message):
                stage = _stage(match[1])
                began = self.started.pop((record.thread, stage), None)
                took = time.monotonic() - began if began is not None else float("nan")
                self.seconds.setdefault(stage, []).append(round(took, 1))
                self._say(f"{stage}: {match[2].lower()} ({took:.1f} s)")
            elif match := _CACHED.match(message):
                stage = _stage(match[1])
                self.cached.append(stage)
                self._say(f"{stage}: cached, reusing its outputs")
        return True


@contextlib.contextmanager
def _watching(tracker: _Tracker) -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    # kfp.local swaps builtins.print for an indenting one per task; two ParallelFor threads
    # doing so at once can leave it swapped for good. Put the real one back afterwards.
    real_print = builtins.print
    root.addFilter(tracker)
    if root.getEffectiveLevel() > logging.INFO:
        # kfp.local logs cache hits at INFO, outside its own logging context.
        root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            for category, message in _LOCAL_NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        builtins.print = real_print
        root.removeFilter(tracker)
        root.setLevel(level)


@contextlib.contextmanager
def _root_handlers_to(stream) -> Iterator[None]:
    """Send the root logger (kfp.local logs through it) to ``stream`` for the block, redacted."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.StreamHandler(stream)
    handler.addFilter(redaction.RedactingFilter())
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved


def _redact_file(path: Path) -> None:
    """Rewrite ``path`` with its credentials redacted (see :func:`cycleprune.redaction.redact`)."""
    if not path.is_file():  # it could not be opened: that error is the one to see
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    clean = redaction.redact(text)
    if clean != text:
        storage.atomic_write_text(path, clean)


def hide_docker_folder() -> None:
    """Keep a ``docker/`` folder on ``sys.path`` from posing as the Docker SDK.

    Run from the repository root, ``import docker`` finds this project's ``docker/`` folder (the
    Dockerfile) as a namespace package. kfp.local imports ``docker`` to offer its DockerRunner and
    only expects an ImportError when the SDK is absent, so the impostor breaks every run. Only
    the SubprocessRunner is used here: make the impostor an ImportError.
    """
    module = sys.modules.get("docker")
    if module is not None:
        impostor = getattr(module, "__file__", None) is None
    else:
        spec = importlib.util.find_spec("docker")
        impostor = spec is not None and spec.origin is None
    if impostor:
        sys.modules["docker"] = None  # type: ignore[assignment]


def code_digest() -> str:
    """SHA-256 of the library's and the components' Python sources (paths and contents).

    kfp.local runs the code of this checkout whatever image the tasks name, and its cache key
    holds only a component's own function source: this digest, set as an environment variable
    of every task, makes a change anywhere in ``cycleprune/`` or ``components/`` a cache miss.
    """
    digest = hashlib.sha256()
    for package in (cycleprune, components):
        folder = Path(package.__file__).parent
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def _print_line(line: str) -> None:
    # The real terminal, not print() or sys.stdout: while the pipeline runs, kfp.local's task
    # logs are redirected to the log file (and kfp.local indents print()).
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _run_error(message: str, root: Path, log_path: Path | None) -> PipelineRunError:
    """The cause first (the failed task and its exception), then where to read more."""
    failed = re.search(r"Inner task failed: '([^']+)'", message)
    where = f"Task outputs are under {root}."
    if log_path is None:  # the logs were streamed above
        cause = message
    else:
        sys.stdout.flush()
        where = f"Full log: {log_path}. {where}"
        text = ""
        with contextlib.suppress(OSError):
            text = log_path.read_text(errors="replace")
        error = _task_error(text, failed.group(1)) if failed else None
        cause = f"task {failed.group(1)} failed: {error}" if failed and error else message
    return PipelineRunError(f"{cause} ({where})")


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def run_local(
    config: Config,
    *,
    source: str,
    out_dir: str | Path | None = None,
    image: str | None = None,
    progress: Callable[[str], None] | None = _print_line,
    pipeline_root: str | Path | None = None,
    keep_task_outputs: bool = False,
    log_file: str | Path | None = None,
    stream_logs: bool = False,
    registry: str = "",
    model_name: str = "cycleprune",
    gate: GateConfig | None = None,
    enable_caching: bool = True,
) -> dict[str, Any]:
    """Run the pipeline with ``kfp.local`` and assemble the run folder.

    Args:
        config: The run configuration (passed as pipeline arguments; see
            :func:`components.parameters.pipeline_arguments`).
        source: The dataset (``.npz``, image folder or prepared dataset); a local path is made
            absolute.
        out_dir: The run folder; default ``runs/<UTC timestamp>``. Must not exist or be empty.
        image: Image name recorded in the tasks (kfp.local runs this virtualenv whatever it is).
            Default: :data:`components._base.DEFAULT_IMAGE`.
        progress: Called with one line per task start, finish and cache hit; ``None`` = quiet.
        log_file: Where kfp.local's own log and every task's output go (they are long);
            default ``<pipeline_root>/logs/<run stamp>.log``. Copied into the run folder as
            ``pipeline.log``; with ``None`` and ``stream_logs=True`` they go to stdout instead.
        stream_logs: Stream kfp.local's logs to stdout rather than a file.
        pipeline_root: kfp.local's output and cache folder; default ``runs/.kfp-root``. Keep it
            across runs for caching.
        keep_task_outputs: Keep this run's task folders under ``pipeline_root`` (for debugging;
            by default only the cached stages' outputs stay, and none without caching).
        registry: Push the selected model to this registry (a folder or ``gs://`` URI) and
            promote it if it passes the gate; empty = no push. A local path is made absolute.
        model_name: The model's name in the registry.
        gate: The promotion gate's thresholds; default :class:`cycleprune.registry.GateConfig`.
        enable_caching: Serve unchanged stages from kfp.local's cache and add this run's
            outputs to it. ``False`` runs every task (``cycleprune run --no-cache``).

    Returns:
        The summary dict (also written to ``<run folder>/summary.json``), with ``run_dir`` (the
        absolute run folder) and ``pipeline`` (``root``, ``run``, ``image``, ``wall_seconds``,
        ``task_seconds`` per stage that ran, ``caching``, ``cached`` stages, ``arguments``).

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        PipelineRunError: a task failed. One line names the task and its exception (kfp's
            message when the log holds none) and the log file; the task's outputs stay under
            ``pipeline_root``.
    """
    run_dir = Path(out_dir) if out_dir is not None else DEFAULT_RUNS_DIR / _utc_stamp()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"Run folder already exists and is not empty: {run_dir}")
    root = Path(pipeline_root if pipeline_root is not None else DEFAULT_PIPELINE_ROOT).resolve()
    if "://" not in source:
        source = str(Path(source).resolve())
    image = image or DEFAULT_IMAGE
    arguments = {**pipeline_arguments(config), "source": source}
    if registry:
        check_model_name(model_name)
        gate = gate or GateConfig()
        arguments.update(
            registry=registry if "://" in registry else str(Path(registry).resolve()),
            model_name=model_name,
            min_auc=gate.min_auc,
            min_sensitivity=gate.min_sensitivity,
            min_specificity=gate.min_specificity,
            promotion_tolerance=gate.tolerance,
        )

    hide_docker_folder()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=enable_caching,
        raise_on_error=True,
    )
    tracker = _Tracker(progress)
    log_path = None
    if not stream_logs:
        log_path = Path(log_file) if log_file else root / "logs" / f"{run_dir.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if progress is not None:
            progress(f"Task logs: {log_path}")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            # The tasks' own output (printed, not logged here) is redacted once the file closes
            # (callbacks run last-in, first-out: this one after the file's close).
            stack.callback(_redact_file, log_path)
            # kfp.local logs and streams every task's output to sys.stdout: send it to the file.
            handle = stack.enter_context(open(log_path, "w", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(handle))
            stack.enter_context(_root_handlers_to(handle))
        with _watching(tracker):
            try:
                pipeline = build_pipeline(
                    image,
                    gpus=0,
                    retries=0,
                    env={CODE_DIGEST_ENV: code_digest()},
                    checkpoint_run_id=False,
                )
                task = pipeline(**arguments)
            except RuntimeError as err:
                raise _run_error(_ANSI.sub("", str(err)), root, log_path) from None
    wall = time.monotonic() - started

    run_artifact = task.output
    kfp_run = Path(run_artifact.path).parents[1]
    with storage.atomic_dir(run_dir, replaces="summary.json") as tmp:
        shutil.copytree(run_artifact.path, tmp, dirs_exist_ok=True)
        if log_path is not None:
            shutil.copyfile(log_path, Path(tmp) / "pipeline.log")
    summary = storage.read_json(run_dir / "summary.json")
    summary["run_dir"] = str(run_dir.resolve())
    summary["pipeline"] = {
        "runner": "kfp.local.SubprocessRunner(use_venv=False)",
        "root": str(root),
        "run": kfp_run.name,
        "image": image,
        "wall_seconds": round(wall, 1),
        "task_seconds": tracker.seconds,
        "caching": enable_caching,
        "cached": sorted(set(tracker.cached)),
        "arguments": arguments,
    }
    storage.atomic_write_json(run_dir / "summary.json", summary)
    if not keep_task_outputs:
        _prune_task_outputs(kfp_run, cached=enable_caching)
    return summary


def _prune_task_outputs(kfp_run: Path, *, cached: bool = True) -> None:
    """Delete a finished run's task folders, except those the kfp.local cache may point to.

    With ``cached`` every task folder but the uncached stages' stays (a cached stage's entry
    refers to its files; a missing file is a cache miss); without, every folder goes.
    """
    for child in kfp_run.iterdir():
        if cached and child.is_dir() and _stage(child.name) not in UNCACHED_STAGES:
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()
    with contextlib.suppress(OSError):
        kfp_run.rmdir()  # only succeeds when nothing was kept
