"""summary.json, report.html and the results table (cycleprune.report), on synthetic records."""

import json
import math
import re

import pytest

from cycleprune import report, storage
from cycleprune.config import preset

CLASSES = ["normal", "pneumonia"]


def lr_record() -> dict:
    lrs = [1e-4 * 1.5**i for i in range(20)]
    losses = [1.0 - 0.03 * i if i < 15 else 0.6 + 0.2 * (i - 15) for i in range(20)]
    return {
        "lrs": lrs, "losses": losses, "smoothed": losses, "steps": 20, "stopped_early": False,
        "min_lr": 1e-3, "max_lr": 1e-2, "suggested_min_lr": 1e-3, "suggested_max_lr": 1e-2,
        "bounds_from": "lr_finder", "seconds": 4.0, "optimizer": "adam",
    }  # fmt: skip


def history(epochs: int = 2, steps: int = 4) -> dict:
    rows = [
        {"epoch": e + 1, "loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "accuracy": 0.5 + e / 10}
        for e in range(epochs)
    ]
    return {
        "epochs": rows, "lr": [0.001 * (1 + i % 2) for i in range(epochs * steps)],
        "min_lr": 0.001, "max_lr": 0.002, "step_size": steps, "policy": "triangular",
        "num_epochs": epochs, "steps_per_epoch": steps, "global_step": epochs * steps,
    }  # fmt: skip


def prune_record(target: float) -> dict:
    h = history(1)
    h.update(
        steps=list(range(4)), sparsity=[0.0, target / 2, target, target], final_sparsity=target
    )
    return {
        "history": h, "target_sparsity": target, "sparsity": target - 0.001,
        "layer_sparsity": {"conv": target}, "warnings": [], "seconds": 7.0,
    }  # fmt: skip


def model(fmt: str, gzip: int, auc: float, accuracy: float) -> dict:
    metrics = {
        "accuracy": accuracy, "sensitivity": 0.9, "specificity": 0.7, "auc": auc,
        "precision": 0.8, "f1": 0.85, "confusion_matrix": [[7, 3], [1, 9]], "threshold": 0.4,
    }  # fmt: skip
    return {
        "name": fmt, "format": fmt, "path": "model.keras" if fmt == "keras" else f"{fmt}.tflite",
        "size_bytes": 3 * gzip, "gzip_bytes": gzip, "threshold": 0.4, "val": dict(metrics),
        "test": metrics, "roc": {"fpr": [0.0, 0.3, 1.0], "tpr": [0.0, 0.9, 1.0],
                                 "thresholds": [None, 0.4, 0.0]},
        "latency_ms": 1.25,
    }  # fmt: skip


def evaluation(target: float, shrink: int) -> dict:
    return {
        "target_sparsity": target, "sparsity": target, "class_names": CLASSES,
        "positive_class": 1, "threshold_rule": "youden", "seconds": 3.0,
        "models": [model("keras", 9000 // shrink, 0.95, 0.88),
                   model("tflite_int8", 3000 // shrink, 0.95, 0.87)],
    }  # fmt: skip


DATASET = {
    "class_names": CLASSES, "image_shape": [28, 28, 1], "source": "/data/x.npz",
    "version": "abc123", "seconds": 2.5,
    "counts": {"train": {"normal": 60, "pneumonia": 120}, "val": {"normal": 8, "pneumonia": 12},
               "test": {"normal": 10, "pneumonia": 10}},
}  # fmt: skip
SELECTION = {
    "name": "prune_50/tflite_int8", "variant": "prune_50", "format": "tflite_int8",
    "path": "tflite_int8.tflite", "baseline": "dense/keras", "fallback": False,
    "eligible": ["prune_50/tflite_int8", "dense/keras"], "reason": "smallest", "seconds": 0.5,
}  # fmt: skip


@pytest.fixture
def summary() -> dict:
    return report.summarize(
        preset("smoke"),
        dataset=DATASET,
        lr_finder=lr_record(),
        training={"history": history(), "val": {"auc": 0.9}, "seconds": 10.0},
        pruning=[prune_record(0.5)],
        evaluations=[evaluation(0.0, 1), evaluation(0.5, 2)],
        selection=SELECTION,
        compress_seconds={"dense": 5.0, "prune_50": 6.0},
        tensorboard=["train", "prune_50"],
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
     (5 * 1024**2, "5.0 MiB"), (None, "-")],
)  # fmt: skip
def test_format_bytes(n, text):
    assert report.format_bytes(n) == text


def test_summary_fields(summary):
    assert summary["schema"] == 1
    assert summary["dataset"]["examples"] == {"train": 180, "val": 20, "test": 20}
    assert summary["lr_finder"]["min_lr"] == 1e-3 and summary["lr_finder"]["bounds_from"]
    assert summary["lr_finder"]["optimizer"] == "adam"
    assert summary["training"]["global_step"] == 8
    assert [p["variant"] for p in summary["pruning"]] == ["prune_50"]
    names = [m["name"] for m in summary["models"]]
    assert names == ["dense/keras", "dense/tflite_int8", "prune_50/keras", "prune_50/tflite_int8"]
    pruned = summary["models"][3]
    assert pruned["path"] == "models/prune_50/tflite_int8.tflite"
    assert pruned["gzip_bytes"] == 1500 and pruned["size_bytes"] == 4500
    assert set(pruned["test"]) >= {"accuracy", "sensitivity", "specificity", "auc"}
    assert summary["selected"] == "prune_50/tflite_int8"
    assert "seconds" not in summary["selection"]
    seconds = summary["seconds"]
    assert seconds["prune"] == {"prune_50": 7.0}
    assert seconds["compress"] == {"dense": 5.0, "prune_50": 6.0}
    assert seconds["evaluate"] == {"dense": 3.0, "prune_50": 3.0}
    assert seconds["total"] == pytest.approx(2.5 + 4 + 10 + 7 + 11 + 6 + 0.5)
    assert summary["tensorboard"] == {
        "train": "tensorboard/train",
        "prune_50": "tensorboard/prune_50",
    }
    assert summary["config"] == preset("smoke").to_dict()
    json.dumps(summary)  # JSON-ready


def test_table_shows_dense_pruned_and_selected(summary):
    rows = report.table_rows(summary)
    assert [r["name"] for r in rows] == ["dense/keras", "prune_50/keras", "prune_50/tflite_int8"]
    text = report.format_table(summary)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "sparsity", "accuracy"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[4].startswith("* prune_50/tflite_int8")
    assert "0.8700" in lines[4] and "1.5 KiB" in lines[4] and "50.0%" in lines[4]
    assert lines[-1] == "* selected: prune_50/tflite_int8"


def test_table_does_not_repeat_a_selected_keras_model(summary):
    summary = {**summary, "selected": "dense/keras"}
    assert [r["name"] for r in report.table_rows(summary)] == ["dense/keras", "prune_50/keras"]


def test_figures_html_embeds_pngs(tmp_path):
    figures = report.lr_finder_figures(lr_record(), tmp_path)
    caption = "LR range test: 20 steps with adam; CLR bounds 0.001 .. 0.01 (from lr_finder)"
    assert [c for c, _ in figures] == [caption]
    page = report.figures_html("LR <test>", figures, notes=["logs at s3://b/x"])
    assert page.count('src="data:image/png;base64,') == 1
    assert "LR &lt;test&gt;" in page and "s3://b/x" in page


def _write_stage_outputs(root) -> report.StageOutputs:
    paths = {}
    for name, record in {
        "info": DATASET, "lr": lr_record(), "selection": SELECTION,
        "train": {"history": history(), "val": {"auc": 0.9}, "seconds": 10.0},
        "prune": prune_record(0.5), "eval_dense": evaluation(0.0, 1),
        "eval_50": evaluation(0.5, 2),
    }.items():  # fmt: skip
        paths[name] = str(storage.atomic_write_json(root / f"{name}.json", record))
    for variant in ("dense", "prune_50"):
        folder = root / "compress" / variant
        folder.mkdir(parents=True)
        (folder / "model.keras").write_bytes(b"k" * 10)
        (folder / "tflite_int8.tflite").write_bytes(b"t" * 5)
    for run in ("train", "prune_50"):
        (root / "tb" / run).mkdir(parents=True)
        (root / "tb" / run / "events.out.tfevents.1").write_bytes(b"e")
    return report.StageOutputs(
        dataset=paths["info"],
        lr_finder=paths["lr"],
        training=paths["train"],
        pruning=[paths["prune"]],
        evaluations=[paths["eval_50"], paths["eval_dense"]],  # any order
        models={v: str(root / "compress" / v) for v in ("dense", "prune_50")},
        tensorboard={r: str(root / "tb" / r) for r in ("train", "prune_50")},
        selection=paths["selection"],
        compress_seconds={"dense": 5.0, "prune_50": 6.0},
    )


def test_build_run_writes_the_run_folder(tmp_path):
    stages = _write_stage_outputs(tmp_path / "stages")
    run = tmp_path / "run"
    summary = report.build_run(run, stages, preset("smoke"))
    assert storage.read_json(run / "summary.json") == json.loads(json.dumps(summary))
    for entry in summary["models"]:
        assert (run / entry["path"]).is_file(), entry["path"]
    assert (run / "tensorboard" / "prune_50" / "events.out.tfevents.1").is_file()
    page = (run / "report.html").read_text()
    # Offline: every image is embedded, nothing is fetched.
    assert not re.search(r'src="(?!data:)', page)
    # LR finder, schedule + curves, sparsity + curves, size/accuracy, 4 x (confusion + ROC).
    assert page.count('src="data:image/png;base64,') == 1 + 2 + 3 + 1 + 8
    assert 'class="selected"><td>prune_50/tflite_int8' in page
    assert "threshold_rule: youden" in page  # the configuration
    assert not list(run.parent.glob(".tmp-*"))


def test_whole_task_stages_join_seconds_when_known(summary):
    assert not {"configure", "push", "report"} & set(summary["seconds"])  # unknown: left out
    known = report.summarize(
        preset("smoke"),
        dataset=DATASET,
        lr_finder=lr_record(),
        training={"history": history(), "val": {"auc": 0.9}, "seconds": 10.0},
        pruning=[prune_record(0.5)],
        evaluations=[evaluation(0.0, 1), evaluation(0.5, 2)],
        selection=SELECTION,
        compress_seconds={"dense": 5.0, "prune_50": 6.0},
        push={"skipped": True, "seconds": 0.25},
        configure_seconds=0.125,
    )
    seconds = known["seconds"]
    assert (seconds["configure"], seconds["push"]) == (0.125, 0.25)
    assert known["registry"] is None  # a skipped push, seconds or not
    assert seconds["total"] == pytest.approx(summary["seconds"]["total"] + 0.375)


def test_add_stage_seconds_updates_the_total_in_summary_json(tmp_path):
    stages = _write_stage_outputs(tmp_path / "stages")
    run = tmp_path / "run"
    before = report.build_run(run, stages, preset("smoke"))["seconds"]
    after = report.add_stage_seconds(run, "report", 1.23456)
    assert after == storage.read_json(run / "summary.json")
    assert after["seconds"]["report"] == 1.235
    assert after["seconds"]["total"] == pytest.approx(before["total"] + 1.235)
    assert {k: v for k, v in after["seconds"].items() if k not in ("report", "total")} == {
        k: v for k, v in before.items() if k != "total"
    }
    again = report.add_stage_seconds(run, "report", 2.0)  # replaces, never adds up
    assert again["seconds"]["total"] == pytest.approx(before["total"] + 2.0)


@pytest.mark.parametrize(
    ("stage", "seconds", "message"),
    [("total", 1.0, "`stage`"), ("", 1.0, "`stage`"), ("report", -1.0, "`seconds`"),
     ("report", math.nan, "`seconds`")],
)  # fmt: skip
def test_add_stage_seconds_rejects_bad_values(tmp_path, stage, seconds, message):
    with pytest.raises(ValueError, match=message):
        report.add_stage_seconds(tmp_path, stage, seconds)


def test_build_run_reports_a_missing_record(tmp_path):
    stages = _write_stage_outputs(tmp_path / "stages")
    (tmp_path / "stages" / "lr.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lr\.json"):
        report.build_run(tmp_path / "run", stages, preset("smoke"))
    assert not (tmp_path / "run").exists()
