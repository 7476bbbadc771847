"""Held-out evaluation of every exported model: metrics, decision threshold, ROC, latency.

A screening classifier is judged by its sensitivity (recall of the positive class, pneumonia) and
specificity (recall of the negative class) at a decision threshold, and by the threshold-free ROC
AUC. The threshold is chosen on the validation split (:func:`choose_threshold`) and then applied,
unchanged, to the test split, which is read only by :func:`run_evaluation`. The metrics come from
scikit-learn.

Predicted positive iff ``p_positive >= threshold`` (as in ``sklearn.metrics.roc_curve``).
For more than two classes the evaluation is one-vs-rest on ``config.evaluate.positive_class``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import plots, storage
from cycleprune.config import THRESHOLD_RULES, Config

_MAX_ROC_POINTS = 200
_FIXED_THRESHOLD = 0.5
_LATENCY_WARMUP = 3
_SIZES_FILE = "sizes.json"
_METRICS_FILE = "metrics.json"


class EvaluationError(ValueError):
    """Data that cannot be evaluated (e.g. a split holding a single class, mismatched lengths)."""


# --------------------------------------------------------------------------------------------
# Metrics and thresholds (pure)


def _binary_inputs(y_true: Any, p_positive: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(p_positive, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise EvaluationError("Cannot evaluate an empty set: y_true has no labels.")
    if y.shape != p.shape:
        raise EvaluationError(
            f"y_true and p_positive must have the same length. Received: {y.size} and {p.size}"
        )
    if not np.isin(y, (0, 1)).all():
        raise EvaluationError(
            f"y_true must be binary (0/1). Received values: {np.unique(y)[:10].tolist()}"
        )
    if not np.isfinite(p).all():
        raise EvaluationError("p_positive holds NaN or infinite values.")
    return y.astype(np.int64), p


def compute_metrics(y_true: Any, p_positive: Any, threshold: float) -> dict[str, Any]:
    """Binary classification metrics at a decision threshold, via scikit-learn.

    Predicted positive iff ``p_positive >= threshold``. With the confusion matrix
    ``[[tn, fp], [fn, tp]]``:

    - accuracy = (tp + tn) / n
    - sensitivity (recall, TPR) = tp / (tp + fn)
    - specificity (TNR) = tn / (tn + fp)
    - precision (PPV) = tp / (tp + fp)
    - f1 = 2 * precision * sensitivity / (precision + sensitivity)
    - auc = area under the ROC curve of ``p_positive`` (threshold-free)

    A ratio with a zero denominator is 0.0 (scikit-learn's ``zero_division=0``); the AUC is
    ``None`` when ``y_true`` holds a single class.

    Args:
        y_true: Labels, 1 = positive, 0 = negative.
        p_positive: Probability of the positive class, one per label.
        threshold: Decision threshold.

    Returns:
        ``{"accuracy", "sensitivity", "specificity", "precision", "f1", "auc",
        "confusion_matrix": [[tn, fp], [fn, tp]], "threshold", "n", "positives"}``.

    Raises:
        EvaluationError: empty or mismatched inputs, non-binary labels, non-finite scores.
        ValueError: a non-finite threshold.
    """
    from sklearn import metrics

    if not math.isfinite(threshold):
        raise ValueError(f"Argument `threshold` must be finite. Received: threshold={threshold}")
    y, p = _binary_inputs(y_true, p_positive)
    y_pred = (p >= threshold).astype(np.int64)
    cm = metrics.confusion_matrix(y, y_pred, labels=[0, 1])
    both_classes = np.unique(y).size == 2
    return {
        "accuracy": float(metrics.accuracy_score(y, y_pred)),
        "sensitivity": float(metrics.recall_score(y, y_pred, pos_label=1, zero_division=0)),
        "specificity": float(metrics.recall_score(y, y_pred, pos_label=0, zero_division=0)),
        "precision": float(metrics.precision_score(y, y_pred, pos_label=1, zero_division=0)),
        "f1": float(metrics.f1_score(y, y_pred, pos_label=1, zero_division=0)),
        "auc": float(metrics.roc_auc_score(y, p)) if both_classes else None,
        "confusion_matrix": cm.astype(int).tolist(),
        "threshold": float(threshold),
        "n": int(y.size),
        "positives": int(y.sum()),
    }


def _closest_to_half(thresholds: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the best score; ties (within float noise) go to the one nearest 0.5."""
    best = np.isclose(scores, scores.max(), rtol=0.0, atol=1e-12)
    candidates = thresholds[best]
    return float(candidates[np.argmin(np.abs(candidates - _FIXED_THRESHOLD))])


def choose_threshold(
    y_true: Any, p_positive: Any, rule: str, *, min_sensitivity: float = 0.95
) -> float:
    """Choose the decision threshold on validation data.

    Candidate thresholds are the distinct scores (``sklearn.metrics.roc_curve`` with
    ``drop_intermediate=False``), each meaning "positive iff p >= threshold". Rules:

    - ``youden``: maximise Youden's J = sensitivity + specificity - 1 = TPR - FPR
      (Youden 1950, "Index for rating diagnostic tests"); ties go to the threshold closest to 0.5;
    - ``f1``: maximise F1 of the positive class; ties go to the threshold closest to 0.5;
    - ``sensitivity``: the highest threshold whose sensitivity is >= ``min_sensitivity`` (the most
      specific operating point that still meets the sensitivity target);
    - ``fixed``: 0.5.

    Use validation data only: a threshold tuned on the test split biases the test metrics.

    Args:
        y_true: Labels, 1 = positive, 0 = negative.
        p_positive: Probability of the positive class.
        rule: ``"youden"``, ``"f1"``, ``"sensitivity"`` or ``"fixed"``.
        min_sensitivity: Target of the ``sensitivity`` rule, in (0, 1].

    Returns:
        The threshold, a float in [0, 1] for probabilities.

    Raises:
        ValueError: an unknown rule or ``min_sensitivity`` outside (0, 1].
        EvaluationError: bad inputs, or labels of a single class (no rule but ``fixed`` applies).
    """
    from sklearn import metrics

    if rule not in THRESHOLD_RULES:
        raise ValueError(
            f"Argument `rule` must be one of {', '.join(THRESHOLD_RULES)}. Received: rule={rule!r}"
        )
    if not 0 < min_sensitivity <= 1:
        raise ValueError(
            f"Argument `min_sensitivity` must be in (0, 1]. Received: {min_sensitivity=}"
        )
    if rule == "fixed":
        return _FIXED_THRESHOLD
    y, p = _binary_inputs(y_true, p_positive)
    if np.unique(y).size < 2:
        raise EvaluationError(
            f"Threshold rule {rule!r} needs both classes in the validation labels. "
            f"Received: only class {int(y[0])} ({y.size} labels)"
        )
    if rule == "f1":
        precision, recall, thresholds = metrics.precision_recall_curve(y, p)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        return _closest_to_half(thresholds, f1)
    fpr, tpr, thresholds = metrics.roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first point (inf) predicts nothing positive
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        return _closest_to_half(thresholds, tpr - fpr)
    # rule == "sensitivity": thresholds decrease, so tpr only grows; the first hit is the highest.
    meets = np.flatnonzero(tpr >= min_sensitivity - 1e-12)
    return float(thresholds[meets[0]])


def roc_points(
    y_true: Any, p_positive: Any, max_points: int = _MAX_ROC_POINTS
) -> dict[str, list[Any]]:
    """ROC curve points, thinned to at most ``max_points`` (first and last kept).

    Returns:
        ``{"fpr": [...], "tpr": [...], "thresholds": [...]}``; the first threshold, infinite in
        scikit-learn (nothing predicted positive), is written as ``None`` to stay valid JSON.
        Empty lists when ``y_true`` holds a single class.
    """
    from sklearn import metrics

    y, p = _binary_inputs(y_true, p_positive)
    if np.unique(y).size < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thresholds = metrics.roc_curve(y, p, drop_intermediate=True)
    if fpr.size > max_points:
        keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max_points)).astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return {
        "fpr": fpr.astype(float).tolist(),
        "tpr": tpr.astype(float).tolist(),
        "thresholds": [float(t) if np.isfinite(t) else None for t in thresholds],
    }


