"""Choosing the model to deploy from the evaluated candidates.

The rule (``config.select``, a :class:`~cycleprune.config.SelectConfig`):

1. The *baseline* is the dense Keras model (``dense/keras``): the trained network, uncompressed.
2. A candidate is any evaluated model whose format is in ``formats``.
3. A candidate is *eligible* when, on the **validation** split (never test, which stays unseen
   by every decision), both

   - ``val_auc >= baseline_val_auc - auc_tolerance`` and
   - ``val_sensitivity >= baseline_val_sensitivity - sensitivity_tolerance``.

4. The eligible candidate with the smallest gzip size wins (ties: higher validation AUC, then
   higher validation sensitivity, then name).
5. No eligible candidate (e.g. every compressed model lost too much, or a metric is NaN): the
   baseline itself is deployed.

Models are named ``<variant>/<format>``: the variant is ``dense`` or ``prune_<percent>`` from the
*target* sparsity (:func:`variant_name`), the format comes from compression (``keras``,
``tflite_float32``, ``tflite_dynamic``, ``tflite_int8``).

Pure Python over plain dicts: no TensorFlow, no kfp.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cycleprune.config import SelectConfig

DENSE = "dense"
BASELINE_FORMAT = "keras"
BASELINE = f"{DENSE}/{BASELINE_FORMAT}"
_EPS = 1e-12


def variant_name(target_sparsity: float) -> str:
    """``dense`` for 0, else ``prune_<percent>``: 0.5 -> ``prune_50``, 0.875 -> ``prune_87p5``.

    Raises:
        ValueError: ``target_sparsity`` outside [0, 1).
    """
    value = float(target_sparsity)
    if not 0 <= value < 1:
        raise ValueError(
            f"Argument `target_sparsity` must be in [0, 1). Received: target_sparsity={value}"
        )
    if value == 0:
        return DENSE
    return "prune_" + f"{round(value * 100, 4):g}".replace(".", "p")


def collect_entries(evaluations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten evaluation records into one entry per model.

    Args:
        evaluations: Records as written by the ``evaluate`` component: the
            :func:`cycleprune.evaluation.run_evaluation` dict (``sparsity``, ``models``) plus
            ``target_sparsity``.

    Returns:
        Dicts with ``name`` (``<variant>/<format>``), ``variant``, ``target_sparsity``,
        ``sparsity`` (measured), ``format``, ``path`` (relative to the variant's compression
        folder), ``size_bytes``, ``gzip_bytes``, ``threshold``, ``val``, ``test`` and
        ``latency_ms``, in input order.

    Raises:
        ValueError: a record lacks ``target_sparsity`` or ``models``, or two models share a name.
    """
    entries: list[dict[str, Any]] = []
    for i, record in enumerate(evaluations):
        missing = [k for k in ("target_sparsity", "models") if k not in record]
        if missing:
            raise ValueError(f"evaluations[{i}] lacks {missing}. Received keys: {sorted(record)}")
        variant = variant_name(record["target_sparsity"])
        for model in record["models"]:
            entries.append(
                {
                    "name": f"{variant}/{model['format']}",
                    "variant": variant,
                    "target_sparsity": float(record["target_sparsity"]),
                    "sparsity": record.get("sparsity"),
                    "format": model["format"],
                    "path": model["path"],
                    "size_bytes": int(model["size_bytes"]),
                    "gzip_bytes": int(model["gzip_bytes"]),
                    "threshold": model.get("threshold"),
                    "val": dict(model.get("val", {})),
                    "test": dict(model.get("test", {})),
                    "latency_ms": model.get("latency_ms"),
                }
            )
    names = [e["name"] for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Model names must be unique. Received duplicates: {duplicates}")
    return entries


@dataclasses.dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_model`.

    Attributes:
        name: The deployed model (``<variant>/<format>``).
        variant, format, path: Its variant, format and path inside the variant's folder.
        baseline: The reference model's name (``dense/keras``).
        eligible: Names of the eligible candidates, best first.
        fallback: True when nothing was eligible and the baseline is deployed.
        reason: One sentence a person can read in the report.
    """

    name: str
    variant: str
    format: str
    path: str
    baseline: str
    eligible: tuple[str, ...]
    fallback: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eligible"] = list(self.eligible)
        return data


def _metric(entry: Mapping[str, Any], key: str) -> float:
    value = entry.get("val", {}).get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def is_eligible(
    entry: Mapping[str, Any], baseline: Mapping[str, Any], config: SelectConfig
) -> bool:
    """Whether ``entry``'s validation AUC and sensitivity are within tolerance of ``baseline``'s.

    A NaN (or missing) metric on either side makes the entry ineligible.
    """
    for key, tolerance in (
        ("auc", config.auc_tolerance),
        ("sensitivity", config.sensitivity_tolerance),
    ):
        value, reference = _metric(entry, key), _metric(baseline, key)
        if not (math.isfinite(value) and math.isfinite(reference)):
            return False
        if value < reference - tolerance - _EPS:
            return False
    return True


def select_model(entries: Sequence[Mapping[str, Any]], config: SelectConfig) -> Selection:
    """Pick the deployed model by the rule in this module's docstring.

    Args:
        entries: Model entries as returned by :func:`collect_entries`; one must be the dense
            Keras baseline.
        config: Tolerances and allowed formats.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: no ``dense/keras`` entry.
    """
    by_name = {e["name"]: e for e in entries}
    baseline = by_name.get(BASELINE)
    if baseline is None:
        raise ValueError(
            f"The dense Keras model ({BASELINE}) is the baseline of the selection rule and must "
            f"be among the entries. Received: {sorted(by_name)}"
        )
    candidates = [e for e in entries if e["format"] in config.formats]
    eligible = sorted(
        (e for e in candidates if is_eligible(e, baseline, config)),
        key=lambda e: (e["gzip_bytes"], -_metric(e, "auc"), -_metric(e, "sensitivity"), e["name"]),
    )
    if eligible:
        chosen, fallback = eligible[0], False
        reason = (
            f"{chosen['name']} is the smallest ({chosen['gzip_bytes']} bytes gzip) of "
            f"{len(eligible)} model(s) in formats {list(config.formats)} whose validation AUC "
            f"and sensitivity are within {config.auc_tolerance} and "
            f"{config.sensitivity_tolerance} of {BASELINE} "
            f"(AUC {_metric(baseline, 'auc'):.4f}, sensitivity "
            f"{_metric(baseline, 'sensitivity'):.4f})."
        )
    else:
        chosen, fallback = baseline, True
        reason = (
            f"No model in formats {list(config.formats)} kept validation AUC and sensitivity "
            f"within {config.auc_tolerance} and {config.sensitivity_tolerance} of {BASELINE}; "
            "the dense model is deployed."
        )
    return Selection(
        name=chosen["name"],
        variant=chosen["variant"],
        format=chosen["format"],
        path=chosen["path"],
        baseline=BASELINE,
        eligible=tuple(e["name"] for e in eligible),
        fallback=fallback,
        reason=reason,
    )
