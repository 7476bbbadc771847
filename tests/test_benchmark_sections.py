"""The benchmark sections' arithmetic, on fake inputs: compression table and targets, pipeline
overhead, LR range test cost, the data-scaling image-folder builder, and the throughput
section's paired ratios (plus one short real run of its three sides)."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, compression, data_scaling, lr_range, pipeline_overhead, throughput
from benchmarks.common import Context


def _model(name, size, gzip, accuracy, auc, threshold=0.5):
    return {
        "name": name,
        "variant": name.split("/")[0],
        "format": name.split("/")[1],
        "size_bytes": size,
        "gzip_bytes": gzip,
        "sparsity": 0.0,
        "threshold": threshold,
        "test": {"accuracy": accuracy, "sensitivity": 0.9, "specificity": 0.8, "auc": auc},
    }


@pytest.fixture
def fake_run(tmp_path) -> Path:
    summary = {
        "selected": "prune_90/tflite_int8",
        "selection": {"reason": "smallest within tolerance"},
        "models": [
            _model("dense/keras", 4_000_000, 3_000_000, 0.90, 0.95),
            _model("dense/tflite_int8", 1_000_000, 900_000, 0.89, 0.95),
            _model("prune_90/tflite_int8", 1_000_000, 150_000, 0.885, 0.9475, threshold=0.4),
        ],
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_compression_section_targets_and_table(fake_run, tmp_path):
    ctx = Context(quick=True, work_dir=tmp_path, repeats=1, shared={"pipeline_run": fake_run})
    out = compression.run(ctx)

    targets = {t["name"]: t for t in out["targets"]}
    ratio = targets["selected model gzip size ratio vs dense float"]
    assert ratio["measured"] == pytest.approx(20.0)
    assert ratio["met"] is True
    accuracy = targets["selected model test accuracy drop vs dense (points)"]
    assert accuracy["measured"] == pytest.approx(1.5)
    assert accuracy["met"] is False
    auc = targets["selected model test AUC drop vs dense (points)"]
    assert auc["measured"] == pytest.approx(0.25)
    assert auc["met"] is True

    table = out["results"]["table"]
    rows = {row[0]: row for row in table["rows"]}
    assert len(table["columns"]) == len(rows["dense/keras"])
    assert rows["dense/tflite_int8"][3] == "3.33"  # 3_000_000 / 900_000
    selected = rows["prune_90/tflite_int8 (selected)"]
    assert selected[1:4] == [1_000_000, 150_000, "20.00"]
    assert selected[4] == "0.8850" and selected[7] == "0.9475" and selected[8] == "0.400"
    assert rows["article: 50% sparsity (.h5)"][3] == "1.34"  # 51.42 / 38.33
    assert rows["article's quoted ratio: dense raw / 50% gzip"][3] == "1.47"  # 56.19 / 38.33


def test_compression_needs_the_dense_keras_baseline():
    summary = {"selected": "a/keras", "models": [_model("a/keras", 10, 5, 0.5, 0.5)]}
    with pytest.raises(ValueError, match=r"no dense/keras model"):
        compression.model_rows(summary)


def test_stage_compute_sums_variants_and_skips_total_and_cached():
    seconds = {
        "prepare_data": 2.5,
        "find_lr": 6.0,
        "prune": {"prune_50": 10.0, "prune_75": 12.0},
        "select_model": 0.01,
        "total": 30.51,
    }
    assert pipeline_overhead.stage_compute(seconds, exclude=["prepare_data"]) == {
        "find_lr": 6.0,
        "prune": 22.0,
        "select_model": 0.01,
    }


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ([], 0.0),
        ([(0, 2), (3, 4)], 3.0),
        ([(0, 5), (1, 2), (4, 7)], 7.0),
        ([(4, 7), (0, 5)], 7.0),
        ([(0, 1), (1, 2)], 2.0),
    ],
)
def test_interval_union(intervals, expected):
    assert pipeline_overhead.interval_union(intervals) == pytest.approx(expected)


def test_overhead_figures_serial_run_matches_the_naive_formula():
    # One task after another: busy = sum of task walls.
    out = pipeline_overhead.overhead_figures(
        wall=100.0,
        task_seconds={"train": [60.0], "evaluate": [30.0]},
        compute={"train": 54.0, "evaluate": 27.0},
        busy=90.0,
    )
    assert out["compute_s"] == 81.0 and out["task_s"] == 90.0
    assert out["between_tasks_s"] == pytest.approx(10.0)
    assert out["naive"] == pytest.approx(0.19)
    assert out["serial"] == pytest.approx(0.19)
    assert out["stages"]["train"] == {
        "tasks": 1,
        "task_s": 60.0,
        "compute_s": 54.0,
        "overhead_s": 6.0,
    }


def test_overhead_figures_parallel_tasks():
    # Two 40 s prune tasks side by side: compute exceeds the wall, the naive share goes negative.
    out = pipeline_overhead.overhead_figures(
        wall=50.0,
        task_seconds={"prune": [40.0, 40.0], "report": [5.0]},
        compute={"prune": 72.0},
        busy=45.0,
    )
    assert out["naive"] == pytest.approx(-22 / 50)
    assert out["serial"] == pytest.approx(1 - 72 / 90)
    assert out["tasks"] == 3
    assert out["stages"]["report"]["overhead_s"] == 5.0
    with pytest.raises(ValueError, match="wall"):
        pipeline_overhead.overhead_figures(0.0, {}, {}, 0.0)


def test_sweep_cost():
    cost = lr_range.sweep_cost(80, 74)
    assert cost["epochs"] == pytest.approx(80 / 74)
    assert cost["article_steps"] == 370
    assert cost["steps_ratio_article_over_test"] == pytest.approx(370 / 80)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_range.sweep_cost(80, 0)


def test_build_image_folder_counts(tmp_path):
    from PIL import Image

    labels = {"train": [0, 1, 1, 1, 0, 1], "test": [1, 0, 1]}
    arrays = {}
    for split, ys in labels.items():
        arrays[f"{split}_images"] = np.arange(len(ys) * 16, dtype=np.uint8).reshape(-1, 4, 4)
        arrays[f"{split}_labels"] = np.array(ys, np.uint8).reshape(-1, 1)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **arrays)

    out = tmp_path / "folder"
    # 15 images: 3 test (one pass over the source's test split), 12 train (two passes).
    counts = data_scaling.build_image_folder(npz, out, 15, test_fraction=0.2)

    assert counts == {"train": {"normal": 4, "pneumonia": 8}, "test": {"normal": 1, "pneumonia": 2}}
    for split, by_class in counts.items():
        for name, n in by_class.items():
            files = sorted((out / split / name).glob("*.png"))
            assert len(files) == n
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    # A "normal" training image is one of the source's label-0 images, pixel for pixel.
    first = np.asarray(Image.open(next((out / "train" / "normal").glob("*.png"))))
    normal = [arrays["train_images"][i] for i, y in enumerate(labels["train"]) if y == 0]
    assert any(np.array_equal(first, img) for img in normal)
    with pytest.raises(ValueError, match="Both splits"):
        data_scaling.build_image_folder(npz, tmp_path / "empty", 2, test_fraction=0.0)


def test_pipeline_overhead_section_from_fake_runs(tmp_path, monkeypatch):
    def fake_run(wall, task_seconds, compute, cached):
        figures = pipeline_overhead.overhead_figures(wall, task_seconds, compute, busy=wall - 1)
        return {
            "run_dir": str(tmp_path / "run"),
            "wall_s": wall,
            "cached": cached,
            "task_seconds": task_seconds,
            "figures": figures,
        }

    tasks = {"prepare_data": [3.0], "train": [40.0], "compress": [10.0, 10.0], "report": [4.0]}
    compute = {"prepare_data": 2.0, "train": 36.0, "compress": 16.0}
    runs = iter(
        [
            fake_run(68.0, tasks, compute, []),
            fake_run(64.0, {k: v for k, v in tasks.items() if k != "prepare_data"}, {}, ["x"]),
        ]
    )
    monkeypatch.setattr(pipeline_overhead, "run_pipeline", lambda ctx, root, out: next(runs))
    imports = {"python + kfp": {"median_s": 0.5}, "python + kfp + tensorflow": {"median_s": 3.5}}
    monkeypatch.setattr(pipeline_overhead, "_import_seconds", lambda repeats: imports)
    ctx = Context(quick=True, work_dir=tmp_path, repeats=1)

    out = pipeline_overhead.run(ctx)

    assert ctx.shared["pipeline_run"] == str(tmp_path / "run")
    targets = {t["name"]: t for t in out["targets"]}
    # compute 54 s of task walls 67 s + 1 s between tasks.
    assert targets["pipeline orchestration overhead"]["measured"] == pytest.approx(
        1 - 54 / 68, abs=1e-4
    )
    assert targets["cached rerun / first run"]["measured"] == pytest.approx(64 / 68, abs=1e-4)
    results = out["results"]
    # 5 tasks x 0.5 s + 4 TensorFlow tasks (prepare_data, train, 2 compress) x 3 s.
    assert results["startup_estimate_s"] == pytest.approx(2.5 + 4 * 3.0)
    # Every TensorFlow import happens before a stage's timer: none counts as compute.
    assert results["overhead_tf_import_as_overhead"] == pytest.approx(1 - 54 / 68)
    rows = {row[0]: row for row in results["table"]["rows"]}
    assert rows["compress"][1:5] == [2, "20.0", "16.0", "4.0"]
    assert rows["report"][4] == "4.0" and rows["report"][6].startswith("no")


# --------------------------------------------------------------------------------------------
# Throughput


def _side(samples, teardown=0.0):
    walls = [v + teardown for v in samples]
    return {**common.summarize(samples), "wall_samples_s": walls}


def _preset(sides, steps=10, batch=32, callback=None):
    startup = common.summarize([0.05, 0.05])
    info = {"preset": "p", "batch_size": batch, "steps": steps, "rounds": 4}
    timings = {name: _side(*args) for name, args in sides.items()}
    return throughput.compare_timings(
        timings, images=steps * batch, startup=startup, info=info, callback=callback
    )


def test_throughput_ratios_are_paired_per_round():
    # (b) and (c) take 1.1x as long as (a) in every round while the machine drifts 2x; one call
    # of (c) is an outlier. Samples of (a) carry a 2.5 s teardown, left out of the timing.
    a = [1.0, 2.0, 1.5, 1.2]
    result = _preset(
        {
            "a": (a, 2.5),
            "b": ([1.1 * v for v in a],),
            "c": ([1.1, 9.0, 1.65, 1.32],),
            "a_jit": ([0.5 * v for v in a],),
            "a_spe1": ([1.05 * v for v in a],),
            "b_nocb": ([1.08 * v for v in a],),
        }
    )
    assert result["ratios"]["a/b"] == pytest.approx(1.1)
    assert result["ratios"]["a/c"] == pytest.approx(1.1)  # the median ignores round 1's 4.5
    assert result["paired"]["a/c"]["max"] == pytest.approx(4.5)
    assert result["ratios"]["a_jit/a"] == pytest.approx(2.0)
    assert result["ratios"]["a/a_spe1"] == pytest.approx(1.05)
    assert result["ratios"]["b_nocb/b"] == pytest.approx(1.1 / 1.08)  # the callback's cost
    assert result["ratios"]["a/b_nocb"] == pytest.approx(1.08)  # the rest of a/b
    assert result["paired"]["a_augment/a"] is None and result["ratios"]["a_augment/a"] is None
    sides = result["sides"]
    assert sides["a"]["images_per_s"] == pytest.approx(320 / 1.35)
    assert sides["a"]["teardown_median_s"] == pytest.approx(2.5)
    assert sides["b"]["teardown_max_s"] == pytest.approx(0.0, abs=1e-9)
    assert result["epoch_startup_share_of_a"] == pytest.approx(0.05 / 1.35)
    assert result["rounds"] == 4 and result["steps"] == 10
    assert result["article_callback"] is None  # no callback time given


def test_throughput_callback_hook_share_of_the_step():
    # (b) takes a median 1.5 s for 10 steps = 150 ms per step; its hook's median call took
    # 0.15 s = 15 ms per step: 10% of the step.
    result = _preset(
        {"a": ([1.0, 1.0, 1.0],), "b": ([1.5, 1.4, 1.6],), "c": ([1.0, 1.0, 1.0],)},
        callback={"samples_s": [0.15, 0.1, 0.9]},
    )
    callback = result["article_callback"]
    assert callback["hook_ms_per_step"] == pytest.approx(15.0)
    assert callback["b_ms_per_step"] == pytest.approx(150.0)
    assert callback["share_of_b_step"] == pytest.approx(0.1)
    assert callback["calls"] == 3
    assert result["ratios"]["b_nocb/b"] is None  # no such side timed
    nothing = _preset({"a": ([1.0],), "b": ([1.5],)}, callback={"samples_s": []})
    assert nothing["article_callback"] is None
    # Only the timed rounds count: they are the last calls, after the untimed round.
    setup = throughput.Setup.__new__(throughput.Setup)
    assert setup.callback_time(2) is None  # (b) not built
    setup.hook_samples = [9.0, 0.1, 0.2]
    assert setup.callback_time(2) == {"samples_s": [0.1, 0.2]}


def test_throughput_section_record_from_fake_presets(tmp_path, monkeypatch):
    seen = []

    def fake_compare(ctx, prepared, preset, *, steps, extras):
        seen.append((preset, steps, extras))
        sides = {"a": ([1.0, 1.0],), "b": ([1.02, 1.06],), "c": ([0.98, 0.99],)}
        sides.update({name: ([1.5, 1.5],) for name in extras})
        if preset == "seed":
            sides["b_nocb"] = ([1.0, 1.0],)  # (b) without its callback: 1.02 and 1.06 faster
        # The hook: 0.0104 s per call = 5.2 ms per step of (b)'s 1.04 s / 2 steps.
        callback = {"samples_s": [0.0104, 0.0104]} if preset == "seed" else None
        return _preset(sides, steps=steps or 74, batch=64, callback=callback)

    monkeypatch.setattr(common, "prepared_dataset", lambda ctx: tmp_path)
    monkeypatch.setattr(throughput, "_compare", fake_compare)
    out = throughput.run(Context(quick=True, work_dir=tmp_path, repeats=2))

    assert seen == [("small", 3, ("a_spe1", "a_jit")), ("seed", 2, ())]
    targets = {t["name"]: t for t in out["targets"]}
    assert set(targets) == {
        f"throughput {pair} ({model})"
        for pair in ("a/b", "a/c")
        for model in ("small", "full width")
    }
    ab = targets["throughput a/b (small)"]
    assert ab["measured"] == pytest.approx(1.04)  # median of 1.02 and 1.06
    assert ab["met"] is False and ab["goal"] == ">= 1.05"
    assert ab["note"].startswith("median of 2 per-round ratios, IQR 1.030-1.050, range 1.020-1.060")
    assert "numpy arrays" in ab["note"]
    assert "without its callback" not in ab["note"] and "hook" not in ab["note"]  # small: none
    full_ab = targets["throughput a/b (full width)"]["note"]
    # (b): 1.04 s / 2 steps = 520 ms per step, of which 5.2 ms (1%) in the callback's hook.
    assert full_ab.endswith(
        "; without its callback (b) is 1.040x as fast (IQR 1.030-1.050), a/b_nocb 1.000"
        "; the callback's hook takes 5.20 ms of (b)'s 520.0 ms step (1.00%)"
    )
    assert targets["throughput a/c (full width)"]["measured"] == pytest.approx(0.985)
    results = out["results"]
    assert results["a_over_b_small"] == pytest.approx(1.04)
    assert results["jit_over_a_small"] == pytest.approx(1 / 1.5)
    assert results["augment_over_a_small"] is None
    assert results["a_over_spe1_small"] == pytest.approx(1.5)  # (a) runs 1.0 s, a_spe1 1.5 s
    assert results["nocb_over_b_full_width"] == pytest.approx(1.04)
    assert results["nocb_over_b_small"] is None
    # small: a b c a_spe1 a_jit; full width: a b c b_nocb
    assert len(results["table"]["rows"]) == 5 + 4
    ratio_table, callback_table = results["tables"].values()
    assert ["small", "a/b", 1.04, "1.0300 - 1.0500", "1.0200 - 1.0600", 2, 1.04] in ratio_table[
        "rows"
    ]
    assert callback_table["rows"] == [["full_width", 5.2, 520.0, "1.00%", 1.04, 1.0, 2]]
    json.dumps(out)  # JSON-serialisable as is


def test_throughput_sides_on_tiny_data(tiny_dataset, tmp_path):
    """The three real sides, 2 steps each, in 2 paired rounds: same work, teardown left out."""
    ctx = Context(quick=True, work_dir=tmp_path, repeats=2)
    result = throughput._compare(ctx, tiny_dataset, "small", steps=2, extras=())

    assert result["rounds"] == 2 and result["order"] == ["b_nocb", "b", "a", "c"]
    assert result["images_per_call"] == 2 * 64
    assert list(result["sides"]) == ["a", "b", "c", "b_nocb"]
    for stats in result["sides"].values():
        assert len(stats["samples_s"]) == 2
        for own, wall in zip(stats["samples_s"], stats["wall_samples_s"], strict=True):
            assert 0 < own <= wall
    for pair in ("a/b", "a/c", "b_nocb/b", "a/b_nocb"):
        assert result["paired"][pair]["n"] == 2
        assert result["ratios"][pair] > 0
    # (b)'s callback hook time: one sample per timed call, none from the warm-up.
    callback = result["article_callback"]
    assert callback["calls"] == 2
    assert 0 < callback["hook_ms_per_step"] < callback["b_ms_per_step"]


def test_a_range_test_that_suggests_nothing_or_diverges_fails_the_accuracy_target():
    sweeps = [{"seed": 1, "max_lr": 0.1}, {"seed": 2, "seconds": 3.0}, {"seed": 3, "max_lr": 0.2}]
    suggested = [
        {"seed": 1, "val_accuracy": 0.9},
        {"seed": 3, "diverged": "loss is NaN at step 12"},
    ]
    failed = lr_range.range_test_failures(sweeps, suggested)
    assert failed == "seed 2: no suggestion; seed 3: diverged"
    assert lr_range.range_test_failures(sweeps[:1], suggested[:1]) == ""
    # The seeds left over may compare well: the target still fails, and says why.
    target = common.Target("acc", 1.5, 0.0, note="n", failed=failed).to_dict()
    assert target["met"] is False
    assert target["note"] == "n (not met: seed 2: no suggestion; seed 3: diverged)"
    assert common.Target("acc", None, 0.0, failed="x").met is False
