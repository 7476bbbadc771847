"""How far the model family reaches on the test split: seed ensembles and an oracle threshold.

An offline study for issue #7. It reads the dense models that
``python -m benchmarks.quality --dense-only --keep DIR`` leaves (``DIR/seed*/train/model.keras``)
and each seed's prepared dataset (``DIR/seed*/dataset``), then reports:

- **ensembles**: for k = 1 .. n seeds, the mean over every k-subset of the seeds of the
  averaged-probability ensemble: validation AUC, and test accuracy, sensitivity, specificity and
  AUC at the threshold chosen on validation with the rule of ``--preset`` (``evaluate.
  threshold_rule`` and ``evaluate.min_sensitivity``; ``--rule`` to override);
- **oracle**: a diagnostic that reads the test labels to place the threshold, never a selection:
  per model (each seed, and the ensemble of all seeds) the best test accuracy over every
  threshold, and the highest test specificity among the thresholds whose sensitivity meets
  ``--min-sensitivity``. It bounds what any threshold rule chosen on validation could reach;
- **threshold rules**: per rule of :func:`cycleprune.evaluation.choose_threshold` (on
  validation), the test metrics of each seed's model, their mean and the lowest sensitivity;
- **BatchNorm statistics** (``--bn-refit``, a diagnostic of the validation -> test gap): per
  seed, the validation and test AUC as trained, and with every BatchNorm layer's moving
  statistics re-estimated on the train, validation or test images (AdaBN, Li et al. 2016,
  arXiv 1603.04779). Re-estimating on test reads the test images (not their labels) and is never
  a deployable choice: a large test gain would say the gap lies in the per-channel means and
  variances that BatchNorm carries, no gain that it does not.

    python -m benchmarks.quality --preset small --seeds 1 2 3 4 5 --dense-only --keep DIR
    python -m benchmarks.ceiling DIR --out benchmarks/results/ablation/Z_ceiling_small.json
    python -m benchmarks.ceiling DIR --preset best --bn-refit --out ...
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("val", "test")
REFIT_SPLITS = ("train", "val", "test")
TEST_KEYS = ("accuracy", "sensitivity", "specificity", "auc")
_TOLERANCE = 1e-12  # as evaluation.choose_threshold's sensitivity floor


def seed_folders(keep: Path) -> dict[int, Path]:
    """``{seed: folder}`` for every ``seed<N>`` folder under ``keep`` holding a trained model."""
    found = {}
    for folder in keep.glob("seed*"):
        suffix = folder.name[len("seed") :]
        if suffix.isdigit() and (folder / "train" / "model.keras").is_file():
            found[int(suffix)] = folder
    if not found:
        raise FileNotFoundError(
            f"no seed<N>/train/model.keras under {keep}: run benchmarks.quality with --keep {keep}"
        )
    return dict(sorted(found.items()))


def seed_probabilities(
    folders: dict[int, Path], positive: int
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, np.ndarray]]]:
    """Binary labels per split, and each seed's positive-class probabilities per split.

    Raises:
        ValueError: the seeds' datasets disagree on a split's labels (different sources).
    """
    from cycleprune import data, evaluation, models

    labels: dict[str, np.ndarray] = {}
    probs: dict[str, dict[int, np.ndarray]] = {split: {} for split in SPLITS}
    for seed, folder in folders.items():
        path = folder / "train" / "model.keras"
        model = models.load_model(path)
        for split in SPLITS:
            x, y = data.load_arrays(str(folder / "dataset"), split)
            y = (np.asarray(y) == positive).astype(np.int64)
            p = evaluation.predict_proba(model, x)
            if p.shape[1] <= positive:
                raise ValueError(
                    f"--positive-class {positive}: {path} outputs {p.shape[1]} classes"
                )
            if split in labels and not np.array_equal(labels[split], y):
                raise ValueError(
                    f"{folder / 'dataset'}: the {split} labels differ from the other seeds'; "
                    "every seed must be prepared from the same source"
                )
            labels[split] = y
            probs[split][seed] = p[:, positive]
    return labels, probs


def _at_val_threshold(
    labels: dict[str, np.ndarray],
    val: np.ndarray,
    test: np.ndarray,
    rule: str,
    min_sensitivity: float,
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """The pipeline's decision: a threshold chosen on validation, then metrics on both splits."""
    from cycleprune import evaluation

    threshold = evaluation.choose_threshold(
        labels["val"], val, rule, min_sensitivity=min_sensitivity
    )
    return (
        threshold,
        evaluation.compute_metrics(labels["val"], val, threshold),
        evaluation.compute_metrics(labels["test"], test, threshold),
    )


