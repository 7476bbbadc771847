"""Pipeline parameters <-> :class:`~cycleprune.config.Config`.

The run form of the pipeline shows the article's hyperparameters as parameters, with the article's
values as defaults (:data:`FORM_DEFAULTS`); everything else comes from a preset or
``extra_config``. :func:`build_config` resolves them in this order: the ``preset``, then each
explicit parameter (:data:`PARAMETERS`), then ``extra_config`` (YAML or JSON sections).

A parameter left at its form default takes the *preset's* value, so choosing ``preset: small`` in
the form runs ``small`` and not ``small`` under the article's batch size, width, loss and schedule
(with the default ``preset: seed`` the two are the same values). Only ``class_names``
(:data:`ALWAYS_APPLIED`), the pipeline's own choice for the bundled data, always applies;
``sparsities`` defaults to ``[]``, the preset's (``seed``: 50%, ``small``: 50/75/90%, ``best``:
90%), and any list given applies; and ``min_lr``/``max_lr`` go together: changing either applies
both. A value equal to a form default can still be forced under another preset through
``extra_config``, which may set any field, ``prune.sparsities`` included (unless it contradicts a
``sparsities`` parameter given): the pipeline fans out over the resolved configuration's
sparsities. :func:`pipeline_arguments` is the inverse, for running a given ``Config`` as a
pipeline.

No kfp import: the ``configure`` component imports this module inside its container, where
``kfp.dsl`` is the slim runtime.
"""

import json
from collections.abc import Mapping
from typing import Any

import yaml

from cycleprune.config import Config, load_yaml, preset

# Pipeline parameter -> the config field(s) it sets.
PARAMETERS: dict[str, tuple[str, ...]] = {
    "class_names": ("data.class_names",),
    "batch_size": ("data.batch_size",),
    "augment": ("data.augment",),
    "class_weight": ("data.class_weight",),
    "seed": ("data.seed", "train.seed"),
    "width": ("model.width",),
    "min_lr": ("schedule.min_lr",),
    "max_lr": ("schedule.max_lr",),
    "lr_policy": ("schedule.policy",),
    "step_size_epochs": ("schedule.step_size_epochs",),
    "epochs": ("train.epochs",),
    "optimizer": ("train.optimizer",),
    "momentum": ("train.momentum",),
    "loss": ("train.loss",),
    "focal_gamma": ("train.focal_gamma",),
    "focal_alpha": ("train.focal_alpha",),
    "sparsities": ("prune.sparsities",),
    "prune_epochs": ("prune.epochs",),
    "prune_end_epoch": ("prune.end_epoch",),
    "prune_frequency": ("prune.frequency",),
}

# The run form's defaults: the article's hyperparameters (the `seed` preset), except for the
# pipeline's own choices: named PneumoniaMNIST classes, sparsities [] = the preset's, and
# prune_end_epoch 0 = the preset's ramp, or all fine-tuning epochs when prune_epochs is set.
_SEED = preset("seed").to_dict()
FORM_DEFAULTS: dict[str, Any] = {
    name: _SEED[fields[0].split(".")[0]][fields[0].split(".")[1]]
    for name, fields in PARAMETERS.items()
}
FORM_DEFAULTS.update(
    class_names=["normal", "pneumonia"],
    class_weight=json.dumps(FORM_DEFAULTS["class_weight"]),
    sparsities=[],
    prune_end_epoch=0,
)
# Parameters applied even at their form default: they describe the bundled data, not a preset's
# recipe.
ALWAYS_APPLIED = frozenset({"class_names"})
_BOUNDS = ("min_lr", "max_lr")

# The DataConfig fields that change what prepare_dataset writes (batching and augmentation
# happen later, in make_dataset).
PREPARE_FIELDS = (
    "class_names",
    "image_size",
    "channels",
    "val_fraction",
    "shard_size",
    "limit",
    "seed",
)


def _parse_class_weight(value: Any) -> Any:
    """``"balanced"``, ``"none"``, or a YAML/JSON list such as ``"[1.0, 0.33]"``."""
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        return load_yaml(value)
    return value


def _parse_extra(extra_config: str) -> dict[str, dict[str, Any]]:
    try:
        extra = load_yaml(extra_config) if extra_config.strip() else {}
    except yaml.YAMLError as err:
        raise ValueError(f"extra_config is not valid YAML/JSON: {err}") from None
    extra = extra or {}
    if not isinstance(extra, Mapping) or not all(isinstance(v, Mapping) for v in extra.values()):
        raise ValueError(
            "extra_config must map sections to fields, e.g. "
            f"'{{evaluate: {{threshold_rule: f1}}}}'. Received: extra_config={extra_config!r}"
        )
    return {str(k): dict(v) for k, v in extra.items()}


