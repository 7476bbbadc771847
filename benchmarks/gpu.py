"""Section 8 (GPU only): the article's full-width VGG at 224 x 224 x 3, images/s and MFU.

Skipped without a GPU. On the first GPU, with mixed precision (``mixed_float16``; the model's
softmax layer stays float32) and XLA (``jit_compile=True``) on every side, the full-width VGG
(preset ``seed``: width 1.0, no BatchNorm) trains on the bundled images prepared at
224 x 224 x 3 (``data.image_size=224, channels=3``; ``limit`` images per split):

- **a**: cycleprune's path at the article's batch 32 (see :mod:`benchmarks.throughput`: compiled
  and warmed up by :func:`cycleprune.training.fit`, one epoch's ``model.fit`` per timed call);
- **b**: the article's ``CyclicLR`` callback on numpy arrays, batch 32;
- **a_large_batch**: (a) at batch 256, for the best MFU the model reaches;
- **a_spe1**: (a) with one step per call of the train function instead of the preset's
  ``train.steps_per_execution`` (16), which (a) and a_large_batch run: what the graph loop saves
  on a GPU, where every call is a host round trip. (b) cannot loop: its callback runs after every
  batch.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s, with achieved FLOP/s = images/s x
:func:`training_flops` per image (3 x the forward FLOPs counted from the layer shapes by
:func:`forward_flops`) and the peak the dense fp16/bf16 tensor-core figure of :data:`PEAK_FLOPS`
for the GPU's name (``None`` when the GPU is not in the table).

``python -m benchmarks.gpu --dry-run`` runs the same measurement on the CPU with a tiny model and
images, to check the code without a GPU (numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import Context, Target

# Dense fp16/bf16 tensor-core peak FLOP/s (no sparsity), from the vendors' data sheets. A variant
# (PCIe, NVL) comes before its family's SXM figure: the first key found in the name wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("V100S", 130e12),
    ("V100-PCIE", 112e12),
    ("V100", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("T4", 65e12),
)
IMAGE_SIDE = 224
BATCH = 32
LARGE_BATCH = 256
# Images per timed call: 144 steps of the article's batch 32, 18 of the large batch (whole
# batches on every side). Each call is one epoch of `model.fit`, so it includes the epoch's
# input-pipeline start (the shuffle buffer's fill) as on the CPU; enough steps keep that small.
EPOCH_IMAGES = 4608


def peak_flops(device_name: str) -> float | None:
    """The dense fp16 peak FLOP/s of a GPU from its name (``"NVIDIA H100 80GB HBM3"``), or None.

    See :func:`peak_flops_key`.
    """
    key = peak_flops_key(device_name)
    return None if key is None else dict(PEAK_FLOPS)[key]


def peak_flops_key(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` entry that ``device_name`` matches, or None.

    A key must appear as whole tokens (``L4`` does not match ``L40S``; a space in a key also
    matches ``-`` or ``_``), and the first matching key wins, so variants precede their family.
    """
    for key, _ in PEAK_FLOPS:
        pattern = r"[\s_-]+".join(re.escape(part) for part in re.split(r"[\s-]+", key))
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", device_name, flags=re.I):
            return key
    return None


def forward_flops(model: Any) -> int:
    """Forward-pass FLOPs per image of ``model``'s ``Conv2D`` and ``Dense`` layers.

    A convolution costs ``2 * kh * kw * (cin / groups) * cout`` per output pixel, i.e.
    ``2 * kernel.size * H_out * W_out``; a ``Dense`` layer ``2 * in * out`` per input vector
    (times the positions of a higher-rank input). Biases, activations, normalisation and
    pooling are left out (a fraction of a percent for VGG), as is usual for MFU. Nested models
    and wrappers (tfmot's pruning wrappers) are looked through.

    Args:
        model: A built Keras model (channels-last).

    Returns:
        FLOPs for one image.
    """
    from cycleprune.compat import keras

    total = 0
    for layer, shaped in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
            layer, keras.layers.Conv2DTranspose
        ):
            _, height, width, _ = shaped.output_shape
            total += 2 * int(math.prod(layer.kernel.shape)) * height * width
        elif isinstance(layer, keras.layers.Dense):
            positions = math.prod(shaped.input_shape[1:-1]) if len(shaped.input_shape) > 2 else 1
            total += 2 * int(math.prod(layer.kernel.shape)) * positions
    return int(total)


def training_flops(model: Any) -> int:
    """FLOPs per image of one training step: forward + backward = 3 x :func:`forward_flops`.

    The backward pass computes the gradients of the activations and of the weights, each about
    the forward's cost (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", 2.1).
    """
    return 3 * forward_flops(model)


def _leaf_layers(model: Any) -> Iterator[tuple[Any, Any]]:
    """``(layer, layer whose shapes to read)`` for every non-model layer, unwrapping wrappers."""
    from cycleprune.compat import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        elif isinstance(layer, keras.layers.Wrapper):
            yield layer.layer, layer
        else:
            yield layer, layer


