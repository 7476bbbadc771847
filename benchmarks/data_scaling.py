"""Section 7: does data preparation's memory grow with the dataset?

Builds two image-folder datasets (PNG files, ``<root>/<split>/<class>/*.png``, the layout
:func:`cycleprune.data.prepare_dataset` reads) of N and 4N images from the bundled PneumoniaMNIST
(images repeat when N exceeds the source; full: N = 2000, quick: N = 200), then prepares each
in a fresh subprocess, interleaved (N, 4N, N, 4N, ...), after one warm-up of each (none in
quick mode). The child
reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) and the seconds of the
``prepare_dataset`` call. A third child only imports ``cycleprune.data`` and TensorFlow: the
baseline every run pays before reading one image.

The PNGs keep the source's 28 x 28 pixels, but ``prepare_dataset`` resizes them to
``data.image_size = 224`` (quick: 64), as for a real chest X-ray folder: holding every prepared
28 x 28 image of 4N would add only 6 MB to a ~560 MB TensorFlow process, which no RSS ratio can
tell from streaming; at 224 x 224 it would add ~400 MB.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Context, Target

FULL_N = 2000
QUICK_N = 200
SCALE = 4
TEST_FRACTION = 0.2
CLASS_NAMES = ("normal", "pneumonia")
FULL_SIDE = 224
QUICK_SIDE = 64

_CHILD = """
import json, resource, sys, time
from cycleprune import data
from cycleprune.compat import tf
from cycleprune.config import DataConfig
seconds = None
if len(sys.argv) > 1:
    config = DataConfig(image_size=int(sys.argv[3]))
    start = time.perf_counter()
    data.prepare_dataset(sys.argv[1], sys.argv[2], config)
    seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"seconds": seconds, "max_rss_mb": rss / 1024}))
"""


def build_image_folder(
    npz: str | Path,
    out: str | Path,
    n: int,
    *,
    test_fraction: float = TEST_FRACTION,
    class_names: Sequence[str] = CLASS_NAMES,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Write ``n`` PNG images as ``out/train/<class>/*.png`` and ``out/test/<class>/*.png``.

    ``round(n * test_fraction)`` images go to test, the rest to train; each split takes the
    source's split of the same name in a seeded random order, cycled when it holds fewer
    images. Labels name the class folder.

    Returns:
        ``{split: {class: images written}}``.

    Raises:
        ValueError: ``n`` < 2 or a split would be empty.
    """
    from PIL import Image

    n_test = round(n * test_fraction)
    sizes = {"train": n - n_test, "test": n_test}
    if n < 2 or min(sizes.values()) < 1:
        raise ValueError(f"Both splits need images. Received: {n=}, {test_fraction=}")
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    with np.load(npz) as source:
        for split, size in sizes.items():
            images = source[f"{split}_images"]
            labels = source[f"{split}_labels"].reshape(-1)
            order = np.resize(rng.permutation(len(images)), size)  # cycles when size > len
            counts[split] = dict.fromkeys(class_names, 0)
            for i, index in enumerate(order):
                name = class_names[int(labels[index])]
                folder = Path(out) / split / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index]).save(folder / f"{i:06d}.png")
                counts[split][name] += 1
    return counts


def _child(args: Sequence[str] = ()) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, args)], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict[str, Any]:
    import shutil

    n = QUICK_N if ctx.quick else FULL_N
    side = QUICK_SIDE if ctx.quick else FULL_SIDE
    work = ctx.work_dir / "data_scaling"
    sizes = {"N": n, f"{SCALE}N": SCALE * n}
    folders, counts = {}, {}
    for label, size in sizes.items():
        folders[label] = work / f"images-{size}"
        counts[label] = build_image_folder(ctx.source, folders[label], size)

    def prepare(label: str) -> dict[str, Any]:
        out = work / f"prepared-{label}"
        shutil.rmtree(out, ignore_errors=True)
        return _child([folders[label], out, side])

    if not ctx.quick:
        for label in sizes:  # warm-up: page cache, .pyc files
            prepare(label)
    samples: dict[str, list[dict]] = {label: [] for label in sizes}
    for _ in range(max(1, ctx.repeats)):
        for label in sizes:
            samples[label].append(prepare(label))
    baseline = [_child() for _ in range(1 if ctx.quick else max(1, ctx.repeats))]

    summary = {}
    for label, runs in samples.items():
        summary[label] = {
            "images": sizes[label],
            "median_s": statistics.median(r["seconds"] for r in runs),
            "max_rss_mb": max(r["max_rss_mb"] for r in runs),
            "samples": runs,
        }
    base_rss = max(r["max_rss_mb"] for r in baseline)
    small, large = summary["N"], summary[f"{SCALE}N"]
    rss_ratio = large["max_rss_mb"] / small["max_rss_mb"]
    # What holding every prepared image of a size in memory would add (the test's resolution).
    held_mb = {label: size * side * side / 2**20 for label, size in sizes.items()}
    rows = [
        [
            f"{label} = {s['images']} images",
            f"{s['median_s']:.2f}",
            f"{s['max_rss_mb']:.0f}",
            f"{s['max_rss_mb'] - base_rss:+.0f}",
        ]
        for label, s in summary.items()
    ]
    rows.append(["import cycleprune.data + tensorflow only", "", f"{base_rss:.0f}", "+0"])
    note = (
        f"peak RSS {large['max_rss_mb']:.0f} MB ({SCALE}N = {large['images']} images) / "
        f"{small['max_rss_mb']:.0f} MB (N = {small['images']}); the import-only child peaks at "
        f"{base_rss:.0f} MB, so preparing adds {small['max_rss_mb'] - base_rss:+.0f} MB for N "
        f"and {large['max_rss_mb'] - base_rss:+.0f} MB for {SCALE}N; time ratio "
        f"{large['median_s'] / small['median_s']:.2f}. Resized to {side} x {side}: holding "
        f"every prepared image would add {held_mb['N']:.0f} MB for N and "
        f"{held_mb[f'{SCALE}N']:.0f} MB for {SCALE}N."
    )
    return {
        "results": {
            "n": n,
            "image_size": side,
            "all_images_mb": held_mb,
            "counts": counts,
            "runs": summary,
            "baseline_rss_mb": base_rss,
            "rss_ratio": rss_ratio,
            "time_ratio": large["median_s"] / small["median_s"],
            "table": {
                "columns": ["dataset", "prepare_dataset (s)", "peak RSS (MB)", "vs import only"],
                "rows": rows,
            },
        },
        "targets": [
            Target(f"data prep peak RSS {SCALE}N / N", rss_ratio, 1.2, "<=", note=note).to_dict()
        ],
        "skipped": None,
    }
