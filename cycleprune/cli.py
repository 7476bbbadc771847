"""Command line: every stage of the workflow, the local pipeline run, and compilation.

``python -m cycleprune <command> --help`` documents each command. The stage commands call the same
library functions as the Kubeflow components, so one stage can be debugged on a laptop::

    python -m cycleprune prepare-data --source data/pneumoniamnist.npz --out /tmp/ds
    python -m cycleprune find-lr --dataset /tmp/ds --out /tmp/lr --preset smoke
    python -m cycleprune train --dataset /tmp/ds --out /tmp/train --min-lr 1e-3 --max-lr 1e-1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cycleprune import __version__, redaction
from cycleprune.config import PRESETS, Config, load_config
from cycleprune.storage import StorageError

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO_ROOT / "data" / "pneumoniamnist.npz"
BUNDLED_CLASS_NAMES = ("normal", "pneumonia")

log = logging.getLogger("cycleprune")


def _add_config_args(parser: argparse.ArgumentParser, default_preset: str = "small") -> None:
    group = parser.add_argument_group("configuration (applied in this order)")
    group.add_argument(
        "--preset",
        default=default_preset,
        choices=sorted(PRESETS),
        help=f"base preset (default: {default_preset})",
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="YAML or JSON file with sections to merge over the preset",
    )
    group.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one field, e.g. --set train.epochs=4 "
        "(repeatable; values are YAML: 0.5, true, [0.5, 0.9])",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.preset, args.config, args.overrides)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from cycleprune import data

    config = _config(args)
    info = data.prepare_dataset(args.source, str(args.out), _data_config_for(args.source, config))
    _print_json(info.to_dict())
    return 0


def _data_config_for(source: str, config: Config):
    """The bundled PneumoniaMNIST carries no class names; name them unless the user did."""
    import dataclasses

    if (
        not config.data.class_names
        and not source.startswith("gs://")
        and Path(source).resolve() == BUNDLED_DATA.resolve()
    ):
        return dataclasses.replace(config.data, class_names=BUNDLED_CLASS_NAMES)
    return config.data


def _cmd_find_lr(args: argparse.Namespace) -> int:
    from cycleprune import lr_finder

    result = lr_finder.run_lr_finder(str(args.dataset), str(args.out), _config(args))
    _print_json(
        {
            "min_lr": result.min_lr,
            "max_lr": result.max_lr,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "out": str(args.out),
        }
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cycleprune import training

    result = training.run_training(
        str(args.dataset),
        str(args.out),
        _config(args),
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        checkpoint_dir=str(args.checkpoints) if args.checkpoints else None,
    )
    _print_json(
        {
            "model": str(result.model_path),
            "epochs": result.epochs_run,
            "global_step": result.global_step,
            "min_lr": result.min_lr,
            "max_lr": result.max_lr,
            "val": result.val_metrics,
        }
    )
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from cycleprune import pruning

    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1). Received: --sparsity={args.sparsity}")
    if not args.model.exists():
        raise FileNotFoundError(f"Model not found: {args.model}")
    result = pruning.run_pruning(
        str(args.model),
        str(args.dataset),
        str(args.out),
        _config(args),
        final_sparsity=args.sparsity,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        checkpoint_dir=str(args.checkpoints) if args.checkpoints else None,
    )
    _print_json(
        {
            "model": str(result.model_path),
            "sparsity": result.sparsity,
            "best_checkpoint": result.best_checkpoint,
        }
    )
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from cycleprune import compression

    _print_json(
        compression.run_compression(
            str(args.model), str(args.dataset), str(args.out), _config(args)
        )
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cycleprune import evaluation

    report = evaluation.run_evaluation(
        str(args.model), str(args.dataset), str(args.out), _config(args)
    )
    rows = [
        {
            "name": m["name"],
            "threshold": m["threshold"],
            **{k: m["test"][k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
        }
        for m in report["models"]
    ]
    _print_json(rows)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines import local  # kfp lives on the pipeline side, never in the library

    config = _config(args)
    source = str(args.source)
    if not source.startswith("gs://"):
        source = str(Path(source).resolve())
    config = config.replace(data=_data_config_for(source, config))
    registry = str(args.registry or "")
    if registry and not registry.startswith("gs://"):
        registry = str(Path(registry).resolve())
    if not source.startswith("gs://") and not Path(source).exists():
        raise FileNotFoundError(f"Data source not found: {source}")
    started = time.monotonic()
    try:
        summary = local.run_local(
            config,
            source=source,
            out_dir=str(args.out) if args.out else None,
            stream_logs=args.verbose,
            registry=registry,
            model_name=args.model_name,
            gate=_gate(args),
            enable_caching=not args.no_cache,
        )
    except local.PipelineRunError as err:
        print(f"error: {redaction.format_error(err)}", file=sys.stderr)
        return 1
    print()
    print(local.format_table(summary))
    print()
    print(f"Run folder: {summary['run_dir']}  ({time.monotonic() - started:.0f} s)")
    return 0


def _gate(args: argparse.Namespace):
    from cycleprune.registry import GateConfig

    return GateConfig(
        min_auc=args.min_auc,
        min_sensitivity=args.min_sensitivity,
        min_specificity=args.min_specificity,
        tolerance=args.promotion_tolerance,
    )


def _gate_outcome(registry_uri: str, model_name: str, version: str) -> str:
    from cycleprune import registry, storage

    uri = storage.join_uri(
        registry.model_uri(registry_uri, model_name), registry.DECISIONS_DIR, f"{version}.json"
    )
    try:
        return "promoted" if json.loads(storage.read_bytes(uri))["promoted"] else "rejected"
    except storage.ObjectNotFoundError:
        return "-"


def _cmd_models_list(args: argparse.Namespace) -> int:
    from cycleprune import registry, storage

    known = registry.list_models(args.registry)  # a missing folder or bucket is an error
    if args.model and args.model not in known:
        raise registry.RegistryError(f"Registry {args.registry} has no model {args.model!r}")
    names = [args.model] if args.model else known
    for name in names:
        pointer, _ = registry.read_production(args.registry, name)
        current = pointer["version"] if pointer else None
        print(
            f"{name}: production {current} (revision {pointer['revision']})"
            if pointer
            else f"{name}: no production version"
        )
        rows = [("  version", "test AUC", "sensitivity", "specificity", "gzip", "gate", "run")]
        for version in registry.list_versions(args.registry, name):
            uri = registry.version_uri(args.registry, name, version)
            card = json.loads(storage.read_bytes(storage.join_uri(uri, registry.CARD_JSON)))
            test = card["metrics"]["test"]
            rows.append(
                (
                    f"{'*' if version == current else ' '} {version}",
                    *(
                        f"{float(test.get(k) or 0):.4f}"
                        for k in ("auc", "sensitivity", "specificity")
                    ),
                    str(card["sizes"]["gzip_bytes"]),
                    _gate_outcome(args.registry, name, version),
                    str(card.get("parent_run", "")),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = zip(row, widths, strict=True)
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
    return 0


def _cmd_models_show(args: argparse.Namespace) -> int:
    from cycleprune import registry

    _print_json(registry.show(args.registry, args.model, args.version))
    return 0


def _print_pointer(model_name: str, pointer: dict[str, Any]) -> None:
    print(
        f"{model_name}: production is now {pointer['version']} (revision "
        f"{pointer['revision']}, was {pointer['previous']})"
    )


def _cmd_models_promote(args: argparse.Namespace) -> int:
    from cycleprune import registry

    _print_pointer(args.model, registry.promote(args.registry, args.model, args.version))
    return 0


def _cmd_models_rollback(args: argparse.Namespace) -> int:
    from cycleprune import registry

    _print_pointer(args.model, registry.rollback(args.registry, args.model, args.to))
    return 0


def _add_models_commands(sub: Any) -> None:
    models = sub.add_parser(
        "models",
        help="The model registry: list, show, promote, rollback.",
        description="The model registry (a local folder or gs:// URI): list versions, show "
        "one, point production at a version (promote: no gate) or back at an earlier one.",
    )
    verbs = models.add_subparsers(dest="models_command", required=True, metavar="<action>")

    def verb(name: str, func: Callable[[argparse.Namespace], int], text: str, model: bool = True):
        p = verbs.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        p.add_argument("--registry", required=True, help="a folder or gs://bucket/prefix")
        p.add_argument("--model", required=model, help="model name")
        return p

    verb("list", _cmd_models_list, "List the versions (* = production) and gate decisions.", False)
    p = verb("show", _cmd_models_show, "Print a version's model card, metrics and decision.")
    p.add_argument("--version", help="default: the production version")
    p = verb("promote", _cmd_models_promote, "Point production at a version (no gate).")
    p.add_argument("--version", required=True, help="the version to serve")
    p = verb("rollback", _cmd_models_rollback, "Point production back at an earlier version.")
    p.add_argument(
        "--to",
        help="default: the latest earlier production version not already rolled back from "
        "(rolling back twice goes two steps back)",
    )


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines import DEFAULT_IMAGE
    from pipelines import compile as compile_module

    paths = compile_module.compile_pipeline(str(args.out), image=args.image or DEFAULT_IMAGE)
    for path in paths:
        print(path)
    return 0


def _cmd_show_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(config.to_yaml() if args.format == "yaml" else config.to_json())
    return 0


def _add_registry_args(parser: argparse.ArgumentParser) -> None:
    from cycleprune.registry import GateConfig

    defaults = GateConfig()
    group = parser.add_argument_group("model registry and promotion gate")
    group.add_argument(
        "--registry",
        help="push the selected model to this registry (a folder or gs://bucket/prefix) and "
        "promote it if it passes the gate (default: no push)",
    )
    group.add_argument("--model-name", default="cycleprune", help="registry model name")
    for metric in ("auc", "sensitivity", "specificity"):
        default = getattr(defaults, f"min_{metric}")
        group.add_argument(
            f"--min-{metric}",
            type=float,
            default=default,
            help=f"gate: lowest test {metric} (default: {default})",
        )
    group.add_argument(
        "--promotion-tolerance",
        type=float,
        default=defaults.tolerance,
        help="gate: how much worse than the production model (evaluated on this run's test "
        f"split) each metric may be (default: {defaults.tolerance})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cycleprune",
        description="LR range test -> cyclical-LR training -> magnitude pruning -> compression "
        "-> evaluation, as library stages and as a Kubeflow pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m cycleprune <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"cycleprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str, config: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if config:
            _add_config_args(p)
        return p

    p = command(
        "run",
        _cmd_run,
        "Run the whole pipeline on this machine (kfp.local) and print "
        "the results table. Default: the bundled PneumoniaMNIST, preset small.",
    )
    p.add_argument(
        "--source",
        default=str(BUNDLED_DATA),
        help="dataset: .npz, image-folder root, prepared dataset, or gs:// URI "
        "(default: the bundled PneumoniaMNIST)",
    )
    p.add_argument("--out", type=Path, help="run folder (default: runs/<UTC timestamp>)")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every stage, even those whose inputs are unchanged since an earlier run "
        "(by default they come from the cache in runs/.kfp-root; use this when the source "
        "changed under the same path or URI)",
    )
    _add_registry_args(p)

    p = command(
        "compile",
        _cmd_compile,
        "Compile the pipeline: IR YAML for the KFP UI / "
        "kfp.Client, and Kubernetes Pipeline + PipelineVersion manifests.",
        config=False,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--image", help="component base image (default: the pinned project image)")

    p = command(
        "prepare-data",
        _cmd_prepare_data,
        "Validate a source and write a versioned "
        "prepared dataset (TFRecord shards + dataset.json).",
    )
    p.add_argument("--source", required=True, help=".npz, image-folder root, or prepared dataset")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")

    p = command("find-lr", _cmd_find_lr, "LR range test: exponential sweep, suggested CLR bounds.")
    p.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")

    for name, func, what in (
        ("train", _cmd_train, "Train with cyclical learning rates."),
        ("prune", _cmd_prune, "Magnitude-prune a trained model and fine-tune it under CLR."),
    ):
        p = command(name, func, what)
        if name == "prune":
            p.add_argument("--model", type=Path, required=True, help="trained model (.keras)")
            p.add_argument(
                "--sparsity", type=float, help="target sparsity (default: prune.final_sparsity)"
            )
        p.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--min-lr", type=float, help="CLR lower bound (default: schedule.min_lr)")
        p.add_argument("--max-lr", type=float, help="CLR upper bound (default: schedule.max_lr)")
        p.add_argument(
            "--checkpoints",
            type=Path,
            help="checkpoint folder to write and resume from (default: OUT/checkpoints)",
        )

    p = command(
        "compress",
        _cmd_compress,
        "Strip pruning, export Keras/SavedModel/TFLite "
        "(float32, dynamic int8, full int8) and report raw and gzip sizes.",
    )
    p.add_argument("--model", type=Path, required=True, help="model (.keras)")
    p.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="prepared dataset (training images calibrate int8)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")

    p = command(
        "evaluate",
        _cmd_evaluate,
        "Evaluate a model file or a compress output folder: "
        "threshold on validation, metrics on test, latency.",
    )
    p.add_argument("--model", type=Path, required=True, help=".keras, .tflite, or compress folder")
    p.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")

    p = command("show-config", _cmd_show_config, "Print the resolved configuration.")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    _add_models_commands(sub)

    # upload / submit / schedule talk to a KFP API and live on the pipeline side (kfp). They are
    # listed here and parsed by pipelines.cluster, so other commands never pay for importing kfp.
    for name, text in CLUSTER_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=None)
    return parser


CLUSTER_COMMANDS = {
    "upload": "Upload a compiled pipeline to a KFP cluster (a new pipeline or version).",
    "submit": "Start a run on a KFP cluster; optionally wait and print its state and UI link.",
    "schedule": "Create a KFP recurring run (cron, max concurrency 1, no catch-up).",
}


def _run_cluster_command(argv: Sequence[str]) -> int:
    from pipelines.cluster import add_cluster_commands

    parser = argparse.ArgumentParser(prog="python -m cycleprune")
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redaction.install()  # no log line of ours, kfp's or TensorFlow's prints a token
    cluster = args.command in CLUSTER_COMMANDS
    if extra and not cluster:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if cluster:
            return _run_cluster_command(argv[argv.index(args.command) :])
        return args.func(args)
    except (ValueError, OSError, StorageError) as err:
        # Bad input: one clear line, no traceback. Names of files/fields are in the message;
        # credentials in it (a signed URL, a token) are redacted, control characters escaped.
        print(f"error: {redaction.format_error(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # Named stage failures carry everything needed in their message: the step, LR and last
        # good checkpoint of a divergence; the checkpoint written before a SIGTERM stop.
        from cycleprune.preemption import PreemptedError
        from cycleprune.training import DivergenceError

        if isinstance(err, PreemptedError):
            print(f"preempted: {redaction.format_error(err)}", file=sys.stderr)
            return 143  # 128 + SIGTERM, as if the signal had ended the process
        if isinstance(err, DivergenceError):
            print(f"error: {redaction.format_error(err)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
