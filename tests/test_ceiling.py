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
    # Best cuts: p >= 0.9 or p >= 0.4 (3 of 4 right); the first found is the higher one.
    assert out["best_accuracy"] == pytest.approx(0.75)
    assert out["at_best_accuracy"] == pytest.approx(
        {"threshold": 0.9, "sensitivity": 0.5, "specificity": 1.0}
    )
    # Sensitivity 1 needs p >= 0.4, which calls 0.6 positive: specificity 1/2.
    assert out["max_specificity_at_min_sensitivity"] == pytest.approx(0.5)


def test_oracle_calling_nothing_positive_has_no_threshold():
    # Four negatives, one of them scored 1.0: the best accuracy (4/5) calls nothing positive,
    # which no cut-off p >= t does (p >= 1.0 would call the 1.0 positive).
    out = ceiling.oracle(np.array([0, 0, 0, 0, 1]), np.array([0.2, 0.3, 0.9, 1.0, 0.5]), 0.5)
    assert out["best_accuracy"] == pytest.approx(0.8)
    assert out["at_best_accuracy"] == {"threshold": None, "sensitivity": 0.0, "specificity": 1.0}
    # Sensitivity >= 0.5 (the one positive, 0.5) calls 0.9 and 1.0 positive too.
    assert out["max_specificity_at_min_sensitivity"] == pytest.approx(0.5)


def test_ensembles_average_probabilities_over_every_subset():
    labels = {"val": np.array([0, 0, 1, 1]), "test": np.array([0, 0, 1, 1])}
    probs = {
        # Seed 1 separates val (its own Youden threshold: 0.5); seed 2 ties 0.7 with 0.7 (AUC
        # 0.875); their mean [0.15, 0.55, 0.6, 0.85] separates it, at the one best cut 0.6.
        "val": {1: np.array([0.1, 0.4, 0.5, 0.9]), 2: np.array([0.2, 0.7, 0.7, 0.8])},
        # Test AUC: seed 1 0.75, seed 2 0.625 (0.6 < 0.8, 0.8 = 0.8); the mean
        # [0.55, 0.3, 0.65, 0.625] separates test, and at 0.6 (not 0.5) calls 0.55 normal.
        "test": {1: np.array([0.3, 0.5, 0.7, 0.45]), 2: np.array([0.8, 0.1, 0.6, 0.8])},
    }
    rows = ceiling.ensemble_rows(labels, probs, "youden", 0.95)
    assert [(r["k"], r["subsets"]) for r in rows] == [(1, 2), (2, 1)]
    assert rows[0]["val_auc"] == pytest.approx((1.0 + 0.875) / 2)
    assert rows[0]["test"]["auc"] == pytest.approx((0.75 + 0.625) / 2)
    assert rows[1]["val_auc"] == pytest.approx(1.0)
    # The elementwise minimum would miss 0.45 at its own cut 0.5; the mean gets every image right.
    assert rows[1]["test"] == pytest.approx(
        {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "auc": 1.0}
    )


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
    from cycleprune.config import preset

    settings = preset("small").evaluate
    out = tmp_path / "ceiling.json"
    assert ceiling.main([str(keep), "--out", str(out), "--what", "two tiny seeds"]) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == [1, 2] and result["what"] == "two tiny seeds"
    assert result["threshold_rule"] == settings.threshold_rule
    assert [r["models"] for r in result["oracle"]] == ["seed 1", "seed 2", "ensemble of 2"]

    # k = 1 is the mean of the pipeline's own evaluation of each seed's model.
    vx, vy = data.load_arrays(str(keep / "seed1" / "dataset"), "val")
    tx, ty = data.load_arrays(str(keep / "seed1" / "dataset"), "test")
    accuracies = []
    for seed in (1, 2):
        model = models.load_model(keep / f"seed{seed}" / "train" / "model.keras")
        pv = evaluation.predict_proba(model, vx)[:, 1]
        pt = evaluation.predict_proba(model, tx)[:, 1]
        threshold = evaluation.choose_threshold(
            vy, pv, settings.threshold_rule, min_sensitivity=settings.min_sensitivity
        )
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
    val = np.array([0.1, 0.5, 0.3, 0.6, 0.8, 0.9])
    labels = {"val": np.array([0, 0, 1, 1, 1, 1]), "test": np.array([0, 0, 1, 1, 1, 1])}
    probs = {
        "val": {7: val, 8: val},
        "test": {
            7: np.array([0.1, 0.55, 0.35, 0.7, 0.8, 0.9]),
            8: np.array([0.1, 0.65, 0.35, 0.5, 0.8, 0.9]),
        },
    }
    youden, sens75, fixed = ceiling.rule_rows(
        labels, probs, [("youden", 0.95), ("sensitivity", 0.75), ("fixed", 0.95)]
    )
    # Youden on val: p >= 0.6 gives J = 3/4 + 1 - 1 = 0.75, the best. On test, seed 7 misses
    # 0.35 (sensitivity 3/4, specificity 1); seed 8 misses 0.35 and 0.5 and calls 0.65 positive
    # (sensitivity 1/2, specificity 1/2).
    assert [m["threshold"] for m in youden["per_seed"].values()] == pytest.approx([0.6, 0.6])
    assert youden["test"]["sensitivity"] == pytest.approx(0.625)
    assert youden["test"]["specificity"] == pytest.approx(0.75)
    assert youden["test"]["accuracy"] == pytest.approx((5 / 6 + 3 / 6) / 2)
    assert youden["lowest_sensitivity"] == pytest.approx(0.5)
    assert youden["min_sensitivity"] is None
    # The most specific threshold with val sensitivity >= 0.75 is the same 0.6.
    assert sens75["min_sensitivity"] == 0.75
    assert sens75["test"] == pytest.approx(youden["test"])
    # 0.5 calls 0.55 (seed 7) and 0.65 (seed 8) positive, and catches seed 8's 0.5.
    assert fixed["test"]["specificity"] == pytest.approx(0.5)
    assert fixed["per_seed"][8]["sensitivity"] == pytest.approx(0.75)
    assert fixed["lowest_sensitivity"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("otsu", "must be one of"),
        ("sensitivity:high", "not a number"),
        ("sensitivity:1.5", r"in \(0, 1\]"),
        ("youden:0.9", "only the sensitivity rule"),
    ],
)
def test_bad_threshold_rules_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match) as caught:
        ceiling._rule(text, 0.95)
    assert repr(text) in str(caught.value)


