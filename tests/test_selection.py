"""The deployment rule: numbers in, one model out (cycleprune.selection)."""

import pytest

from cycleprune.config import SelectConfig
from cycleprune.selection import (
    BASELINE,
    collect_entries,
    is_eligible,
    select_model,
    variant_name,
)

RULE = SelectConfig(auc_tolerance=0.01, sensitivity_tolerance=0.02)


def entry(name: str, gzip: int, auc: float, sensitivity: float) -> dict:
    variant, fmt = name.split("/")
    return {
        "name": name,
        "variant": variant,
        "format": fmt,
        "path": f"{fmt}.file",
        "gzip_bytes": gzip,
        "val": {"auc": auc, "sensitivity": sensitivity},
    }


DENSE = entry(BASELINE, 1000, 0.95, 0.90)


@pytest.mark.parametrize(
    ("sparsity", "name"),
    [(0.0, "dense"), (0.5, "prune_50"), (0.75, "prune_75"), (0.9, "prune_90"),
     (0.875, "prune_87p5"), (0.333, "prune_33p3")],
)  # fmt: skip
def test_variant_name(sparsity, name):
    assert variant_name(sparsity) == name


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_variant_name_rejects_out_of_range(sparsity):
    with pytest.raises(ValueError, match="target_sparsity"):
        variant_name(sparsity)


def test_smallest_eligible_model_wins():
    entries = [
        DENSE,
        entry("dense/tflite_int8", 300, 0.945, 0.89),  # within both tolerances
        entry("prune_50/tflite_int8", 200, 0.942, 0.885),  # within both tolerances, smaller
        entry("prune_90/tflite_int8", 100, 0.93, 0.90),  # AUC 0.02 below: out
    ]
    choice = select_model(entries, RULE)
    assert choice.name == "prune_50/tflite_int8"
    assert choice.variant == "prune_50" and choice.format == "tflite_int8"
    assert choice.eligible == ("prune_50/tflite_int8", "dense/tflite_int8", BASELINE)
    assert not choice.fallback
    assert "prune_50/tflite_int8" in choice.reason


def test_sensitivity_tolerance_excludes_a_small_model():
    entries = [DENSE, entry("prune_75/tflite_int8", 100, 0.96, 0.87)]  # sensitivity -0.03
    assert select_model(entries, RULE).name == BASELINE


def test_tolerance_boundary_is_inclusive():
    at_edge = entry("prune_50/keras", 10, 0.95 - 0.01, 0.90 - 0.02)
    assert is_eligible(at_edge, DENSE, RULE)
    below = entry("prune_50/keras", 10, 0.95 - 0.0101, 0.90)
    assert not is_eligible(below, DENSE, RULE)


def test_formats_restrict_the_candidates():
    entries = [DENSE, entry("prune_50/keras", 100, 0.95, 0.90)]
    only_tflite = SelectConfig(formats=("tflite_int8",))
    choice = select_model(entries, only_tflite)
    assert choice.name == BASELINE
    assert choice.fallback and choice.eligible == ()
    assert select_model(entries, RULE).name == "prune_50/keras"


def test_nan_metric_is_never_eligible():
    entries = [DENSE, entry("prune_50/tflite_int8", 10, float("nan"), 0.99)]
    assert select_model(entries, RULE).name == BASELINE


def test_nan_baseline_falls_back_to_dense():
    dense = entry(BASELINE, 1000, float("nan"), 0.9)
    choice = select_model([dense, entry("prune_50/tflite_int8", 10, 0.99, 0.99)], RULE)
    assert choice.name == BASELINE and choice.fallback


def test_ties_prefer_higher_auc_then_name():
    entries = [
        DENSE,
        entry("prune_50/tflite_int8", 100, 0.95, 0.90),
        entry("prune_75/tflite_int8", 100, 0.96, 0.90),
    ]
    assert select_model(entries, RULE).name == "prune_75/tflite_int8"


def test_missing_baseline_is_an_error():
    with pytest.raises(ValueError, match="dense/keras"):
        select_model([entry("prune_50/keras", 1, 0.9, 0.9)], RULE)


def evaluation(target: float, sparsity: float) -> dict:
    def model(fmt: str, gzip: int) -> dict:
        return {
            "name": fmt, "format": fmt, "path": f"model.{fmt}", "size_bytes": 2 * gzip,
            "gzip_bytes": gzip, "threshold": 0.4, "val": {"auc": 0.9, "sensitivity": 0.9},
            "test": {"accuracy": 0.8}, "latency_ms": 1.5,
        }  # fmt: skip

    return {"target_sparsity": target, "sparsity": sparsity,
            "models": [model("keras", 900), model("tflite_int8", 300)]}  # fmt: skip


def test_collect_entries_names_models_by_variant_and_format():
    entries = collect_entries([evaluation(0.0, 0.001), evaluation(0.75, 0.749)])
    assert [e["name"] for e in entries] == [
        "dense/keras", "dense/tflite_int8", "prune_75/keras", "prune_75/tflite_int8",
    ]  # fmt: skip
    pruned = entries[3]
    assert pruned["variant"] == "prune_75" and pruned["target_sparsity"] == 0.75
    assert pruned["sparsity"] == 0.749 and pruned["gzip_bytes"] == 300
    assert pruned["size_bytes"] == 600 and pruned["path"] == "model.tflite_int8"
    assert select_model(entries, RULE).name == "dense/tflite_int8"  # equal metrics, smaller


def test_collect_entries_rejects_duplicates_and_bad_records():
    with pytest.raises(ValueError, match="unique"):
        collect_entries([evaluation(0.5, 0.5), evaluation(0.5, 0.5)])
    with pytest.raises(ValueError, match="target_sparsity"):
        collect_entries([{"models": []}])
