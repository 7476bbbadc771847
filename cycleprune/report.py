"""The run's results: ``summary.json``, a self-contained ``report.html``, and the results table.

Everything here works on the JSON records the stages write, so it runs without TensorFlow: in
the pipeline's ``report`` component, and on a laptop over a downloaded run. Figures are PNGs from
:mod:`cycleprune.plots`, embedded as ``data:`` URIs, so the HTML needs nothing else to display
(offline, in the KFP UI, or attached to an e-mail).

``summary.json`` is a stable contract (``schema`` 1):

- ``dataset``: ``source``, ``version``, ``class_names``, ``image_shape``, ``counts``
  (``{split: {class: n}}``) and ``examples`` (``{split: n}``);
- ``lr_finder``: the CLR bounds used (``min_lr``, ``max_lr``), the range test's suggestion
  (``suggested_min_lr``, ``suggested_max_lr``), ``bounds_from`` (``lr_finder`` or ``config``),
  ``steps``, ``stopped_early``, ``optimizer`` (what the range test swept with: the training's;
  ``None`` for a run from before the field);
- ``training``: ``epochs``, ``global_step``, ``steps_per_epoch``, ``policy``, ``step_size``,
  ``min_lr``, ``max_lr``, ``precision`` (``float32`` or ``mixed_float16``; ``None`` for a run
  from before the field), ``val`` (last epoch's validation metrics);
- ``pruning``: one dict per pruned variant (``variant``, ``target_sparsity``, ``sparsity``,
  ``layer_sparsity``, ``warnings``);
- ``models``: one entry per evaluated model, each with ``name`` (``<variant>/<format>``),
  ``variant``, ``format``, ``sparsity`` (measured), ``target_sparsity``, ``size_bytes``,
  ``gzip_bytes``, ``path`` (relative to the run folder), ``threshold`` (chosen on validation),
  ``latency_ms``, ``val`` and ``test`` (``accuracy``, ``sensitivity``, ``specificity``, ``auc``,
  ``precision``, ``f1``, ``confusion_matrix``, ``threshold``);
- ``selected``: the deployed model's name, and ``selection`` (rule outcome and reason);
- ``seconds``: per stage, the seconds its task spent on the stage's own work after its imports
  (the library call, figures, artifacts and metrics; not process start-up or imports):
  ``prepare_data``, ``find_lr``, ``train``, ``prune``, ``compress`` and ``evaluate`` (these
  three per variant), ``select_model``; ``configure``, ``push`` and ``report`` when known (a
  pipeline run has them: :func:`add_stage_seconds` adds ``report``'s own after the report is
  drawn, so ``report.html``'s table lacks it); and ``total``, their sum. The pipeline's
  ``list_sparsities`` task records none (it only reads the config). A stage served from
  the pipeline's cache reports the seconds of the run that computed it;
- ``tensorboard``: ``{run name: folder relative to the run folder}``; ``report``: ``report.html``;
- ``config``: the resolved configuration; ``cycleprune_version``;
- ``registry``: None, or the ``push`` stage's outcome: ``registry``, ``model_name``,
  ``version``, ``uri``, ``promoted``, ``summary`` (one sentence), ``reasons``, ``gate``,
  ``candidate`` and ``champion`` (test ``auc``, ``sensitivity``, ``specificity``; the champion
  evaluated on this run's test split), ``champion_version``, ``production`` (the version in
  production after the run).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cycleprune import __version__, plots, storage
from cycleprune.config import Config
from cycleprune.selection import DENSE, variant_name

SCHEMA = 1
METRICS = ("accuracy", "sensitivity", "specificity", "auc")
_GATE_METRICS = ("auc", "sensitivity", "specificity")  # cycleprune.registry.GATE_METRICS
Figure = tuple[str, Path]  # (caption, PNG path)


# --------------------------------------------------------------------------------------------
# Figures, per stage


def lr_finder_figures(record: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Figure]:
    """The LR range test curve with the bounds actually used (``record["min_lr"]``/``max_lr``)."""
    path = plots.plot_lr_finder(
        record["lrs"],
        record["losses"],
        record["smoothed"],
        record["min_lr"],
        record["max_lr"],
        Path(out_dir) / "lr_finder.png",
    )
    caption = (
        f"LR range test: {record['steps']} steps with {record.get('optimizer', 'sgd')}; CLR bounds "
        f"{record['min_lr']:.3g} .. {record['max_lr']:.3g} "
        f"(from {record.get('bounds_from', 'lr_finder')})"
    )
    return [(caption, path)]


def training_figures(
    history: Mapping[str, Any], out_dir: str | os.PathLike, name: str = "train"
) -> list[Figure]:
    """The CLR schedule per step and the per-epoch curves of a ``history.json``."""
    out = Path(out_dir)
    figures = []
    if history.get("lr"):
        caption = (
            f"{name}: learning rate per step ({history.get('policy', '')}, step size "
            f"{history.get('step_size', '?')} steps, {history.get('min_lr', 0):.3g} .. "
            f"{history.get('max_lr', 0):.3g})"
        )
        figures.append((caption, plots.plot_schedule(history["lr"], out / f"{name}_lr.png")))
    figures.append(
        (f"{name}: training curves", plots.plot_history(history, out / f"{name}_history.png"))
    )
    return figures


def pruning_figures(
    history: Mapping[str, Any], out_dir: str | os.PathLike, name: str
) -> list[Figure]:
    """The sparsity schedule per step, then the fine-tuning curves (as in training)."""
    out = Path(out_dir)
    figures = []
    if history.get("steps"):
        path = plots.plot_sparsity(history["steps"], history["sparsity"], out / f"{name}_sp.png")
        figures.append((f"{name}: sparsity schedule (target {history['final_sparsity']})", path))
    return figures + training_figures(history, out, name)


def binary_labels(class_names: Sequence[str], positive: int) -> list[str]:
    """Row/column labels of a binary (negative, positive) confusion matrix."""
    if len(class_names) == 2 and positive == 1:
        return [str(n) for n in class_names]
    if len(class_names) == 2:
        return [str(class_names[1]), str(class_names[0])]
    return [f"not {class_names[positive]}", str(class_names[positive])]


def evaluation_figures(
    record: Mapping[str, Any], out_dir: str | os.PathLike, name: str
) -> list[Figure]:
    """Test confusion matrix and ROC curve of every model of one evaluation record."""
    out = Path(out_dir)
    labels = binary_labels(record["class_names"], record.get("positive_class", 1))
    figures = []
    for model in record["models"]:
        tag = f"{name}_{model['format']}"
        test = model["test"]
        figures.append(
            (
                f"{name}/{model['format']}: test confusion matrix at threshold "
                f"{model['threshold']:.3f}",
                plots.plot_confusion(test["confusion_matrix"], labels, out / f"{tag}_cm.png"),
            )
        )
        roc = model.get("roc") or {}
        figures.append(
            (
                f"{name}/{model['format']}: test ROC",
                plots.plot_roc(
                    roc.get("fpr") or [0.0, 1.0],
                    roc.get("tpr") or [0.0, 1.0],
                    test.get("auc"),
                    out / f"{tag}_roc.png",
                ),
            )
        )
    return figures


def size_accuracy_figure(
    models: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> list[Figure]:
    """gzip size against test accuracy, one point per model."""
    entries = [
        {"name": m["name"], "gzip_bytes": m["gzip_bytes"], "accuracy": m["test"]["accuracy"]}
        for m in models
    ]
    path = plots.plot_size_vs_accuracy(entries, Path(out_dir) / "size_vs_accuracy.png")
    return [("Size (gzip) vs test accuracy", path)]


# --------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.selected { background: #e6f4ea; font-weight: 600; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; } figcaption { font-size: 13px; color: #555; max-width: 640px; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
.note { color: #555; }
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _figures_html(figures: Sequence[Figure]) -> str:
    return "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="{plots.png_to_data_uri(path)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, path in figures
    )


def figures_html(title: str, figures: Sequence[Figure], *, notes: Sequence[str] = ()) -> str:
    """A standalone HTML page: the notes, then every figure embedded as a ``data:`` URI."""
    body = "".join(f'<p class="note">{html.escape(note)}</p>\n' for note in notes)
    return _page(title, body + _figures_html(figures))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes=None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        lines.append(f"<tr{css}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


# --------------------------------------------------------------------------------------------
# Formatting


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if n is None or not math.isfinite(float(n)):
        return "-"
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


def _num(value: Any, digits: int = 4) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else "nan"


def _sig(value: Any) -> str:
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return "-"


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.1f}%"
    except (TypeError, ValueError):
        return "-"


def table_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the results table: the dense Keras model, each pruned Keras model, and the
    selected model when it is not one of those (typically a TFLite file)."""
    models = summary["models"]
    rows = [m for m in models if m["format"] == "keras"]
    rows.sort(key=lambda m: (m["variant"] != DENSE, m["target_sparsity"]))
    selected = summary.get("selected")
    if selected and selected not in {m["name"] for m in rows}:
        rows += [m for m in models if m["name"] == selected]
    return rows