def test_rule_parsing():
    assert ceiling._rule("sensitivity:0.97", 0.95) == ("sensitivity", 0.97)
    assert ceiling._rule("sensitivity", 0.9) == ("sensitivity", 0.9)
    assert ceiling._rule("youden", 0.95) == ("youden", 0.95)


def test_a_bad_oracle_floor_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="--min-sensitivity"):
        ceiling.main([str(tmp_path), "--min-sensitivity", "0"])


def test_a_class_the_models_lack_is_refused_with_the_model_path(keep):
    with pytest.raises(ValueError, match=r"--positive-class 2: .*seed1.*model\.keras outputs 2"):
        ceiling.seed_probabilities(ceiling.seed_folders(keep), positive=2)


def _first_norm_and_its_input(model):
    from cycleprune.compat import keras

    first = next(m for m in model.layers if isinstance(m, keras.layers.BatchNormalization))
    return first, keras.Model(model.input, first.input)


def test_refit_batchnorm_sets_the_moving_statistics_from_the_images(tiny_dataset, train_tiny_model):
    from cycleprune import data

    model = train_tiny_model(tiny_dataset, seed=1)
    x, _ = data.load_arrays(str(tiny_dataset), "val")  # 80 images: chunks of 32, 32 and 16
    first, upstream = _first_norm_and_its_input(model)
    kernels = [w.copy() for w in model.get_weights()]
    momentum = first.momentum
    before = first.moving_mean.numpy().copy()

    order = np.random.default_rng(5).permutation(len(x))
    # The first BatchNorm's input has no BatchNorm upstream: the same in either mode.
    h = upstream(x[order].astype(np.float32), training=False).numpy()
    chunks = [h[i : i + 32].reshape(-1, h.shape[-1]) for i in range(0, len(h), 32)]
    sizes = np.array([len(c) for c in chunks], dtype=np.float64)

    assert ceiling.refit_batchnorm(model, x, batch_size=32, seed=5) is model
    mean = first.moving_mean.numpy()
    assert not np.allclose(mean, before, atol=1e-3)
    # The image-weighted mean of the chunks' means is the mean over all the images.
    np.testing.assert_allclose(mean, h.reshape(-1, h.shape[-1]).mean(axis=0), atol=1e-4)
    variances = np.stack([c.var(axis=0, ddof=1) for c in chunks])
    np.testing.assert_allclose(
        first.moving_variance.numpy(), sizes @ variances / sizes.sum(), rtol=1e-3, atol=1e-5
    )
    assert first.momentum == momentum
    moved = {id(v) for n in model.submodules if hasattr(n, "moving_mean") for v in n.weights[2:]}
    for weight, old in zip(model.weights, kernels, strict=True):
        if id(weight) not in moved:
            np.testing.assert_array_equal(weight.numpy(), old)


