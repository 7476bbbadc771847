"""Hostile and broken input, end to end through the command line.

Each row of the README's "Reliability and security" table is a case here: the real CLI
(``cycleprune.cli.main``, and a few through ``python -m cycleprune`` in a subprocess) must exit
non-zero with one ``error:`` line naming the file, key or value, leave no output folder and no
``.tmp-`` sibling that a later stage could pick up, and never run code from the input (cases that
would create a marker file if they did assert it does not exist).

The library-level checks behind these rows (exact messages, every variant) live in
``test_data.py``, ``test_config.py`` and ``test_models.py``; this file checks what a user of the
command line sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cycleprune import cli

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Inputs


def _png(path: Path, mode: str = "L", size: tuple[int, int] = (10, 10), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], *{"L": (), "RGB": (3,), "RGBA": (4,), "LA": (2,)}.get(mode, ()))
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    if mode == "P":
        image = image.convert("RGB").convert("P")
    elif image.mode != mode:
        image = image.convert(mode)
    image.save(path)
    return path


def _tree(root: Path) -> Path:
    """A valid chest_xray-style tree: train/test, 2 classes, 3 small images each."""
    for split in ("train", "test"):
        for c, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(3):
                _png(root / split / cls / f"img{i}.png", seed=10 * c + i)
    return root


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _png_bomb(path: Path, width: int, height: int, *, real: bool = True) -> Path:
    """A grayscale PNG of ``width x height`` zeros: a few KB on disk, huge in memory.

    With ``real=False`` only the header is honest (no pixel data): enough for a reader that
    must refuse the image before decoding it.
    """
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    rows = height if real else 0
    data = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )
    return path


def _jpeg(path: Path, size: tuple[int, int] | None = None) -> Path:
    """A small JPEG; with ``size``, its frame header claims that (width, height) instead."""
    _png(path.with_suffix(".tmp.png"), "L", (16, 16), seed=3)
    with Image.open(path.with_suffix(".tmp.png")) as image:
        image.save(path, "JPEG")
    path.with_suffix(".tmp.png").unlink()
    if size:
        blob = bytearray(path.read_bytes())
        sof = blob.index(b"\xff\xc0")
        blob[sof + 5 : sof + 9] = struct.pack(">HH", size[1], size[0])
        path.write_bytes(bytes(blob))
    return path


def _npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (12, 6, 6), dtype=np.uint8),
        "train_labels": np.tile([0, 1], 6),
        "val_images": rng.integers(0, 256, (4, 6, 6), dtype=np.uint8),
        "val_labels": np.array([0, 1, 0, 1]),
        "test_images": rng.integers(0, 256, (4, 6, 6), dtype=np.uint8),
        "test_labels": np.array([0, 1, 1, 0]),
    }


def _npz(path: Path, **changes) -> Path:
    arrays = _npz_arrays()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


class _Touch:
    """Unpickling this creates ``path``: proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _header_only_npy(shape: tuple[int, ...]) -> bytes:
    """A .npy whose header declares ``shape`` but which holds 16 bytes of data."""
    header = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16)


def _npz_with_member(path: Path, name: str, blob: bytes) -> Path:
    """The valid arrays, with member ``name`` (replaced or added) holding ``blob``."""
    key = name.removesuffix(".npy")
    _npz(path, **({key: None} if key in _npz_arrays() else {}))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(name, blob)
    return path


# ---------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    """One row: build the input under ``tmp``, return the CLI arguments (without --out)."""

    build: Callable[[Path], list[str]]
    names: tuple[str, ...]  # what the error line must contain (file, key or value)
    command: str = "prepare-data"
    marker: bool = False  # the input would create tmp/PWNED if a loader ran its code
    extra: list[str] = field(default_factory=list)


