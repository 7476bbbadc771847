"""Each component's Python function on tiny real data: artifacts in, artifacts out.

The functions run in this process (``component.python_func``) with KFP artifact objects whose
URIs point into a temporary folder, chained stage by stage like the pipeline chains them.
"""

import dataclasses
import json
import time
from pathlib import Path

import pytest
from kfp import dsl

from components.compress import compress
from components.configure import configure, list_sparsities
from components.evaluate import evaluate
from components.find_lr import find_lr
from components.parameters import (
    FORM_DEFAULTS,
    PARAMETERS,
    build_config,
    data_config,
    pipeline_arguments,
)
from components.prepare_data import prepare_data
from components.prune import prune
from components.push import push
from components.report import report
from components.select_model import select_model
from components.train import train
from cycleprune import registry, storage
from cycleprune.config import CompressConfig, preset


@pytest.fixture(scope="module")
def config():
    base = preset("smoke")
    return base.replace(
        data=dataclasses.replace(base.data, class_names=("normal", "pneumonia")),
        compress=CompressConfig(quantizations=("dynamic",), saved_model=False),
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("components")


def art(cls, root: Path, task: str, name: str, metadata=None):
    """An output/input artifact as KFP would hand it over: a URI under the task's folder."""
    (root / task).mkdir(parents=True, exist_ok=True)
    return cls(name=name, uri=str(root / task / name), metadata=dict(metadata or {}))


def html_images(artifact) -> int:
    return Path(artifact.path).read_text().count('src="data:image/png;base64,')


# --- configure -------------------------------------------------------------------------------


def configure_args(config, **changes) -> dict:
    args = pipeline_arguments(config)
    args.update(changes)
    return args


def run_configure(tmp_path, config, **changes) -> tuple[dict, str]:
    """(resolved config dict, data_config string) from the configure component."""
    output = art(dsl.Artifact, tmp_path, "configure", "config")
    data = configure.python_func(**configure_args(config, **changes), config=output).data_config
    return json.loads(Path(output.path).read_text()), data


def test_configure_round_trips_a_config(tmp_path, config):
    resolved, data = run_configure(tmp_path, config)
    assert resolved == config.to_dict()
    assert json.loads(data) == data_config(config)


def test_configure_records_its_seconds_beside_the_config(tmp_path, config):
    output = art(dsl.Artifact, tmp_path, "configure", "config")
    configure.python_func(**configure_args(config), config=output)
    assert output.metadata["preset"] == "seed" and output.metadata["seconds"] >= 0
    assert "seconds" not in json.loads(Path(output.path).read_text())  # a plain Config


def test_configure_applies_preset_then_parameters_then_extra_config(tmp_path, config):
    resolved, _ = run_configure(
        tmp_path,
        config,
        preset="smoke",
        epochs=5,
        class_weight="balanced",
        seed=7,
        prune_epochs=3,
        prune_end_epoch=0,
        extra_config="evaluate: {threshold_rule: f1}\ntrain: {epochs: 6}",
    )
    assert resolved["train"]["epochs"] == 6  # extra_config comes last
    assert resolved["data"]["class_weight"] == "balanced"
    assert resolved["data"]["seed"] == resolved["train"]["seed"] == 7
    assert resolved["prune"]["end_epoch"] == 3  # 0 with prune_epochs set: all of them
    assert resolved["evaluate"]["threshold_rule"] == "f1"
    assert resolved["data"]["limit"] == 192  # from the preset


def test_data_config_ignores_training_settings(tmp_path, config):
    _, first = run_configure(tmp_path, config)
    _, changed = run_configure(tmp_path, config, epochs=9, batch_size=8, width=0.5)
    assert changed == first
    _, reseeded = run_configure(tmp_path, config, seed=1)
    assert reseeded != first


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr_policy": "cosine"}, r"schedule\.policy"),
        ({"extra_config": "train: {epochz: 3}"}, "epochz"),
        ({"extra_config": "[1, 2]"}, "extra_config"),
        ({"sparsities": [0.5, 1.0]}, r"prune\.sparsities must all be in \(0, 1\)"),
        ({"sparsities": [0.5, 0.5]}, r"repeated: \['prune_50'\]"),
        (
            {"sparsities": [0.5], "extra_config": "prune: {sparsities: [0.6]}"},
            r"sparsities=\[0\.5\], prune\.sparsities=\[0\.6\]",
        ),
        (
            {"sparsities": [], "extra_config": "prune: {sparsities: []}"},
            r"prune\.sparsities must not be empty",
        ),
        ({"min_lr": 0.1, "max_lr": 0.01}, r"schedule\.min_lr"),
    ],
)
def test_configure_rejects_bad_values(tmp_path, config, changes, message):
    with pytest.raises(ValueError, match=message):
        run_configure(tmp_path, config, **changes)


