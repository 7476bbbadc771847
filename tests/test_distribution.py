"""cycleprune.distribution: strategy choice, global batch, and training under MirroredStrategy.

The multi-replica test needs two logical CPU devices, which TensorFlow only creates before it
initialises its devices (the pytest process already has): it runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cycleprune.compat import tf

# In a fresh process: split the CPU into two logical devices, then train, prune and run the LR
# range test on 1 and 2 replicas. No BatchNorm: its statistics are per replica, which would make
# the 2-replica run differ from the 1-replica run by more than float rounding.
_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import numpy as np
    from cycleprune.compat import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from cycleprune import distribution, lr_finder, models, pruning, training
    from cycleprune.config import LRFinderConfig, ModelConfig, PruneConfig, preset

    dataset, out = sys.argv[1], sys.argv[2]
    base = preset("smoke")
    config = base.replace(
        model=ModelConfig(width=0.125, batch_norm=False),
        train=dataclasses.replace(base.train, epochs=2, whole_cycles=False),
        # Fixed bounds: the LR range test then records its curve even without a usable descent.
        schedule=dataclasses.replace(base.schedule, step_size_epochs=1.5, min_lr=1e-3, max_lr=0.1),
        lr_finder=LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=6),
        prune=PruneConfig(final_sparsity=0.5, begin_epoch=0, end_epoch=1, epochs=1, frequency=1),
    )
    one = distribution.select_strategy()
    two = distribution.select_strategy(["/cpu:0", "/cpu:1"])

    def train(name, strategy, batch):
        cfg = config.replace(data=dataclasses.replace(config.data, batch_size=batch))
        result = training.run_training(dataset, f"{out}/{name}", cfg, strategy=strategy)
        weights = models.load_model(result.model_path).get_weights()
        keys = ("steps_per_epoch", "step_size", "global_batch_size", "replicas", "global_step")
        return cfg, result, {
            **{k: result.history[k] for k in keys},
            "loss": [e["loss"] for e in result.history["epochs"]],
            "weights": [w.tolist() for w in weights],
        }

    report = {"describe": distribution.describe(two)}
    _, _, report["one"] = train("one", one, 32)
    _, _, report["two"] = train("two", two, 32)  # global batch 64
    cfg, result, report["two_same_global"] = train("two16", two, 16)  # global batch 32
    initial = models.build_model(config.model, (28, 28, 1), 2, seed=config.train.seed)
    report["initial"] = [w.tolist() for w in initial.get_weights()]

    pruned = pruning.run_pruning(result.model_path, dataset, f"{out}/prune", cfg, strategy=two)
    report["pruned"] = {"sparsity": pruned.sparsity, "replicas": pruned.history["replicas"]}
    for name, strategy, batch in (("one", one, 32), ("two", two, 16)):
        cfg = config.replace(data=dataclasses.replace(config.data, batch_size=batch))
        found = lr_finder.run_lr_finder(dataset, f"{out}/lr-{name}", cfg, strategy=strategy)
        report[f"lr_{name}"] = found.losses.tolist()
    print("REPORT " + json.dumps(report))
    """
)


def test_select_strategy_defaults_to_one_device_and_validates():
    from cycleprune import distribution

    strategy = distribution.select_strategy()
    assert distribution.replicas(strategy) == 1  # no GPU here
    assert distribution.global_batch_size(32, strategy) == 32
    assert distribution.describe(strategy)["replicas"] == 1
    with pytest.raises(ValueError, match="each once"):
        distribution.select_strategy(["/cpu:0", "/cpu:0"])
    with pytest.raises(ValueError, match="at least one"):
        distribution.select_strategy([])
    with pytest.raises(ValueError, match="per_replica=0"):
        distribution.global_batch_size(0, strategy)


def test_check_gpus_warns_when_more_are_requested_than_visible(caplog):
    from cycleprune import distribution

    visible = len(tf.config.list_physical_devices("GPU"))
    with caplog.at_level("WARNING", logger="cycleprune.distribution"):
        assert distribution.check_gpus(visible + 2) == visible
    assert f"gpus={visible + 2} was requested" in caplog.text
    with pytest.raises(ValueError, match="requested=-1"):
        distribution.check_gpus(-1)


def test_two_replicas_scale_the_batch_and_match_one_replica(tiny_dataset, tmp_path):
    import numpy as np

    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_dataset), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    one, two, same = report["one"], report["two"], report["two_same_global"]
    assert report["describe"]["replicas"] == 2 and len(report["describe"]["devices"]) == 2

    # 240 images: 8 steps of 32 on one replica, 4 steps of 2 x 32 on two; the CLR half cycle
    # stays 1.5 epochs, in steps 12 and 6.
    assert (one["replicas"], one["global_batch_size"], one["steps_per_epoch"]) == (1, 32, 8)
    assert (two["replicas"], two["global_batch_size"], two["steps_per_epoch"]) == (2, 64, 4)
    assert (one["step_size"], two["step_size"]) == (12, 6)
    assert (one["global_step"], two["global_step"]) == (16, 8)
    assert all(np.isfinite(two["loss"]))
    # The 2-replica run updated every weight tensor (kernels and biases alike).
    for start, end in zip(report["initial"], two["weights"], strict=True):
        assert not np.allclose(np.asarray(start), np.asarray(end))

    # Two replicas of 16 see the same global batches as one replica of 32: the summed gradients
    # are the full batch's, so the weights agree up to float rounding (measured: 3e-8).
    assert same["steps_per_epoch"] == 8 and same["step_size"] == 12
    for a, b in zip(one["weights"], same["weights"], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(same["loss"], one["loss"], rtol=1e-5)

    # Pruning under two replicas reaches its target; the LR range test records the same losses.
    assert report["pruned"] == {"sparsity": pytest.approx(0.5, abs=0.01), "replicas": 2}
    np.testing.assert_allclose(report["lr_two"], report["lr_one"], rtol=1e-5)
