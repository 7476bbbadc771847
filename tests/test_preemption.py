"""Preemption and crashes: SIGTERM and SIGKILL on a real training process, then resume.

The subprocess tests train the tiny VGG on the 240-image slice (8 steps per epoch) with
``train.deterministic``, in a fresh interpreter each time, and compare with an uninterrupted
run of the same configuration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cycleprune.compat import keras, tf
from cycleprune.config import preset

EPOCHS = 6
STEPS = 8  # ceil(240 tiny training images / batch 32)
GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds

_WORKER = textwrap.dedent(
    """
    import hashlib, json, sys
    from cycleprune import models, preemption, training
    from cycleprune.config import Config

    config = Config.from_json(open(sys.argv[1]).read())
    dataset, out, checkpoints = sys.argv[2:5]
    try:
        result = training.run_training(dataset, out, config, checkpoint_dir=checkpoints)
    except preemption.PreemptedError as err:
        print("PREEMPTED " + json.dumps({"step": err.step, "checkpoint": err.checkpoint}))
        sys.exit(preemption.EXIT_CODE)
    weights = models.load_model(result.model_path).get_weights()
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    print("RESULT " + json.dumps({
        "global_step": result.global_step,
        "epochs_run": result.epochs_run,
        "epochs": result.history["epochs"],
        "weights": digest,
    }))
    """
)


def _config():
    base = preset("smoke")
    return base.replace(
        # 4 steps per call (the presets run 16): a signal mid-epoch stops at a call boundary
        # inside the 8-step epoch, which writes the partial checkpoint.
        train=dataclasses.replace(
            base.train,
            epochs=EPOCHS,
            whole_cycles=False,
            deterministic=True,
            steps_per_execution=4,
        ),
        schedule=dataclasses.replace(base.schedule, min_lr=1e-3, max_lr=0.1, step_size_epochs=1.5),
    )


def _start(config_path: Path, dataset: Path, out: Path, checkpoints: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(config_path), str(dataset), str(out), str(checkpoints)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, dict]:
    stdout, stderr = proc.communicate(timeout=timeout)
    for line in stdout.splitlines():
        for tag in ("RESULT ", "PREEMPTED "):
            if line.startswith(tag):
                return proc.returncode, {"kind": tag.strip(), **json.loads(line[len(tag) :])}
    return proc.returncode, {"kind": "none", "stderr": stderr[-3000:]}


def _completed(checkpoints: Path) -> list[str]:
    """The epoch checkpoints the manager's state file lists (what a restore would consider)."""
    state = tf.train.get_checkpoint_state(str(checkpoints)) if checkpoints.is_dir() else None
    return list(state.all_model_checkpoint_paths) if state else []


def _latest_epoch(checkpoints: Path) -> int:
    listed = _completed(checkpoints)  # the newest TRAIN_CHECKPOINTS_TO_KEEP (3) of them
    return int(listed[-1].rsplit("-", 1)[-1]) if listed else 0


def _wait_for_epochs(proc: subprocess.Popen, checkpoints: Path, epoch: int) -> None:
    deadline = time.monotonic() + 120
    while _latest_epoch(checkpoints) < epoch:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.02)


def _assert_intact(checkpoints: Path) -> list[int]:
    """Every listed checkpoint restores, has its JSON entry, and holds finite numbers."""
    epochs = []
    for path in _completed(checkpoints):
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_shape_map():
            value = reader.get_tensor(key)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.isfinite(value).all(), (path, key)
        epoch = int(path.rsplit("-", 1)[-1])
        entry = json.loads((checkpoints / f"ckpt-{epoch}.json").read_text())
        assert entry["epoch"] == epoch and entry["global_step"] == epoch * STEPS
        epochs.append(epoch)
    return epochs


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(_config().to_json())
    return path


