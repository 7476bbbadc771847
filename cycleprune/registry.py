"""The model registry: every pushed model as a version, and a production pointer that only the
promotion gate (or an operator) moves.

Layout (``<registry>`` is a local folder or ``gs://bucket/prefix``)::

    <registry>/<model_name>/<version>/             one pushed model (complete once its
        _MANIFEST.json        manifest exists, see cycleprune.storage.write_prefix)
        model.keras           the selected variant's Keras model
        saved_model/          ... and its SavedModel (TF Serving)
        model_<mode>.tflite   ... and its TFLite model: the selected one, or float32
        metrics.json          validation and test metrics of the served file, its threshold
        model_card.json       data, parameters, metrics, sizes, sparsity, parent run
        model_card.md         the same, for people
    <registry>/<model_name>/production.json        the production pointer
    <registry>/<model_name>/decisions/<version>.json   the gate's decision on each version

Versions are ``vYYYYMMDDTHHMMSSffffffZ-<8 hex>``: UTC time of the push plus a random suffix, so
they sort in time order and two pushes never collide.

**The promotion gate** (:func:`gate_decision`, pure) promotes a candidate iff every check passes:

1. thresholds: ``auc >= min_auc``, ``sensitivity >= min_sensitivity`` and ``specificity >=
   min_specificity``, on the test split of this run, at the threshold chosen on validation;
2. champion/challenger, when a production model exists: for the same three metrics,
   ``candidate >= champion - tolerance``, where the champion (the production version) is
   evaluated by :func:`evaluate_version` on *this run's* test split, at its own recorded
   threshold, so both are measured on the same images. A champion that cannot be evaluated
   (other classes, another input shape, unreadable files) fails the check: the gate fails
   closed.

A missing or NaN metric fails its check. The first run (no champion) needs the thresholds only.
A rejected candidate stays in the registry as a version; only the pointer does not move.

**The pointer** moves by compare-and-swap (:func:`cycleprune.storage.compare_and_swap`: GCS
generation preconditions, or a lock file and an atomic rename locally).
:func:`gate_and_promote` reads the pointer, evaluates the champion it names, decides, and swaps
only if the pointer is still the one it read; otherwise it starts again against the new
champion. Two runs finishing together never lose an update and never promote on a stale
comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cycleprune import storage

PRODUCTION_FILE = "production.json"
DECISIONS_DIR = "decisions"
METRICS_FILE = "metrics.json"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
GATE_METRICS = ("auc", "sensitivity", "specificity")
POINTER_SCHEMA = 1
_VERSION = re.compile(r"^v\d{8}T\d{12}Z-[0-9a-f]{8}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MAX_ATTEMPTS = 20
_EPS = 1e-12


class RegistryError(ValueError):
    """A registry request that cannot be served (no such version, no production model, ...)."""


# --------------------------------------------------------------------------------------------
# The gate (pure)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Thresholds of the promotion gate (see the module docstring for the rule).

    Attributes:
        min_auc: Lowest acceptable test ROC AUC.
        min_sensitivity: Lowest acceptable test sensitivity.
        min_specificity: Lowest acceptable test specificity.
        tolerance: How much worse than the production model, per metric, a candidate may be.
    """

    min_auc: float = 0.8
    min_sensitivity: float = 0.8
    min_specificity: float = 0.5
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        for name in ("min_auc", "min_sensitivity", "min_specificity", "tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Argument `{name}` must be a number. Received: {name}={value!r}")
            if not 0 <= value <= 1:
                raise ValueError(f"Argument `{name}` must be in [0, 1]. Received: {name}={value}")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The outcome of :func:`gate_decision`.

    Attributes:
        promote: Whether the candidate becomes the production model.
        checks: One dict per check: ``check`` (``min_auc``, ..., ``champion_auc``, ...),
            ``metric``, ``value``, ``bound``, ``passed``.
        reasons: One sentence per failed check (empty when promoted).
        candidate: The candidate's metrics used.
        champion: The production model's metrics on this run's test split (None: no champion).
        champion_version: The production version compared against (None: first model).
        champion_error: Why the champion could not be evaluated, if it could not.
        gate: The thresholds used.
    """

    promote: bool
    checks: tuple[dict[str, Any], ...]
    reasons: tuple[str, ...]
    candidate: dict[str, Any]
    champion: dict[str, Any] | None
    champion_version: str | None
    champion_error: str | None
    gate: dict[str, float]

    @property
    def summary(self) -> str:
        """One sentence for logs and reports."""
        if not self.promote:
            return "rejected: " + "; ".join(self.reasons) + "."
        against = (
            f"not worse than production {self.champion_version} (within {self.gate['tolerance']:g})"
            if self.champion_version
            else "no production model yet"
        )
        return f"promoted: passes the thresholds and {against}."

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["checks"], data["reasons"] = list(self.checks), list(self.reasons)
        data["summary"] = self.summary
        return data


def _value(metrics: Mapping[str, Any] | None, key: str) -> float:
    try:
        return float((metrics or {}).get(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def gate_decision(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    gate: GateConfig,
    *,
    champion_version: str | None = None,
    champion_error: str | None = None,
) -> GateDecision:
    """Decide whether a candidate replaces the production model (rule: module docstring).

    Args:
        candidate: The candidate's test metrics (``auc``, ``sensitivity``, ``specificity``).
        champion: The production model's metrics on the same test split; None when there is
            no production model (or it could not be evaluated: see ``champion_error``).
        gate: Thresholds and tolerance.
        champion_version: The production version, when there is one.
        champion_error: Set when a production model exists but could not be evaluated; the
            candidate is then rejected.

    Returns:
        The :class:`GateDecision`.
    """
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    for metric in GATE_METRICS:
        value, bound = _value(candidate, metric), getattr(gate, f"min_{metric}")
        passed = math.isfinite(value) and value >= bound - _EPS
        checks.append(
            {"check": f"min_{metric}", "metric": metric, "value": value, "bound": bound}
            | {"passed": passed}
        )
        if not passed:
            reasons.append(f"test {metric} {value:.4f} < min_{metric} {bound:g}")
    if champion_error is not None:
        checks.append(
            {"check": "champion", "metric": None, "value": None, "bound": None, "passed": False}
        )
        reasons.append(
            f"the production model {champion_version} could not be evaluated on this run's "
            f"test split ({champion_error})"
        )
    elif champion is not None:
        for metric in GATE_METRICS:
            value, reference = _value(candidate, metric), _value(champion, metric)
            bound = reference - gate.tolerance
            passed = math.isfinite(value) and math.isfinite(bound) and value >= bound - _EPS
            checks.append(
                {"check": f"champion_{metric}", "metric": metric, "value": value, "bound": bound}
                | {"passed": passed}
            )
            if not passed:
                reasons.append(
                    f"test {metric} {value:.4f} is worse than production {champion_version}'s "
                    f"{reference:.4f} by more than {gate.tolerance:g}"
                )
    return GateDecision(
        promote=not reasons,
        checks=tuple(checks),
        reasons=tuple(reasons),
        candidate={k: _value(candidate, k) for k in GATE_METRICS},
        champion=None if champion is None else {k: _value(champion, k) for k in GATE_METRICS},
        champion_version=champion_version,
        champion_error=champion_error,
        gate=gate.to_dict(),
    )


# --------------------------------------------------------------------------------------------
# Names and layout


def check_model_name(model_name: str) -> str:
    """``model_name`` if it is a valid registry name (letters, digits, ``.``, ``_``, ``-``).

    Raises:
        ValueError: any other name.
    """
    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise ValueError(
            "Argument `model_name` must be 1-100 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit. Received: model_name={model_name!r}"
        )
    return model_name


def _check_registry(registry: str | os.PathLike) -> str:
    registry = os.fspath(registry)
    if not registry.strip():
        raise ValueError("Argument `registry` must be a folder or gs:// URI. Received: ''")
    return registry


def model_uri(registry: str | os.PathLike, model_name: str) -> str:
    return storage.join_uri(_check_registry(registry), check_model_name(model_name))


def version_uri(registry: str | os.PathLike, model_name: str, version: str) -> str:
    """Where a version lives.

    Raises:
        ValueError: a malformed model name or version.
    """
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(
            "Argument `version` must look like v20250101T000000000000Z-0123abcd. "
            f"Received: version={version!r}"
        )
    return storage.join_uri(model_uri(registry, model_name), version)


def new_version(now: datetime.datetime | None = None) -> str:
    """A new version name: ``v`` + UTC time to the microsecond + ``Z-`` + 8 random hex digits."""
    now = now or datetime.datetime.now(datetime.UTC)
    return f"v{now.astimezone(datetime.UTC):%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(4)}"


# --------------------------------------------------------------------------------------------
# Reading the registry


def list_models(registry: str | os.PathLike) -> list[str]:
    """Model names in a registry (folders with a valid name).

    Raises:
        ObjectNotFoundError: a missing local folder or bucket.
    """
    children = storage.list_uri(_check_registry(registry), recursive=False)
    return [c.rstrip("/") for c in children if c.endswith("/") and _MODEL_NAME.match(c[:-1])]


def list_versions(registry: str | os.PathLike, model_name: str) -> list[str]:
    """The complete versions of a model, oldest first (incomplete pushes are ignored).

    Raises:
        ObjectNotFoundError: a missing local registry folder or bucket.
    """
    root = model_uri(registry, model_name)
    try:
        children = storage.list_uri(root, recursive=False)
    except storage.ObjectNotFoundError:
        if storage.is_gcs(root):
            raise
        return []
    names = sorted(c.rstrip("/") for c in children if _VERSION.match(c.rstrip("/")))
    return [v for v in names if storage.is_complete(storage.join_uri(root, v))]


def read_production(registry: str | os.PathLike, model_name: str) -> tuple[dict | None, str]:
    """The production pointer (None before the first promotion) and its CAS token.

    Raises:
        StorageError: unreadable or malformed pointer.
    """
    uri = storage.join_uri(model_uri(registry, model_name), PRODUCTION_FILE)
    raw, token = storage.read_with_token(uri)
    if raw is None:
        return None, token
    try:
        pointer = json.loads(raw)
        str(pointer["version"]), int(pointer["revision"])
    except (ValueError, KeyError, TypeError) as err:
        raise storage.StorageError(f"{uri} is not a valid production pointer: {err}") from None
    return pointer, token


def production_version(registry: str | os.PathLike, model_name: str) -> str | None:
    pointer, _ = read_production(registry, model_name)
    return None if pointer is None else pointer["version"]


def _no_production(registry: str | os.PathLike, model_name: str, rest: str) -> RegistryError:
    """ "No production version", or, for a local registry, the missing folder that explains it."""
    if not storage.is_gcs(registry):
        if not Path(registry).is_dir():
            return RegistryError(f"No registry at {registry}: there is no such folder")
        if not Path(model_uri(registry, model_name)).is_dir():
            return RegistryError(f"Registry {registry} has no model {model_name!r}")
    return RegistryError(f"{model_name!r} has no production version{rest}")


def _read_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError as err:
        raise storage.StorageError(f"{uri} is not valid JSON: {err}") from None


def _require_complete(registry: str | os.PathLike, model_name: str, version: str) -> str:
    uri = version_uri(registry, model_name, version)
    if not storage.is_complete(uri):
        raise RegistryError(f"No complete version {version} of {model_name!r} at {uri}")
    return uri


def show(
    registry: str | os.PathLike, model_name: str, version: str | None = None
) -> dict[str, Any]:
    """A version's model card, metrics, gate decision and whether it is in production.

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        version: Default: the production version.

    Returns:
        ``{"model_name", "version", "uri", "production", "card", "metrics", "decision",
        "files", "total_bytes"}`` (``decision`` None when none was recorded).

    Raises:
        RegistryError: no such complete version, or no production version to default to.
    """
    current = production_version(registry, model_name)
    version = version or current
    if version is None:
        raise _no_production(registry, model_name, "; name one with --version")
    uri = _require_complete(registry, model_name, version)
    manifest = storage.read_manifest(uri)
    decision_uri = storage.join_uri(
        model_uri(registry, model_name), DECISIONS_DIR, f"{version}.json"
    )
    try:
        decision = _read_json(decision_uri)
    except storage.ObjectNotFoundError:
        decision = None
    return {
        "model_name": model_name,
        "version": version,
        "uri": uri,
        "production": version == current,
        "card": _read_json(storage.join_uri(uri, CARD_JSON)),
        "metrics": _read_json(storage.join_uri(uri, METRICS_FILE)),
        "decision": decision,
        "files": [f["path"] for f in manifest["files"]],
        "total_bytes": manifest["total_bytes"],
    }


# --------------------------------------------------------------------------------------------
# Moving the pointer


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _history_entry(pointer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pointer.items() if k != "history"}


def _new_pointer(
    current: Mapping[str, Any] | None,
    model_name: str,
    version: str,
    reason: str,
    decision: Mapping[str, Any] | None,
) -> dict[str, Any]:
    history = [] if current is None else [*current.get("history", []), _history_entry(current)]
    return {
        "schema": POINTER_SCHEMA,
        "model_name": model_name,
        "version": version,
        "previous": None if current is None else current["version"],
        "revision": 1 if current is None else int(current["revision"]) + 1,
        "updated": _now(),
        "reason": reason,
        "decision": None if decision is None else dict(decision),
        "history": history,
    }


def set_production(
    registry: str | os.PathLike,
    model_name: str,
    version: str,
    *,
    token: str,
    current: Mapping[str, Any] | None,
    reason: str,
    decision: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Point production at ``version`` if the pointer is still ``current`` (compare-and-swap).

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        version: A complete version.
        token: The token :func:`read_production` returned with ``current``.
        current: The pointer as read (its history is carried over).
        reason: Why (``gate``, ``manual promote``, ``rollback``).
        decision: The gate's decision, for ``gate``.

    Returns:
        The new pointer.

    Raises:
        RegistryError: ``version`` is not a complete version.
        ConcurrentUpdateError: the pointer moved since it was read.
    """
    _require_complete(registry, model_name, version)
    pointer = _new_pointer(current, model_name, version, reason, decision)
    uri = storage.join_uri(model_uri(registry, model_name), PRODUCTION_FILE)
    data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode("utf-8")
    storage.compare_and_swap(uri, data, token)
    return pointer


