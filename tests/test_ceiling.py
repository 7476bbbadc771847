"""benchmarks.ceiling: seed ensembles at a validation threshold, and oracle test thresholds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks import ceiling


def test_oracle_on_hand_computed_scores():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])
    out = ceiling.oracle(y, p, min_sensitivity=1.0)
    # Pairs (positive, negative) ranked right: (0.4 > 0.1), (0.9 > 0.1), (0.9 > 0.6); not 0.4 < 0.6.
    assert out["auc"] == pytest.approx(0.75)
    # Best cut: p >= 0.9 or p >= 0.4 (3 of 4 right); never all four.
    assert out["best_accuracy"] == pytest.approx(0.75)
    # Sensitivity 1 needs p >= 0.4, which calls 0.6 positive: specificity 1/2.
    assert out["max_specificity_at_min_sensitivity"] == pytest.approx(0.5)


def test_ensembles_average_probabilities_over_every_subset():
    labels = {"val": np.array([0, 0, 1, 1]), "test": np.array([0, 0, 1, 1])}
    # Each seed misranks one test pair; their mean ranks all test pairs right.
    probs = {
        "val": {1: np.array([0.1, 0.2, 0.8, 0.9]), 2: np.array([0.1, 0.2, 0.8, 0.9])},
        "test": {1: np.array([0.1, 0.7, 0.6, 0.9]), 2: np.array([0.5, 0.1, 0.9, 0.4])},
    }
    rows = ceiling.ensemble_rows(labels, probs, "youden", 0.95)
    assert [(r["k"], r["subsets"]) for r in rows] == [(1, 2), (2, 1)]
    assert rows[0]["val_auc"] == pytest.approx(1.0)
    assert rows[0]["test"]["auc"] == pytest.approx(0.75)  # both seeds: 3 of 4 pairs
    # The mean: [0.3, 0.4, 0.75, 0.65] separates the classes.
    assert rows[1]["test"]["auc"] == pytest.approx(1.0)
    # Youden on val: any cut in (0.2, 0.8]; ties go nearest 0.5 -> 0.8 is the only distinct
    # candidate with J = 1, so the mean's test scores 0.75 and 0.65 are called normal.
    assert rows[1]["test"]["sensitivity"] == pytest.approx(0.0)
    assert rows[1]["test"]["specificity"] == pytest.approx(1.0)


def test_seed_folders_names_the_folder_without_models(tmp_path):
    (tmp_path / "seed1" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ceiling.seed_folders(tmp_path)


@pytest.fixture(scope="module")
def keep(tiny_dataset, train_tiny_model, tmp_path_factory):
    """A benchmarks.quality --keep folder of two seeds' dense models on the tiny dataset."""
    from cycleprune import training

    root = tmp_path_factory.mktemp("keep")
    for seed in (1, 2):
        folder = root / f"seed{seed}"
        shutil.copytree(tiny_dataset, folder / "dataset")
        training.save_model(
            train_tiny_model(tiny_dataset, seed=seed), folder / "train" / "model.keras"
        )
    (root / "seed3").mkdir()  # a seed whose training did not finish: skipped
    return root


def test_main_matches_the_pipelines_evaluation_per_seed(keep, tmp_path, capsys):
    from cycleprune import data, evaluation, models

    out = tmp_path / "ceiling.json"
    assert ceiling.main([str(keep), "--out", str(out), "--what", "two tiny seeds"]) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == [1, 2] and result["what"] == "two tiny seeds"
    assert [r["models"] for r in result["oracle"]] == ["seed 1", "seed 2", "ensemble of 2"]

    # k = 1 is the mean of the pipeline's own evaluation of each seed's model.
    vx, vy = data.load_arrays(str(keep / "seed1" / "dataset"), "val")
    tx, ty = data.load_arrays(str(keep / "seed1" / "dataset"), "test")
    accuracies = []
    for seed in (1, 2):
        model = models.load_model(keep / f"seed{seed}" / "train" / "model.keras")
        pv = evaluation.predict_proba(model, vx)[:, 1]
        pt = evaluation.predict_proba(model, tx)[:, 1]
        threshold = evaluation.choose_threshold(vy, pv, "youden")
        accuracies.append(evaluation.compute_metrics(ty, pt, threshold)["accuracy"])
        # No threshold rule beats the oracle's best accuracy.
        assert result["oracle"][seed - 1]["best_accuracy"] >= accuracies[-1]
    assert result["ensembles"][0]["test"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert "| 2 | 1 |" in capsys.readouterr().out


def test_seeds_prepared_from_different_sources_are_refused(keep, monkeypatch):
    from cycleprune import data

    real = data.load_arrays

    def shifted(dataset_dir, split):
        x, y = real(dataset_dir, split)
        return x, (1 - y if "seed2" in str(dataset_dir) and split == "test" else y)

    monkeypatch.setattr(data, "load_arrays", shifted)
    with pytest.raises(ValueError, match=r"seed2.*test labels differ"):
        ceiling.seed_probabilities(ceiling.seed_folders(keep), positive=1)


def test_threshold_rules_are_chosen_on_validation_and_scored_on_test():
    labels = {"val": np.array([0, 0, 1, 1, 1, 1]), "test": np.array([0, 0, 1, 1, 1, 1])}
    probs = {
        "val": {7: np.array([0.1, 0.5, 0.3, 0.6, 0.8, 0.9])},
        "test": {7: np.array([0.1, 0.55, 0.35, 0.7, 0.8, 0.9])},
    }
    youden, sens75, fixed = ceiling.rule_rows(
        labels, probs, [("youden", 0.95), ("sensitivity", 0.75), ("fixed", 0.95)]
    )
    # Youden on val: p >= 0.6 gives J = 3/4 + 1 - 1 = 0.75, the best; on test 0.7, 0.8, 0.9 are
    # positive, 0.35 a miss and 0.55 a true negative.
    assert youden["per_seed"][7]["threshold"] == pytest.approx(0.6)
    assert youden["test"]["sensitivity"] == pytest.approx(0.75)
    assert youden["test"]["specificity"] == pytest.approx(1.0)
    assert youden["min_sensitivity"] is None
    # The most specific threshold with val sensitivity >= 0.75 is the same 0.6.
    assert sens75["per_seed"][7]["threshold"] == pytest.approx(0.6)
    assert sens75["min_sensitivity"] == 0.75
    # 0.5 calls 0.55 positive: specificity 1/2 on test.
    assert fixed["test"]["specificity"] == pytest.approx(0.5)
    assert fixed["lowest_sensitivity"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("text", "match"), [("otsu", "must be one of"), ("sensitivity:high", "not a number")]
)
def test_unknown_threshold_rules_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        ceiling._rule(text)


def test_rule_parsing():
    assert ceiling._rule("sensitivity:0.97") == ("sensitivity", 0.97)
    assert ceiling._rule("youden") == ("youden", 0.95)