@pytest.mark.parametrize("name", ["seed", "small", "best", "smoke"])
def test_the_run_form_left_at_its_defaults_runs_the_chosen_preset(name):
    # The form shows the article's values; choosing another preset must not keep them.
    resolved = build_config(name, FORM_DEFAULTS).to_dict()
    expected = preset(name).to_dict()
    expected["data"]["class_names"] = ["normal", "pneumonia"]  # always applied
    assert resolved == expected  # the preset's sparsities too: best prunes to 90% only


def test_the_pruning_branches_are_the_resolved_configs_sparsities(tmp_path, config):
    def branches(**changes) -> list:
        resolved, _ = run_configure(tmp_path, config, **changes)
        output = art(dsl.Artifact, tmp_path, "configure", "config")  # the file just written
        assert json.loads(Path(output.path).read_text()) == resolved
        return list_sparsities.python_func(config=output)

    assert branches(preset="best", sparsities=[]) == [0.9]  # [] = the preset's
    assert branches(preset="seed", sparsities=[]) == [0.5]
    assert branches(preset="small", sparsities=[]) == [0.5, 0.75, 0.9]
    assert branches(preset="best", sparsities=[0.5, 0.8]) == [0.5, 0.8]  # a list given applies
    # extra_config comes last, prune.sparsities included (the parameter left at [], or agreeing).
    assert branches(sparsities=[], extra_config="prune: {sparsities: [0.6, 0.7]}") == [0.6, 0.7]
    assert branches(sparsities=[0.6], extra_config="prune: {sparsities: [0.6]}") == [0.6]
    assert build_config("best", {"sparsities": ()}).prune.sparsities == (0.9,)  # () as []


def test_a_changed_form_value_wins_over_the_preset():
    changed = {**FORM_DEFAULTS, "batch_size": 16, "loss": "crossentropy", "momentum": 0.0}
    config = build_config("small", changed)
    assert (config.data.batch_size, config.train.loss, config.train.momentum) == (
        16,
        "crossentropy",
        0.0,
    )
    assert config.model.width == preset("small").model.width  # still at its default
    # prune_end_epoch 0: the preset's ramp (small: 9 of 12), or all of a changed prune_epochs.
    assert build_config("small", FORM_DEFAULTS).prune.end_epoch == 9
    assert build_config("small", {**FORM_DEFAULTS, "prune_epochs": 16}).prune.end_epoch == 16
    assert build_config("seed", {**FORM_DEFAULTS, "prune_epochs": 10}).prune.end_epoch == 10
    assert build_config("small", {**FORM_DEFAULTS, "prune_end_epoch": 5}).prune.end_epoch == 5
    # The CLR bounds go together: a changed max_lr brings the min_lr shown beside it.
    bounds = build_config("small", {**FORM_DEFAULTS, "max_lr": 0.05}).schedule
    assert (bounds.min_lr, bounds.max_lr) == (0.001, 0.05)
    # A value equal to a form default is forced under another preset through extra_config.
    forced = build_config("small", FORM_DEFAULTS, "data: {batch_size: 32}")
    assert forced.data.batch_size == 32


