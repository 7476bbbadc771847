"""Section 5: inference latency on one thread, Keras float against TFLite float32 and int8.

The ``small`` preset model (width 0.25, BatchNorm, 28 x 28 x 1; untrained: weights do not change
the latency) is converted with :func:`cycleprune.compression.convert_tflite` to ``float32`` and
``int8`` (full integer, calibrated on ``compress.representative_samples`` real training images,
as the compress stage does). Each variant runs at batch 1 and batch 32:

- **keras_float**: ``model(x, training=False)`` in a ``tf.function`` (no XLA), ``.numpy()``;
  TensorFlow limited to one intra-op and one inter-op thread;
- **tflite_float32**, **tflite_int8**: ``ai_edge_litert.interpreter.Interpreter(num_threads=1)``
  built as :mod:`cycleprune.evaluation` builds it (default op resolver, which applies LiteRT's
  default delegate, XNNPACK); one call is ``set_tensor`` + ``invoke`` + ``get_tensor`` (the
  int8 model takes the raw uint8 pixels);
- **..._no_delegate**: the same TFLite models with
  ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`` (LiteRT's own kernels, no XNNPACK), to
  show what the delegate does.

TensorFlow's thread pools are fixed when it initialises, so the measurement runs in a child
process (``python -m benchmarks.latency --child OUT.json``) that sets them first. The child
reports whether the XNNPACK delegate was created (LiteRT logs it on stderr) and how many
delegate nodes each interpreter's graph has. Every timed repeat is a block of calls (median of
the per-call time over interleaved repeats); :func:`cycleprune.evaluation.measure_latency`, the
figure the evaluate stage reports, is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import REPO, Context, Target

BATCHES = (1, 32)
VARIANTS = (
    "keras_float",
    "tflite_float32",
    "tflite_int8",
    "tflite_float32_no_delegate",
    "tflite_int8_no_delegate",
)
_CHILD_TIMEOUT_S = 900


def run(ctx: Context) -> dict[str, Any]:
    prepared = common.prepared_dataset(ctx)
    out = ctx.work_dir / "latency.json"
    args = [sys.executable, "-m", "benchmarks.latency", "--child", str(out)]
    args += ["--dataset", str(prepared), "--repeats", str(ctx.repeats)]
    if ctx.quick:
        args.append("--quick")
    done = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"latency child exited with {done.returncode}:\n{tail}")
    results = json.loads(out.read_text())
    results["xnnpack_delegate_created"] = "XNNPACK delegate" in done.stderr
    results["delegate_log"] = [
        line.strip() for line in done.stderr.splitlines() if "delegate" in line.lower()
    ][:5]
    ms = results["ms_per_batch"]
    speedup = common.ratio(ms["keras_float"]["1"], ms["tflite_int8"]["1"])
    results["int8_speedup_batch1"] = speedup
    results["float32_speedup_batch1"] = common.ratio(
        ms["keras_float"]["1"], ms["tflite_float32"]["1"]
    )
    results["int8_speedup_batch32"] = common.ratio(ms["keras_float"]["32"], ms["tflite_int8"]["32"])
    results["table"] = {
        "columns": ["variant", *(f"ms/batch @{b}" for b in BATCHES), "ms/image @32"],
        "rows": [
            [
                variant,
                *(round(ms[variant][str(b)], 4) for b in BATCHES),
                round(ms[variant]["32"] / 32, 4),
            ]
            for variant in VARIANTS
        ],
    }
    target = Target(
        "TFLite int8 batch-1 speed-up vs Keras float",
        speedup,
        3.0,
        unit="x",
        note="1 thread; LiteRT default op resolver (XNNPACK)",
    )
    return {"results": results, "targets": [target.to_dict()], "skipped": None}


# --------------------------------------------------------------------------------------------
# The child process


def _child(out: Path, dataset: Path, repeats: int, quick: bool) -> None:
    from cycleprune.compat import tf

    # Before any op runs: the thread pools are created on first use.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from cycleprune import compression, data, evaluation, models
    from cycleprune.config import preset

    config = preset("small")
    info = data.load_info(dataset)
    images, _ = data.load_arrays(dataset, "train")
    samples = 16 if quick else config.compress.representative_samples
    representative = images[:samples].astype(np.float32)
    model = models.build_model(
        config.model, info.image_shape, info.num_classes, seed=config.train.seed
    )
    folder = out.parent / "latency-models"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in ("float32", "int8"):
        paths[mode] = folder / f"model_{mode}.tflite"
        paths[mode].write_bytes(compression.convert_tflite(model, mode, representative))

    spec = tf.TensorSpec([None, *info.image_shape], tf.float32)
    keras_call = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def keras_fn(batch: np.ndarray):
        return lambda: keras_call(batch).numpy()

    delegate_nodes = {}

    def tflite_fn(name: str, path: Path, batch: np.ndarray, *, delegate: bool):
        if delegate:
            interpreter = evaluation._interpreter(path)  # as the library builds it
        else:
            interpreter = Interpreter(
                model_path=str(path),
                num_threads=1,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, list(batch.shape), strict=False)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        output = interpreter.get_output_details()[0]["index"]
        fed = batch.astype(detail["dtype"])  # uint8 raw pixels for int8 (scale 1, zero point 0)
        delegate_nodes[name] = sum(
            1 for op in interpreter._get_ops_details() if op["op_name"] == "DELEGATE"
        )

        def call() -> Any:
            interpreter.set_tensor(detail["index"], fed)
            interpreter.invoke()
            return interpreter.get_tensor(output)

        return call

    blocks = {1: 5 if quick else 25, 32: 2 if quick else 4}
    latency_repeats = repeats if quick else max(repeats * 4, 20)
    ms_per_batch: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    samples_ms: dict[str, dict[str, list]] = {v: {} for v in VARIANTS}
    for size in BATCHES:
        batch = np.ascontiguousarray(images[:size].astype(np.float32))
        calls = {
            "keras_float": keras_fn(batch),
            "tflite_float32": tflite_fn("float32", paths["float32"], batch, delegate=True),
            "tflite_int8": tflite_fn("int8", paths["int8"], batch, delegate=True),
            "tflite_float32_no_delegate": tflite_fn(
                "float32_no_delegate", paths["float32"], batch, delegate=False
            ),
            "tflite_int8_no_delegate": tflite_fn(
                "int8_no_delegate", paths["int8"], batch, delegate=False
            ),
        }
        n = blocks[size]

        def block(fn, n=n):
            def run_block() -> None:
                for _ in range(n):
                    fn()

            return run_block

        for fn in calls.values():  # untimed: tracing, memory planning, delegate preparation
            for _ in range(3):
                fn()
        timings = common.interleaved(
            {name: block(fn) for name, fn in calls.items()}, latency_repeats, warmup=1
        )
        for name, stats in timings.items():
            ms_per_batch[name][str(size)] = stats["median_s"] / n * 1000
            samples_ms[name][str(size)] = [round(s / n * 1000, 4) for s in stats["samples_s"]]

    runs = 5 if quick else 50
    library = {
        "keras": evaluation.measure_latency(model, images[0], runs),
        "tflite_float32": evaluation.measure_latency(paths["float32"], images[0], runs),
        "tflite_int8": evaluation.measure_latency(paths["int8"], images[0], runs),
    }
    results = {
        "model": "small preset (width 0.25, BatchNorm), untrained",
        "image_shape": list(info.image_shape),
        "threads": 1,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "op_resolver": "AUTO (BuiltinOpResolver + default delegates)",
        "delegate_nodes": delegate_nodes,
        "calibration_images": samples,
        "calls_per_block": {str(k): v for k, v in blocks.items()},
        "repeats": latency_repeats,
        "tflite_bytes": {mode: path.stat().st_size for mode, path in paths.items()},
        "ms_per_batch": ms_per_batch,
        "ms_per_image": {
            v: {b: ms / int(b) for b, ms in per.items()} for v, per in ms_per_batch.items()
        },
        "samples_ms_per_batch": samples_ms,
        "library_measure_latency_ms_batch1": library,
    }
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency")
    parser.add_argument("--child", type=Path, required=True, help="write the results here")
    parser.add_argument("--dataset", type=Path, required=True, help="a prepared dataset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    _child(args.child, args.dataset, args.repeats, args.quick)


if __name__ == "__main__":
    main()
