"""`python -m cycleprune run --registry gs://...` end to end (kfp.local, a GCS emulator): the
first model is promoted, a second run with a worse config is rejected, and the run says why."""

import json

import pytest

from cycleprune import cli, registry

# A small run that learns something in seconds: Adam, no BatchNorm (two short epochs leave
# BatchNorm's moving statistics at their initial values), one pruned variant, one TFLite mode.
FAST = [
    "--preset", "smoke",
    "--set", "train.optimizer=adam", "--set", "model.batch_norm=false",
    "--set", "prune.sparsities=[0.5]", "--set", "compress.quantizations=[dynamic]",
    "--set", "evaluate.latency_runs=1",
]  # fmt: skip
GOOD = ["--set", "schedule.min_lr=0.0001", "--set", "schedule.max_lr=0.001",
        "--set", "train.epochs=4"]  # fmt: skip
# Learning rates a thousand times too small: the network stays at its initialisation.
WORSE = ["--set", "schedule.min_lr=0.0000001", "--set", "schedule.max_lr=0.000001",
         "--set", "train.epochs=2"]  # fmt: skip
GATE = ["--min-auc", "0.7", "--min-sensitivity", "0.5", "--min-specificity", "0.5"]


@pytest.mark.slow
def test_second_worse_run_is_rejected_by_the_gate(gcs_bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and runs/.kfp-root (shared by both runs: cache)
    reg = f"{gcs_bucket}/registry"
    args = ["run", *FAST, "--registry", reg, "--model-name", "pneumonia", *GATE]

    assert cli.main([*args, *GOOD, "--out", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    first = json.loads((tmp_path / "good" / "summary.json").read_text())["registry"]
    assert first["promoted"], out
    assert f"registry: pushed pneumonia {first['version']} to {reg}" in out
    assert "gate: promoted: passes the thresholds and no production model yet." in out

    assert cli.main([*args, *WORSE, "--out", str(tmp_path / "worse")]) == 0
    out = capsys.readouterr().out
    second = json.loads((tmp_path / "worse" / "summary.json").read_text())["registry"]
    assert not second["promoted"]
    assert "gate: rejected: " in out and second["reasons"][0] in out
    # Rejected on the comparison with production too, not only on the thresholds: the first
    # model ranks better on this run's test split.
    assert second["champion"]["auc"] > second["candidate"]["auc"] + 0.01
    assert any(f"is worse than production {first['version']}'s" in r for r in second["reasons"])
    assert f"production {first['version']} on this run's test split" in out
    assert second["champion_version"] == first["version"] == second["production"]
    assert registry.production_version(reg, "pneumonia") == first["version"]
    assert registry.list_versions(reg, "pneumonia") == [first["version"], second["version"]]
    shown = registry.show(reg, "pneumonia", first["version"])
    assert {"saved_model/saved_model.pb", "model.keras", "model_card.md"} <= set(shown["files"])
    assert "Model registry" in (tmp_path / "worse" / "report.html").read_text()
