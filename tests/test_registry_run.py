"""`python -m cycleprune run --registry gs://...` end to end (kfp.local, a GCS emulator): the
first model is promoted, a second run with a worse config is rejected, and the run says why.

The first run is the shared smoke pipeline run (conftest's ``smoke_pipeline_run``), which
pushed its model to a registry on the emulator; this test adds the second run through the CLI.
"""

import json

import pytest

from cycleprune import cli, registry
from pipelines import local as local_run

# A small run in seconds: Adam, no BatchNorm, one pruned variant, one TFLite mode. Learning
# rates a thousand times too small: the network stays at its initialisation.
WORSE = [
    "--preset", "smoke",
    "--set", "train.optimizer=adam", "--set", "model.batch_norm=false",
    "--set", "prune.sparsities=[0.5]", "--set", "compress.quantizations=[dynamic]",
    "--set", "evaluate.latency_runs=1",
    "--set", "schedule.min_lr=0.0000001", "--set", "schedule.max_lr=0.000001",
    "--set", "train.epochs=2",
]  # fmt: skip
GATE = ["--min-auc", "0.7", "--min-sensitivity", "0.5", "--min-specificity", "0.5"]


@pytest.mark.slow
def test_second_worse_run_is_rejected_by_the_gate(
    smoke_pipeline_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # runs/.kfp-root for the CLI's run
    reg = smoke_pipeline_run.registry
    first = smoke_pipeline_run.summary["registry"]
    assert first["promoted"] and first["model_name"] == "pneumonia"
    out = local_run.format_table(smoke_pipeline_run.summary)  # what `cycleprune run` prints
    assert f"registry: pushed pneumonia {first['version']} to {reg}" in out
    assert "gate: promoted: passes the thresholds and no production model yet." in out
    assert registry.production_version(reg, "pneumonia") == first["version"]

    args = ["run", *WORSE, "--registry", reg, "--model-name", "pneumonia", *GATE]
    assert cli.main([*args, "--out", str(tmp_path / "worse")]) == 0
    out = capsys.readouterr().out
    second = json.loads((tmp_path / "worse" / "summary.json").read_text())["registry"]
    assert not second["promoted"]
    assert "gate: rejected: " in out and second["reasons"][0] in out
    assert f"production {first['version']} on this run's test split" in out
    assert second["champion_version"] == first["version"] == second["production"]
    assert registry.production_version(reg, "pneumonia") == first["version"]
    assert registry.list_versions(reg, "pneumonia") == [first["version"], second["version"]]
    shown = registry.show(reg, "pneumonia", first["version"])
    assert {"saved_model/saved_model.pb", "model.keras", "model_card.md"} <= set(shown["files"])
    assert "Model registry" in (tmp_path / "worse" / "report.html").read_text()