def test_refit_batchnorm_refuses_bad_arguments_by_name():
    from cycleprune import models
    from cycleprune.config import ModelConfig

    plain = models.build_model(ModelConfig(width=0.125, batch_norm=False), (28, 28, 1), 2, seed=0)
    normed = models.build_model(ModelConfig(width=0.125, batch_norm=True), (28, 28, 1), 2, seed=0)
    images = np.zeros((4, 28, 28, 1), np.uint8)
    with pytest.raises(ValueError, match=f"{plain.name!r} has no BatchNormalization"):
        ceiling.refit_batchnorm(plain, images)
    with pytest.raises(ValueError, match="no images"):
        ceiling.refit_batchnorm(normed, images[:0])
    for bad in (0, -1):  # -1 would otherwise run no chunk and return the model unchanged
        with pytest.raises(ValueError, match=rf"`batch_size` must be an int >= 1.*{bad}"):
            ceiling.refit_batchnorm(normed, images, batch_size=bad)


def test_main_bn_refit_names_a_model_without_batchnorm_first(tiny_dataset, tmp_path):
    from cycleprune import models, training
    from cycleprune.config import ModelConfig

    folder = tmp_path / "seed1"
    shutil.copytree(tiny_dataset, folder / "dataset")
    plain = models.build_model(ModelConfig(width=0.125, batch_norm=False), (28, 28, 1), 2, seed=0)
    training.save_model(plain, folder / "train" / "model.keras")
    with pytest.raises(ValueError, match=r"--bn-refit: .*seed1.*model\.keras: .*no BatchNorm"):
        ceiling.main([str(tmp_path), "--bn-refit", "--out", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_main_bn_refit_scores_each_seed_as_trained_and_per_split(keep, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from cycleprune import data, evaluation, models

    images, labels = {}, {}
    for split in ("val", "test"):
        images[split], labels[split] = data.load_arrays(str(keep / "seed1" / "dataset"), split)
    out = tmp_path / "ceiling.json"
    assert ceiling.main([str(keep), "--bn-refit", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["bn_refit"]
    assert [r["seed"] for r in rows] == [1, 2]
    oracle_auc = {r["models"]: r["auc"] for r in result["oracle"]}
    for row in rows:
        # As trained, the models are the ones the other sections score.
        assert row["as_trained"]["test"] == pytest.approx(oracle_auc[f"seed {row['seed']}"])
        assert set(row) == {"seed", "as_trained", "train", "val", "test"}
        # Each source's scores are those of the model refit on that split's images.
        folder = keep / f"seed{row['seed']}"
        for source in ("train", "val", "test"):
            model = models.load_model(folder / "train" / "model.keras")
            x, _ = data.load_arrays(str(folder / "dataset"), source)
            ceiling.refit_batchnorm(model, x, seed=row["seed"])
            expected = {
                split: roc_auc_score(
                    labels[split], evaluation.predict_proba(model, images[split])[:, 1]
                )
                for split in ("val", "test")
            }
            assert row[source] == pytest.approx(expected, abs=1e-12)
        # New statistics change the scores (the fixture's were set from 128 training images).
        assert row["val"]["test"] != pytest.approx(row["as_trained"]["test"], abs=1e-9)
    printed = capsys.readouterr().out
    assert "| 1 | test images |" in printed and "| 2 | training (as trained) |" in printed
    plain = tmp_path / "plain.json"
    assert ceiling.main([str(keep), "--out", str(plain)]) == 0
    assert "bn_refit" not in json.loads(plain.read_text())  # off unless asked: it costs minutes