def ensemble_rows(
    labels: dict[str, np.ndarray],
    probs: dict[str, dict[int, np.ndarray]],
    rule: str,
    min_sensitivity: float,
) -> list[dict[str, Any]]:
    """Per ensemble size k, the mean metrics over all k-subsets (threshold from validation)."""

    seeds = sorted(probs["val"])
    rows = []
    for k in range(1, len(seeds) + 1):
        scores = []
        for subset in itertools.combinations(seeds, k):
            val = np.mean([probs["val"][s] for s in subset], axis=0)
            test = np.mean([probs["test"][s] for s in subset], axis=0)
            _, on_val, on_test = _at_val_threshold(labels, val, test, rule, min_sensitivity)
            scores.append({"val_auc": on_val["auc"], **{key: on_test[key] for key in TEST_KEYS}})
        rows.append(
            {
                "k": k,
                "subsets": len(scores),
                "val_auc": statistics.fmean(s["val_auc"] for s in scores),
                "test": {key: statistics.fmean(s[key] for s in scores) for key in TEST_KEYS},
            }
        )
    return rows


def rule_rows(
    labels: dict[str, np.ndarray],
    probs: dict[str, dict[int, np.ndarray]],
    rules: list[tuple[str, float]],
) -> list[dict[str, Any]]:
    """Per ``(rule, min_sensitivity)``: each seed's test metrics at its validation threshold."""

    rows = []
    for rule, min_sensitivity in rules:
        per_seed = {}
        for seed, val in probs["val"].items():
            threshold, _, on_test = _at_val_threshold(
                labels, val, probs["test"][seed], rule, min_sensitivity
            )
            per_seed[seed] = {"threshold": threshold, **{k: on_test[k] for k in TEST_KEYS}}
        rows.append(
            {
                "rule": rule,
                "min_sensitivity": min_sensitivity if rule == "sensitivity" else None,
                "per_seed": per_seed,
                "test": {k: statistics.fmean(m[k] for m in per_seed.values()) for k in TEST_KEYS},
                "lowest_sensitivity": min(m["sensitivity"] for m in per_seed.values()),
            }
        )
    return rows


def oracle(y_true: np.ndarray, p_positive: np.ndarray, min_sensitivity: float) -> dict[str, Any]:
    """Test metrics at thresholds placed with the test labels (a bound, not a selection)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, thresholds = roc_curve(y_true, p_positive, drop_intermediate=False)
    positives = int(np.sum(y_true == 1))
    negatives = len(y_true) - positives
    accuracy = (tpr * positives + (1 - fpr) * negatives) / len(y_true)
    best = int(np.argmax(accuracy))
    meets = tpr >= min_sensitivity - _TOLERANCE
    return {
        "auc": float(roc_auc_score(y_true, p_positive)),
        "best_accuracy": float(accuracy[best]),
        "at_best_accuracy": {
            # roc_curve's first threshold is inf: nothing called positive (no finite cut-off).
            "threshold": float(thresholds[best]) if np.isfinite(thresholds[best]) else None,
            "sensitivity": float(tpr[best]),
            "specificity": float(1 - fpr[best]),
        },
        "max_specificity_at_min_sensitivity": float(np.max(1 - fpr[meets])),
    }


def oracle_rows(
    labels: dict[str, np.ndarray], probs: dict[str, dict[int, np.ndarray]], min_sensitivity: float
) -> list[dict[str, Any]]:
    """:func:`oracle` for each seed's model, and for the ensemble of all seeds."""
    test = probs["test"]
    rows = [
        {"models": f"seed {s}", **oracle(labels["test"], p, min_sensitivity)}
        for s, p in test.items()
    ]
    if len(test) > 1:
        mean = np.mean(list(test.values()), axis=0)
        rows.append(
            {"models": f"ensemble of {len(test)}", **oracle(labels["test"], mean, min_sensitivity)}
        )
    return rows


