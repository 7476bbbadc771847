"""Section 4: size and quality of every model of a pipeline run, against the article's figures.

Reads ``summary.json`` of the pipeline run made by the ``pipeline_overhead`` section
(``ctx.shared["pipeline_run"]``; runs the pipeline itself when that section did not run). For
each model (dense and pruned variants x Keras / TFLite float32 / dynamic-range / int8): raw and
gzip bytes, ``ratio = dense Keras gzip / model gzip``, and the test accuracy, sensitivity,
specificity, AUC and decision threshold. The targets concern the model the pipeline selected.

The article (VGG-16 on its own chest X-ray data, Keras ``.h5``): dense 56.19 MB, 51.42 MB
gzipped; 50% sparsity 38.33 MB gzipped. Its "about 1.47x" is 56.19 / 38.33 (raw dense over
gzipped pruned); on this section's definition (gzip over gzip) it is 51.42 / 38.33 = 1.34x. The
table shows both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Target

BASELINE = "dense/keras"
ARTICLE = {"dense_mb": 56.19, "dense_gzip_mb": 51.42, "sparse50_gzip_mb": 38.33}
METRICS = ("accuracy", "sensitivity", "specificity", "auc")
COLUMNS = [
    "model",
    "bytes",
    "gzip bytes",
    "ratio vs dense keras gzip",
    "test accuracy",
    "sensitivity",
    "specificity",
    "AUC",
    "threshold",
]


def model_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per model of ``summary["models"]``: sizes, ratio, test metrics, threshold.

    Raises:
        ValueError: the summary has no dense Keras model (the baseline).
    """
    models = summary["models"]
    dense = next((m for m in models if m["name"] == BASELINE), None)
    if dense is None:
        raise ValueError(f"summary.json has no {BASELINE} model: {[m['name'] for m in models]}")
    rows = []
    for m in models:
        rows.append(
            {
                "name": m["name"],
                "size_bytes": int(m["size_bytes"]),
                "gzip_bytes": int(m["gzip_bytes"]),
                "ratio": dense["gzip_bytes"] / m["gzip_bytes"],
                **{k: float(m["test"][k]) for k in METRICS},
                "threshold": float(m["threshold"]),
                "sparsity": m.get("sparsity"),
            }
        )
    return rows


def selected_targets(summary: Mapping[str, Any]) -> list[Target]:
    """The targets of the selected model against the dense Keras model (drops in points)."""
    rows = {r["name"]: r for r in model_rows(summary)}
    name = summary["selected"]
    chosen, dense = rows[name], rows[BASELINE]
    where = f"selected {name}"
    return [
        Target(
            "selected model gzip size ratio vs dense float",
            chosen["ratio"],
            15.0,
            ">=",
            unit="x",
            note=f"{where}: {dense['gzip_bytes']} / {chosen['gzip_bytes']} gzip bytes",
        ),
        Target(
            "selected model test accuracy drop vs dense (points)",
            100 * (dense["accuracy"] - chosen["accuracy"]),
            1.0,
            "<=",
            note=f"{where}: {chosen['accuracy']:.4f} vs dense keras {dense['accuracy']:.4f}",
        ),
        Target(
            "selected model test AUC drop vs dense (points)",
            100 * (dense["auc"] - chosen["auc"]),
            1.0,
            "<=",
            note=f"{where}: {chosen['auc']:.4f} vs dense keras {dense['auc']:.4f}",
        ),
    ]


def table(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The Markdown table: every model, then the article's figures."""
    selected = summary["selected"]
    rows = []
    for r in model_rows(summary):
        mark = " (selected)" if r["name"] == selected else ""
        rows.append(
            [
                r["name"] + mark,
                r["size_bytes"],
                r["gzip_bytes"],
                f"{r['ratio']:.2f}",
                *(f"{r[k]:.4f}" for k in METRICS),
                f"{r['threshold']:.3f}",
            ]
        )
    blank = [""] * (len(METRICS) + 1)
    dense_mb, dense_gzip_mb = f"{ARTICLE['dense_mb']} MB", f"{ARTICLE['dense_gzip_mb']} MB"
    rows.append(["article: dense (.h5)", dense_mb, dense_gzip_mb, "1.00", *blank])
    ratio = ARTICLE["dense_gzip_mb"] / ARTICLE["sparse50_gzip_mb"]
    sparse_gzip_mb = f"{ARTICLE['sparse50_gzip_mb']} MB"
    rows.append(["article: 50% sparsity (.h5)", "", sparse_gzip_mb, f"{ratio:.2f}", *blank])
    # The article's own "about 1.47x" divides the raw dense file by the gzipped pruned one.
    quoted = ARTICLE["dense_mb"] / ARTICLE["sparse50_gzip_mb"]
    rows.append(
        [
            "article's quoted ratio: dense raw / 50% gzip",
            dense_mb,
            sparse_gzip_mb,
            f"{quoted:.2f}",
            *blank,
        ]
    )
    return {"columns": COLUMNS, "rows": rows}


def run(ctx: Context) -> dict[str, Any]:
    from cycleprune import storage

    if "pipeline_run" in ctx.shared:
        run_dir = Path(ctx.shared["pipeline_run"])
    else:
        from benchmarks.pipeline_overhead import ensure_pipeline_run

        run_dir = ensure_pipeline_run(ctx)
    summary = storage.read_json(run_dir / "summary.json")
    return {
        "results": {
            "run_dir": str(run_dir),
            "selected": summary["selected"],
            "selection_reason": summary.get("selection", {}).get("reason"),
            "models": model_rows(summary),
            "article": {
                **ARTICLE,
                "ratio_gzip_over_gzip": ARTICLE["dense_gzip_mb"] / ARTICLE["sparse50_gzip_mb"],
                "ratio_article_raw_over_gzip": ARTICLE["dense_mb"] / ARTICLE["sparse50_gzip_mb"],
            },
            "table": table(summary),
        },
        "targets": [t.to_dict() for t in selected_targets(summary)],
        "skipped": None,
    }