def _folder(change: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        root = _tree(tmp / "xray")
        change(root)
        return ["--source", str(root)]

    return build


def _file(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda tmp: ["--source", str(make(tmp))]


def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _outside_link(root: Path, name: str, target: Path) -> None:
    (root / "train" / "NORMAL" / name).symlink_to(target)


def _empty_class(root: Path) -> None:
    for path in (root / "test" / "NORMAL").iterdir():
        path.unlink()


def _single_class(root: Path) -> None:
    for split in ("train", "test"):
        shutil.rmtree(root / split / "PNEUMONIA")


def _symlink_source(tmp: Path) -> list[str]:
    root = _tree(tmp / "xray")
    _outside_link(root, "link.png", _png(tmp / "outside.png"))
    return ["--source", str(root)]


def _linked_class(root: Path) -> None:
    outside = root.parent / "elsewhere"
    _png(outside / "x.png")
    (root / "test" / "PNEUMONIA_LINK").symlink_to(outside, target_is_directory=True)


def _fifo(root: Path) -> None:
    os.mkfifo(root / "test" / "NORMAL" / "pipe.png")


def _zip_slip(tmp: Path) -> Path:
    path = tmp / "xray.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../../escaped.txt", "zip-slip")
        archive.writestr("train/NORMAL/a.png", _png(tmp / "a.png").read_bytes())
    return path


def _pickled_npz(tmp: Path) -> Path:
    evil = np.empty(12, dtype=object)
    evil[:] = [_Touch(tmp / "PWNED")] * 12
    return _npz(tmp / "pickled.npz", train_labels=evil)


def _pickle_as_npz(tmp: Path) -> Path:
    path = tmp / "pickle.npz"
    path.write_bytes(pickle.dumps(_Touch(tmp / "PWNED")))
    return path


def _corrupt_deflate(tmp: Path) -> Path:
    path = tmp / "deflate.npz"
    np.savez_compressed(path, **_npz_arrays())
    blob = bytearray(path.read_bytes())
    start = blob.index(b"train_images.npy") + len("train_images.npy") + 20
    blob[start : start + 40] = bytes(40)
    path.write_bytes(bytes(blob))
    return path


def _npz_bomb(tmp: Path) -> Path:
    path = tmp / "bomb.npz"
    arrays = _npz_arrays()
    arrays["train_images"] = np.zeros((1, 7000, 7000), np.uint8)  # 49 MP, 48 KB compressed
    arrays["train_labels"] = np.zeros(1, np.int64)
    np.savez_compressed(path, **arrays)
    return path


def _config(text: str, name: str = "hostile.yaml") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_text(text.replace("MARKER", str(tmp / "PWNED")))
        return ["--config", str(path), "--dataset", str(tmp / "dataset")]

    return build


def _binary_config(tmp: Path) -> list[str]:
    path = tmp / "binary.yaml"
    path.write_bytes(b"train:\n  epochs: \xff\xfe\n")
    return ["--config", str(path), "--dataset", str(tmp / "dataset")]


def _model(name: str) -> Callable[[Path], list[str]]:
    """``compress --model`` on one of the crafted artifacts (see ``artifacts``)."""
    return lambda tmp: ["--model", str(tmp / "artifacts" / name), "--dataset", str(tmp / "ds")]


CASES = {
    # ---- images
    "truncated PNG": Case(
        _folder(lambda r: _truncate(r / "test" / "NORMAL" / "img1.png", 80)),
        ("Cannot decode image", "img1.png"),
    ),
    "truncated JPEG": Case(
        _folder(lambda r: _truncate(_jpeg(r / "train" / "PNEUMONIA" / "cut.jpg"), 200)),
        ("Cannot decode image", "cut.jpg"),
    ),
    "corrupt PNG body": Case(
        _folder(
            lambda r: (r / "train" / "NORMAL" / "img0.png").write_bytes(
                b"\x89PNG\r\n\x1a\n" + bytes(range(7, 200, 3))
            )
        ),
        ("Cannot decode image", "img0.png"),
    ),
    "non-image with an image extension": Case(
        _folder(lambda r: (r / "test" / "PNEUMONIA" / "notes.png").write_text("hello")),
        ("Cannot decode image", "notes.png"),
    ),
    "file without an image extension": Case(
        _folder(lambda r: (r / "test" / "PNEUMONIA" / "notes.txt").write_text("hello")),
        ("is not an image", "notes.txt"),
    ),
    "image bomb over the 40 MP limit": Case(
        _folder(lambda r: _png_bomb(r / "train" / "NORMAL" / "bomb.png", 8000, 6000)),
        ("bomb.png", "8000x6000", "limit of 40000000"),
    ),
    "image bomb over Pillow's own limit": Case(
        _folder(lambda r: _png_bomb(r / "train" / "NORMAL" / "bomb.png", 20000, 20000, real=False)),
        ("bomb.png", "decompression bomb"),
    ),
    "JPEG header claiming 30000x30000": Case(
        _folder(lambda r: _jpeg(r / "test" / "NORMAL" / "huge.jpg", (30000, 30000))),
        ("huge.jpg", "decompression bomb"),
    ),
    "16-bit image": Case(
        _folder(
            lambda r: Image.fromarray(np.full((10, 10), 4000, np.uint16)).save(
                r / "test" / "NORMAL" / "deep.png"
            )
        ),
        ("deep.png", "mode 'I;16'"),
    ),
    "empty class folder": Case(_folder(_empty_class), ("Class folder", "test/NORMAL", "is empty")),
    "single class": Case(_folder(_single_class), ("at least 2 classes", "NORMAL")),
    "unknown split name": Case(
        _folder(lambda r: _png(r / "validation" / "NORMAL" / "a.png")),
        ("Unknown split folder", "validation"),
    ),
    "symlink to a file outside the root": Case(
        _folder(lambda r: _outside_link(r, "link.png", _png(r.parent / "secret.png"))),
        ("Symlink", "link.png", "points outside"),
    ),
    "symlinked class folder outside the root": Case(
        _folder(_linked_class), ("Symlink", "PNEUMONIA_LINK", "points outside")
    ),
    "FIFO named like an image": Case(_folder(_fifo), ("pipe.png", "neither a file nor a folder")),
    "archive as the source (zip-slip entries)": Case(
        _file(_zip_slip), ("Unsupported data source", "xray.zip")
    ),
    # ---- .npz
    "npz missing key": Case(
        _file(lambda t: _npz(t / "a.npz", test_labels=None)), ("a.npz", "no array 'test_labels'")
    ),
    "npz wrong dtype": Case(
        _file(lambda t: _npz(t / "a.npz", test_images=np.zeros((4, 6, 6)))),
        ("a.npz", "test_images", "dtype=float64"),
    ),
    "npz mismatched lengths": Case(
        _file(lambda t: _npz(t / "a.npz", val_labels=np.array([0, 1, 0]))),
        ("a.npz", "val_images has 4 images but val_labels has 3 labels"),
    ),
    "npz label out of range of the class names": Case(
        _file(lambda t: _npz(t / "a.npz", test_labels=np.array([0, 1, 2, 0]))),
        ("a.npz", "label 2 is out of range", "data.class_names"),
        extra=["--set", "data.class_names=[normal, pneumonia]"],
    ),
    "npz negative label": Case(
        _file(lambda t: _npz(t / "a.npz", test_labels=np.array([0, 1, -1, 0]))),
        ("a.npz", "test_labels[2] = -1"),
    ),
    "npz label 2**31-1 (no class names)": Case(
        _file(lambda t: _npz(t / "a.npz", val_labels=np.array([0, 1, 0, 2**31 - 1]))),
        ("a.npz", "label 2147483647", "train_labels has only 12 labels"),
    ),
    "npz with pickled objects": Case(
        _file(_pickled_npz),
        ("pickled.npz", "'train_labels' cannot be loaded without pickle"),
        marker=True,
    ),
    "pickle file named .npz": Case(
        _file(_pickle_as_npz), ("pickle.npz", "is a Python pickle (never loaded"), marker=True
    ),
    "npz with corrupt compressed data": Case(
        _file(_corrupt_deflate), ("deflate.npz", "'train_images' is corrupt")
    ),
    "npz image bomb over the 40 MP limit": Case(
        _file(_npz_bomb), ("bomb.npz", "7000x7000", "limit of 40000000")
    ),
    "npz header promising more data than it holds": Case(
        _file(
            lambda t: _npz_with_member(
                t / "lying.npz", "train_images.npy", _header_only_npy((10**6, 512, 512))
            )
        ),
        ("lying.npz", "'train_images' is corrupt", "(1000000, 512, 512)"),
    ),
    # ---- configs (train fails before touching the dataset)
    "config unknown key": Case(
        _config("train:\n  epochz: 3\n"),
        ("hostile.yaml", "Unknown key(s) in train: epochz"),
        "train",
    ),
    "config unknown section": Case(
        _config("trian:\n  epochs: 3\n"),
        ("hostile.yaml", "Unknown config section 'trian'"),
        "train",
    ),
    "config wrong type": Case(
        _config('{"train": {"epochs": "three"}}', "hostile.json"),
        ("hostile.json", "train.epochs must be an integer", "'three'"),
        "train",
    ),
    "config impossible value": Case(
        _config("schedule:\n  min_lr: 0.2\n  max_lr: 0.1\n"),
        ("hostile.yaml", "schedule.min_lr must be > 0 and < max_lr (0.1)", "min_lr=0.2"),
        "train",
    ),
    "config number beyond float range": Case(
        _config(f'{{"train": {{"momentum": 1{"0" * 400}}}}}', "hostile.json"),
        ("hostile.json", "train.momentum must be finite"),
        "train",
    ),
    "config with a YAML Python tag": Case(
        _config("train: !!python/object/apply:os.system ['touch MARKER']\n"),
        ("Cannot parse config file", "hostile.yaml"),
        "train",
        marker=True,
    ),
    "config that is not UTF-8": Case(_binary_config, ("binary.yaml", "not UTF-8"), "train"),
    "config path is a folder": Case(
        lambda t: ["--config", str(t), "--dataset", str(t / "dataset")],
        ("Is a directory",),
        "train",
    ),
    "override impossible value": Case(
        lambda t: ["--dataset", str(t / "dataset")],
        ("train.epochs must be > 0", "train.epochs=0"),
        "train",
        extra=["--set", "train.epochs=0"],
    ),
    # ---- model artifacts (compress loads the model first)
    ".keras with a Lambda layer": Case(
        _model("lambda.keras"), ("lambda.keras", "Lambda layer"), "compress", marker=True
    ),
    ".keras naming a module outside Keras": Case(
        _model("module.keras"),
        ("module.keras", "cycleprune_hostile_probe", "only keras, tf_keras"),
        "compress",
        marker=True,
    ),
    ".h5 with a Lambda layer": Case(
        _model("lambda.h5"), ("lambda.h5", "HDF5"), "compress", marker=True
    ),
    "SavedModel with a Lambda layer": Case(
        _model("lambda_savedmodel"),
        ("lambda_savedmodel", "SavedModel folder"),
        "compress",
        marker=True,
    ),
    "not a model at all": Case(
        _model("junk.keras"), ("junk.keras", "not a .keras model archive"), "compress"
    ),
}


# ---------------------------------------------------------------------------------------------
# Crafted model artifacts


PROBE = "cycleprune_hostile_probe"


def _lambda_body(x):
    """Runs when the layer is called: touches $CYCLEPRUNE_TEST_MARKER if it is set."""
    marker = __import__("os").environ.get("CYCLEPRUNE_TEST_MARKER")
    if marker:
        __import__("pathlib").Path(marker).touch()
    return x


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A Lambda model as .keras, .h5 and SavedModel; a .keras naming a foreign module; junk."""
    from cycleprune.compat import keras

    folder = tmp_path_factory.mktemp("artifacts")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(_lambda_body)(inputs)))
    model.save(folder / "lambda.keras")
    with pytest.warns(UserWarning, match="HDF5"):
        model.save(folder / "lambda.h5")
    model.save(folder / "lambda_savedmodel", save_format="tf")
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    plain.save(folder / "plain.keras")
    with zipfile.ZipFile(folder / "plain.keras") as src:
        config = json.loads(src.read("config.json"))
        config["module"], config["registered_name"] = PROBE, "Probe>Functional"
        with zipfile.ZipFile(folder / "module.keras", "w") as dst:
            for item in src.infolist():
                blob = json.dumps(config) if item.filename == "config.json" else src.read(item)
                dst.writestr(item, blob)
    (folder / "junk.keras").write_bytes(b"not a model")
    return folder


@pytest.fixture
def probe_module(tmp_path, monkeypatch) -> Path:
    """An importable module that touches tmp/PWNED when imported (and the Lambda's marker)."""
    marker = tmp_path / "PWNED"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / f"{PROBE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from tf_keras import Model as Functional\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    monkeypatch.setenv("CYCLEPRUNE_TEST_MARKER", str(marker))
    yield marker
    sys.modules.pop(PROBE, None)


def test_crafted_artifacts_would_run_code_without_the_check(artifacts, probe_module):
    """The control: plain Keras (safe mode included) runs code from these files."""
    from cycleprune.compat import keras

    for name in ("module.keras", "lambda.h5", "lambda_savedmodel"):
        probe_module.unlink(missing_ok=True)
        sys.modules.pop(PROBE, None)
        with contextlib.suppress(Exception):  # the probe need only run, not load cleanly
            keras.models.load_model(artifacts / name, safe_mode=True)
        assert probe_module.exists(), f"{name} did not run its code under plain Keras"


# ---------------------------------------------------------------------------------------------
# Running the cases


def _assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir()]
        assert leftovers == [], f"left in {out.parent}: {leftovers}"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_fails_cleanly(name, tmp_path, capsys, request):
    case = CASES[name]
    if case.command == "compress":
        (tmp_path / "artifacts").symlink_to(request.getfixturevalue("artifacts"))
        marker = request.getfixturevalue("probe_module")
    else:
        marker = tmp_path / "PWNED"
    out = tmp_path / "out" / "result"
    argv = [case.command, *case.build(tmp_path), "--out", str(out), *case.extra]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"exit {code}: {captured.err}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for text in case.names:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    assert captured.out == ""
    _assert_no_output(out)
    assert not marker.exists(), "the input's code ran"


def test_no_archive_entry_escapes(tmp_path, capsys):
    """Archives are never extracted: a zip source is refused, and an .npz member named
    ``../../escaped.npy`` is an unknown key, read in memory and ignored."""
    source = _zip_slip(tmp_path)
    assert cli.main(["prepare-data", "--source", str(source), "--out", str(tmp_path / "a")]) == 2
    npz = _npz_with_member(tmp_path / "slip.npz", "../../escaped.npy", _header_only_npy((2,)))
    out = tmp_path / "b" / "dataset"
    assert cli.main(["prepare-data", "--source", str(npz), "--out", str(out)]) == 0
    capsys.readouterr()
    assert (out / "dataset.json").is_file()
    assert list(tmp_path.rglob("escaped*")) == []
    for base in (out, tmp_path, Path.cwd()):
        for name in ("escaped.npy", "escaped.txt"):
            assert not (base / ".." / ".." / name).resolve().exists()


def test_grayscale_rgb_palette_and_alpha_mix_is_converted_explicitly(tmp_path, capsys):
    root = _tree(tmp_path / "xray")
    modes = {"RGB": "rgb.png", "RGBA": "rgba.png", "P": "palette.png", "LA": "la.png"}
    for mode, name in modes.items():
        _png(root / "train" / "PNEUMONIA" / name, mode, seed=len(name))
    for channels in (1, 3):
        out = tmp_path / f"c{channels}"
        argv = ["prepare-data", "--source", str(root), "--out", str(out)]
        assert cli.main([*argv, "--set", f"data.channels={channels}"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["image_shape"] == [10, 10, channels]
        assert info["counts"]["train"]["PNEUMONIA"] + info["counts"]["val"]["PNEUMONIA"] == 7


@pytest.mark.parametrize(
    ("argv", "names", "marker"),
    [
        (
            lambda t: ["prepare-data", "--source", str(_pickled_npz(t))],
            ("pickled.npz", "cannot be loaded without pickle"),
            True,
        ),
        (
            lambda t: ["train", *_config("train:\n  epochz: 3\n")(t)],
            ("hostile.yaml", "epochz"),
            False,
        ),
        (
            lambda t: ["prepare-data", *_symlink_source(t)],
            ("Symlink", "link.png", "points outside"),
            False,
        ),
    ],
    ids=["pickled npz", "config unknown key", "symlink outside"],
)
def test_real_command_line_exit_code_and_stderr(argv, names, marker, tmp_path):
    out = tmp_path / "out" / "result"
    command = [sys.executable, "-m", "cycleprune", *argv(tmp_path), "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    for text in names:
        assert text in last
    _assert_no_output(out)
    assert not (tmp_path / "PWNED").exists()