def format_table(summary: Mapping[str, Any]) -> str:
    """Plain-text results table: dense vs each pruned model vs the selected model (``*``).

    Columns: test accuracy, sensitivity, specificity and AUC (at the threshold chosen on
    validation), measured sparsity, size and gzip size.
    """
    header = ("model", "sparsity", "accuracy", "sensitivity", "specificity", "AUC", "size", "gzip")
    lines = [header]
    for m in table_rows(summary):
        mark = "*" if m["name"] == summary.get("selected") else " "
        test = m["test"]
        lines.append(
            (
                f"{mark} {m['name']}",
                _pct(m.get("sparsity")),
                *(_num(test.get(k)) for k in METRICS),
                format_bytes(m["size_bytes"]),
                format_bytes(m["gzip_bytes"]),
            )
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(
            str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"* selected: {summary.get('selected')}")
    return "\n".join(text + registry_lines(summary.get("registry")))


def registry_summary(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``registry`` entry of ``summary.json`` from the ``push`` stage's record."""
    if not record or record.get("skipped"):
        return None
    decision = record["decision"]
    production = record.get("production") or {}
    return {
        "registry": record["registry"],
        "model_name": record["model_name"],
        "version": record["version"],
        "uri": record["uri"],
        "promoted": record["promoted"],
        "summary": decision["summary"],
        "reasons": decision["reasons"],
        "gate": decision["gate"],
        "candidate": decision["candidate"],
        "champion": decision["champion"],
        "champion_version": decision["champion_version"],
        "production": production.get("version"),
    }


def _gate_metrics(metrics: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k} {_num((metrics or {}).get(k))}" for k in _GATE_METRICS)


def registry_lines(registry: Mapping[str, Any] | None) -> list[str]:
    """Plain-text lines about the push and the gate's decision (none when nothing was pushed)."""
    if not registry:
        return []
    lines = [
        f"registry: pushed {registry['model_name']} {registry['version']} to "
        f"{registry['registry']}",
        f"gate: {registry['summary']}",
        f"  candidate: {_gate_metrics(registry['candidate'])}",
    ]
    if registry.get("champion"):
        lines.append(
            f"  production {registry['champion_version']} on this run's test split: "
            f"{_gate_metrics(registry['champion'])}"
        )
    lines.append(f"production: {registry.get('production') or 'none'}")
    return lines


def _registry_html(registry: Mapping[str, Any]) -> str:
    rows = [["candidate " + registry["version"], *_gate_cells(registry["candidate"])]]
    if registry.get("champion"):
        rows.append(
            ["production " + str(registry["champion_version"]), *_gate_cells(registry["champion"])]
        )
    gate = registry["gate"]
    rows.append(
        [
            "thresholds",
            _num(gate["min_auc"]),
            _num(gate["min_sensitivity"]),
            _num(gate["min_specificity"]),
        ]
    )
    verdict = "promoted" if registry["promoted"] else "rejected"
    return (
        f"<p>Pushed <b>{html.escape(registry['model_name'])} "
        f"{html.escape(registry['version'])}</b> to {html.escape(registry['uri'])}: "
        f"<b>{verdict}</b>. {html.escape(registry['summary'])} Production: "
        f"{html.escape(str(registry.get('production') or 'none'))}. Tolerance against "
        f"production: {_num(gate['tolerance'])}.</p>"
        + _table(["model (test split of this run)", "AUC", "sensitivity", "specificity"], rows)
    )


def _gate_cells(metrics: Mapping[str, Any]) -> list[str]:
    return [_num(metrics.get(k)) for k in _GATE_METRICS]


def push_html(record: Mapping[str, Any] | None) -> str:
    """The ``push`` stage's page for the KFP UI: the decision and both models' metrics."""
    registry = registry_summary(record)
    if registry is None:
        return _page("Model registry", "<p>No registry given: nothing was pushed.</p>")
    return _page("Model registry", _registry_html(registry))


# --------------------------------------------------------------------------------------------
# The run folder


@dataclasses.dataclass(frozen=True)
class StageOutputs:
    """Where a run's stage outputs are (local paths), as the ``report`` component sees them.

    Attributes:
        dataset: ``prepare_data``'s info JSON (DatasetInfo dict + ``seconds``).
        lr_finder: ``find_lr``'s JSON.
        training: ``train``'s JSON (``history``, ``val``, ``seconds``, ...).
        pruning: ``prune``'s JSONs (``history``, ``target_sparsity``, ``seconds``, ...).
        evaluations: ``evaluate``'s JSONs (run_evaluation dict + ``target_sparsity``,
            ``seconds``), the dense one included.
        models: ``{variant: compression output folder}``.
        tensorboard: ``{run name: TensorBoard log folder}`` (``train``, ``prune_50``, ...).
        selection: ``select_model``'s JSON.
        compress_seconds: ``{variant: seconds}``.
        push: ``push``'s JSON (the registry record, or ``{"skipped": true}``; either with
            ``seconds``), if the run has that stage.
        configure_seconds: ``configure``'s seconds, if known.
    """

    dataset: str
    lr_finder: str
    training: str
    pruning: Sequence[str]
    evaluations: Sequence[str]
    models: Mapping[str, str]
    tensorboard: Mapping[str, str]
    selection: str
    compress_seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)
    push: str | None = None
    configure_seconds: float | None = None


def _seconds(value: Any) -> float:
    return round(float(value), 3) if value is not None else math.nan


def _total(seconds: Mapping[str, Any]) -> float:
    """The sum of every finite per-stage (and per-variant) figure but ``total``."""
    stages = [v for k, v in seconds.items() if k != "total"]
    flat = [v for v in stages if not isinstance(v, Mapping)]
    flat += [v for d in stages if isinstance(d, Mapping) for v in d.values()]
    return round(sum(v for v in flat if math.isfinite(v)), 3)


def summarize(
    config: Config,
    *,
    dataset: Mapping[str, Any],
    lr_finder: Mapping[str, Any],
    training: Mapping[str, Any],
    pruning: Sequence[Mapping[str, Any]],
    evaluations: Sequence[Mapping[str, Any]],
    selection: Mapping[str, Any],
    compress_seconds: Mapping[str, float] | None = None,
    tensorboard: Sequence[str] = (),
    push: Mapping[str, Any] | None = None,
    configure_seconds: float | None = None,
) -> dict[str, Any]:
    """Build the ``summary.json`` dict (see the module docstring) from the stage records."""
    from cycleprune.selection import collect_entries

    models = []
    for entry in collect_entries(evaluations):
        entry = dict(entry)
        entry["path"] = f"models/{entry['variant']}/{entry['path']}"
        models.append(entry)
    history = training["history"]
    seconds: dict[str, Any] = {}
    if configure_seconds is not None:
        seconds["configure"] = _seconds(configure_seconds)
    seconds.update(
        prepare_data=_seconds(dataset.get("seconds")),
        find_lr=_seconds(lr_finder.get("seconds")),
        train=_seconds(training.get("seconds")),
        prune={variant_name(p["target_sparsity"]): _seconds(p.get("seconds")) for p in pruning},
        compress={k: _seconds(v) for k, v in (compress_seconds or {}).items()},
        evaluate={
            variant_name(e["target_sparsity"]): _seconds(e.get("seconds")) for e in evaluations
        },
        select_model=_seconds(selection.get("seconds")),
    )
    if push and push.get("seconds") is not None:
        seconds["push"] = _seconds(push["seconds"])
    seconds["total"] = _total(seconds)
    return {
        "schema": SCHEMA,
        "cycleprune_version": __version__,
        "dataset": {
            "source": dataset.get("source"),
            "version": dataset.get("version"),
            "class_names": list(dataset["class_names"]),
            "image_shape": list(dataset["image_shape"]),
            "counts": dataset["counts"],
            "examples": {s: sum(c.values()) for s, c in dataset["counts"].items()},
        },
        "lr_finder": {
            k: lr_finder.get(k)
            for k in (
                "min_lr",
                "max_lr",
                "suggested_min_lr",
                "suggested_max_lr",
                "bounds_from",
                "steps",
                "stopped_early",
                "optimizer",
            )
        },
        "training": {
            "epochs": history.get("num_epochs"),
            "global_step": history.get("global_step"),
            "steps_per_epoch": history.get("steps_per_epoch"),
            "policy": history.get("policy"),
            "step_size": history.get("step_size"),
            "min_lr": history.get("min_lr"),
            "max_lr": history.get("max_lr"),
            "precision": history.get("precision"),
            "val": training.get("val", {}),
        },
        "pruning": [
            {
                "variant": variant_name(p["target_sparsity"]),
                "target_sparsity": p["target_sparsity"],
                "sparsity": p.get("sparsity"),
                "layer_sparsity": p.get("layer_sparsity", {}),
                "warnings": p.get("warnings", []),
            }
            for p in pruning
        ],
        "models": models,
        "selected": selection["name"],
        "selection": {k: v for k, v in selection.items() if k != "seconds"},
        "seconds": seconds,
        "tensorboard": {name: f"tensorboard/{name}" for name in tensorboard},
        "report": "report.html",
        "config": config.to_dict(),
        "registry": registry_summary(push),
    }


def render_html(
    summary: Mapping[str, Any],
    *,
    lr_finder: Mapping[str, Any],
    training: Mapping[str, Any],
    pruning: Sequence[Mapping[str, Any]],
    evaluations: Sequence[Mapping[str, Any]],
    figure_dir: str | os.PathLike,
) -> str:
    """The full report page (figures rendered into ``figure_dir``, then embedded)."""
    selected = summary["selected"]
    parts = [
        f"<p>cycleprune {html.escape(summary['cycleprune_version'])}. Deployed model: "
        f"<b>{html.escape(selected)}</b>. {html.escape(summary['selection']['reason'])}</p>"
    ]

    if summary.get("registry"):
        parts.append("<h2>Model registry</h2>")
        parts.append(_registry_html(summary["registry"]))

    parts.append("<h2>Results (test split, threshold chosen on validation)</h2>")
    rows, classes = [], []
    for m in summary["models"]:
        rows.append(
            [
                m["name"],
                _pct(m.get("sparsity")),
                *(_num(m["test"].get(k)) for k in METRICS),
                _num(m["val"].get("auc")),
                _num(m["val"].get("sensitivity")),
                _sig(m["threshold"]),
                format_bytes(m["size_bytes"]),
                format_bytes(m["gzip_bytes"]),
                _num(m.get("latency_ms"), 2),
            ]
        )
        classes.append("selected" if m["name"] == selected else "")
    parts.append(
        _table(
            [
                "model",
                "sparsity",
                "accuracy",
                "sensitivity",
                "specificity",
                "AUC",
                "val AUC",
                "val sensitivity",
                "threshold",
                "size",
                "gzip",
                "latency (ms)",
            ],
            rows,
            classes,
        )
    )
    eligible = ", ".join(summary["selection"].get("eligible", [])) or "none"
    parts.append(f'<p class="note">Eligible for deployment: {html.escape(eligible)}.</p>')
    fig_dir = Path(figure_dir)
    parts.append(_figures_html(size_accuracy_figure(summary["models"], fig_dir)))

    data = summary["dataset"]
    parts.append("<h2>Data</h2>")
    parts.append(
        f"<p>{html.escape(str(data['source']))} (version {html.escape(str(data['version']))}), "
        f"images {'x'.join(str(v) for v in data['image_shape'])}.</p>"
    )
    names = data["class_names"]
    parts.append(
        _table(
            ["split", *names, "total"],
            [
                [s, *(c.get(n, 0) for n in names), data["examples"][s]]
                for s, c in data["counts"].items()
            ],
        )
    )

    parts.append("<h2>LR range test and cyclical-LR training</h2>")
    parts.append(_figures_html(lr_finder_figures(lr_finder, fig_dir)))
    parts.append(_figures_html(training_figures(training["history"], fig_dir, "train")))

    if pruning:
        parts.append("<h2>Pruning</h2>")
        parts.append(
            _table(
                ["variant", "target", "measured sparsity", "warnings"],
                [
                    [
                        p["variant"],
                        _pct(p["target_sparsity"]),
                        _pct(p["sparsity"]),
                        "; ".join(p["warnings"]) or "-",
                    ]
                    for p in summary["pruning"]
                ],
            )
        )
        for record in pruning:
            name = variant_name(record["target_sparsity"])
            parts.append(_figures_html(pruning_figures(record["history"], fig_dir, name)))

    parts.append("<h2>Evaluation</h2>")
    for record in evaluations:
        name = variant_name(record["target_sparsity"])
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(_figures_html(evaluation_figures(record, fig_dir, name)))

    parts.append("<h2>Compute time (seconds)</h2>")
    seconds = summary["seconds"]
    flat = []
    for stage, value in seconds.items():
        if isinstance(value, dict):
            flat += [[f"{stage} {k}", _num(v, 1)] for k, v in value.items()]
        else:
            flat.append([stage, _num(value, 1)])
    parts.append(_table(["stage", "seconds"], flat))

    if summary.get("tensorboard"):
        logs = ", ".join(summary["tensorboard"].values())
        parts.append(
            f'<p class="note">TensorBoard logs: {html.escape(logs)} '
            "(<code>tensorboard --logdir tensorboard</code> in the run folder).</p>"
        )
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{html.escape(Config.from_dict(summary['config']).to_yaml())}</pre>")
    return _page("cycleprune run report", "\n".join(parts))


def build_run(out_dir: str | os.PathLike, stages: StageOutputs, config: Config) -> dict[str, Any]:
    """Assemble a run folder from the stage outputs.

    Writes, as a whole (the folder appears only when complete): ``summary.json`` (see the module
    docstring), ``report.html``, ``models/<variant>/`` (each compression output: Keras,
    SavedModel, TFLite files and ``sizes.json``) and ``tensorboard/<run>/``.

    Args:
        out_dir: The run folder (replaced if it exists).
        stages: Where the stage outputs are.
        config: The run configuration.

    Returns:
        The summary dict.

    Raises:
        FileNotFoundError: a stage output is missing.
        ValueError: a record is malformed, or there is no dense Keras model.
    """
    records = {
        "dataset": storage.read_json(stages.dataset),
        "lr_finder": storage.read_json(stages.lr_finder),
        "training": storage.read_json(stages.training),
        "pruning": [storage.read_json(p) for p in stages.pruning],
        "evaluations": [storage.read_json(p) for p in stages.evaluations],
        "selection": storage.read_json(stages.selection),
    }
    records["pruning"].sort(key=lambda r: r["target_sparsity"])
    records["evaluations"].sort(key=lambda r: r["target_sparsity"])
    summary = summarize(
        config,
        **records,
        compress_seconds=stages.compress_seconds,
        tensorboard=sorted(stages.tensorboard),
        push=storage.read_json(stages.push) if stages.push else None,
        configure_seconds=stages.configure_seconds,
    )
    with storage.atomic_dir(out_dir, replaces="summary.json") as tmp:
        for variant, folder in sorted(stages.models.items()):
            shutil.copytree(folder, tmp / "models" / variant)
        for name, folder in sorted(stages.tensorboard.items()):
            shutil.copytree(folder, tmp / "tensorboard" / name)
        storage.atomic_write_json(tmp / "summary.json", summary)
        with tempfile.TemporaryDirectory() as figure_dir:
            page = render_html(
                summary,
                lr_finder=records["lr_finder"],
                training=records["training"],
                pruning=records["pruning"],
                evaluations=records["evaluations"],
                figure_dir=figure_dir,
            )
        storage.atomic_write_text(tmp / "report.html", page)
    return summary


def add_stage_seconds(run_dir: str | os.PathLike, stage: str, seconds: float) -> dict[str, Any]:
    """Record one more stage's seconds in a run folder's ``summary.json`` and update ``total``.

    For a stage whose time is only known once the folder exists: the ``report`` stage that
    builds it.

    Args:
        run_dir: A run folder from :func:`build_run`.
        stage: The stage's name (a new key of ``seconds``, or one to replace).
        seconds: Its seconds (>= 0).

    Returns:
        The updated summary dict.

    Raises:
        FileNotFoundError: the folder has no ``summary.json``.
        ValueError: ``stage`` is ``total`` or empty, or ``seconds`` is negative or not finite.
    """
    if not stage or stage == "total":
        raise ValueError(f"Argument `stage` must name a stage. Received: stage={stage!r}")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"Argument `seconds` must be finite and >= 0. Received: {seconds=}")
    path = Path(run_dir) / "summary.json"
    summary = storage.read_json(path)
    times = summary["seconds"]
    times.pop("total", None)
    times[stage] = _seconds(seconds)
    times["total"] = _total(times)
    storage.atomic_write_json(path, summary)
    return summary