def _retrying(action: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    for _ in range(_MAX_ATTEMPTS):
        try:
            return action()
        except storage.ConcurrentUpdateError:
            continue
    raise storage.ConcurrentUpdateError(
        f"{what}: the production pointer kept changing ({_MAX_ATTEMPTS} attempts)"
    )


def promote(registry: str | os.PathLike, model_name: str, version: str) -> dict[str, Any]:
    """Point production at ``version`` without the gate (an operator's decision).

    Returns:
        The new pointer.

    Raises:
        RegistryError: ``version`` is not a complete version.
    """

    def attempt() -> dict[str, Any]:
        current, token = read_production(registry, model_name)
        return set_production(
            registry, model_name, version, token=token, current=current, reason="manual promote"
        )

    return _retrying(attempt, f"promote {model_name} {version}")


def rollback(
    registry: str | os.PathLike, model_name: str, to_version: str | None = None
) -> dict[str, Any]:
    """Point production back at an earlier version.

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        to_version: Default: the version that was in production before the current one.

    Returns:
        The new pointer.

    Raises:
        RegistryError: no production model, no earlier one, or ``to_version`` is not complete.
    """

    def attempt() -> dict[str, Any]:
        current, token = read_production(registry, model_name)
        if current is None:
            raise _no_production(registry, model_name, " to roll back")
        target = to_version
        if target is None:
            earlier = _rollback_candidates(current)
            if not earlier:
                raise RegistryError(
                    f"{model_name!r} has had no production version before {current['version']} "
                    f"that was not rolled back from; name one with --to"
                )
            target = earlier[-1]
        return set_production(
            registry, model_name, target, token=token, current=current, reason="rollback"
        )

    return _retrying(attempt, f"rollback {model_name}")


def _rollback_candidates(current: Mapping[str, Any]) -> list[str]:
    """Earlier production versions a default rollback may return to, oldest first.

    The pointer's history read as a stack: a promotion pushes its version, a rollback to a
    version on the stack pops back to it (a rollback elsewhere pushes). Rolling back twice thus
    goes two steps back (C -> B -> A), never back to the model just rolled away from
    (C -> B -> C); a champion promoted after rollbacks rolls back to the one it replaced.
    """
    stack: list[str] = []
    for entry in [*current.get("history", []), _history_entry(current)]:
        version = entry["version"]
        if entry.get("reason") == "rollback" and version in stack:
            del stack[len(stack) - stack[::-1].index(version) :]
        else:
            stack.append(version)
    return [v for v in stack[:-1] if v != current["version"]]


def gate_and_promote(
    registry: str | os.PathLike,
    model_name: str,
    version: str,
    candidate: Mapping[str, Any],
    gate: GateConfig,
    evaluate_champion: Callable[[str], Mapping[str, Any]],
) -> tuple[GateDecision, dict[str, Any] | None]:
    """Run the gate against the current production model and move the pointer if it passes.

    The pointer is read, its version evaluated by ``evaluate_champion``, the decision made
    (:func:`gate_decision`), and then either the pointer is swapped (promotion) or re-read
    (rejection): if it moved meanwhile, everything starts again against the new champion.

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        version: The candidate, already pushed (complete).
        candidate: Its test metrics.
        gate: Thresholds and tolerance.
        evaluate_champion: ``version -> metrics`` on this run's test split. Any exception
            counts as "could not be evaluated" (the candidate is rejected).

    Returns:
        ``(decision, pointer)``: the pointer as it is after the decision (None: none yet).

    Raises:
        ConcurrentUpdateError: the pointer moved on every one of many attempts.
    """
    for _ in range(_MAX_ATTEMPTS):
        current, token = read_production(registry, model_name)
        champion_version = None if current is None else current["version"]
        champion, error = None, None
        if champion_version is not None and champion_version != version:
            try:
                champion = dict(evaluate_champion(champion_version))
            except Exception as err:  # fail closed: any failure rejects the candidate
                error = f"{type(err).__name__}: {err}"
        decision = gate_decision(
            candidate,
            champion,
            gate,
            champion_version=champion_version,
            champion_error=error,
        )
        if decision.promote:
            try:
                pointer = set_production(
                    registry,
                    model_name,
                    version,
                    token=token,
                    current=current,
                    reason="gate",
                    decision=decision.to_dict(),
                )
            except storage.ConcurrentUpdateError:
                continue
            return decision, pointer
        if read_production(registry, model_name)[1] == token:
            return decision, current
    raise storage.ConcurrentUpdateError(
        f"Gate for {model_name} {version}: the production pointer kept changing "
        f"({_MAX_ATTEMPTS} attempts)"
    )


# --------------------------------------------------------------------------------------------
# Pushing a run's selected model

RUNS_DIR = "runs"


def _run_version(registry: str | os.PathLike, model_name: str, parent_run: str, name: str) -> str:
    """The version this run's push writes: the one an earlier attempt chose, or a new one.

    ``<model>/runs/<parent_run>.json`` records it before anything is pushed, so a retried push
    (KFP's Retry of a failed run keeps the run's id) finishes that version instead of pushing the
    same model again under a second name, which would then be gated against itself.
    """
    if not parent_run:
        return new_version()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", parent_run)[:200]
    marker = storage.join_uri(model_uri(registry, model_name), RUNS_DIR, f"{safe}.json")
    with contextlib.suppress(storage.ObjectNotFoundError, ValueError, KeyError, TypeError):
        recorded = json.loads(storage.read_bytes(marker))
        if recorded["name"] == name and _VERSION.match(str(recorded["version"])):
            return str(recorded["version"])
    version = new_version()
    record = {"parent_run": parent_run, "name": name, "version": version, "created": _now()}
    storage.write_bytes(marker, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return version


def _decision_from_dict(data: Mapping[str, Any]) -> GateDecision:
    fields = {f.name for f in dataclasses.fields(GateDecision)}
    values = {k: v for k, v in data.items() if k in fields}
    values["checks"] = tuple(values.get("checks", ()))
    values["reasons"] = tuple(values.get("reasons", ()))
    return GateDecision(**values)


def _serving_files(folder: Path, selected_path: str) -> list[str]:
    """What a version holds from the variant's compression folder: the Keras model, the
    SavedModel, and one TFLite model (the selected one, or the first available)."""
    names = [KERAS_FILE]
    if (folder / SAVED_MODEL_DIR).is_dir():
        names.append(SAVED_MODEL_DIR)
    if selected_path.endswith(".tflite"):
        names.append(Path(selected_path).name)
    else:
        modes = ("float32", "dynamic", "int8")
        available = [f"model_{m}.tflite" for m in modes if (folder / f"model_{m}.tflite").is_file()]
        names += available[:1]
    return names


def _card_markdown(card: Mapping[str, Any]) -> str:
    test, val = card["metrics"]["test"], card["metrics"]["val"]
    data = card["data"]

    def row(name: str, metrics: Mapping[str, Any]) -> str:
        cells = " | ".join(f"{_value(metrics, k):.4f}" for k in ("accuracy", *GATE_METRICS))
        return f"| {name} | {cells} |"

    lines = [
        f"# {card['model_name']} {card['version']}",
        "",
        f"Served file: `{card['serving_file']}` ({card['format']}), decision threshold "
        f"{card['threshold']:.4g} (chosen on validation). Inputs: raw pixels "
        f"{'x'.join(str(v) for v in data['image_shape'])}, 0-255.",
        "",
        "| split | accuracy | AUC | sensitivity | specificity |",
        "| --- | --- | --- | --- | --- |",
        row("validation", val),
        row("test", test),
        "",
        f"- Data: {data['source']} (version {data['version']}), classes "
        f"{', '.join(data['class_names'])}; test images: {data['examples'].get('test')}",
        f"- Size: {card['sizes']['size_bytes']} bytes, {card['sizes']['gzip_bytes']} gzip",
        f"- Sparsity: {card['sparsity']['measured']} (target {card['sparsity']['target']})",
        f"- Selection: {card['selection']}",
        f"- Parent run: {card['parent_run']}; cycleprune {card['cycleprune_version']}; "
        f"pushed {card['created']}",
        "",
        "Parameters: `model_card.json` (`parameters`, the whole resolved configuration).",
        "",
    ]
    return "\n".join(lines)


def push_version(
    registry: str | os.PathLike,
    model_name: str,
    *,
    model_dir: str | os.PathLike,
    entry: Mapping[str, Any],
    selection: Mapping[str, Any],
    dataset_info: Mapping[str, Any],
    parameters: Mapping[str, Any],
    parent_run: str,
    version: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write one model as a new version (SavedModel, TFLite, Keras, metrics, model card).

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        model_dir: The selected variant's compression folder.
        entry: The selected model's entry (:func:`cycleprune.selection.collect_entries`).
        selection: The selection record (``name``, ``reason``, ...).
        dataset_info: The prepared dataset's info (``DatasetInfo.to_dict()``).
        parameters: The resolved configuration (``Config.to_dict()``).
        parent_run: The run that produced the model.
        version: Default: :func:`new_version`.

    Returns:
        ``(version, model card)``.

    Raises:
        FileNotFoundError: a model file is missing from ``model_dir``.
        StorageError (and subclasses): the upload failed (the version stays incomplete).
    """
    from cycleprune import __version__

    version = version or new_version()
    uri = version_uri(registry, model_name, version)
    folder = Path(model_dir)
    files = _serving_files(folder, str(entry["path"]))
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing: cannot push {entry['name']}")
    serving = Path(entry["path"]).name
    counts = dataset_info.get("counts", {})
    card = {
        "model_name": model_name,
        "version": version,
        "created": _now(),
        "parent_run": parent_run,
        "cycleprune_version": __version__,
        "name": entry["name"],
        "format": entry["format"],
        "serving_file": serving,
        "threshold": float(entry["threshold"]),
        "positive_class": int(parameters.get("evaluate", {}).get("positive_class", 1)),
        "data": {
            "source": dataset_info.get("source"),
            "version": dataset_info.get("version"),
            "content_hash": dataset_info.get("content_hash"),
            "class_names": list(dataset_info.get("class_names", [])),
            "image_shape": list(dataset_info.get("image_shape", [])),
            "examples": {s: sum(c.values()) for s, c in counts.items()},
        },
        "metrics": {"val": dict(entry.get("val", {})), "test": dict(entry.get("test", {}))},
        "sizes": {"size_bytes": entry["size_bytes"], "gzip_bytes": entry["gzip_bytes"]},
        "sparsity": {"measured": entry.get("sparsity"), "target": entry.get("target_sparsity")},
        "latency_ms": entry.get("latency_ms"),
        "selection": selection.get("reason", ""),
        "files": sorted(files),
        "parameters": dict(parameters),
    }
    metrics = {
        "name": entry["name"],
        "format": entry["format"],
        "serving_file": serving,
        "threshold": card["threshold"],
        "val": card["metrics"]["val"],
        "test": card["metrics"]["test"],
        "dataset_version": card["data"]["version"],
    }
    with tempfile.TemporaryDirectory() as staging:
        stage = Path(staging)
        for name in files:
            if (folder / name).is_dir():
                shutil.copytree(folder / name, stage / name)
            else:
                shutil.copy2(folder / name, stage / name)
        storage.atomic_write_json(stage / METRICS_FILE, metrics)
        storage.atomic_write_json(stage / CARD_JSON, card)
        storage.atomic_write_text(stage / CARD_MD, _card_markdown(card))
        storage.write_prefix(stage, uri, metadata={"model_name": model_name, "version": version})
    return version, card


def evaluate_version(
    registry: str | os.PathLike,
    model_name: str,
    version: str,
    dataset_dir: str | os.PathLike,
    *,
    positive_class: int = 1,
) -> dict[str, Any]:
    """Metrics of a registered version on a prepared dataset's test split, at the version's
    own threshold (the champion's side of the gate; the evaluation-side read of test).

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        version: A complete version.
        dataset_dir: This run's prepared dataset.
        positive_class: The class scored as positive.

    Returns:
        :func:`cycleprune.evaluation.compute_metrics` of the served file.

    Raises:
        RegistryError: incomplete version, or other class names than the dataset's.
        StorageError (and subclasses): unreadable or corrupted files.
    """
    from cycleprune import data, evaluation

    uri = _require_complete(registry, model_name, version)
    info = data.load_info(dataset_dir, verify=True)
    with tempfile.TemporaryDirectory() as tmp:
        storage.read_prefix(uri, Path(tmp) / "card", files=[CARD_JSON])
        card = storage.read_json(Path(tmp) / "card" / CARD_JSON)
        if list(card["data"]["class_names"]) != list(info.class_names):
            raise RegistryError(
                f"{model_name} {version} was trained on classes {card['data']['class_names']}, "
                f"this run's data has {list(info.class_names)}"
            )
        serving = storage._safe_relative(card["serving_file"], uri)
        storage.read_prefix(uri, Path(tmp) / "model", files=[serving])
        images, labels = data.load_arrays(dataset_dir, "test")
        probs = evaluation.predict_proba(str(Path(tmp) / "model" / serving), images)
    if probs.shape[1] <= positive_class:
        raise RegistryError(f"{model_name} {version} outputs {probs.shape[1]} classes")
    y = (labels == positive_class).astype("int64")
    return evaluation.compute_metrics(y, probs[:, positive_class], float(card["threshold"]))


def run_push(
    registry: str | os.PathLike,
    model_name: str,
    *,
    selection: Mapping[str, Any],
    evaluations: Sequence[Mapping[str, Any]],
    model_dirs: Mapping[str, str | os.PathLike],
    dataset_dir: str | os.PathLike,
    dataset_info: Mapping[str, Any],
    parameters: Mapping[str, Any],
    gate: GateConfig,
    parent_run: str,
    evaluate_champion: Callable[[str], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``push`` stage: push the selected model as a version, then gate and maybe promote.

    Args:
        registry: Local folder or ``gs://`` URI.
        model_name: The model.
        selection: The ``select_model`` record (``name``, ``variant``, ``reason``, ...).
        evaluations: The ``evaluate`` records (dense and pruned).
        model_dirs: ``{variant: compression output folder}``.
        dataset_dir: This run's prepared dataset (the champion is evaluated on its test split).
        dataset_info: Its info dict.
        parameters: The resolved configuration (``Config.to_dict()``).
        gate: Thresholds and tolerance.
        parent_run: The run's id.
        evaluate_champion: Default: :func:`evaluate_version` on ``dataset_dir``.

    Returns:
        ``{"registry", "model_name", "version", "uri", "promoted", "decision" (GateDecision
        dict), "production" (pointer after, without its history), "candidate" (the model
        card, without parameters)}``. The decision is also written to
        ``<registry>/<model_name>/decisions/<version>.json``.

    Raises:
        ValueError: bad registry or model name, or the selected model is not evaluated.
        StorageError (and subclasses): registry I/O failed.
    """
    from cycleprune.selection import collect_entries

    check_model_name(model_name)
    _check_registry(registry)
    entries = {e["name"]: e for e in collect_entries(evaluations)}
    entry = entries.get(selection["name"])
    if entry is None:
        raise ValueError(f"The selected model {selection['name']!r} has no evaluation")
    version = _run_version(registry, model_name, parent_run, entry["name"])
    uri = version_uri(registry, model_name, version)
    if storage.is_complete(uri):  # a retry of this run's push: the version is already there
        card = _read_json(storage.join_uri(uri, CARD_JSON))
    else:
        version, card = push_version(
            registry,
            model_name,
            model_dir=model_dirs[entry["variant"]],
            entry=entry,
            selection=selection,
            dataset_info=dataset_info,
            parameters=parameters,
            parent_run=parent_run,
            version=version,
        )
    if evaluate_champion is None:
        positive = int(parameters.get("evaluate", {}).get("positive_class", 1))

        def evaluate_champion(champion: str) -> dict[str, Any]:
            return evaluate_version(
                registry, model_name, champion, dataset_dir, positive_class=positive
            )

    current, _ = read_production(registry, model_name)
    if current is not None and current["version"] == version and current.get("decision"):
        # An earlier attempt of this push promoted it, then stopped before writing its decision.
        decision, pointer = _decision_from_dict(current["decision"]), current
    else:
        decision, pointer = gate_and_promote(
            registry, model_name, version, entry["test"], gate, evaluate_champion
        )
    record = {
        "registry": os.fspath(registry),
        "model_name": model_name,
        "version": version,
        "uri": version_uri(registry, model_name, version),
        "promoted": decision.promote,
        "decision": decision.to_dict(),
        "production": None if pointer is None else _history_entry(pointer),
        "candidate": {k: v for k, v in card.items() if k != "parameters"},
    }
    decision_uri = storage.join_uri(
        model_uri(registry, model_name), DECISIONS_DIR, f"{version}.json"
    )
    storage.write_bytes(
        decision_uri, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    return record


__all__ = [
    "GateConfig",
    "GateDecision",
    "RegistryError",
    "evaluate_version",
    "gate_and_promote",
    "gate_decision",
    "list_models",
    "list_versions",
    "new_version",
    "promote",
    "push_version",
    "read_production",
    "rollback",
    "run_push",
    "set_production",
    "show",
]