@pytest.fixture(scope="module")
def reference(config_path, tiny_dataset, tmp_path_factory) -> dict:
    """An uninterrupted run, and its mean time per epoch."""
    root = tmp_path_factory.mktemp("reference")
    proc = _start(config_path, tiny_dataset, root / "out", root / "checkpoints")
    code, result = _finish(proc)
    assert code == 0 and result["kind"] == "RESULT", result
    written = [(root / "checkpoints" / f"ckpt-{n}.json").stat().st_mtime for n in (1, EPOCHS)]
    result["epoch_seconds"] = (written[1] - written[0]) / (EPOCHS - 1)
    return result


def _assert_same_run(resumed: dict, reference: dict) -> float:
    """Same steps, the same weights, the same metrics; returns the largest metric difference."""
    assert resumed["global_step"] == reference["global_step"] == EPOCHS * STEPS
    assert [e["epoch"] for e in resumed["epochs"]] == list(range(1, EPOCHS + 1))
    worst = 0.0
    for got, want in zip(resumed["epochs"], reference["epochs"], strict=True):
        for key in ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc", "lr"):
            worst = max(worst, abs(got[key] - want[key]))
    assert worst <= 1e-6, worst
    assert resumed["weights"] == reference["weights"]
    return worst


def test_sigterm_guard_sets_the_flag_and_restores_the_handler():
    from cycleprune.preemption import SigtermGuard

    before = signal.getsignal(signal.SIGTERM)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with SigtermGuard() as guard:
        guard.watch(model)
        assert not guard.requested and not getattr(model, "stop_training", False)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode of the main thread
        assert guard.requested and model.stop_training
        late = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        guard.watch(late)
        assert late.stop_training  # watching after the signal stops it at once
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_checkpoints_and_exits_within_the_grace_period(
    config_path, tiny_dataset, reference, tmp_path
):
    checkpoints = tmp_path / "checkpoints"
    proc = _start(config_path, tiny_dataset, tmp_path / "out", checkpoints)
    _wait_for_epochs(proc, checkpoints, 1)
    time.sleep(random.Random(7).uniform(0.1, 0.6) * reference["epoch_seconds"])
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, stopped = _finish(proc, timeout=GRACE_SECONDS)
    exit_seconds = time.monotonic() - sent
    assert code == 143 and stopped["kind"] == "PREEMPTED", stopped
    assert exit_seconds < GRACE_SECONDS
    assert stopped["checkpoint"] and Path(f"{stopped['checkpoint']}.index").is_file()
    assert 0 < stopped["step"] < EPOCHS * STEPS
    _assert_intact(checkpoints)

    code, resumed = _finish(_start(config_path, tiny_dataset, tmp_path / "out", checkpoints))
    assert code == 0 and resumed["kind"] == "RESULT", resumed
    _assert_same_run(resumed, reference)
    assert not (checkpoints / "partial").exists()  # superseded by the epoch's checkpoint


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_completes_the_same_run(
    config_path, tiny_dataset, reference, tmp_path
):
    rng = random.Random(1234)
    checkpoints = tmp_path / "checkpoints"
    out = tmp_path / "out"
    kills = []
    # Kill in three different epochs, each at a random moment of the epoch (possibly while a
    # checkpoint is being written); each attempt first finishes at least one epoch of its own.
    for target in sorted(rng.sample(range(1, EPOCHS - 1), 3)):
        proc = _start(config_path, tiny_dataset, out, checkpoints)
        _wait_for_epochs(proc, checkpoints, max(target, _latest_epoch(checkpoints) + 1))
        time.sleep(rng.uniform(0.0, 1.0) * reference["epoch_seconds"])
        proc.kill()  # SIGKILL
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        intact = _assert_intact(checkpoints)
        assert intact and intact == sorted(intact)
        kills.append(intact[-1])

    code, resumed = _finish(_start(config_path, tiny_dataset, out, checkpoints))
    assert code == 0 and resumed["kind"] == "RESULT", resumed
    assert resumed["epochs_run"] == EPOCHS - kills[-1]  # it resumed after the last saved epoch
    _assert_same_run(resumed, reference)
    assert _assert_intact(checkpoints)[-1] == EPOCHS