# --------------------------------------------------------------------------------------------
# Inference


def _is_tflite(model_or_path: Any) -> bool:
    return isinstance(model_or_path, (str, os.PathLike)) and Path(model_or_path).suffix == ".tflite"


def _interpreter(path: str | os.PathLike) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    if not Path(path).is_file():
        raise FileNotFoundError(f"No TFLite model at {path}")
    return Interpreter(model_path=str(path), num_threads=1)


def _quantize_input(batch: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float pixels -> the input tensor's dtype (raw uint8 pixels when scale 1, zero point 0)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return batch.astype(dtype)
    scale, zero_point = detail["quantization"]
    if scale:
        batch = np.round(batch.astype(np.float64) / scale + zero_point)
    info = np.iinfo(dtype)
    return np.clip(batch, info.min, info.max).astype(dtype)


def _dequantize_output(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * (scale or 1.0)).astype(np.float32)


def _tflite_run(interpreter: Any, batch: np.ndarray, shape: list[int] | None) -> np.ndarray:
    inp = interpreter.get_input_details()[0]
    if shape != list(batch.shape):
        interpreter.resize_tensor_input(inp["index"], list(batch.shape), strict=False)
        interpreter.allocate_tensors()
        inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], _quantize_input(batch, inp))
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    return _dequantize_output(interpreter.get_tensor(out["index"]), out)


