"""Metrics against hand-computed values, threshold rules, inference parity, and the stage."""

from __future__ import annotations

import numpy as np
import pytest

from cycleprune import compression, data, evaluation, models, storage
from cycleprune.config import CompressConfig, Config, EvaluateConfig, ModelConfig

TINY_MODEL = ModelConfig(width=0.125, batch_norm=True)


def _fixed_confusion():
    """Labels and scores giving tn=50, fp=10, fn=5, tp=35 at threshold 0.5."""
    y_true = np.array([0] * 60 + [1] * 40)
    p = np.array([0.1] * 50 + [0.9] * 10 + [0.1] * 5 + [0.9] * 35)
    return y_true, p


def test_compute_metrics_matches_hand_computed_values():
    y_true, p = _fixed_confusion()
    m = evaluation.compute_metrics(y_true, p, 0.5)
    assert m["confusion_matrix"] == [[50, 10], [5, 35]]
    assert m["accuracy"] == pytest.approx(0.85)
    assert m["sensitivity"] == pytest.approx(35 / 40)
    assert m["specificity"] == pytest.approx(50 / 60)
    assert m["precision"] == pytest.approx(35 / 45)
    assert m["f1"] == pytest.approx(2 * 35 / (2 * 35 + 10 + 5))
    # AUC = P(score_pos > score_neg) + P(tie) / 2 over the 40 x 60 pairs:
    # 35*50 wins, 35*10 + 5*50 ties.
    assert m["auc"] == pytest.approx((35 * 50 + 0.5 * (35 * 10 + 5 * 50)) / (40 * 60))
    assert (m["threshold"], m["n"], m["positives"]) == (0.5, 100, 40)


def test_compute_metrics_threshold_is_inclusive_and_auc_is_rank_based():
    y_true = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert evaluation.compute_metrics(y_true, p, 0.5)["auc"] == pytest.approx(0.75)
    at_035 = evaluation.compute_metrics(y_true, p, 0.35)  # p == threshold counts as positive
    assert at_035["confusion_matrix"] == [[1, 1], [0, 2]]
    assert at_035["sensitivity"] == 1.0
    assert at_035["specificity"] == 0.5


def test_compute_metrics_degenerate_cases():
    m = evaluation.compute_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert m["auc"] is None  # undefined with one class
    assert m["confusion_matrix"] == [[3, 0], [0, 0]]
    assert (m["sensitivity"], m["precision"], m["f1"], m["specificity"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(evaluation.EvaluationError, match="same length"):
        evaluation.compute_metrics([0, 1], [0.5], 0.5)
    with pytest.raises(evaluation.EvaluationError, match="binary"):
        evaluation.compute_metrics([0, 2], [0.5, 0.5], 0.5)
    with pytest.raises(evaluation.EvaluationError, match="empty"):
        evaluation.compute_metrics([], [], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        evaluation.compute_metrics([0, 1], [0.2, 0.8], float("nan"))


# Scores of 4 negatives and 4 positives. Positive iff p >= t:
#   t     tp fp  sens spec  J     F1
#   0.9   1  0   .25  1     .25   .4
#   0.8   2  0   .5   1     .5    .667
#   0.7   3  0   .75  1     .75   .857
#   0.6   3  1   .75  .75   .5    .75
#   0.4   4  1   1    .75   .75   .889
#   0.3   4  2   1    .5    .5    .8
RULE_Y = [0, 0, 0, 0, 1, 1, 1, 1]
RULE_P = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]


@pytest.mark.parametrize(
    ("rule", "min_sensitivity", "expected"),
    [
        ("youden", 0.95, 0.4),  # J ties at 0.7 and 0.4; 0.4 is closer to 0.5
        ("f1", 0.95, 0.4),
        ("sensitivity", 0.95, 0.4),
        ("sensitivity", 0.7, 0.7),
        ("sensitivity", 0.5, 0.8),
        ("fixed", 0.95, 0.5),
    ],
)
def test_choose_threshold_rules(rule, min_sensitivity, expected):
    got = evaluation.choose_threshold(RULE_Y, RULE_P, rule, min_sensitivity=min_sensitivity)
    assert got == pytest.approx(expected)


def test_choose_threshold_f1_and_youden_can_differ():
    # 20 easy negatives, 3 negatives at 0.55-0.7 between the positives at 0.5 and 0.9.
    # t=0.9: tp=1 fp=0 -> J = 0.5,            F1 = 2/3
    # t=0.5: tp=2 fp=3 -> J = 1 - 3/23 = 0.87, F1 = 2 * 0.4 * 1 / 1.4 = 0.571
    # F1 ignores true negatives, so it pays more for the false positives than J does.
    y = [0] * 23 + [1, 1]
    p = [0.1] * 20 + [0.55, 0.6, 0.7] + [0.5, 0.9]
    assert evaluation.choose_threshold(y, p, "youden") == pytest.approx(0.5)
    assert evaluation.choose_threshold(y, p, "f1") == pytest.approx(0.9)
    assert evaluation.choose_threshold(y, p, "sensitivity", min_sensitivity=1.0) == 0.5
    assert evaluation.choose_threshold(y, p, "sensitivity", min_sensitivity=0.5) == 0.9


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="rule='median'"):
        evaluation.choose_threshold(RULE_Y, RULE_P, "median")
    with pytest.raises(ValueError, match="min_sensitivity"):
        evaluation.choose_threshold(RULE_Y, RULE_P, "sensitivity", min_sensitivity=0.0)
    with pytest.raises(evaluation.EvaluationError, match="both classes"):
        evaluation.choose_threshold([1, 1], [0.2, 0.9], "youden")
    assert evaluation.choose_threshold([1, 1], [0.2, 0.9], "fixed") == 0.5


def test_roc_points_are_thinned():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 5000), 0, 1)
    roc = evaluation.roc_points(y, p)
    assert 100 < len(roc["fpr"]) <= 200
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"])
    assert (roc["fpr"][0], roc["tpr"][0], roc["thresholds"][0]) == (0.0, 0.0, None)
    assert (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(roc["fpr"]) >= 0)