def test_every_parameter_sets_its_fields():
    # smoke differs from seed in most exposed fields: the parameters alone must carry them.
    target, seed = preset("smoke").to_dict(), preset("seed").to_dict()
    args = pipeline_arguments(preset("smoke"), preset_name="seed")
    resolved = build_config("seed", {k: v for k, v in args.items() if k in PARAMETERS}).to_dict()
    differing = 0
    for name, fields in PARAMETERS.items():
        for field in fields:
            section, key = field.split(".")
            assert resolved[section][key] == target[section][key], name
            differing += seed[section][key] != target[section][key]
    assert differing >= 8


# --- the stages, chained ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_artifact(root, config):
    artifact = art(dsl.Artifact, root, "configure", "config")
    Path(artifact.path).write_text(config.to_json())
    return artifact


@pytest.fixture(scope="module")
def prepared(root, tiny_npz, config):
    outputs = {
        "dataset": art(dsl.Dataset, root, "prepare", "dataset"),
        "info": art(dsl.Artifact, root, "prepare", "info"),
        "metrics": art(dsl.Metrics, root, "prepare", "metrics"),
    }
    prepare_data.python_func(
        source=str(tiny_npz), data_config=json.dumps(data_config(config)), **outputs
    )
    return outputs


def test_prepare_data(prepared):
    info = storage.read_json(prepared["info"].path)
    assert info["class_names"] == ["normal", "pneumonia"]
    assert info["seconds"] > 0
    assert (Path(prepared["dataset"].path) / "dataset.json").is_file()
    metrics = prepared["metrics"].metadata
    assert metrics["test_examples"] == sum(info["counts"]["test"].values())
    assert metrics["train_normal"] + metrics["train_pneumonia"] == metrics["train_examples"]
    assert prepared["dataset"].metadata["version"] == info["version"]


def _find_lr(root, task, prepared, config_artifact) -> dict:
    outputs = {
        "lr_finder": art(dsl.Artifact, root, task, "lr_finder"),
        "plot": art(dsl.HTML, root, task, "plot"),
        "metrics": art(dsl.Metrics, root, task, "metrics"),
    }
    find_lr.python_func(dataset=prepared["dataset"], config=config_artifact, **outputs)
    return outputs


@pytest.fixture(scope="module")
def bounds(root, prepared, config_artifact):
    return _find_lr(root, "find_lr", prepared, config_artifact)


def test_find_lr(bounds):
    record = storage.read_json(bounds["lr_finder"].path)
    assert 0 < record["min_lr"] < record["max_lr"]
    assert record["bounds_from"] == "lr_finder" and record["optimizer"] == "sgd"
    suggested = (record["suggested_min_lr"], record["suggested_max_lr"])
    assert (record["min_lr"], record["max_lr"]) == suggested
    assert len(record["lrs"]) == record["steps"] == len(record["smoothed"])
    assert html_images(bounds["plot"]) == 1
    assert bounds["metrics"].metadata["max_lr"] == record["max_lr"]
    assert bounds["lr_finder"].metadata["bounds_from"] == "lr_finder"


def test_find_lr_keeps_configured_bounds(root, prepared, config):
    given = config.replace(schedule=dataclasses.replace(config.schedule, min_lr=0.002, max_lr=0.02))
    artifact = art(dsl.Artifact, root, "configure_given", "config")
    Path(artifact.path).write_text(given.to_json())
    record = storage.read_json(
        _find_lr(root, "find_lr_given", prepared, artifact)["lr_finder"].path
    )
    assert (record["min_lr"], record["max_lr"]) == (0.002, 0.02)
    assert record["bounds_from"] == "config"