def _merge(preset_name: str, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The preset as a dict with the parameters written over it (not validated yet)."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"Unknown pipeline parameter(s): {', '.join(unknown)}")
    data = preset(preset_name).to_dict()
    # The CLR bounds are one choice: changing either one in the form applies both as shown.
    bounds_changed = any(
        name in params and not _same(params[name], FORM_DEFAULTS[name]) for name in _BOUNDS
    )
    for name, value in params.items():
        applied = name in ALWAYS_APPLIED or (name in _BOUNDS and bounds_changed)
        if not applied and _same(value, FORM_DEFAULTS[name]):
            continue  # left at the form's default: the preset's value stands
        if name == "class_weight":
            value = _parse_class_weight(value)
        for field in PARAMETERS[name]:
            section, key = field.split(".")
            data[section][key] = value
    if params.get("prune_end_epoch", 0) == 0:
        # The preset's ramp, unless prune_epochs is set: then the ramp spans all of them.
        epochs = params.get("prune_epochs", FORM_DEFAULTS["prune_epochs"])
        if not _same(epochs, FORM_DEFAULTS["prune_epochs"]):
            data["prune"]["end_epoch"] = data["prune"]["epochs"]
    return data


def _same(value: Any, default: Any) -> bool:
    """Whether a form value is its default (class_weight as text or parsed; 1 == 1.0)."""
    if isinstance(default, str) and default.startswith("["):
        return _parse_class_weight(value) == _parse_class_weight(default)
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(default, list) and isinstance(value, tuple):
        return list(value) == default
    return value == default


def build_config(preset_name: str, params: Mapping[str, Any], extra_config: str = "") -> Config:
    """Resolve the run configuration from the pipeline's parameters.

    Args:
        preset_name: Base preset (``smoke``, ``small``, ``best``, ``seed``).
        params: Pipeline parameter values keyed as in :data:`PARAMETERS` (any subset). One
            equal to its :data:`FORM_DEFAULTS` entry leaves the preset's value, except for
            :data:`ALWAYS_APPLIED`. ``sparsities=[]`` (its default) means the preset's.
            ``prune_end_epoch=0`` means the preset's end of the sparsity ramp, or all
            fine-tuning epochs when ``prune_epochs`` is set.
        extra_config: YAML/JSON ``{section: {field: value}}`` applied last. Its
            ``prune.sparsities`` may not contradict a non-empty ``sparsities`` parameter.

    Returns:
        The validated :class:`Config`.

    Raises:
        ValueError: an unknown preset, parameter, section or field, or an invalid value (the
            message names the field and the value).
    """
    data = _merge(preset_name, params)
    extra = _parse_extra(extra_config)
    given = params.get("sparsities", FORM_DEFAULTS["sparsities"])
    other = extra.get("prune", {}).get("sparsities")
    if (
        not _same(given, FORM_DEFAULTS["sparsities"])
        and isinstance(other, list | tuple)
        and list(other) != list(given)
    ):
        raise ValueError(
            "The sparsities parameter and extra_config's prune.sparsities disagree; set one of "
            f"them. Received: sparsities={given!r}, prune.sparsities={other!r}"
        )
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


def data_config(config: Config) -> dict[str, Any]:
    """The :data:`PREPARE_FIELDS` of ``config.data``, JSON-ready."""
    data = config.to_dict()["data"]
    return {name: data[name] for name in PREPARE_FIELDS}


def pipeline_arguments(config: Config, *, preset_name: str = "seed") -> dict[str, Any]:
    """The pipeline arguments that make :func:`build_config` return ``config`` again.

    Every explicit parameter takes its value from ``config``; ``extra_config`` carries only the
    fields that still differ from ``preset_name`` (JSON, sorted keys: the same config always
    gives the same arguments, so cached stages stay cached).
    """
    values = config.to_dict()
    args: dict[str, Any] = {"preset": preset_name}
    for name, fields in PARAMETERS.items():
        section, key = fields[0].split(".")
        value = values[section][key]
        if name == "class_weight" and not isinstance(value, str):
            value = json.dumps(value)
        args[name] = value
    base = _merge(preset_name, {k: v for k, v in args.items() if k != "preset"})
    extra = {
        section: {k: v for k, v in fields.items() if base[section][k] != v}
        for section, fields in values.items()
    }
    extra = {section: fields for section, fields in extra.items() if fields}
    args["extra_config"] = json.dumps(extra, sort_keys=True) if extra else ""
    return args
