"""Model quality per preset and seed: the pipeline's stages, chained in one process.

The chain is the pipeline's, stage for stage, through the same library calls the components make:
prepare data -> LR range test -> CLR training -> pruning at each sparsity -> compression of the
dense and every pruned model -> evaluation -> selection of the deployed model. Only evaluation
reads the test split; thresholds and the selection use validation only.

    python -m benchmarks.quality --preset small --seeds 1 2 3
    python -m benchmarks.quality --preset small --seeds 1 --set train.epochs=48
    python -m benchmarks.quality --preset small --dense-only --set model.input_size=56

Writes ``benchmarks/results/quality-<preset>-<date>.json`` (``--out`` to change): per seed the
dense, pruned and TFLite metrics on validation and test, the thresholds, the sizes, the selected
model and the seconds per stage; then the mean and spread (sample standard deviation) over seeds
of the selected model's and the dense model's test metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BUNDLED_DATA, REPO

KEYS = ("accuracy", "sensitivity", "specificity", "auc")


def _model_row(variant: str, entry: dict[str, Any], at_half: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"{variant}/{entry['format']}",
        "gzip_bytes": entry["gzip_bytes"],
        "size_bytes": entry["size_bytes"],
        "threshold": entry["threshold"],
        "val": {k: entry["val"][k] for k in KEYS},
        "test": {k: entry["test"][k] for k in KEYS},
        "test_at_0.5": {k: at_half.get(k) for k in KEYS},
        "test_confusion_matrix": entry["test"].get("confusion_matrix"),
    }


def run_chain(
    config: Any, source: str | Path, work: Path, *, dense_only: bool = False
) -> dict[str, Any]:
    """Run the pipeline's stages on ``source`` with ``config``; return the per-model record."""
    from cycleprune import compression, data, evaluation, lr_finder, pruning, selection, training

    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - start, 2)
        return out

    dataset = work / "dataset"
    timed("prepare_data", data.prepare_dataset, str(source), dataset, config.data)
    bounds = timed("find_lr", lr_finder.run_lr_finder, dataset, work / "lr", config)
    trained = timed(
        "train",
        training.run_training,
        dataset,
        work / "train",
        config,
        min_lr=bounds.min_lr,
        max_lr=bounds.max_lr,
    )
    variants = {0.0: trained.model_path}
    if not dense_only:
        for sparsity in config.prune.sparsities:
            name = selection.variant_name(sparsity)
            result = timed(
                f"prune_{name}",
                pruning.run_pruning,
                trained.model_path,
                dataset,
                work / name,
                config,
                final_sparsity=sparsity,
                min_lr=bounds.min_lr,
                max_lr=bounds.max_lr,
            )
            variants[sparsity] = result.model_path
    evaluations = []
    for sparsity, model_path in variants.items():
        name = selection.variant_name(sparsity)
        if dense_only:
            folder = model_path
        else:
            folder = work / f"compressed_{name}"
            timed(
                f"compress_{name}",
                compression.run_compression,
                model_path,
                str(dataset),
                str(folder),
                config,
            )
        record = timed(
            f"evaluate_{name}",
            evaluation.run_evaluation,
            folder,
            dataset,
            work / f"eval_{name}",
            config,
        )
        evaluations.append({**record, "target_sparsity": sparsity})
    entries = selection.collect_entries(evaluations)
    at_half = {
        f"{selection.variant_name(r['target_sparsity'])}/{m['format']}": m.get("test_at_0.5", {})
        for r in evaluations
        for m in r["models"]
    }
    chosen = selection.select_model(entries, config.select)
    by_name = {e["name"]: e for e in entries}
    return {
        "lr_bounds": {"min_lr": bounds.min_lr, "max_lr": bounds.max_lr, "from": bounds.bounds_from},
        "train_val": trained.val_metrics,
        "models": [_model_row(e["variant"], e, at_half[e["name"]]) for e in entries],
        "selected": chosen.name,
        "selected_test": {k: by_name[chosen.name]["test"][k] for k in KEYS},
        "dense_test": {k: by_name[selection.BASELINE]["test"][k] for k in KEYS},
        "size_ratio": by_name[selection.BASELINE]["gzip_bytes"]
        / by_name[chosen.name]["gzip_bytes"],
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of the selected and dense test metrics."""
    out: dict[str, Any] = {}
    for which in ("selected_test", "dense_test"):
        out[which] = {}
        for key in KEYS:
            values = [r[which][key] for r in runs]
            out[which][key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
    ratios = [r["size_ratio"] for r in runs]
    out["size_ratio"] = {"mean": statistics.fmean(ratios), "min": min(ratios)}
    out["total_seconds"] = {"mean": statistics.fmean(r["total_seconds"] for r in runs)}
    return out


def render(result: dict[str, Any]) -> str:
    """A Markdown rendering of a result file: per seed, then mean ± spread."""
    overrides = " ".join(result["overrides"]) or "none"
    lines = [
        f"# Quality: preset `{result['preset']}` (overrides: {overrides})",
        "",
        "Test split (624 images) at the threshold chosen on validation. Sizes are gzip bytes.",
        "",
        "| seed | model | accuracy | sensitivity | specificity | AUC | threshold | gzip "
        "| x smaller |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        dense = next(m for m in run["models"] if m["name"] == "dense/keras")
        shown = [m for m in run["models"] if m["name"].endswith(("/keras", "/tflite_int8"))]
        selected = next(m for m in run["models"] if m["name"] == run["selected"])
        if selected not in shown:
            shown.append(selected)
        for m in shown:
            mark = " (selected)" if m is selected else ""
            t = m["test"]
            lines.append(
                f"| {run['seed']} | {m['name']}{mark} | {t['accuracy']:.3f} | "
                f"{t['sensitivity']:.3f} | {t['specificity']:.3f} | {t['auc']:.3f} | "
                f"{m['threshold']:.3f} | {m['gzip_bytes']:,} | "
                f"{dense['gzip_bytes'] / m['gzip_bytes']:.1f} |"
            )
    summary = result["summary"]
    lines += [
        "",
        "| over seeds | accuracy | sensitivity | specificity | AUC |",
        "|---|---|---|---|---|",
    ]
    for which, label in (("selected_test", "selected model"), ("dense_test", "dense Keras")):
        cells = [f"{summary[which][k]['mean']:.3f} ± {summary[which][k]['std']:.3f}" for k in KEYS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Selected model {summary['size_ratio']['mean']:.1f}x smaller than the dense model on "
        f"average (at least {summary['size_ratio']['min']:.1f}x); "
        f"{summary['total_seconds']['mean']:.0f} s of stage time per seed on average.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="base preset (default: small)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="train.seed of each run"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. train.epochs=48)",
    )
    parser.add_argument(
        "--dense-only", action="store_true", help="stop after the dense model's evaluation"
    )
    parser.add_argument("--source", default=str(BUNDLED_DATA), help="dataset (default: bundled)")
    parser.add_argument(
        "--out",
        default=None,
        help="result JSON (default: benchmarks/results/quality-<preset>[-<label>]-<date>.json); "
        "the Markdown table goes beside it",
    )
    parser.add_argument("--label", default="", help="added to the default file name")
    parser.add_argument("--keep", default=None, help="keep each seed's work folder under this")
    parser.add_argument("--render", metavar="JSON", help="only print the Markdown of a result file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0

    from cycleprune.config import load_config

    try:  # a bad preset or override fails now, not after the first seed's run
        load_config(args.preset, overrides=args.overrides)
    except ValueError as err:
        parser.error(str(err))

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    label = f"-{args.label}" if args.label else ""
    out = Path(
        args.out or REPO / "benchmarks" / "results" / f"quality-{args.preset}{label}-{date}.json"
    )
    runs = []
    for seed in args.seeds:
        config = load_config(args.preset, overrides=[*args.overrides, f"train.seed={seed}"])
        if args.keep:
            work = Path(args.keep) / f"seed{seed}"
            record = run_chain(config, args.source, work, dense_only=args.dense_only)
        else:
            with tempfile.TemporaryDirectory(prefix="quality-") as work:
                record = run_chain(config, args.source, Path(work), dense_only=args.dense_only)
        record["seed"] = seed
        runs.append(record)
        sel = record["selected_test"]
        dense = record["dense_test"]
        print(
            f"seed {seed}: selected {record['selected']} acc {sel['accuracy']:.3f} "
            f"AUC {sel['auc']:.3f} sens {sel['sensitivity']:.3f} spec {sel['specificity']:.3f} "
            f"| dense acc {dense['accuracy']:.3f} AUC {dense['auc']:.3f} | "
            f"{record['size_ratio']:.1f}x smaller | {record['total_seconds']:.0f} s",
            flush=True,
        )
    result = {
        "schema": 1,
        "preset": args.preset,
        "overrides": args.overrides,
        "dense_only": args.dense_only,
        "config": load_config(args.preset, overrides=args.overrides).to_dict(),
        "runs": runs,
        "summary": aggregate(runs),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(out)
    if not args.dense_only:
        out.with_suffix(".md").write_text(render(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
