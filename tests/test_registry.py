"""The model registry: the gate rule, push/promote/reject/rollback on a GCS emulator, the
compare-and-swap pointer under concurrent promotions, and killed pushes."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from cycleprune import registry, storage
from cycleprune.registry import GateConfig, gate_decision

GOOD = {"auc": 0.95, "sensitivity": 0.93, "specificity": 0.80}


# --------------------------------------------------------------------------------------------
# The gate rule (pure)


@pytest.mark.parametrize(
    ("candidate", "champion", "promote", "failed"),
    [
        (GOOD, None, True, []),  # first model: thresholds only
        ({**GOOD, "auc": 0.79}, None, False, ["min_auc"]),
        ({**GOOD, "sensitivity": 0.5, "specificity": 0.4}, None, False, ["min_sens", "min_spec"]),
        ({**GOOD, "auc": math.nan}, None, False, ["min_auc"]),
        ({"sensitivity": 0.9, "specificity": 0.9}, None, False, ["min_auc"]),  # missing
        (GOOD, GOOD, True, []),  # equal to the champion
        ({**GOOD, "auc": 0.941}, GOOD, True, []),  # worse, but within the tolerance 0.01
        ({**GOOD, "auc": 0.939}, GOOD, False, ["champion_auc"]),  # beyond it
        (GOOD, {**GOOD, "specificity": 0.85}, False, ["champion_spec"]),
        ({**GOOD, "auc": 0.99}, {**GOOD, "auc": math.nan}, False, ["champion_auc"]),
    ],
)
def test_gate_rule(candidate, champion, promote, failed):
    gate = GateConfig(min_auc=0.8, min_sensitivity=0.8, min_specificity=0.5, tolerance=0.01)
    decision = gate_decision(candidate, champion, gate, champion_version="v1" if champion else None)
    assert decision.promote is promote
    names = [c["check"] for c in decision.checks if not c["passed"]]
    assert len(names) == len(failed)
    assert all(n.startswith(f) for n, f in zip(names, failed, strict=True))
    assert len(decision.reasons) == len(failed)
    assert len(decision.checks) == (6 if champion else 3)
    assert decision.summary.startswith("promoted" if promote else "rejected")
    json.dumps(decision.to_dict())  # serialisable


def test_gate_fails_closed_when_the_champion_cannot_be_evaluated():
    decision = gate_decision(
        GOOD, None, GateConfig(), champion_version="v9", champion_error="ValueError: shape"
    )
    assert not decision.promote
    assert "production model v9 could not be evaluated" in decision.reasons[0]


def test_gate_config_validation():
    with pytest.raises(ValueError, match=r"`min_auc` must be in \[0, 1\]. Received: min_auc=1.5"):
        GateConfig(min_auc=1.5)
    with pytest.raises(ValueError, match="`tolerance` must be a number"):
        GateConfig(tolerance="0.1")


def test_versions_are_time_ordered_and_unique():
    import datetime

    t0 = datetime.datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)
    early = registry.new_version(t0)
    late = registry.new_version(t0 + datetime.timedelta(microseconds=1))
    assert early.startswith("v20250102T030405000006Z-") and early < late
    many = {registry.new_version(t0) for _ in range(2000)}
    assert len(many) == 2000
    registry.version_uri("gs://b/r", "m", early)
    with pytest.raises(ValueError, match="`version` must look like"):
        registry.version_uri("gs://b/r", "m", "../x")
    with pytest.raises(ValueError, match="`model_name` must be"):
        registry.model_uri("gs://b/r", "../etc")


# --------------------------------------------------------------------------------------------
# Push, gate, promote, reject, rollback: real tiny models, a GCS emulator registry


def _evaluation_record(model, dataset_dir, folder) -> dict:
    """What the evaluate stage records for one Keras model (no TFLite, no latency)."""
    from cycleprune import data, evaluation

    folder.mkdir(parents=True)
    model.save(str(folder / "model.keras"))
    val_x, val_y = data.load_arrays(dataset_dir, "val")
    test_x, test_y = data.load_arrays(dataset_dir, "test")
    pv = evaluation.predict_proba(model, val_x)[:, 1]
    pt = evaluation.predict_proba(model, test_x)[:, 1]
    threshold = evaluation.choose_threshold(val_y, pv, "youden")
    size = (folder / "model.keras").stat().st_size
    entry = {
        "format": "keras",
        "path": "model.keras",
        "size_bytes": size,
        "gzip_bytes": size,
        "threshold": threshold,
        "val": evaluation.compute_metrics(val_y, pv, threshold),
        "test": evaluation.compute_metrics(test_y, pt, threshold),
    }
    return {"target_sparsity": 0.0, "sparsity": 0.0, "models": [entry]}


@pytest.fixture(scope="module")
def candidates(tiny_dataset, train_tiny_model, tmp_path_factory):
    """A trained tiny model ("good") and an untrained one ("bad"), as evaluate records."""
    from cycleprune import data, models
    from cycleprune.compat import keras
    from cycleprune.config import ModelConfig

    root = tmp_path_factory.mktemp("candidates")
    good = train_tiny_model(tiny_dataset, seed=0, epochs=3)
    keras.utils.set_random_seed(7)
    shape = data.load_info(tiny_dataset).image_shape
    bad = models.build_model(ModelConfig(width=0.125, batch_norm=True), shape, 2, seed=7)
    return {
        name: (_evaluation_record(model, tiny_dataset, root / name), root / name)
        for name, model in (("good", good), ("bad", bad))
    }


def _push(reg, candidates, name, tiny_dataset, gate, **kwargs):
    from cycleprune import data
    from cycleprune.config import Config

    record, folder = candidates[name]
    return registry.run_push(
        reg,
        "pneumonia",
        selection={"name": "dense/keras", "reason": "test"},
        evaluations=[record],
        model_dirs={"dense": folder},
        dataset_dir=tiny_dataset,
        dataset_info=data.load_info(tiny_dataset).to_dict(),
        parameters=Config().to_dict(),
        gate=gate,
        **{"parent_run": f"run-{name}", **kwargs},
    )


def test_push_promote_reject_rollback_on_gcs(gcs_bucket, candidates, tiny_dataset, capsys):
    from cycleprune import cli

    good_test = candidates["good"][0]["models"][0]["test"]
    bad_test = candidates["bad"][0]["models"][0]["test"]
    assert good_test["auc"] > bad_test["auc"] + 0.1, (good_test, bad_test)
    reg = f"{gcs_bucket}/registry"
    gate = GateConfig(min_auc=0.6, min_sensitivity=0.3, min_specificity=0.3, tolerance=0.01)

    first = _push(reg, candidates, "good", tiny_dataset, gate)
    assert first["promoted"] and first["decision"]["champion_version"] is None
    assert registry.production_version(reg, "pneumonia") == first["version"]
    files = storage.list_uri(first["uri"])
    assert {"model.keras", "metrics.json", "model_card.json", "model_card.md"} <= set(files)
    assert files[-1] == storage.MANIFEST or storage.MANIFEST in files

    # A worse model: pushed as a version, rejected by the gate against the champion, which
    # was evaluated on this run's test split at its own threshold.
    second = _push(reg, candidates, "bad", tiny_dataset, GateConfig(0.0, 0.0, 0.0, 0.01))
    assert not second["promoted"]
    decision = second["decision"]
    assert decision["champion_version"] == first["version"]
    assert decision["champion"]["auc"] == pytest.approx(good_test["auc"], abs=1e-6)
    assert decision["candidate"]["auc"] == pytest.approx(bad_test["auc"])
    assert any("worse than production" in r for r in decision["reasons"])
    assert registry.production_version(reg, "pneumonia") == first["version"]
    assert registry.list_versions(reg, "pneumonia") == [first["version"], second["version"]]
    shown = registry.show(reg, "pneumonia", second["version"])
    assert not shown["production"] and shown["decision"]["promoted"] is False
    assert shown["card"]["parent_run"] == "run-bad" and shown["card"]["data"]["class_names"]

    # An operator promotes it anyway, then rolls back.
    assert cli.main(["models", "promote", "--registry", reg, "--model", "pneumonia",
                     "--version", second["version"]]) == 0  # fmt: skip
    assert registry.production_version(reg, "pneumonia") == second["version"]
    assert cli.main(["models", "rollback", "--registry", reg, "--model", "pneumonia"]) == 0
    pointer, _ = registry.read_production(reg, "pneumonia")
    assert pointer["version"] == first["version"] and pointer["reason"] == "rollback"
    assert [h["version"] for h in pointer["history"]] == [first["version"], second["version"]]
    assert pointer["revision"] == 3

    capsys.readouterr()
    assert cli.main(["models", "list", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert f"* {first['version']}" in out and f"  {second['version']}" in out
    assert "rejected" in out and "promoted" in out
    assert cli.main(["models", "show", "--registry", reg, "--model", "pneumonia"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == first["version"] and shown["production"] is True
    assert cli.main(["models", "rollback", "--registry", reg, "--model", "nope"]) == 2
    assert "has no production version" in capsys.readouterr().err


def test_a_missing_local_registry_or_model_is_named(tmp_path, capsys):
    from cycleprune import cli

    missing = str(tmp_path / "no-such-registry")
    assert cli.main(["models", "show", "--registry", missing, "--model", "pneumonia"]) == 2
    assert f"No registry at {missing}: there is no such folder" in capsys.readouterr().err
    for model in ([], ["--model", "pneumonia"]):
        assert cli.main(["models", "list", "--registry", missing, *model]) == 2
        assert missing in capsys.readouterr().err
    assert cli.main(["models", "list", "--registry", str(tmp_path), "--model", "nope"]) == 2
    assert f"Registry {tmp_path} has no model 'nope'" in capsys.readouterr().err
    assert cli.main(["models", "rollback", "--registry", str(tmp_path), "--model", "nope"]) == 2
    assert f"Registry {tmp_path} has no model 'nope'" in capsys.readouterr().err
    (tmp_path / "nope").mkdir()  # the model's folder, but nothing promoted yet
    assert cli.main(["models", "rollback", "--registry", str(tmp_path), "--model", "nope"]) == 2
    assert "'nope' has no production version to roll back" in capsys.readouterr().err


def test_champion_of_other_classes_rejects_the_candidate(tmp_path, candidates, tiny_dataset):
    reg = tmp_path / "registry"
    gate = GateConfig(0.0, 0.0, 0.0, 0.01)
    first = _push(reg, candidates, "good", tiny_dataset, gate)
    card_uri = storage.join_uri(first["uri"], registry.CARD_JSON)
    card = json.loads(storage.read_bytes(card_uri))
    card["data"]["class_names"] = ["cat", "dog"]
    # Rewrite the version with the edited card (a model trained on other classes).
    staged = tmp_path / "staged"
    storage.read_prefix(first["uri"], staged)
    (staged / registry.CARD_JSON).write_text(json.dumps(card))
    os.unlink(staged / storage.MANIFEST)
    storage.write_prefix(staged, first["uri"])
    second = _push(reg, candidates, "good", tiny_dataset, gate, parent_run="another-run")
    assert not second["promoted"]
    assert "trained on classes ['cat', 'dog']" in second["decision"]["reasons"][0]


# --------------------------------------------------------------------------------------------
# Concurrent promotions on the local backend


def _fake_version(reg, model, auc: float) -> str:
    """A complete version with stored metrics (no real model: the race is about the pointer)."""
    import tempfile

    version = registry.new_version()
    with tempfile.TemporaryDirectory() as tmp:
        storage.atomic_write_json(
            os.path.join(tmp, registry.METRICS_FILE), {"test": {**GOOD, "auc": auc}}
        )
        storage.write_prefix(tmp, registry.version_uri(reg, model, version))
    return version


def _stored_metrics(reg, model):
    def evaluate(version):
        uri = storage.join_uri(registry.version_uri(reg, model, version), registry.METRICS_FILE)
        return json.loads(storage.read_bytes(uri))["test"]

    return evaluate


def _check_consistent(reg, model, versions_by_auc):
    pointer, _ = registry.read_production(reg, model)
    best = versions_by_auc[max(versions_by_auc)]
    assert pointer["version"] == best
    chain = [*pointer["history"], {k: v for k, v in pointer.items() if k != "history"}]
    assert [p["revision"] for p in chain] == list(range(1, len(chain) + 1))
    for before, after in itertools.pairwise(chain):
        # Each promotion replaced exactly the champion it was compared against...
        assert after["previous"] == before["version"]
        assert after["decision"]["champion_version"] == before["version"]
        # ...and was better than it, on the metrics of the model actually replaced.
        assert after["decision"]["candidate"]["auc"] > after["decision"]["champion"]["auc"]
    assert chain[0]["decision"]["champion_version"] is None


def test_concurrent_promotions_threads_give_one_consistent_pointer(tmp_path):
    reg, model, n = str(tmp_path / "registry"), "race", 12
    aucs = [round(0.85 + 0.01 * i, 2) for i in np.random.default_rng(0).permutation(n)]
    versions = {auc: _fake_version(reg, model, auc) for auc in aucs}
    gate = GateConfig(min_auc=0.5, min_sensitivity=0.5, min_specificity=0.5, tolerance=0.0)
    barrier = threading.Barrier(n)
    results, errors = {}, []

    def run(auc):
        try:
            barrier.wait(timeout=30)
            results[auc] = registry.gate_and_promote(
                reg, model, versions[auc], {**GOOD, "auc": auc}, gate, _stored_metrics(reg, model)
            )
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(auc,)) for auc in aucs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == n
    _check_consistent(reg, model, versions)
    best = max(aucs)
    assert results[best][0].promote
    # Every rejection was decided against a champion at least as good as the candidate.
    for auc, (decision, _) in results.items():
        if not decision.promote:
            assert decision.champion["auc"] >= auc


def test_concurrent_promotions_processes_give_one_consistent_pointer(tmp_path):
    reg, model = str(tmp_path / "registry"), "race"
    aucs = [0.9, 0.97, 0.88, 0.95]
    versions = {auc: _fake_version(reg, model, auc) for auc in aucs}
    go = tmp_path / "go"
    script = textwrap.dedent(
        """
        import json, os, sys, time
        from cycleprune import registry, storage
        reg, model, version, auc, go = sys.argv[1:6]
        def evaluate(v):
            uri = storage.join_uri(registry.version_uri(reg, model, v), registry.METRICS_FILE)
            time.sleep(0.05)  # widen the window between reading the pointer and the swap
            return json.loads(storage.read_bytes(uri))["test"]
        while not os.path.exists(go):
            time.sleep(0.005)
        gate = registry.GateConfig(0.5, 0.5, 0.5, 0.0)
        metrics = {"auc": float(auc), "sensitivity": 0.93, "specificity": 0.8}
        decision, _ = registry.gate_and_promote(reg, model, version, metrics, gate, evaluate)
        print(json.dumps(decision.promote))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, reg, model, versions[auc], str(auc), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for auc in aucs
    ]
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    _check_consistent(reg, model, versions)