def test_find_lr_checkpoints_its_sweep_where_a_retry_finds_it(
    root, prepared, bounds, config_artifact
):
    outputs = {
        "lr_finder": art(dsl.Artifact, root, "find_lr_retry", "lr_finder"),
        "plot": art(dsl.HTML, root, "find_lr_retry", "plot"),
        "metrics": art(dsl.Metrics, root, "find_lr_retry", "metrics"),
    }
    find_lr.python_func(
        dataset=prepared["dataset"], config=config_artifact, checkpoint_root=str(root / "ckpt"),
        run_id="run-1", gpus=0, **outputs,
    )  # fmt: skip
    sweep = storage.read_json(root / "ckpt" / "run-1" / "find_lr" / "sweep.json")
    record = storage.read_json(outputs["lr_finder"].path)
    assert sweep["done"] and sweep["losses"] == record["losses"]
    assert record["losses"] == storage.read_json(bounds["lr_finder"].path)["losses"]


@pytest.fixture(scope="module")
def trained(root, prepared, bounds, config_artifact):
    outputs = {
        name: art(cls, root, "train", name)
        for name, cls in (("model", dsl.Model), ("history", dsl.Artifact),
                          ("tensorboard", dsl.Artifact), ("plots", dsl.HTML),
                          ("metrics", dsl.Metrics))
    }  # fmt: skip
    train.python_func(
        dataset=prepared["dataset"], config=config_artifact, lr_finder=bounds["lr_finder"],
        checkpoint_root=str(root / "checkpoints"), run_id="run-1", **outputs,
    )  # fmt: skip
    return outputs


def test_train(trained, root, config):
    assert (Path(trained["model"].path) / "model.keras").is_file()
    record = storage.read_json(trained["history"].path)
    assert (
        record["history"]["num_epochs"] == len(record["history"]["epochs"]) >= config.train.epochs
    )
    assert record["seconds"] > 0 and "auc" in record["val"]
    assert list(Path(trained["tensorboard"].path).rglob("events.out.tfevents.*"))
    assert html_images(trained["plots"]) == 2  # CLR schedule, training curves
    assert trained["metrics"].metadata["epochs"] == record["history"]["num_epochs"]
    assert "val_auc" in trained["metrics"].metadata
    # Checkpoints went to <checkpoint_root>/<run_id>/train, where a retry would resume.
    assert any((root / "checkpoints" / "run-1" / "train").iterdir())


@pytest.fixture(scope="module")
def pruned(root, prepared, bounds, trained, config_artifact):
    outputs = {
        name: art(cls, root, "prune", name)
        for name, cls in (("pruned", dsl.Model), ("history", dsl.Artifact),
                          ("tensorboard", dsl.Artifact), ("plots", dsl.HTML),
                          ("metrics", dsl.Metrics))
    }  # fmt: skip
    prune.python_func(
        model=trained["model"], dataset=prepared["dataset"], config=config_artifact,
        sparsity=0.5, lr_finder=bounds["lr_finder"], checkpoint_root="", run_id="run-1",
        **outputs,
    )  # fmt: skip
    return outputs