def refit_batchnorm(model: Any, images: np.ndarray, *, batch_size: int = 256, seed: int = 0) -> Any:
    """Re-estimate every BatchNorm layer's moving statistics on ``images``, in place.

    The images run through the model in training mode, in shuffled chunks of ``batch_size`` (the
    last one smaller; a last chunk of one image joins the one before, as one value has no
    variance on a 1x1 map). Each layer's moving mean becomes the image-weighted mean of the
    chunks' means, and its moving variance that of the chunks' variances (each Bessel-corrected,
    as BatchNorm's own update): the spread of the chunk means is left out, as in PreciseBN and
    ``torch.optim.swa_utils.update_bn``. The weights and each layer's momentum are kept.

    Raises:
        ValueError: ``batch_size`` is under 1, ``images`` is empty, or the model has no
            BatchNormalization layer.
    """
    from cycleprune.compat import keras

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Argument `batch_size` must be an int >= 1. Received: {batch_size=}")
    if len(images) == 0:
        raise ValueError("no images to estimate the BatchNorm statistics on")
    norms = [m for m in model.submodules if isinstance(m, keras.layers.BatchNormalization)]
    if not norms:
        raise ValueError(f"model {model.name!r} has no BatchNormalization layer to refit")
    bounds = [*range(0, len(images), batch_size), len(images)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        del bounds[-2]
    momenta = [layer.momentum for layer in norms]
    order = np.random.default_rng(seed).permutation(len(images))
    seen = 0
    try:
        for start, stop in itertools.pairwise(bounds):
            chunk = np.asarray(images[order[start:stop]], dtype=np.float32)
            for layer in norms:  # moving = (seen * moving + n * chunk's) / (seen + n)
                layer.momentum = seen / (seen + len(chunk))
            model(chunk, training=True)
            seen += len(chunk)
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
    return model


def bn_refit_rows(folders: dict[int, Path], positive: int) -> list[dict[str, Any]]:
    """Per seed: val and test AUC as trained, and after :func:`refit_batchnorm` on each split.

    Raises:
        ValueError: a seed's model has no BatchNormalization layer (the message names its file).
    """
    from sklearn.metrics import roc_auc_score

    from cycleprune import data, evaluation, models

    rows = []
    for seed, folder in folders.items():
        path = folder / "train" / "model.keras"
        arrays = {s: data.load_arrays(str(folder / "dataset"), s) for s in REFIT_SPLITS}
        row: dict[str, Any] = {"seed": seed}
        for source in (None, *REFIT_SPLITS):
            model = models.load_model(path)
            if source is not None:
                try:
                    refit_batchnorm(model, arrays[source][0], seed=seed)
                except ValueError as err:
                    raise ValueError(f"--bn-refit: {path}: {err}") from None
            row[source or "as_trained"] = {}
            for split in SPLITS:
                x, y = arrays[split]
                p = evaluation.predict_proba(model, x)
                if p.shape[1] <= positive:
                    raise ValueError(
                        f"--positive-class {positive}: {path} outputs {p.shape[1]} classes"
                    )
                auc = roc_auc_score(np.asarray(y) == positive, p[:, positive])
                row[source or "as_trained"][split] = float(auc)
        rows.append(row)
    return rows


def _rule_name(rule: str, floor: float | None) -> str:
    return rule if floor is None else f"{rule} >= {floor:g}"


def render(result: dict[str, Any]) -> str:
    """The Markdown tables of a result."""
    lines = [
        f"Ensembles of the dense models in `{result['keep']}` (seeds "
        f"{', '.join(map(str, result['seeds']))}); threshold from validation "
        f"({_rule_name(result['threshold_rule'], result['rule_min_sensitivity'])}), metrics on "
        "test, means over every subset of k seeds:",
        "",
        "| k | subsets | val AUC | test acc | test AUC | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["ensembles"]:
        t = row["test"]
        lines.append(
            f"| {row['k']} | {row['subsets']} | {row['val_auc']:.4f} | {t['accuracy']:.3f} | "
            f"{t['auc']:.4f} | {t['sensitivity']:.3f} | {t['specificity']:.3f} |"
        )
    floor = result["min_sensitivity"]
    lines += [
        "",
        "Oracle thresholds (placed with the test labels: a bound, never a selection):",
        "",
        f"| models | test AUC | best test acc | its sensitivity / specificity | max specificity "
        f"with sensitivity >= {floor:g} |",
        "|---|---|---|---|---|",
    ]
    for row in result["oracle"]:
        at = row["at_best_accuracy"]
        lines.append(
            f"| {row['models']} | {row['auc']:.4f} | {row['best_accuracy']:.3f} | "
            f"{at['sensitivity']:.3f} / {at['specificity']:.3f} | "
            f"{row['max_specificity_at_min_sensitivity']:.3f} |"
        )
    lines += [
        "",
        "Threshold rules (on validation), each seed's model on test, means over seeds:",
        "",
        "| rule | test acc | sensitivity (lowest) | specificity | thresholds |",
        "|---|---|---|---|---|",
    ]
    for row in result["threshold_rules"]:
        t = row["test"]
        name = _rule_name(row["rule"], row["min_sensitivity"])
        thresholds = ", ".join(f"{m['threshold']:.3f}" for m in row["per_seed"].values())
        lines.append(
            f"| {name} | {t['accuracy']:.3f} | {t['sensitivity']:.3f} "
            f"({row['lowest_sensitivity']:.3f}) | {t['specificity']:.3f} | {thresholds} |"
        )
    if result.get("bn_refit"):
        lines += [
            "",
            "BatchNorm statistics re-estimated on a split (a diagnostic: on test it reads the test "
            "images), each seed's model:",
            "",
            "| seed | statistics from | val AUC | test AUC |",
            "|---|---|---|---|",
        ]
        for row in result["bn_refit"]:
            for source in ("as_trained", *REFIT_SPLITS):
                auc = row[source]
                name = "training (as trained)" if source == "as_trained" else f"{source} images"
                lines.append(f"| {row['seed']} | {name} | {auc['val']:.4f} | {auc['test']:.4f} |")
    return "\n".join(lines) + "\n"


def _rule(text: str, default_floor: float) -> tuple[str, float]:
    """``"youden"`` -> ``("youden", default_floor)``; ``"sensitivity:0.97"`` -> its floor.

    Raises:
        ValueError: an unknown rule, a floor on a rule other than ``sensitivity``, or a floor
            that is not a number in (0, 1]; the message names the text.
    """
    from cycleprune.config import THRESHOLD_RULES

    rule, colon, floor = text.partition(":")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"{text!r}: the rule must be one of {', '.join(THRESHOLD_RULES)}")
    if not colon:
        return rule, default_floor
    if rule != "sensitivity":
        raise ValueError(f"{text!r}: only the sensitivity rule takes a floor (sensitivity:MIN)")
    return rule, _floor(floor, text)


def _floor(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what!r}: {value!r} is not a number") from None
    if not 0 < number <= 1:
        raise ValueError(f"{what!r}: the sensitivity floor must be in (0, 1], not {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    from cycleprune.config import preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keep", type=Path, help="a benchmarks.quality --keep folder")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    parser.add_argument("--what", default="", help="a sentence on what was run, kept in the JSON")
    parser.add_argument("--preset", default="small", help="whose threshold rule the ensembles use")
    parser.add_argument("--rule", help="the ensembles' rule instead: RULE or sensitivity:MIN")
    parser.add_argument("--positive-class", type=int, help="default: the preset's")
    parser.add_argument(
        "--min-sensitivity", default="0.97", help="the oracle's sensitivity floor, in (0, 1]"
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        default=["youden", "f1", "sensitivity:0.95", "sensitivity:0.97"],
        help="threshold rules to compare: RULE or sensitivity:MIN",
    )
    parser.add_argument(
        "--bn-refit",
        action="store_true",
        help="also score each model with its BatchNorm statistics re-estimated per split",
    )
    args = parser.parse_args(argv)
    settings = preset(args.preset).evaluate
    rule, rule_floor = (settings.threshold_rule, settings.min_sensitivity)
    if args.rule:
        rule, rule_floor = _rule(args.rule, settings.min_sensitivity)
    oracle_floor = _floor(args.min_sensitivity, "--min-sensitivity")
    positive = settings.positive_class if args.positive_class is None else args.positive_class
    compare = [_rule(text, settings.min_sensitivity) for text in args.compare]

    folders = seed_folders(args.keep)
    # Refit first: a model without BatchNorm (the `seed` preset's) fails at once, not last.
    bn_rows = bn_refit_rows(folders, positive) if args.bn_refit else None
    labels, probs = seed_probabilities(folders, positive)
    result = {
        "schema": 1,
        "study": "ceiling",
        "what": args.what,
        "keep": str(args.keep),
        "seeds": list(folders),
        "preset": args.preset,
        "threshold_rule": rule,
        "rule_min_sensitivity": rule_floor if rule == "sensitivity" else None,
        "positive_class": positive,
        "min_sensitivity": oracle_floor,
        "ensembles": ensemble_rows(labels, probs, rule, rule_floor),
        "oracle": oracle_rows(labels, probs, oracle_floor),
        "threshold_rules": rule_rows(labels, probs, compare),
    }
    if bn_rows is not None:
        result["bn_refit"] = bn_rows
    print(render(result), end="")
    if args.out:
        from cycleprune import storage

        storage.atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