def run(ctx: Context) -> dict[str, Any]:
    from cycleprune.compat import tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"results": None, "targets": [], "skipped": "no GPU"}
    details = tf.config.experimental.get_device_details(gpus[0])
    name = details.get("device_name") or gpus[0].name
    if ctx.quick:
        return measure(ctx, device_name=name, side=IMAGE_SIDE, images=4 * BATCH, width=1.0)
    return measure(ctx, device_name=name, side=IMAGE_SIDE, images=EPOCH_IMAGES, width=1.0)


def measure(
    ctx: Context,
    *,
    device_name: str,
    side: int,
    images: int,
    width: float,
    batch: int = BATCH,
    large_batch: int = LARGE_BATCH,
) -> dict[str, Any]:
    """Time (a), (b) and (a) at a large batch, one epoch of ``images`` per call; see the module."""
    from benchmarks.throughput import Setup
    from cycleprune import data, models, precision
    from cycleprune.config import DataConfig, preset

    prepared = ctx.work_dir / f"prepared-{side}"
    if not (prepared / data.INFO_FILE).is_file():
        data.prepare_dataset(
            ctx.source, prepared, DataConfig(image_size=side, channels=3, limit=images)
        )
    info = data.load_info(prepared)
    n_train = info.num_examples("train")
    base = preset("seed")
    schedule = dataclasses.replace(base.schedule, min_lr=1e-3, max_lr=1e-1)
    config = base.replace(
        data=dataclasses.replace(base.data, augment=False, batch_size=batch),
        model=dataclasses.replace(base.model, width=width),
        schedule=schedule,
    )
    large = config.replace(data=dataclasses.replace(config.data, batch_size=large_batch))

    def setup(cfg: Any, label: str) -> Setup:
        steps = math.ceil(n_train / cfg.data.batch_size)
        return Setup(
            ctx, prepared, cfg, steps=steps, epoch_steps=steps, images=n_train, label=label
        )

    with precision.policy_scope(precision.MIXED):
        counted = models.build_model(config.model, info.image_shape, info.num_classes)
        flops = training_flops(counted)
        del counted
        sides = {
            "a": setup(config, "gpu-a").library(jit=True),
            "b": setup(config, "gpu-b").article(jit=True),
            "a_large_batch": setup(large, "gpu-a-large").library(jit=True),
            "a_spe1": setup(config, "gpu-a-spe1").library(jit=True, steps_per_execution=1),
        }
        # Each call reports its seconds up to on_train_end (Setup's timing, as in the throughput
        # section), so the tf.data teardown wait of (b)'s numpy feed is not counted; a/b is the
        # median of per-round paired ratios.
        rounds = ctx.repeats + ctx.repeats % 2  # even: every side as often in each position
        timings = common.paired_rounds(
            sides, rounds, warmup=0 if ctx.quick else 1, between=gc.collect
        )
    peak = peak_flops(device_name)
    for stats in timings.values():
        stats["images_per_s"] = n_train / stats["median_s"]
        stats["tflops"] = stats["images_per_s"] * flops / 1e12
        stats["mfu"] = None if peak is None else stats["images_per_s"] * flops / peak
    a_over_b = common.paired_ratio(timings["b"]["samples_s"], timings["a"]["samples_s"])["median"]
    rows = [
        [
            name,
            batch if name != "a_large_batch" else large_batch,
            round(stats["images_per_s"], 1),
            round(stats["tflops"], 2),
            None if stats["mfu"] is None else round(stats["mfu"], 4),
        ]
        for name, stats in timings.items()
    ]
    target = Target(
        "throughput a/b (GPU)",
        a_over_b,
        1.05,
        note=f"{device_name}, VGG width {width:g} at {side}x{side}x3, mixed_float16 + XLA",
    )
    return {
        "results": {
            "device": device_name,
            "peak_flops": peak,
            "peak_flops_key": peak_flops_key(device_name),
            "image_shape": list(info.image_shape),
            "width": width,
            "training_flops_per_image": flops,
            "images_per_call": n_train,
            "a_over_b": a_over_b,
            "mfu_a": timings["a"]["mfu"],
            "mfu_a_large_batch": timings["a_large_batch"]["mfu"],
            "a_over_spe1": common.paired_ratio(
                timings["a_spe1"]["samples_s"], timings["a"]["samples_s"]
            )["median"],
            "sides": timings,
            "table": {
                "columns": ["side", "batch", "images/s", "TFLOP/s", "MFU"],
                "rows": rows,
            },
        },
        "targets": [target.to_dict()],
        "skipped": None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    parser.add_argument(
        "--dry-run", action="store_true", help="run on the CPU with a tiny model and images"
    )
    args = parser.parse_args(argv)
    if not args.dry_run:
        parser.error("use `python -m benchmarks.run --only gpu`, or --dry-run")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(quick=True, work_dir=Path(tmp), repeats=1)
        out = measure(ctx, device_name="cpu", side=32, images=32, width=0.125, large_batch=16)
    json.dump(out, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