def _as_probabilities(outputs: np.ndarray) -> np.ndarray:
    outputs = np.asarray(outputs, dtype=np.float32)
    outputs = outputs.reshape(outputs.shape[0], -1)
    if outputs.shape[1] == 1:  # a single sigmoid unit: P(class 1)
        outputs = np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs


def _check_images(images: Any) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(
            "Argument `images` must be a non-empty [N, H, W, C] array. "
            f"Received: shape={array.shape}"
        )
    return array


def _load_keras(model_or_path: Any) -> Any:
    if isinstance(model_or_path, (str, os.PathLike)):
        from cycleprune import models

        return models.load_model(str(model_or_path))
    return model_or_path


_KERAS_CALLS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _keras_call(model: Any) -> Any:
    """One inference-mode ``tf.function`` per model, traced once for any batch size."""
    call = _KERAS_CALLS.get(model)
    if call is None:
        from cycleprune.compat import tf

        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        ref = weakref.ref(model)  # the cache must not keep its key alive
        call = tf.function(lambda x: ref()(x, training=False), input_signature=[spec])
        _KERAS_CALLS[model] = call
    return call


def predict_proba(model_or_path: Any, images: Any, *, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of a Keras model or a TFLite file.

    Images are given as stored (uint8, or float 0..255); models rescale inside. A Keras model
    runs as one compiled ``tf.function`` (inference mode) per batch. A ``.tflite`` file runs in the
    LiteRT interpreter (``ai_edge_litert``, 1 thread), its input resized to the batch; a uint8
    input is fed the quantized pixels (the raw pixels for the int8 models written by
    :func:`cycleprune.compression.convert_tflite`, whose input scale is 1 and zero point 0) and a
    quantized output is dequantized with its scale and zero point.

    Args:
        model_or_path: A ``keras.Model``, a ``.keras`` path, or a ``.tflite`` path.
        images: ``[N, H, W, C]`` (or ``[N, H, W]``) pixels 0..255.
        batch_size: Images per call.

    Returns:
        float32 probabilities ``[N, K]`` (a single sigmoid output becomes ``[1 - p, p]``).

    Raises:
        ValueError: bad ``images`` or ``batch_size``, or an unloadable model.
        FileNotFoundError: a missing model file.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Argument `batch_size` must be an int >= 1. Received: {batch_size=}")
    images = _check_images(images)
    outputs = []
    if _is_tflite(model_or_path):
        interpreter = _interpreter(model_or_path)
        shape = None
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            outputs.append(_tflite_run(interpreter, batch, shape))
            shape = list(batch.shape)
    else:
        model = _load_keras(model_or_path)  # held here: the cached call refers to it weakly
        call = _keras_call(model)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            outputs.append(call(batch).numpy())
    return _as_probabilities(np.concatenate(outputs, axis=0))


def measure_latency(model_or_path: Any, image: Any, runs: int) -> float:
    """Median wall time of one batch-1 prediction, in milliseconds.

    A few untimed warm-up calls come first (graph tracing, memory planning). TFLite models run
    on 1 thread; Keras models as a compiled ``tf.function``. Times include copying the input in
    and the output out.

    Args:
        model_or_path: A ``keras.Model``, a ``.keras`` path, or a ``.tflite`` path.
        image: One image ``[H, W, C]`` (or a batch of one).
        runs: Timed calls (>= 1).

    Returns:
        The median latency in ms.

    Raises:
        ValueError: ``runs`` < 1 or a bad image.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"Argument `runs` must be an int >= 1. Received: {runs=}")
    array = np.asarray(image)
    if array.ndim in (2, 3):
        array = array.reshape((1, *array.shape) if array.ndim == 3 else (1, *array.shape, 1))
    batch = _check_images(array)[:1].astype(np.float32)
    if _is_tflite(model_or_path):
        interpreter = _interpreter(model_or_path)
        _tflite_run(interpreter, batch, None)
        shape = list(batch.shape)

        def once() -> None:
            _tflite_run(interpreter, batch, shape)

    else:
        model = _load_keras(model_or_path)  # held here: the cached call refers to it weakly
        call = _keras_call(model)

        def once() -> None:
            call(batch).numpy()

    for _ in range(_LATENCY_WARMUP):
        once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


# --------------------------------------------------------------------------------------------
# The stage


def _format_of(path: Path) -> str:
    if path.suffix == ".tflite":
        stem = path.stem.removeprefix("model_")
        return f"tflite_{stem}"
    if path.suffix == ".keras":
        return "keras"
    raise ValueError(f"Cannot evaluate {path}: expected a .keras or .tflite file")


def _candidates(model_dir_or_path: str | os.PathLike) -> tuple[list[dict[str, Any]], Any]:
    """Models to evaluate (name, format, absolute path, sizes) and the recorded sparsity."""
    root = Path(model_dir_or_path)
    if not root.exists():
        raise FileNotFoundError(f"Nothing to evaluate at {root}")
    if root.is_file():
        fmt = _format_of(root)
        return [{"name": fmt, "format": fmt, "file": root, "path": root.name}], None
    sizes_file = root / _SIZES_FILE
    if sizes_file.exists():
        sizes = storage.read_json(sizes_file)
        found = []
        for entry in sizes.get("models", []):
            if entry.get("format") == "saved_model":
                continue
            found.append({**entry, "file": root / entry["path"]})
        return found, sizes.get("sparsity")
    files = sorted(root.glob("*.keras")) + sorted(root.glob("model_*.tflite"))
    if not files:
        raise FileNotFoundError(f"No sizes.json, .keras or model_*.tflite file in {root}")
    found = []
    for file in files:
        fmt = _format_of(file)
        name = fmt if fmt != "keras" or file.stem == "model" else f"keras_{file.stem}"
        found.append({"name": name, "format": fmt, "file": file, "path": file.name})
    return found, None


def _binary_view(labels: np.ndarray, probs: np.ndarray, positive: int) -> tuple[Any, Any]:
    if probs.shape[1] <= positive:
        raise EvaluationError(
            f"evaluate.positive_class={positive} but the model outputs {probs.shape[1]} classes"
        )
    return (np.asarray(labels).reshape(-1) == positive).astype(np.int64), probs[:, positive]


def _class_labels(class_names: Sequence[str], positive: int) -> list[str]:
    if len(class_names) == 2:
        return (
            [str(n) for n in class_names]
            if positive == 1
            else [str(class_names[1]), str(class_names[0])]
        )
    return [f"not {class_names[positive]}", str(class_names[positive])]


def run_evaluation(
    model_dir_or_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Config,
) -> dict[str, Any]:
    """Evaluate each exported model on the test split, at a threshold chosen on validation.

    For a compression output folder, every model of its ``sizes.json`` but the SavedModel is
    evaluated (the ``.keras`` model and each ``model_*.tflite``); a folder without ``sizes.json``
    contributes its ``.keras`` and ``model_*.tflite`` files; a single file is evaluated alone.
    Per model: probabilities on val and test (:func:`predict_proba`), the threshold from
    ``config.evaluate.threshold_rule`` on val (:func:`choose_threshold`), metrics on val and on
    test at that threshold and on test at 0.5 (:func:`compute_metrics`), test ROC points (at most
    200), batch-1 latency (``config.evaluate.latency_runs``), sizes (from ``sizes.json`` or
    measured). This is the only place that reads the test split.

    Writes, atomically, into ``out_dir`` (replaced if it exists): ``metrics.json``
    ``{"sparsity", "threshold_rule", "positive_class", "class_names", "models": [{"name",
    "format", "path", "size_bytes", "gzip_bytes", "threshold", "val", "test", "test_at_0.5",
    "roc": {"fpr", "tpr", "thresholds"}, "latency_ms"}]}``, and per model
    ``confusion_<name>.png`` (test, chosen threshold) and ``roc_<name>.png``, plus
    ``size_vs_accuracy.png``.

    Args:
        model_dir_or_path: A compression output folder, or one ``.keras``/``.tflite`` file.
        dataset_dir: The prepared dataset (val and test splits).
        out_dir: Output folder.
        config: The run configuration (``evaluate`` section).

    Returns:
        The ``metrics.json`` content.

    Raises:
        FileNotFoundError: no model to evaluate.
        EvaluationError: a split holding a single class (threshold rules but ``fixed``), or a
            positive class the model does not output.
        cycleprune.data.DataError: unreadable splits.
    """
    from cycleprune import compression, data

    settings = config.evaluate
    candidates, sparsity = _candidates(model_dir_or_path)
    info = data.load_info(str(dataset_dir), verify=True)
    if settings.positive_class >= info.num_classes:
        raise EvaluationError(
            f"evaluate.positive_class={settings.positive_class} but the dataset has "
            f"{info.num_classes} classes {list(info.class_names)}"
        )
    val_x, val_y = data.load_arrays(str(dataset_dir), "val")
    test_x, test_y = data.load_arrays(str(dataset_dir), "test")
    labels = _class_labels(info.class_names, settings.positive_class)
    results = []
    with storage.atomic_dir(out_dir, replaces=_METRICS_FILE) as tmp:
        for candidate in candidates:
            file = Path(candidate["file"])
            model = file if file.suffix == ".tflite" else _load_keras(file)
            if sparsity is None and not isinstance(model, Path):
                stripped = compression.strip_if_pruned(model)
                sparsity = compression.kernel_sparsity(stripped)["sparsity"]
            yv, pv = _binary_view(val_y, predict_proba(model, val_x), settings.positive_class)
            yt, pt = _binary_view(test_y, predict_proba(model, test_x), settings.positive_class)
            threshold = choose_threshold(
                yv, pv, settings.threshold_rule, min_sensitivity=settings.min_sensitivity
            )
            test = compute_metrics(yt, pt, threshold)
            roc = roc_points(yt, pt)
            name = candidate["name"]
            results.append(
                {
                    "name": name,
                    "format": candidate["format"],
                    "path": str(candidate.get("path", file.name)),
                    "size_bytes": candidate.get("size_bytes") or storage.tree_size(file),
                    "gzip_bytes": candidate.get("gzip_bytes") or compression.gzip_size(file),
                    "threshold": threshold,
                    "val": compute_metrics(yv, pv, threshold),
                    "test": test,
                    "test_at_0.5": compute_metrics(yt, pt, _FIXED_THRESHOLD),
                    "roc": roc,
                    "latency_ms": measure_latency(model, test_x[0], settings.latency_runs),
                }
            )
            plots.plot_confusion(test["confusion_matrix"], labels, tmp / f"confusion_{name}.png")
            plots.plot_roc(
                roc["fpr"] or [0.0, 1.0],
                roc["tpr"] or [0.0, 1.0],
                test["auc"],
                tmp / f"roc_{name}.png",
            )
        plots.plot_size_vs_accuracy(
            [
                {
                    "name": r["name"],
                    "gzip_bytes": r["gzip_bytes"],
                    "accuracy": r["test"]["accuracy"],
                }
                for r in results
            ],
            tmp / "size_vs_accuracy.png",
        )
        report = {
            "sparsity": sparsity,
            "threshold_rule": settings.threshold_rule,
            "positive_class": settings.positive_class,
            "class_names": list(info.class_names),
            "models": results,
        }
        storage.atomic_write_json(tmp / _METRICS_FILE, report)
    return report