def test_killed_push_leaves_no_version_that_readers_accept(tmp_path, candidates, tiny_dataset):
    reg = tmp_path / "registry"
    _, folder = candidates["good"]
    script = textwrap.dedent(
        f"""
        import os, shutil, signal
        from cycleprune import storage
        real, calls = shutil.copy2, []
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # the third file of the prefix: die, no clean-up
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        shutil.copy2 = dying
        stage = {str(tmp_path / "stage")!r}
        shutil.copytree({str(folder)!r}, stage, copy_function=real)
        for name in ("metrics.json", "model_card.json"):
            open(os.path.join(stage, name), "w").write("{{}}")
        storage.write_prefix(stage, {str(reg / "pneumonia" / "v20250101T000000000000Z-0badf00d")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert result.returncode == -9
    leftovers = os.listdir(reg / "pneumonia")
    assert leftovers and all(n.startswith(storage.TMP_PREFIX) for n in leftovers)
    assert registry.list_versions(reg, "pneumonia") == []
    with pytest.raises(registry.RegistryError, match="No complete version"):
        registry.show(reg, "pneumonia", "v20250101T000000000000Z-0badf00d")


def test_rolling_back_again_goes_further_back_not_back_and_forth(tmp_path):
    reg, model = str(tmp_path / "registry"), "pneumonia"
    gate = GateConfig(min_auc=0.5, min_sensitivity=0.5, min_specificity=0.5, tolerance=0.0)
    a, b, c = (_fake_version(reg, model, auc) for auc in (0.90, 0.91, 0.92))
    for version, auc in ((a, 0.90), (b, 0.91), (c, 0.92)):
        decision, _ = registry.gate_and_promote(
            reg, model, version, {**GOOD, "auc": auc}, gate, _stored_metrics(reg, model)
        )
        assert decision.promote
    assert registry.rollback(reg, model)["version"] == b
    assert registry.rollback(reg, model)["version"] == a  # not back to c, just rolled away from
    with pytest.raises(registry.RegistryError, match="not rolled back from; name one with --to"):
        registry.rollback(reg, model)
    assert registry.rollback(reg, model, c)["version"] == c  # named explicitly: allowed
    # A new champion after rollbacks rolls back to the version it replaced.
    d = _fake_version(reg, model, 0.95)
    decision, _ = registry.gate_and_promote(
        reg, model, d, {**GOOD, "auc": 0.95}, gate, _stored_metrics(reg, model)
    )
    assert decision.promote and registry.rollback(reg, model)["version"] == c


def test_a_retried_push_finishes_its_own_version_instead_of_pushing_a_twin(
    tmp_path, candidates, tiny_dataset, monkeypatch
):
    reg = str(tmp_path / "registry")
    gate = GateConfig(min_auc=0.6, min_sensitivity=0.3, min_specificity=0.3, tolerance=0.01)
    champion = _push(reg, candidates, "good", tiny_dataset, gate, parent_run="run-1")
    # The next run's push is preempted after the pointer moved, before its decision was written.
    write = storage.write_bytes

    def preempted(uri, data):
        if f"/{registry.DECISIONS_DIR}/" in str(uri):
            raise KeyboardInterrupt("SIGKILL")
        return write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", preempted)
    with pytest.raises(KeyboardInterrupt):
        _push(reg, candidates, "good", tiny_dataset, gate, parent_run="run-2")
    monkeypatch.setattr(storage, "write_bytes", write)
    first_try = registry.production_version(reg, "pneumonia")
    assert first_try != champion["version"]
    retried = _push(reg, candidates, "good", tiny_dataset, gate, parent_run="run-2")
    assert retried["version"] == first_try and retried["promoted"]
    assert retried["decision"]["champion_version"] == champion["version"]  # not itself
    assert registry.list_versions(reg, "pneumonia") == [champion["version"], first_try]
    pointer, _ = registry.read_production(reg, "pneumonia")
    assert [h["version"] for h in pointer["history"]] == [champion["version"]]  # moved once
    assert registry.show(reg, "pneumonia", first_try)["decision"]["promoted"] is True
    assert registry.rollback(reg, "pneumonia")["version"] == champion["version"]
