"""The pipeline under kfp.local: caching, and the whole smoke run end to end (and again, cached)."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from kfp import dsl, local

from components._base import DEFAULT_IMAGE, component
from components.configure import configure, list_sparsities
from components.parameters import pipeline_arguments
from components.prepare_data import prepare_data
from cycleprune import storage
from cycleprune.config import preset
from pipelines import local as local_run
from pipelines.pipeline import CACHED_STAGES, UNCACHED_STAGES, _settle

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist.npz"


def smoke_config(**train_changes):
    config = preset("smoke")
    return config.replace(
        data=dataclasses.replace(config.data, class_names=("normal", "pneumonia")),
        train=dataclasses.replace(config.train, **train_changes),
    )


def _prepare_only(config, source: str):
    """configure -> prepare_data with the real components and the real task settings."""
    arguments = pipeline_arguments(config)

    @dsl.pipeline(name="prepare-only")
    def prepare_only() -> dsl.Dataset:
        settle = {"image": DEFAULT_IMAGE, "gpus": 0, "retries": 0}
        configured = _settle(configure(**arguments), "configure", **settle)
        prepared = _settle(
            prepare_data(source=source, data_config=configured.outputs["data_config"]),
            "prepare_data",
            **settle,
        )
        return prepared.outputs["dataset"]

    return prepare_only


# kfp.local's notes that the image and the resources have no effect in a subprocess: true.
@pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Task .* have no effect:UserWarning")
def test_prepare_data_stays_cached_when_training_settings_change(tmp_path, tiny_npz, caplog):
    local_run.hide_docker_folder()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        enable_caching=True,
    )
    caplog.set_level(logging.INFO)

    def hits() -> set[str]:
        found = {t for t in ("configure", "prepare-data") if f"Task {t} cache hit" in caplog.text}
        caplog.clear()
        return found

    first = _prepare_only(smoke_config(epochs=2), str(tiny_npz))().output
    assert (Path(first.path) / "dataset.json").is_file()
    assert hits() == set()
    again = _prepare_only(smoke_config(epochs=2), str(tiny_npz))().output
    assert again.uri == first.uri and hits() == {"configure", "prepare-data"}
    # configure runs again (so does every stage that reads its config: find_lr, train, ...);
    # prepare_data sees only the data settings, which did not change.
    longer = _prepare_only(smoke_config(epochs=5, optimizer="adam"), str(tiny_npz))().output
    assert longer.uri == first.uri  # served from the cache: same artifact
    assert hits() == {"prepare-data"}
    reseeded = smoke_config()
    reseeded = reseeded.replace(data=dataclasses.replace(reseeded.data, seed=1))
    other = _prepare_only(reseeded, str(tiny_npz))().output
    assert other.uri != first.uri  # a data setting changed: prepared again
    assert hits() == set()


@component
def _branch(sparsity: float) -> float:
    return sparsity


@component
def _gather(sparsities: list) -> str:
    import json

    return json.dumps(sorted(sparsities))


def _branches(**changes) -> list:
    """configure -> list_sparsities -> ParallelFor -> Collected, as the pipeline wires them."""
    arguments = {**pipeline_arguments(smoke_config()), **changes}

    @dsl.pipeline(name="fan-out-only")
    def fan_out_only() -> str:
        settle = {"image": DEFAULT_IMAGE, "gpus": 0, "retries": 0}
        config = _settle(configure(**arguments), "configure", **settle).outputs["config"]
        items = _settle(list_sparsities(config=config), "list_sparsities", **settle).output
        with dsl.ParallelFor(items) as sparsity:
            branch = _branch(sparsity=sparsity)
        return _gather(sparsities=dsl.Collected(branch.output)).output

    return json.loads(fan_out_only().output)


@pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Task .* have no effect:UserWarning")
def test_the_loop_runs_the_resolved_configs_sparsities(tmp_path):
    # The form's default [] runs the chosen preset's branches (best: 90% only), and
    # extra_config's prune.sparsities reaches the loop too.
    local_run.hide_docker_folder()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        enable_caching=False,
    )
    assert _branches(preset="best", sparsities=[], extra_config="") == [0.9]
    extra = "prune: {sparsities: [0.3, 0.4]}"
    assert _branches(preset="seed", sparsities=[], extra_config=extra) == [0.3, 0.4]


def _task_folders(kfp_run: Path, names) -> None:
    for name in names:
        (kfp_run / name / "out").mkdir(parents=True)
        (kfp_run / name / "executor_output.json").write_text("{}")


def test_prune_task_outputs_keeps_what_the_cache_points_to(tmp_path):
    cached = ["configure", "prepare-data", "train", "compress", "compress-2", "evaluate-2"]
    _task_folders(tmp_path / "run", [*cached, "push", "report"])
    local_run._prune_task_outputs(tmp_path / "run", cached=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(cached)
    # Without caching nothing refers to this run's outputs: all of them go, and the folder.
    _task_folders(tmp_path / "uncached", [*cached, "push", "report"])
    local_run._prune_task_outputs(tmp_path / "uncached", cached=False)
    assert not (tmp_path / "uncached").exists()


def test_code_digest_follows_the_library_source(monkeypatch, tmp_path):
    import cycleprune

    digest = local_run.code_digest()
    assert digest == local_run.code_digest() and len(digest) == 64
    fake = tmp_path / "cycleprune"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    monkeypatch.setattr(cycleprune, "__file__", str(fake / "__init__.py"))
    changed = local_run.code_digest()
    (fake / "training.py").write_text("EPOCHS = 1\n")
    assert len({digest, changed, local_run.code_digest()}) == 3


def test_tracker_reads_kfp_local_logs():
    lines = []
    tracker = local_run._Tracker(lines.append)

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("root", logging.INFO, __file__, 1, message, None, None)

    tracker.filter(record("Executing task \x1b[96m'compress-2'\x1b[0m"))
    tracker.filter(record("Task \x1b[96m'compress-2'\x1b[0m finished with status \x1b[92mSUCCESS"))
    tracker.filter(record("Task prepare-data cache hit (key=0123456789ab); skipping execution."))
    assert list(tracker.seconds) == ["compress"] and len(tracker.seconds["compress"]) == 1
    assert tracker.cached == ["prepare_data"]
    assert [line.split("] ", 1)[1] for line in lines] == [
        "compress: started",
        f"compress: success ({tracker.seconds['compress'][0]:.1f} s)",
        "prepare_data: cached, reusing its outputs",
    ]


def test_task_error_is_the_failed_tasks_exception_line():
    log = "\n".join(
        [
            "    Traceback (most recent call last):",
            "    ValueError: an earlier task's error, not this one",
            "Task 'train' finished with status \x1b[92mSUCCESS\x1b[0m",
            "    Traceback (most recent call last):",
            '      File "/app/cycleprune/data.py", line 9, in prepare_dataset',
            "    cycleprune.data.DataError: /d/x.npz is not a .npz archive",
            "",
            "12:00:00.000 - ERROR - Task \x1b[96m'prepare-data'\x1b[0m finished with status "
            "\x1b[91mFAILURE\x1b[0m",
            "Skipping task find-lr: upstream task(s) ['prepare-data'] failed.",
        ]
    )
    assert local_run._task_error(log, "prepare-data") == (
        "cycleprune.data.DataError: /d/x.npz is not a .npz archive"
    )
    assert local_run._task_error("no traceback here", "prepare-data") is None
    # Killed without a traceback: another task's earlier error is not this task's.
    killed = "\n".join(
        [
            "Executing task 'find-lr'",
            "    cycleprune.preemption.PreemptedError: handled in an earlier attempt",
            "Executing task 'train'",
            "Killed",
            "Task 'train' finished with status FAILURE",
        ]
    )
    assert local_run._task_error(killed, "train") is None


@pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Task .* have no effect:UserWarning")
def test_a_failed_run_is_one_error_line_naming_task_cause_and_log(tmp_path, capsys, monkeypatch):
    from cycleprune import cli

    monkeypatch.chdir(tmp_path)  # kfp.local's root: runs/.kfp-root under the working folder

    # A credential in the source's path (as in a signed URL) is in no line printed or logged.
    bad = tmp_path / "key=SECRET9" / "bad.npz"
    bad.parent.mkdir()
    bad.write_text("not an archive")
    code = cli.main(
        ["run", "--preset", "smoke", "--source", str(bad), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert err.startswith("error: task prepare-data failed: cycleprune.data.DataError: ")
    assert f"{tmp_path}/key=[REDACTED] is not a .npz archive" in err
    log = err.split("Full log: ", 1)[1].split(". Task outputs", 1)[0]
    text = Path(log).read_text()
    assert "Traceback" in text and "key=[REDACTED]" in text and "SECRET9" not in text
    assert not (tmp_path / "o").exists()  # no run folder for a failed run
    missing = cli.main(["run", "--preset", "smoke", "--source", str(tmp_path / "nope.npz")])
    assert missing == 2  # checked before kfp.local starts
    assert "Data source not found: " in capsys.readouterr().err


def test_the_run_log_handler_redacts_what_is_logged(tmp_path):
    import io

    stream = io.StringIO()
    with local_run._root_handlers_to(stream):
        logging.getLogger("kfp.local").warning("GET https://h/o?X-Goog-Signature=SECRET1 ok")
    assert stream.getvalue().strip() == "GET https://h/o?X-Goog-Signature=[REDACTED] ok"
    local_run._redact_file(tmp_path / "never-opened.log")  # nothing to redact, no error


def test_run_local_refuses_a_non_empty_run_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        local_run.run_local(smoke_config(), source=str(BUNDLED), out_dir=tmp_path / "run")


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    from cycleprune import evaluation, models

    config = smoke_config()
    lines = []
    run_dir = tmp_path / "runs" / "smoke"
    root = tmp_path / "kfp-root"
    summary = local_run.run_local(
        config, source=str(BUNDLED), out_dir=run_dir, pipeline_root=root, progress=lines.append
    )

    # Every task ran and succeeded (kfp.local raises otherwise); nothing was cached yet.
    pipeline = summary["pipeline"]
    assert pipeline["cached"] == [] and pipeline["caching"] is True
    expected_runs = {
        "configure": 1, "list_sparsities": 1, "prepare_data": 1, "find_lr": 1, "train": 1,
        "prune": 2, "compress": 3, "evaluate": 3, "select_model": 1, "push": 1, "report": 1,
    }  # fmt: skip
    assert {k: len(v) for k, v in pipeline["task_seconds"].items()} == expected_runs
    assert sum("success" in line for line in lines) == sum(expected_runs.values())

    # summary.json: the returned dict, with every field of the contract.
    assert storage.read_json(run_dir / "summary.json") == json.loads(json.dumps(summary))
    assert summary["run_dir"] == str(run_dir.resolve())
    counts = summary["dataset"]["counts"]
    assert set(counts) == {"train", "val", "test"}
    assert all(set(c) == {"normal", "pneumonia"} for c in counts.values())
    test_size = summary["dataset"]["examples"]["test"]
    assert 0 < test_size <= config.data.limit
    lr = summary["lr_finder"]
    assert 0 < lr["min_lr"] < lr["max_lr"] and lr["bounds_from"] == "lr_finder"
    assert summary["training"]["min_lr"] == lr["min_lr"]
    assert [p["variant"] for p in summary["pruning"]] == ["prune_50", "prune_75"]
    formats = ["keras", "tflite_float32", "tflite_dynamic", "tflite_int8"]
    assert [m["name"] for m in summary["models"]] == [
        f"{variant}/{fmt}" for variant in ("dense", "prune_50", "prune_75") for fmt in formats
    ]
    for entry in summary["models"]:
        assert set(entry) >= {"name", "format", "sparsity", "size_bytes", "gzip_bytes", "path",
                              "threshold", "test"}  # fmt: skip
        assert set(entry["test"]) >= {"accuracy", "sensitivity", "specificity", "auc"}
        assert 0 < entry["gzip_bytes"] <= entry["size_bytes"]
        assert (run_dir / entry["path"]).is_file()
    assert summary["selected"] in {m["name"] for m in summary["models"]}
    seconds = summary["seconds"]
    for stage in ("configure", "prepare_data", "find_lr", "train", "select_model", "push"):
        assert seconds[stage] >= 0, stage
    assert seconds["report"] > 0  # recorded by the report itself, after drawing it
    for stage in ("prune", "compress", "evaluate"):
        assert set(seconds[stage]) >= {"prune_50", "prune_75"}, stage
    # The stages' own work (figures included) fits inside their tasks' wall time.
    for stage in ("find_lr", "train", "report"):
        assert seconds[stage] <= sum(pipeline["task_seconds"][stage]) + 0.1, stage
    assert summary["selected"] in local_run.format_table(summary)

    # The run folder: report, TensorBoard logs per training run, every export.
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 10
    for name in ("train", "prune_50", "prune_75"):
        assert list((run_dir / "tensorboard" / name).rglob("events.out.tfevents.*")), name
    assert (run_dir / "models" / "dense" / "saved_model" / "saved_model.pb").is_file()

    # The exported models load and predict raw uint8 pixels at the source resolution.
    with np.load(BUNDLED) as arrays:
        images = arrays["test_images"][:8]
    images = images[..., None] if images.ndim == 3 else images
    dense = models.load_model(str(run_dir / "models" / "dense" / "model.keras"))
    keras_probs = dense.predict(images.astype(np.float32), verbose=0)
    assert keras_probs.shape == (8, 2)
    np.testing.assert_allclose(keras_probs.sum(axis=1), 1.0, atol=1e-5)
    for entry in summary["models"]:
        if entry["format"].startswith("tflite"):
            probs = evaluation.predict_proba(str(run_dir / entry["path"]), images)
            assert probs.shape == (8, 2), entry["name"]
            assert np.all((probs >= 0) & (probs <= 1)), entry["name"]

    # The ClassificationMetrics artifact: a 2x2 confusion matrix over the whole test split.
    executor_output = root / pipeline["run"] / "evaluate" / "executor_output.json"
    artifacts = storage.read_json(executor_output)["artifacts"]
    matrix = artifacts["classification"]["artifacts"][0]["metadata"]["confusionMatrix"]
    rows = [row["row"] for row in matrix["rows"]]
    assert len(rows) == 2 and all(len(row) == 2 for row in rows)
    assert sum(map(sum, rows)) == test_size
    dense_keras = next(m for m in summary["models"] if m["name"] == "dense/keras")
    assert rows == dense_keras["test"]["confusion_matrix"]

    # After the run only the uncached stages' outputs are gone: the cache points to the rest.
    # (The ParallelFor's tasks live in one folder per iteration: for-loop-1-iteration-<i>/.)
    kept = [p for p in (root / pipeline["run"]).iterdir() if "-iteration-" not in p.name]
    kept += [p for p in (root / pipeline["run"]).glob("*-iteration-*/*")]
    assert {local_run._stage(p.name) for p in kept} == set(CACHED_STAGES)

    # The same run again: every cached stage comes from the cache (the first run's pruned
    # outputs suffice), only push and report run, and the run folder is whole.
    lines.clear()
    again_dir = tmp_path / "runs" / "again"
    again = local_run.run_local(
        config, source=str(BUNDLED), out_dir=again_dir, pipeline_root=root, progress=lines.append
    )
    assert again["pipeline"]["cached"] == sorted(CACHED_STAGES)
    assert sorted(again["pipeline"]["task_seconds"]) == sorted(UNCACHED_STAGES)
    assert sum("cached, reusing" in line for line in lines) == 14  # every cached task, loop too
    assert storage.read_json(again_dir / "summary.json") == json.loads(json.dumps(again))
    assert again["models"] == summary["models"] and again["selected"] == summary["selected"]
    for entry in again["models"]:
        assert (again_dir / entry["path"]).is_file()
    for stage in ("configure", "prepare_data", "find_lr", "train", "select_model"):
        assert again["seconds"][stage] == summary["seconds"][stage]  # of the run computing it
    assert (again_dir / "report.html").read_text().count("data:image/png;base64,") >= 10
    for name in ("train", "prune_50", "prune_75"):
        assert list((again_dir / "tensorboard" / name).rglob("events.out.tfevents.*")), name
    assert not (root / again["pipeline"]["run"]).exists()  # held only push and report
