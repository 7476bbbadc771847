"""Export a trained (optionally pruned) model and measure how small it gets.

Pruning only pays off once the model is compressed: a magnitude-pruned kernel is half zeros, and a
general-purpose compressor squeezes runs of zeros almost to nothing. The article measures this as
the size of the gzipped saved model; :func:`gzip_size` reproduces that measure deterministically
(level 9, zeroed timestamps, a sorted tar for folders), so two runs of the same weights give the
same number.

:func:`run_compression` writes the stripped Keras model, a TensorFlow SavedModel and TFLite
variants (float32, dynamic-range and full-integer quantization; TensorFlow Lite post-training
quantization, https://ai.google.dev/edge/litert/models/post_training_quantization), and a
``sizes.json`` listing raw and gzip sizes of each.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import storage
from cycleprune.config import QUANTIZATIONS, Config

_CHUNK = 1 << 20
_SIZES_FILE = "sizes.json"
_KERAS_FILE = "model.keras"
_SAVED_MODEL_DIR = "saved_model"


class _CountingWriter(io.RawIOBase):
    """A write-only sink that only counts bytes (so large models are never held in memory)."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.count += n
        return n


def _tar_info(root: Path, path: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path.relative_to(root).as_posix())
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if path.is_dir():
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = path.stat().st_size
        info.mode = 0o644
    return info


