"""Render the quality ablation table from ``benchmarks.quality`` result files.

    python -m benchmarks.ablation benchmarks/results/ablation/*.json > ablation.md

Each file is one configuration (``--label``/file name), run over one or more seeds. For each, the
table shows the mean over seeds of the dense Keras model's test accuracy and AUC and, for full
chains, the 90%-pruned TFLite int8 model's validation and test AUC and the selected model. Files
that are not ``benchmarks.quality`` results (the offline studies beside them, e.g. the LR rules
or test-time augmentation, each with its own ``what``) are named on stderr and left out. A run
that changed something no ``--set`` reaches says so in a ``change`` field.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    text = f"{statistics.fmean(values):.3f}"
    return text if len(values) == 1 else f"{text} ± {statistics.stdev(values):.3f}"


def is_quality_result(result: object) -> bool:
    """True for a ``benchmarks.quality`` result: runs that each list their models."""
    runs = result.get("runs") if isinstance(result, dict) else None
    return bool(runs) and all(isinstance(r, dict) and "models" in r for r in runs)


def row(path: Path, result: dict | None = None) -> list[str]:
    result = json.loads(path.read_text()) if result is None else result
    runs = result["runs"]
    dense = [next(m for m in r["models"] if m["name"] == "dense/keras") for r in runs]
    p90 = [m for r in runs for m in r["models"] if m["name"] == "prune_90/tflite_int8"]
    return [
        path.stem,
        " ".join(result["overrides"]) or result.get("change", "(preset)"),
        str(len(runs)),
        _mean([m["test"]["accuracy"] for m in dense]),
        _mean([m["test"]["auc"] for m in dense]),
        _mean([m["val"]["auc"] for m in p90]),
        _mean([m["test"]["auc"] for m in p90]),
        ", ".join(r["selected"] for r in runs) if p90 else "-",
    ]


def main(argv: list[str]) -> int:
    columns = [
        "run",
        "overrides (on the preset)",
        "seeds",
        "dense test acc",
        "dense test AUC",
        "prune_90 int8 val AUC",
        "prune_90 int8 test AUC",
        "selected",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in argv:
        result = json.loads(Path(name).read_text())
        if not is_quality_result(result):
            print(f"left out {name}: not a benchmarks.quality result", file=sys.stderr)
            continue
        print("| " + " | ".join(row(Path(name), result)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