def test_prune(pruned):
    record = storage.read_json(pruned["history"].path)
    assert record["target_sparsity"] == 0.5
    assert record["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert (Path(pruned["pruned"].path) / "model.keras").is_file()
    assert pruned["pruned"].metadata["variant"] == "prune_50"
    assert pruned["tensorboard"].metadata["variant"] == "prune_50"
    assert list(Path(pruned["tensorboard"].path).rglob("events.out.tfevents.*"))
    assert html_images(pruned["plots"]) == 3  # sparsity, CLR schedule, curves
    assert pruned["metrics"].metadata["sparsity"] == pytest.approx(0.5, abs=0.02)


def _compress(root, task, model, prepared, config_artifact, target):
    outputs = {
        "models": art(dsl.Model, root, task, "models"),
        "metrics": art(dsl.Metrics, root, task, "metrics"),
    }
    compress.python_func(
        model=model, dataset=prepared["dataset"], config=config_artifact,
        target_sparsity=target, **outputs,
    )  # fmt: skip
    return outputs


@pytest.fixture(scope="module")
def compressed(root, prepared, trained, pruned, config_artifact):
    dense = _compress(root, "compress_dense", trained["model"], prepared, config_artifact, 0.0)
    sparse = _compress(root, "compress_50", pruned["pruned"], prepared, config_artifact, 0.5)
    return {"dense": dense, "prune_50": sparse}


def test_compress(compressed):
    for variant, outputs in compressed.items():
        folder = Path(outputs["models"].path)
        assert (folder / "model.keras").is_file() and (folder / "model_dynamic.tflite").is_file()
        assert not (folder / "saved_model").exists()  # saved_model=False in this config
        meta = outputs["models"].metadata
        assert meta["variant"] == variant and meta["formats"] == ["keras", "tflite_dynamic"]
        assert meta["seconds"] > 0
        metrics = outputs["metrics"].metadata
        assert 0 < metrics["tflite_dynamic_gzip_bytes"] < metrics["keras_gzip_bytes"]
    pruned_size = compressed["prune_50"]["metrics"].metadata["keras_gzip_bytes"]
    assert pruned_size < compressed["dense"]["metrics"].metadata["keras_gzip_bytes"]


def _evaluate(root, task, compressed_outputs, prepared, config_artifact, target):
    outputs = {
        name: art(cls, root, task, name)
        for name, cls in (("evaluation", dsl.Artifact), ("classification",
                          dsl.ClassificationMetrics), ("plots", dsl.HTML),
                          ("metrics", dsl.Metrics))
    }  # fmt: skip
    evaluate.python_func(
        models=compressed_outputs["models"], dataset=prepared["dataset"],
        config=config_artifact, target_sparsity=target, **outputs,
    )  # fmt: skip
    return outputs


@pytest.fixture(scope="module")
def evaluated(root, prepared, compressed, config_artifact):
    dense = _evaluate(root, "evaluate_dense", compressed["dense"], prepared, config_artifact, 0.0)
    sparse = _evaluate(root, "evaluate_50", compressed["prune_50"], prepared, config_artifact, 0.5)
    return {"dense": dense, "prune_50": sparse}


def test_evaluate(evaluated, prepared):
    info = storage.read_json(prepared["info"].path)
    test_size = sum(info["counts"]["test"].values())
    for variant, outputs in evaluated.items():
        record = storage.read_json(outputs["evaluation"].path)
        assert record["target_sparsity"] == (0.0 if variant == "dense" else 0.5)
        assert [m["format"] for m in record["models"]] == ["keras", "tflite_dynamic"]
        matrix = outputs["classification"].metadata["confusionMatrix"]
        assert [a["displayName"] for a in matrix["annotationSpecs"]] == ["normal", "pneumonia"]
        rows = [r["row"] for r in matrix["rows"]]
        assert len(rows) == 2 and all(len(r) == 2 for r in rows)
        assert sum(map(sum, rows)) == test_size
        roc = outputs["classification"].metadata["confidenceMetrics"]
        assert roc and all(0 <= p["confidenceThreshold"] <= 1 for p in roc)
        assert "keras_test_accuracy" in outputs["metrics"].metadata
        assert html_images(outputs["plots"]) == 5  # confusion + ROC per model, size/accuracy
        assert record["seconds"] > 0
        assert outputs["metrics"].metadata["seconds"] == round(record["seconds"], 3)


def test_evaluate_seconds_cover_the_figures_not_only_the_library_call(
    root, evaluated, prepared, compressed, config_artifact, monkeypatch
):
    from cycleprune import evaluation, report

    done = storage.read_json(evaluated["dense"]["evaluation"].path)
    result = {k: v for k, v in done.items() if k not in ("seconds", "target_sparsity")}
    monkeypatch.setattr(evaluation, "run_evaluation", lambda *args: result)  # instant
    drawn = report.evaluation_figures

    def slow_figures(*args, **kwargs):
        time.sleep(0.3)
        return drawn(*args, **kwargs)

    monkeypatch.setattr(report, "evaluation_figures", slow_figures)
    outputs = _evaluate(root, "evaluate_timed", compressed["dense"], prepared, config_artifact, 0.0)
    assert storage.read_json(outputs["evaluation"].path)["seconds"] >= 0.3


def test_evaluate_logs_no_auc_for_a_single_class_test_split(
    root, evaluated, prepared, compressed, config_artifact, monkeypatch
):
    import copy

    from cycleprune import evaluation

    done = storage.read_json(evaluated["dense"]["evaluation"].path)
    result = copy.deepcopy(
        {k: v for k, v in done.items() if k not in ("seconds", "target_sparsity")}
    )
    for entry in result["models"]:
        entry["test"]["auc"] = None  # what compute_metrics gives when only one class is there
    monkeypatch.setattr(evaluation, "run_evaluation", lambda *args: result)
    outputs = _evaluate(
        root, "evaluate_one_class", compressed["dense"], prepared, config_artifact, 0.0
    )
    logged = outputs["metrics"].metadata
    assert "keras_test_accuracy" in logged and "keras_test_auc" not in logged
    assert storage.read_json(outputs["evaluation"].path)["models"][0]["test"]["auc"] is None


@pytest.fixture(scope="module")
def selected(root, evaluated, compressed, config_artifact):
    outputs = {
        "model": art(dsl.Model, root, "select", "model"),
        "selection": art(dsl.Artifact, root, "select", "selection"),
        "metrics": art(dsl.Metrics, root, "select", "metrics"),
    }
    result = select_model.python_func(
        dense_evaluation=evaluated["dense"]["evaluation"],
        pruned_evaluations=[evaluated["prune_50"]["evaluation"]],
        dense_models=compressed["dense"]["models"],
        pruned_models=[compressed["prune_50"]["models"]],
        config=config_artifact,
        **outputs,
    )
    return result, outputs


def test_select_model(selected, evaluated):
    from cycleprune.selection import collect_entries, select_model

    result, outputs = selected
    records = [storage.read_json(evaluated[v]["evaluation"].path) for v in ("dense", "prune_50")]
    expected = select_model(collect_entries(records), preset("smoke").select)
    assert (result.name, result.format) == (expected.name, expected.format)
    record = storage.read_json(outputs["selection"].path)
    assert record["name"] == expected.name and record["reason"]
    deployed = Path(outputs["model"].path) / Path(expected.path).name
    assert deployed.is_file()
    assert outputs["model"].metadata["name"] == expected.name


def test_every_output_of_a_cached_stage_leaves_a_file(
    prepared, bounds, trained, pruned, compressed, evaluated, selected
):
    # kfp.local's cache takes an output artifact without a file for a lost one (a cache miss):
    # Metrics and ClassificationMetrics too must be written.
    outputs = {"prepare_data": prepared, "find_lr": bounds, "train": trained, "prune": pruned}
    outputs.update({f"compress {k}": v for k, v in compressed.items()})
    outputs.update({f"evaluate {k}": v for k, v in evaluated.items()})
    outputs["select_model"] = selected[1]
    missing = [
        f"{stage}: {name}"
        for stage, artifacts in outputs.items()
        for name, artifact in artifacts.items()
        if not Path(artifact.path).exists()
    ]
    assert missing == []
    assert storage.read_json(evaluated["dense"]["metrics"].path)["seconds"] >= 0


def _push(root, selected, evaluated, compressed, prepared, config_artifact, name, registry_uri):
    _, selection = selected
    outputs = {
        "decision": art(dsl.Artifact, root, name, "decision"),
        "page": art(dsl.HTML, root, name, "page"),
        "metrics": art(dsl.Metrics, root, name, "metrics"),
    }
    result = push.python_func(
        selection=selection["selection"],
        dense_evaluation=evaluated["dense"]["evaluation"],
        pruned_evaluations=[evaluated["prune_50"]["evaluation"]],
        dense_models=compressed["dense"]["models"],
        pruned_models=[compressed["prune_50"]["models"]],
        dataset=prepared["dataset"],
        dataset_info=prepared["info"],
        config=config_artifact,
        registry=registry_uri,
        model_name="pneumonia",
        min_auc=0.0,
        min_sensitivity=0.0,
        min_specificity=0.0,
        promotion_tolerance=1.0,
        run_id="run-1",
        **outputs,
    )
    return result, outputs


@pytest.fixture(scope="module")
def pushed(root, selected, evaluated, compressed, prepared, config_artifact):
    args = (root, selected, evaluated, compressed, prepared, config_artifact)
    return _push(*args, "push", str(root / "registry"))


def test_push(pushed, root, selected):
    result, outputs = pushed
    record = storage.read_json(outputs["decision"].path)
    assert result.promoted and result.version == record["version"]
    assert record["decision"]["champion_version"] is None  # the first model
    assert registry.production_version(root / "registry", "pneumonia") == result.version
    card = registry.show(root / "registry", "pneumonia")["card"]
    assert card["name"] == storage.read_json(selected[1]["selection"].path)["name"]
    assert card["parent_run"] == "run-1" and card["data"]["class_names"] == ["normal", "pneumonia"]
    assert outputs["metrics"].metadata["promoted"] == 1
    assert "candidate_test_auc" in outputs["metrics"].metadata
    assert result.version in Path(outputs["page"].path).read_text()


def test_push_without_registry_does_nothing(
    root, selected, evaluated, compressed, prepared, config_artifact
):
    args = (root, selected, evaluated, compressed, prepared, config_artifact)
    result, outputs = _push(*args, "push-skip", "")
    assert (result.version, result.promoted) == ("", False)
    record = storage.read_json(outputs["decision"].path)
    assert record.pop("seconds") >= 0 and record == {"skipped": True}


def test_report(
    root,
    config_artifact,
    prepared,
    bounds,
    trained,
    pruned,
    compressed,
    evaluated,
    selected,
    pushed,
):
    _, selection = selected
    run = art(dsl.Artifact, root, "report", "run")
    page = art(dsl.HTML, root, "report", "html")
    report.python_func(
        config=config_artifact,
        dataset_info=prepared["info"],
        lr_finder=bounds["lr_finder"],
        train_history=trained["history"],
        train_tensorboard=trained["tensorboard"],
        prune_histories=[pruned["history"]],
        prune_tensorboards=[pruned["tensorboard"]],
        dense_evaluation=evaluated["dense"]["evaluation"],
        pruned_evaluations=[evaluated["prune_50"]["evaluation"]],
        dense_models=compressed["dense"]["models"],
        pruned_models=[compressed["prune_50"]["models"]],
        selection=selection["selection"],
        push_decision=pushed[1]["decision"],
        run=run,
        html=page,
    )
    folder = Path(run.path)
    summary = storage.read_json(folder / "summary.json")
    assert summary["selected"] == storage.read_json(selection["selection"].path)["name"]
    assert [m["name"] for m in summary["models"]] == [
        "dense/keras", "dense/tflite_dynamic", "prune_50/keras", "prune_50/tflite_dynamic",
    ]  # fmt: skip
    for entry in summary["models"]:
        assert (folder / entry["path"]).is_file()
    seconds = summary["seconds"]
    for stage in ("prepare_data", "find_lr", "train", "report"):
        assert seconds[stage] > 0, stage
    for stage in ("select_model", "push"):  # milliseconds: may round to 0
        assert seconds[stage] >= 0, stage
    assert "configure" not in seconds  # this test's config artifact has no seconds metadata
    assert set(seconds["compress"]) == {"dense", "prune_50"}
    stages = [v for k, v in seconds.items() if k != "total"]
    flat = [v for v in stages if not isinstance(v, dict)]
    flat += [v for d in stages if isinstance(d, dict) for v in d.values()]
    assert seconds["total"] == pytest.approx(sum(flat), abs=0.01)
    assert run.metadata["seconds"] == seconds["total"]
    assert sorted(p.name for p in (folder / "tensorboard").iterdir()) == ["prune_50", "train"]
    assert Path(page.path).read_text() == (folder / "report.html").read_text()
    assert run.metadata["selected"] == summary["selected"]
    assert summary["registry"]["version"] == pushed[0].version
    assert summary["registry"]["promoted"] and run.metadata["promoted"]
    assert "Model registry" in Path(page.path).read_text()
