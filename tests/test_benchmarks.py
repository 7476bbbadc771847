"""The benchmark harness: targets, timing, the runner, the FLOP counter, the article callback."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from benchmarks import common, gpu
from benchmarks import run as bench_run
from benchmarks.common import Target

# --------------------------------------------------------------------------------------------
# Target, interleaved(), paired_rounds() and paired_ratio()


@pytest.mark.parametrize(
    ("measured", "goal", "op", "met"),
    [
        (1.0, 0.97, ">=", True),
        (0.97, 0.97, ">=", True),
        (0.96, 0.97, ">=", False),
        (1.3, 1.3, "<=", True),
        (1.31, 1.3, "<=", False),
        (0.5, 1.3, "<=", True),
        (None, 1.0, ">=", None),
    ],
)
def test_target_met(measured, goal, op, met):
    assert Target("t", measured, goal, op=op).met is met


def test_target_to_dict():
    target = Target("pruning overhead", 1.234567, 1.3, op="<=", unit="x", note="why")
    assert target.to_dict() == {
        "name": "pruning overhead",
        "measured": 1.2346,
        "goal": "<= 1.3x",
        "met": True,
        "note": "why",
    }
    assert Target("none", None, 3.0).to_dict()["measured"] is None


def test_interleaved_order_and_medians(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []
    durations = {"a": iter([100.0, 1.0, 5.0, 3.0]), "b": iter([100.0, 10.0, 30.0, 20.0])}

    def make(name):
        def fn():
            calls.append(name)
            clock[0] += next(durations[name])

        return fn

    out = common.interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up first, not timed
    assert out["a"]["median_s"] == 3.0
    assert out["b"]["median_s"] == 20.0
    assert out["a"]["samples_s"] == [1.0, 5.0, 3.0]
    assert (out["b"]["min_s"], out["b"]["max_s"]) == (10.0, 30.0)


def _fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock


def test_paired_rounds_alternate_the_order_and_pair_the_samples(monkeypatch):
    clock = _fake_clock(monkeypatch)
    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds

        return fn

    between = []
    out = common.paired_rounds(
        {"a": make("a", 1.0), "b": make("b", 2.0), "c": make("c", 4.0)},
        repeats=3,
        warmup=1,
        between=lambda: between.append(len(calls)),
    )
    # Warm-up round (forward, untimed), then reverse, forward, reverse.
    assert calls == list("abccbaabccba")
    assert between == list(range(1, 13))  # after every call, outside the timing
    assert list(out) == ["a", "b", "c"]
    assert out["a"]["samples_s"] == [1.0, 1.0, 1.0]
    assert out["c"]["wall_samples_s"] == [4.0, 4.0, 4.0]
    assert out["b"]["median_s"] == 2.0

    calls.clear()
    common.paired_rounds({"a": make("a", 1.0), "b": make("b", 1.0)}, 2, warmup=0, alternate=False)
    assert calls == list("abab")


def test_paired_rounds_record_the_seconds_a_call_returns(monkeypatch):
    clock = _fake_clock(monkeypatch)

    def fit():
        clock[0] += 3.0
        return 2.5  # e.g. up to on_train_end; the rest is a teardown

    def plain():
        clock[0] += 1.0
        return "a History, not a number"

    out = common.paired_rounds({"fit": fit, "plain": plain}, 2, warmup=0)
    assert out["fit"]["samples_s"] == [2.5, 2.5]
    assert out["fit"]["wall_samples_s"] == [3.0, 3.0]
    assert out["plain"]["samples_s"] == [1.0, 1.0]


def test_paired_ratio_median_quartiles_and_range():
    out = common.paired_ratio([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 2.0, 2.0, 2.0])
    assert out["ratios"] == [2.0, 2.0, 3.0, 4.0, 5.0]
    assert out["median"] == 3.0
    assert (out["q1"], out["q3"]) == (2.0, 4.0)
    assert (out["min"], out["max"], out["n"]) == (2.0, 5.0, 5)
    assert out["ratio_of_medians"] == 3.0
    one = common.paired_ratio([3.0], [2.0])
    assert one["median"] == one["q1"] == one["q3"] == 1.5


def test_paired_ratio_survives_drift_and_one_sided_stalls():
    # The machine slows down over the run (+20% a round); B is truly 1.5x slower than A. A's
    # first two calls stall (+10 s): A's median moves to later, slower rounds than B's, so the
    # ratio of medians is off by a fifth; each round's ratio cancels the drift, and the median
    # of the per-round ratios ignores the two disturbed rounds.
    drift = [1 + 0.2 * r for r in range(6)]
    a = [f + (10.0 if r < 2 else 0.0) for r, f in enumerate(drift)]
    b = [1.5 * f for f in drift]
    out = common.paired_ratio(b, a)
    assert out["ratio_of_medians"] == pytest.approx(2.25 / 1.9)
    assert out["median"] == pytest.approx(1.5)
    assert out["min"] < 0.2 and out["max"] == pytest.approx(1.5)


def test_paired_ratio_on_the_stalled_samples_of_a_stored_run():
    # Throughput "small" (a) and (b) of benchmarks/results/2026-12-04-run1.json (in git at
    # c995046): a fit took ~2.9 s or, when the tf.data teardown waited for the autotuner's tick,
    # ~5.15 s. The ratio of medians said 1.72.
    a = [5.153264, 5.151087, 2.997394, 2.917569, 2.911715]
    b = [5.171177, 5.202028, 5.166118, 3.093556, 2.928054]
    out = common.paired_ratio(b, a)
    assert out["ratio_of_medians"] == pytest.approx(1.7235, abs=1e-4)
    assert out["median"] == pytest.approx(1.010, abs=1e-3)
    assert out["max"] == pytest.approx(1.7235, abs=1e-4)  # the one round with only (b) stalled


@pytest.mark.parametrize(("alternate", "bias"), [(False, 0.02), (True, 0.0)])
def test_alternating_order_cancels_a_drift_within_rounds(monkeypatch, alternate, bias):
    # Every call takes 2% longer per second elapsed; both sides do the same work. In a fixed
    # order the second side always runs later, hence slower; alternating cancels that.
    clock = _fake_clock(monkeypatch)

    def side():
        clock[0] += 1.0 + 0.02 * clock[0]

    out = common.paired_rounds({"a": side, "b": side}, 10, warmup=1, alternate=alternate)
    ratio = common.paired_ratio(out["b"]["samples_s"], out["a"]["samples_s"])
    assert ratio["median"] == pytest.approx(1.0 + bias, abs=1e-3)


@pytest.mark.parametrize(
    ("numerator", "denominator", "match"),
    [([], [], "non-empty"), ([1.0, 2.0], [1.0], "same length"), ([1.0], [0.0], "> 0")],
)
def test_paired_ratio_rejects_bad_samples(numerator, denominator, match):
    with pytest.raises(ValueError, match=match):
        common.paired_ratio(numerator, denominator)


# --------------------------------------------------------------------------------------------
# The runner


@pytest.fixture(autouse=True)
def _no_gpu_hiding(monkeypatch):
    # On a GPU machine the runner would hide the GPUs from this test process for good.
    monkeypatch.setattr(bench_run, "_hide_gpus", lambda: False)


def _good(ctx):
    assert ctx.repeats == bench_run.QUICK_REPEATS
    return {
        "results": {
            "ratio": 1.5,
            "samples": [1, 2, 3],
            "table": {"columns": ["side", "images/s"], "rows": [["a", 10.5], ["b", 7.0]]},
        },
        "targets": [Target("good ratio", 1.5, 1.05).to_dict()],
        "skipped": None,
    }


def _broken(ctx):
    raise ValueError("boom in section")


def _skipper(ctx):
    return {"results": None, "targets": [], "skipped": "no GPU"}


FAKE = {"good": _good, "broken": _broken, "skipper": _skipper}


def test_runner_writes_json_and_markdown_and_fails_on_error(tmp_path):
    status = bench_run.main(["--quick", "--out", str(tmp_path)], sections=FAKE)
    assert status == 1
    (path,) = tmp_path.glob("quick-*.json")
    payload = json.loads(path.read_text())
    assert payload["schema"] == 1 and payload["quick"] is True
    assert list(payload["sections"]) == ["good", "broken", "skipper"]
    broken = payload["sections"]["broken"]
    assert broken["error"] == "ValueError: boom in section"
    assert "boom in section" in broken["traceback"] and "_broken" in broken["traceback"]
    assert payload["sections"]["skipper"]["skipped"] == "no GPU"
    assert payload["targets"] == [
        {
            "name": "good ratio",
            "measured": 1.5,
            "goal": ">= 1.05",
            "met": True,
            "note": "",
            "section": "good",
        }
    ]
    machine = payload["machine"]
    for key in (
        "cpu",
        "logical_cores",
        "affinity",
        "ram_gib",
        "python",
        "tensorflow",
        "gpus",
        "tf_threads",
    ):
        assert key in machine
    assert machine["wall_s"] >= 0
    markdown = path.with_suffix(".md").read_text()
    assert "| good ratio | good | 1.5 | >= 1.05 | yes |  |" in markdown
    assert "| a | 10.5 |" in markdown
    assert "- ratio: 1.5" in markdown and "samples" not in markdown
    assert "Skipped: no GPU" in markdown
    assert "- TensorFlow threads: intra_op " in markdown
    assert "ValueError: boom in section" in markdown
    assert not list(tmp_path.glob(".*tmp"))  # the atomic writes left no temporary file
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_runner_only_merges_into_the_days_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_QUICK", "1")
    assert bench_run.main(["--out", str(tmp_path)], sections=FAKE) == 1
    # Rerun only the good section: the earlier error stays in the file but is not this run's.
    assert bench_run.main(["--only", "good", "--out", str(tmp_path)], sections=FAKE) == 0
    (path,) = tmp_path.glob("quick-*.json")
    payload = json.loads(path.read_text())
    assert list(payload["sections"]) == ["good", "broken", "skipper"]
    assert payload["sections"]["broken"]["error"].startswith("ValueError")
    assert [t["section"] for t in payload["targets"]] == ["good"]


def test_runner_records_where_each_section_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_QUICK", "1")
    assert bench_run.main(["--only", "good", "--out", str(tmp_path)], sections=FAKE) == 0
    (path,) = tmp_path.glob("quick-*.json")
    payload = json.loads(path.read_text())
    good = payload["sections"]["good"]
    assert good["commit"] == payload["machine"]["git_commit"]
    assert good["git_dirty"] == payload["machine"]["git_dirty"]
    assert good["host"] == bench_run.host_line(payload["machine"])
    assert "Where each section ran" not in path.with_suffix(".md").read_text()
    # A later --only run at another commit: each section keeps its own, and the page says so.
    monkeypatch.setattr(bench_run, "_git_commit", lambda: "f" * 40)
    assert bench_run.main(["--only", "skipper", "--out", str(tmp_path)], sections=FAKE) == 0
    markdown = path.with_suffix(".md").read_text()
    assert "Where each section ran:" in markdown
    assert "- skipper: commit fffffff" in markdown
    assert f"- good: commit {good['commit'][:7]}" in markdown


def test_runner_on_a_gpu_machine_hides_the_gpus_from_the_cpu_sections(tmp_path, monkeypatch):
    machine = {**bench_run.machine_record(), "gpus": [{"name": "GPU:0", "device_name": "H200"}]}
    monkeypatch.setattr(bench_run, "machine_record", lambda: dict(machine))
    calls = []
    monkeypatch.setattr(bench_run, "_hide_gpus", lambda: calls.append("hide") or True)

    def child(quick, env):
        calls.append(("child", quick))
        return {"results": {"device": "H200"}, "targets": [], "skipped": None, "error": None,
                "commit": "c" * 40, "git_dirty": False, "host": "the child"}  # fmt: skip

    def in_process_gpu(ctx):
        raise AssertionError("the gpu section must run in the child process")

    def cpu(ctx):
        calls.append("cpu")
        return _good(ctx)

    monkeypatch.setattr(bench_run, "_gpu_in_child", child)
    sections = {"cpu": cpu, "gpu": in_process_gpu}
    assert bench_run.main(["--quick", "--out", str(tmp_path)], sections=sections) == 0
    assert calls == ["hide", "cpu", ("child", True)]
    (path,) = tmp_path.glob("quick-*.json")
    payload = json.loads(path.read_text())
    assert payload["sections"]["gpu"]["results"] == {"device": "H200"}
    assert payload["sections"]["cpu"]["host"].endswith("GPUs: H200 (hidden from the CPU sections)")
    # Only the gpu section asked for: it runs here, on the GPU, nothing hidden.
    calls.clear()
    sections = {"gpu": lambda ctx: calls.append("gpu here") or _skipper(ctx)}
    assert bench_run.main(["--quick", "--out", str(tmp_path)], sections=sections) == 0
    assert calls == ["gpu here"]


def test_runner_rejects_unknown_sections(tmp_path):
    assert bench_run.main(["--only", "nope", "--out", str(tmp_path)], sections=FAKE) == 2
    assert not list(tmp_path.iterdir())


def test_default_section_order():
    found = bench_run.discover()
    order = [name for name in bench_run.SECTIONS if name in found]
    assert list(found) == order
    assert {"throughput", "pruning_overhead", "latency", "gpu"} <= set(found)


# --------------------------------------------------------------------------------------------
# The FLOP counter and the peak table (GPU section)


def test_forward_flops_of_a_tiny_model():
    from cycleprune.compat import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8x8 out: 2*3*3*3*4 * 64 = 13824
    x = keras.layers.MaxPooling2D(1)(x)  # no FLOPs counted
    x = keras.layers.Conv2D(2, 3)(x)  # 6x6 out: 2*3*3*4*2 * 36 = 5184
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 2*2*5 = 20
    model = keras.Model(inputs, outputs)
    assert gpu.forward_flops(model) == 13824 + 5184 + 20
    assert gpu.training_flops(model) == 3 * 19028


def test_forward_flops_of_the_full_width_vgg():
    from cycleprune import models
    from cycleprune.config import ModelConfig

    model = models.build_model(ModelConfig(width=1.0), (32, 32, 1), 2)
    # Per block: (input channels, filters, side, convolutions); 3x3 kernels.
    blocks = [(1, 64, 32, 2), (64, 128, 16, 2), (128, 256, 8, 3), (256, 512, 4, 3)]
    blocks.append((512, 512, 2, 3))
    expected = 0
    for cin, cout, side, convs in blocks:
        for i in range(convs):
            expected += 2 * 9 * (cin if i == 0 else cout) * cout * side * side
    expected += 2 * 512 * 2
    assert gpu.forward_flops(model) == expected


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla T4", 65e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        # Variants before their family: PCIe and NVL parts run lower clocks than SXM.
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200 NVL", 835e12),
        ("Tesla V100-PCIE-16GB", 112e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA RTX A6000", None),
        ("cpu", None),
    ],
)
def test_peak_flops(name, peak):
    assert gpu.peak_flops(name) == peak


def test_gpu_section_skips_without_a_gpu(tmp_path):
    from cycleprune.compat import tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present")
    ctx = common.Context(quick=True, work_dir=tmp_path, repeats=1)
    assert gpu.run(ctx) == {"results": None, "targets": [], "skipped": "no GPU"}


# --------------------------------------------------------------------------------------------
# The article's callback


@pytest.mark.parametrize(
    ("policy", "gamma"), [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.9)]
)
def test_article_callback_follows_the_clr_formula(policy, gamma):
    from benchmarks.article_callback import CyclicLR
    from cycleprune import schedules
    from cycleprune.compat import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss="mse")
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(float(keras.backend.get_value(self.model.optimizer.lr)))

    clr = CyclicLR(base_lr=0.01, max_lr=0.1, step_size=3, mode=policy, gamma=gamma)
    x = np.zeros((20, 3), np.float32)
    y = np.tile(np.float32([1.0, 0.0]), (20, 1))
    # 2 epochs of 5 batches: the cycle continues across epochs.
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[clr, Recorder()], verbose=0)
    expected = schedules.clr(np.arange(10), 0.01, 0.1, 3, policy=policy, gamma=gamma)
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    np.testing.assert_allclose(clr.history["lr"], expected, rtol=1e-6)
    assert clr.history["iterations"] == list(range(1, 11))
    assert len(clr.history["loss"]) == 10  # the batch logs, as the original records them
    # The peak, one half-cycle in: max_lr (exp_range: 0.01 + 0.09 * gamma**3).
    peak = 0.1 if policy != "exp_range" else 0.01 + 0.09 * gamma**3
    assert seen[3] == pytest.approx(peak, rel=1e-6)


def test_ablation_table_leaves_out_files_of_other_studies(tmp_path, capsys):
    from benchmarks import ablation

    def model(name, acc, auc):
        metrics = {"accuracy": acc, "auc": auc}
        return {"name": name, "val": metrics, "test": metrics}

    quality = tmp_path / "A_run.json"
    quality.write_text(
        json.dumps(
            {
                "overrides": ["train.epochs=16"],
                "runs": [
                    {"models": [model("dense/keras", 0.90, 0.96)], "selected": "dense/keras"},
                    {"models": [model("dense/keras", 0.92, 0.98)], "selected": "dense/keras"},
                ],
            }
        )
    )
    patched = tmp_path / "C_patched.json"
    patched.write_text(
        json.dumps(
            {
                "change": "weight decay 5e-5",
                "overrides": [],
                "runs": [{"models": [model("dense/keras", 0.9, 0.97)], "selected": "dense/keras"}],
            }
        )
    )
    other = tmp_path / "B_offline.json"
    other.write_text(json.dumps({"what": "offline", "rows": [{"tta": "none"}]}))
    assert ablation.main([str(quality), str(other), str(patched)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert lines[2] == "| A_run | train.epochs=16 | 2 | 0.910 ± 0.014 | 0.970 ± 0.014 | - | - | - |"
    assert lines[3] == "| C_patched | weight decay 5e-5 | 1 | 0.900 | 0.970 | - | - | - |"
    assert "left out" in err and "B_offline.json" in err


def test_gpu_section_in_a_child_process_returns_its_record():
    from cycleprune.compat import tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present")
    record = bench_run._gpu_in_child(True, dict(os.environ))
    assert record["skipped"] == "no GPU" and record["error"] is None


def test_gpu_measurement_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    # The GPU section's whole path (mixed precision, XLA, the four sides, FLOPs, the table)
    # on the CPU, so that a crash does not first show on a rationed GPU. Numbers meaningless.
    ctx = common.Context(quick=True, work_dir=tmp_path, repeats=1)
    out = gpu.measure(ctx, device_name="cpu", side=32, images=32, width=0.125, large_batch=16)
    results = out["results"]
    assert set(results["sides"]) == {"a", "b", "a_large_batch", "a_spe1"}
    for stats in results["sides"].values():
        assert len(stats["samples_s"]) == 2  # one round made even: each side in each position
        assert stats["images_per_s"] > 0 and stats["mfu"] is None  # no peak for "cpu"
    assert results["images_per_call"] == 32 and results["image_shape"] == [32, 32, 3]
    assert results["training_flops_per_image"] > 0 and results["a_over_b"] > 0
    assert [row[0] for row in results["table"]["rows"]] == ["a", "b", "a_large_batch", "a_spe1"]
    (target,) = out["targets"]
    assert target["name"] == "throughput a/b (GPU)" and target["measured"] > 0