# ------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="module")
def compressed(tiny_dataset, tmp_path_factory, train_tiny_model):
    folder = tmp_path_factory.mktemp("eval-models")
    train_tiny_model(tiny_dataset).save(folder / "trained.keras")
    out = folder / "compressed"
    config = Config(compress=CompressConfig(representative_samples=32))
    compression.run_compression(str(folder / "trained.keras"), str(tiny_dataset), str(out), config)
    return out


@pytest.fixture(scope="module")
def evaluated(compressed, tiny_dataset, tmp_path_factory, recording_split_reads):
    out = tmp_path_factory.mktemp("eval") / "metrics"
    config = Config(evaluate=EvaluateConfig(latency_runs=3))
    with recording_split_reads() as splits:
        report = evaluation.run_evaluation(str(compressed), str(tiny_dataset), str(out), config)
    return out, report, splits


def test_predict_proba_keras_and_tflite_agree(compressed, tiny_dataset):
    images, _ = data.load_arrays(tiny_dataset, "val")
    model = models.load_model(compressed / "model.keras")
    expected = evaluation.predict_proba(model, images, batch_size=64)
    assert expected.shape == (len(images), 2) and expected.dtype == np.float32
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(expected[:, 1]) > 0.05  # outputs spread, so the argmax check means something
    reference = model(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(expected, reference, atol=1e-5)
    # Path input, odd batch size (a partial last batch), float input: same numbers.
    from_path = evaluation.predict_proba(
        compressed / "model.keras", images.astype(np.float32), batch_size=7
    )
    np.testing.assert_allclose(from_path, expected, atol=1e-5)

    got = evaluation.predict_proba(compressed / "model_float32.tflite", images, batch_size=7)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Dynamic range: int8 weights, activations quantized per batch on the fly, so close, with
    # the odd larger error near the decision boundary.
    got = evaluation.predict_proba(compressed / "model_dynamic.tflite", images, batch_size=7)
    assert got.shape == expected.shape
    assert np.mean(np.abs(got - expected)) < 0.03
    assert np.max(np.abs(got - expected)) < 0.25
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.9
    got = evaluation.predict_proba(compressed / "model_int8.tflite", images, batch_size=32)
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1  # dequantized
    assert np.mean(np.abs(got - expected)) < 0.05
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.9


def test_predict_proba_rejects_bad_input(compressed):
    with pytest.raises(ValueError, match="batch_size"):
        evaluation.predict_proba(
            compressed / "model_float32.tflite", np.zeros((2, 28, 28, 1)), batch_size=0
        )
    with pytest.raises(ValueError, match="images"):
        evaluation.predict_proba(compressed / "model_float32.tflite", np.zeros((0, 28, 28, 1)))
    with pytest.raises(FileNotFoundError):
        evaluation.predict_proba(compressed / "missing.tflite", np.zeros((1, 28, 28, 1)))


def test_measure_latency(compressed, tiny_dataset):
    images, _ = data.load_arrays(tiny_dataset, "test")
    for name in ("model.keras", "model_int8.tflite"):
        ms = evaluation.measure_latency(compressed / name, images[0], runs=3)
        assert 0 < ms < 5_000
    with pytest.raises(ValueError, match="runs"):
        evaluation.measure_latency(compressed / "model_int8.tflite", images[0], runs=0)


def test_run_evaluation_writes_metrics_for_every_format(evaluated, compressed, tiny_dataset):
    out, report, splits = evaluated
    assert sorted(splits) == ["test", "val"]
    assert report == storage.read_json(out / "metrics.json")
    sizes = storage.read_json(compressed / "sizes.json")
    assert report["sparsity"] == sizes["sparsity"]
    assert [m["format"] for m in report["models"]] == [
        "keras",
        "tflite_float32",
        "tflite_dynamic",
        "tflite_int8",
    ]
    recorded = {m["name"]: m for m in sizes["models"]}
    n_test = len(data.load_arrays(tiny_dataset, "test")[1])
    n_val = len(data.load_arrays(tiny_dataset, "val")[1])
    for entry in report["models"]:
        name = entry["name"]
        assert entry["size_bytes"] == recorded[name]["size_bytes"]
        assert entry["gzip_bytes"] == recorded[name]["gzip_bytes"]
        assert np.sum(entry["test"]["confusion_matrix"]) == n_test
        assert np.sum(entry["test_at_0.5"]["confusion_matrix"]) == n_test
        assert np.sum(entry["val"]["confusion_matrix"]) == n_val
        assert entry["test"]["threshold"] == entry["val"]["threshold"] == entry["threshold"]
        assert entry["test_at_0.5"]["threshold"] == 0.5
        assert 0 < len(entry["roc"]["fpr"]) == len(entry["roc"]["tpr"]) <= 200
        assert entry["latency_ms"] > 0
        assert entry["test"]["auc"] is not None and 0 <= entry["test"]["auc"] <= 1
        for kind in ("confusion", "roc"):
            assert (out / f"{kind}_{name}.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "size_vs_accuracy.png").is_file()


def test_run_evaluation_threshold_comes_from_validation(evaluated, compressed, tiny_dataset):
    _, report, _ = evaluated
    images, labels = data.load_arrays(tiny_dataset, "val")
    p = evaluation.predict_proba(compressed / "model.keras", images)[:, 1]
    expected = evaluation.choose_threshold(labels, p, "youden")
    keras_entry = report["models"][0]
    assert keras_entry["threshold"] == pytest.approx(expected)
    assert keras_entry["val"] == evaluation.compute_metrics(labels, p, expected)


def test_run_evaluation_of_a_single_file(compressed, tiny_dataset, tmp_path):
    config = Config(evaluate=EvaluateConfig(latency_runs=1, threshold_rule="fixed"))
    target = compressed / "model_int8.tflite"
    report = evaluation.run_evaluation(str(target), str(tiny_dataset), str(tmp_path / "m"), config)
    (entry,) = report["models"]
    assert entry["format"] == "tflite_int8" and entry["threshold"] == 0.5
    assert entry["size_bytes"] == target.stat().st_size
    assert entry["gzip_bytes"] == compression.gzip_size(target)
    assert report["sparsity"] is None
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        evaluation.run_evaluation(
            str(tmp_path / "notes.txt"), str(tiny_dataset), str(tmp_path / "x"), config
        )
    with pytest.raises(FileNotFoundError):
        evaluation.run_evaluation(
            str(tmp_path / "nope"), str(tiny_dataset), str(tmp_path / "x"), config
        )