def gzip_size(path: str | os.PathLike) -> int:
    """Size in bytes of ``path`` after gzip at level 9, computed deterministically.

    A file is gzipped as is. A folder (a SavedModel) is first packed as a tar with sorted entries
    and zeroed mtime/uid/gid/owner names and normalised modes, so the number depends only on the
    names and contents of the files. The gzip header's timestamp is zeroed too.

    Args:
        path: A file or a folder.

    Returns:
        The compressed size in bytes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Cannot measure a missing path: {path}")
    sink = _CountingWriter()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=sink, mtime=0) as gz:
        if path.is_file():
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    gz.write(chunk)
        else:
            with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for item in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
                    info = _tar_info(path, item)
                    if item.is_file():
                        with item.open("rb") as handle:
                            tar.addfile(info, handle)
                    elif item.is_dir():
                        tar.addfile(info)
    return sink.count


def _is_pruning_wrapped(model: Any) -> bool:
    return any(
        type(layer).__name__ == "PruneLowMagnitude"
        or (hasattr(layer, "layers") and _is_pruning_wrapped(layer))
        for layer in model.layers
    )


def strip_if_pruned(model: Any) -> Any:
    """Return ``model`` without tfmot pruning wrappers (the model itself when there are none).

    The pruning wrappers carry masks and step counters that export formats neither need nor
    understand; ``strip_pruning`` keeps the (already zeroed) kernels and drops the rest.
    """
    if not _is_pruning_wrapped(model):
        return model
    from cycleprune import pruning

    return pruning.strip(model)


def _weight_layers(model: Any) -> list[Any]:
    from cycleprune.compat import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_weight_layers(layer))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            found.append(layer)
    return found


def kernel_sparsity(model: Any) -> dict[str, Any]:
    """Fraction of exactly-zero weights over all Conv2D/Dense kernels (biases excluded).

    Args:
        model: A Keras model, stripped of pruning wrappers.

    Returns:
        ``{"sparsity": zeros / total, "zero_weights": int, "total_weights": int,
        "layer_sparsity": {layer_name: float}}``; sparsity is 0.0 when there are no kernels.
    """
    zeros = total = 0
    per_layer = {}
    for layer in _weight_layers(model):
        kernel = np.asarray(layer.kernel.numpy())
        layer_zeros = int(np.count_nonzero(kernel == 0))
        per_layer[layer.name] = layer_zeros / kernel.size if kernel.size else 0.0
        zeros += layer_zeros
        total += int(kernel.size)
    return {
        "sparsity": zeros / total if total else 0.0,
        "zero_weights": zeros,
        "total_weights": total,
        "layer_sparsity": per_layer,
    }


def _pin_input_range(representative: np.ndarray) -> np.ndarray:
    """Make the calibration data span 0..255 so the uint8 input is exactly the raw pixel.

    The converter calibrates the input tensor's quantization from the data's min and max; with
    the full range it gets scale 1 and zero point 0, i.e. the int8 model takes stored pixels as
    they are. One pixel of the first image is changed at each end, which leaves the calibration of
    the inner layers practically untouched.
    """
    data = np.array(representative, dtype=np.float32, copy=True)
    if data.min() > 0:
        data[0].flat[0] = 0.0
    if data.max() < 255:
        data[0].flat[-1] = 255.0
    return data


def convert_tflite(model: Any, mode: str, representative: np.ndarray | None = None) -> bytes:
    """Convert a Keras model to a TFLite flatbuffer.

    Modes (TensorFlow Lite post-training quantization):

    - ``float32``: no quantization;
    - ``dynamic``: dynamic-range quantization, int8 weights with float activations
      (``Optimize.DEFAULT`` without calibration data);
    - ``int8``: full-integer quantization calibrated on ``representative``, int8 kernels and
      activations, with ``uint8`` input and output tensors: the model takes raw ``uint8`` pixels
      (input scale 1, zero point 0) and returns quantized probabilities (dequantize with the output
      tensor's scale and zero point; :func:`cycleprune.evaluation.predict_proba` does).

    Pruning wrappers are stripped first.

    Args:
        model: A Keras model taking float32 images 0..255.
        mode: ``"float32"``, ``"dynamic"`` or ``"int8"``.
        representative: Calibration images ``[N, H, W, C]`` as the model takes them (0..255),
            from the training split; required for ``int8``, ignored otherwise.

    Returns:
        The ``.tflite`` bytes.

    Raises:
        ValueError: an unknown mode, or ``int8`` without (or with empty) representative data.
    """
    from cycleprune.compat import tf

    if mode not in QUANTIZATIONS:
        raise ValueError(
            f"Argument `mode` must be one of {', '.join(QUANTIZATIONS)}. Received: mode={mode!r}"
        )
    if mode == "int8":
        if representative is None or len(representative) == 0:
            raise ValueError(
                "Argument `representative` must hold calibration images for mode='int8'. "
                f"Received: representative={None if representative is None else 'empty'}"
            )
        calibration = _pin_input_range(representative)
    model = strip_if_pruned(model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode in ("dynamic", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":

        def representative_dataset():
            for i in range(len(calibration)):
                yield [calibration[i : i + 1]]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with warnings.catch_warnings():
        # Raised for every uint8-input conversion: the input statistics come from calibration.
        warnings.filterwarnings(
            "ignore", message="Statistics for quantized inputs were expected", category=UserWarning
        )
        return bytes(converter.convert())


def _representative_images(dataset_dir: str, config: Config) -> np.ndarray:
    from cycleprune import data

    data.load_info(dataset_dir, verify=True)  # a damaged shard is named, not a DataLossError
    images, _ = data.load_arrays(dataset_dir, "train")
    if len(images) == 0:
        raise data.DataError(f"The train split of {dataset_dir} is empty; nothing to calibrate on.")
    n = min(config.compress.representative_samples, len(images))
    rng = np.random.default_rng(config.data.seed)
    picks = np.sort(rng.choice(len(images), size=n, replace=False))
    return images[picks].astype(np.float32)


def _entry(root: Path, relative: str, fmt: str) -> dict[str, Any]:
    target = root / relative
    return {
        "name": fmt,
        "format": fmt,
        "path": relative,
        "size_bytes": storage.tree_size(target),
        "gzip_bytes": gzip_size(target),
    }


def run_compression(
    model_path: str, dataset_dir: str, out_dir: str, config: Config
) -> dict[str, Any]:
    """Export a model in every configured format and record raw and gzip sizes.

    Writes, all at once (the folder appears only when complete):

    - ``model.keras``: the stripped model, without optimizer state;
    - ``saved_model/``: a TensorFlow SavedModel (when ``config.compress.saved_model``);
    - ``model_<mode>.tflite`` for each of ``config.compress.quantizations``; ``int8`` is
      calibrated on ``config.compress.representative_samples`` training images drawn with
      ``config.data.seed`` (never validation or test data);
    - ``sizes.json``: ``{"sparsity", "zero_weights", "total_weights", "layer_sparsity",
      "source", "representative_samples", "models": [{"name", "format", "path", "size_bytes",
      "gzip_bytes"}]}`` with paths relative to ``out_dir`` and formats ``keras``,
      ``saved_model``, ``tflite_<mode>``.

    Args:
        model_path: A ``.keras`` model (pruning wrappers are stripped if present).
        dataset_dir: A prepared dataset (for the int8 calibration images).
        out_dir: Output folder (replaced if it exists).
        config: The run configuration.

    Returns:
        The ``sizes.json`` content.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        cycleprune.data.DataError: unreadable or empty training split (int8 only).
    """
    from cycleprune import models

    if not Path(model_path).exists():
        raise FileNotFoundError(f"Model not found: {model_path}")
    model = strip_if_pruned(models.load_model(str(model_path)))
    quantizations = config.compress.quantizations
    representative = (
        _representative_images(dataset_dir, config) if "int8" in quantizations else None
    )
    sparsity = kernel_sparsity(model)
    with storage.atomic_dir(out_dir, replaces=_SIZES_FILE) as tmp:
        model.save(str(tmp / _KERAS_FILE))  # loaded uncompiled: no optimizer state
        entries = [_entry(tmp, _KERAS_FILE, "keras")]
        if config.compress.saved_model:
            model.save(str(tmp / _SAVED_MODEL_DIR), save_format="tf", include_optimizer=False)
            entries.append(_entry(tmp, _SAVED_MODEL_DIR, "saved_model"))
        for mode in quantizations:
            name = f"model_{mode}.tflite"
            storage.atomic_write_bytes(tmp / name, convert_tflite(model, mode, representative))
            entries.append(_entry(tmp, name, f"tflite_{mode}"))
        sizes = {
            **sparsity,
            "source": str(model_path),
            "representative_samples": 0 if representative is None else len(representative),
            "models": entries,
        }
        storage.atomic_write_json(tmp / _SIZES_FILE, sizes)
    return sizes
