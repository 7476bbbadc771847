"""The cycleprune pipeline: the task graph and its cluster settings.

::

    configure -> prepare_data -> find_lr -> train -> compress -> evaluate -----+
        |                                     |                              |
        +-> list_sparsities ------------------+-> ParallelFor(sparsities):   v
                                                  prune -> compress -> evaluate
                                                                             |
                                           report <- push <- select_model <-+

The loop runs one branch per sparsity of the resolved configuration (``list_sparsities`` reads
them from ``configure``'s ``config``): the preset's, unless the ``sparsities`` parameter or
``extra_config`` sets them.

``push`` writes the selected model to ``<registry>/<model_name>/<version>/`` and moves the
production pointer only if the candidate passes the promotion gate (:mod:`cycleprune.registry`);
with an empty ``registry`` it does nothing.

Cluster settings (``kfp.local`` ignores them):

- ``find_lr``, ``train``, ``prune`` and ``evaluate`` request ``gpus`` accelerators of type
  ``nvidia.com/gpu`` (``gpus`` is a pipeline parameter, resolved per task at run time) and
  tolerate the ``nvidia.com/gpu`` taint that GPU node pools usually carry; the training stages
  mirror over the GPUs they get (:mod:`cycleprune.distribution`). KFP 2.17 does not pass a
  channel used only in ``set_accelerator_limit`` into the ``ParallelFor`` sub-DAG (its tasks
  would reference an input their DAG lacks), so every GPU stage also takes ``gpus`` as a
  component input: that makes the compiler declare it on the loop's DAG. Compiling with
  ``gpus=0`` gives the CPU-only variant: no accelerator request, no toleration at all;
- every task has CPU and memory requests and limits (:data:`RESOURCES`; the CPU-only variant
  :data:`CPU_ONLY_RESOURCES`, which fits 4-vCPU nodes);
- ``find_lr``, ``train`` and ``prune`` are retried (:data:`RETRIES`, exponential back-off).
  With a ``checkpoint_root`` a retry resumes from the last checkpoint (every epoch, and the
  exact step on SIGTERM);
- caching: every stage but ``push`` and ``report`` is cached (:data:`CACHED_STAGES`). A task's
  cache key is its component, image, command, environment and inputs, so a rerun with identical
  inputs is served the identical artifacts, and a changed input reruns exactly the stages that
  depend on it: a new ``epochs`` reuses the prepared dataset (``prepare_data`` takes only the
  data settings) and retrains everything after it. ``push`` is never cached: it writes to the
  registry, and its gate compares with whatever is in production at the time. ``report`` reads
  ``push``'s new decision, so it could never be served from the cache: it is uncached to say so.
  Caching is turned off at run time, to retrain whatever the cache holds: ``cycleprune run
  --no-cache`` (kfp.local) and ``cycleprune submit --no-cache``; ``cycleprune schedule`` turns
  it off unless given ``--cache``, so every scheduled run retrains. The key holds the source's
  path or URI, not its content: a dataset replaced under the same path or ``gs://`` URI needs
  ``--no-cache``. On kfp.local the key also holds a digest of the library code (``env``, set by
  :func:`pipelines.local.run_local`), so editing ``cycleprune/`` invalidates the cache; a
  cluster runs a versioned image instead.
  ``find_lr``, ``train`` and ``prune`` take ``run_id`` (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``),
  used only to name their checkpoint folder under ``checkpoint_root``. Both KFP and kfp.local
  resolve the placeholder to the run's ID before computing the cache key, so with it those
  three stages, and every stage that consumes their artifacts, run again in every run: on a
  cluster only ``configure``, ``list_sparsities`` and ``prepare_data`` are served from the
  cache. kfp.local has no retries and no ``checkpoint_root``, so
  :func:`pipelines.local.run_local` builds the graph with ``checkpoint_run_id=False``
  (``run_id`` = ""), and there every cached stage is served.

Data flow: the configuration and the LR bounds travel as small JSON artifacts (``configure``'s
``config``, ``find_lr``'s ``lr_finder``). Into the ``ParallelFor`` only artifacts, pipeline
parameters and the loop item go: kfp.local 2.17 replaces a task-output *parameter* consumed inside
a loop with the loop item. The loop's items are ``list_sparsities``' single output: kfp.local 2.17
iterates over a task's ``Output`` only, not over one named output of several.
"""

import functools
from collections.abc import Mapping

from kfp import dsl, kubernetes
from kfp.dsl import Artifact
from kfp.dsl.pipeline_channel import PipelineChannel

from components._base import DEFAULT_IMAGE
from components.compress import compress
from components.configure import configure, list_sparsities
from components.evaluate import evaluate
from components.find_lr import find_lr
from components.parameters import FORM_DEFAULTS
from components.prepare_data import prepare_data
from components.prune import prune
from components.push import push
from components.report import report
from components.select_model import select_model
from components.train import train
from cycleprune.registry import GateConfig

PIPELINE_NAME = "cycleprune"
# Where the project image keeps the bundled PneumoniaMNIST (the repository lives in /app).
DEFAULT_SOURCE = "/app/data/pneumoniamnist.npz"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_STAGES = ("find_lr", "train", "prune", "evaluate")
RETRIES = 2
RETRIED_STAGES = ("find_lr", "train", "prune")
RETRY_BACKOFF = "60s"
# (cpu request, cpu limit, memory request, memory limit) per stage.
RESOURCES = {
    "configure": ("250m", "1", "512Mi", "1Gi"),
    "list_sparsities": ("250m", "1", "512Mi", "1Gi"),
    "prepare_data": ("1", "4", "4Gi", "8Gi"),
    "find_lr": ("4", "8", "16Gi", "32Gi"),
    "train": ("4", "8", "16Gi", "32Gi"),
    "prune": ("4", "8", "16Gi", "32Gi"),
    "compress": ("2", "4", "8Gi", "16Gi"),
    "evaluate": ("2", "8", "8Gi", "16Gi"),
    "select_model": ("500m", "1", "1Gi", "2Gi"),
    "report": ("1", "2", "2Gi", "4Gi"),
    "push": ("1", "2", "4Gi", "8Gi"),
}
# The CPU-only variant (compiled with gpus=0, for small dev clusters): the training stages ask for
# at most 2 CPUs and 8 GiB, so every task fits a 4-vCPU, 16 GB node (e2-standard-4 allocates
# about 3.9 CPUs and 13 GiB). The `small` preset trains in about 10 minutes on 2 cores.
CPU_ONLY_RESOURCES = {
    **RESOURCES,
    "find_lr": ("2", "4", "6Gi", "12Gi"),
    "train": ("2", "4", "6Gi", "12Gi"),
    "prune": ("2", "4", "6Gi", "12Gi"),
}
# push has registry side effects; report consumes push's fresh decision (see the docstring).
UNCACHED_STAGES = ("push", "report")
CACHED_STAGES = tuple(stage for stage in RESOURCES if stage not in UNCACHED_STAGES)
# The promotion gate's default thresholds (pipeline parameters).
GATE = GateConfig()


def _settle(
    task: dsl.PipelineTask,
    stage: str,
    image: str,
    gpus: int | PipelineChannel,
    retries: int,
    env: Mapping[str, str] | None = None,
) -> dsl.PipelineTask:
    """Apply the stage's image, caching, environment, resources, accelerator, toleration and
    retry policy.

    ``gpus`` is the ``gpus`` pipeline parameter (a channel), or an int: 0 = no accelerator.
    """
    accelerated = isinstance(gpus, PipelineChannel) or gpus > 0
    resources = RESOURCES if accelerated else CPU_ONLY_RESOURCES
    cpu_request, cpu_limit, memory_request, memory_limit = resources[stage]
    task.set_container_image(image)
    task.set_caching_options(enable_caching=stage in CACHED_STAGES)
    for name, value in sorted((env or {}).items()):
        task.set_env_variable(name, value)
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    if stage in GPU_STAGES and accelerated:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    if stage in RETRIED_STAGES and retries:
        task.set_retry(num_retries=retries, backoff_duration=RETRY_BACKOFF, backoff_factor=2.0)
    return task


def build_pipeline(
    image: str = DEFAULT_IMAGE,
    *,
    gpus: int = 1,
    retries: int = RETRIES,
    env: Mapping[str, str] | None = None,
    checkpoint_run_id: bool = True,
):
    """Build the pipeline with every task running ``image``.

    Args:
        image: Container image of every component (the project image: TensorFlow, kfp and
            cycleprune installed).
        gpus: Default of the ``gpus`` pipeline parameter: GPUs requested by each GPU stage.
            0 compiles the CPU-only variant, whose tasks request no accelerator and tolerate no
            GPU taint whatever ``gpus`` says at run time (its GPU stages then log a warning).
        retries: Retries of ``find_lr``, ``train`` and ``prune`` (``kfp.local`` honours them
            too).
        env: Environment variables of every task. They are part of each task's cache key, so
            :func:`pipelines.local.run_local` sets one to a digest of the library code: kfp.local
            runs the code of this checkout, not of ``image``.
        checkpoint_run_id: Pass the run's ID to ``find_lr``, ``train`` and ``prune``, so their
            checkpoints under ``checkpoint_root`` are per run and a retry resumes its own run's.
            ``False`` passes "" (fine without a ``checkpoint_root``): their cache keys then stay
            the same from run to run. ``push`` gets the run's ID either way (model card).

    Returns:
        The ``@dsl.pipeline`` graph component (compile it, or call it under ``kfp.local``).

    Raises:
        ValueError: a negative ``gpus`` or ``retries``.
    """
    if gpus < 0 or retries < 0:
        raise ValueError(
            f"Arguments `gpus` and `retries` must be >= 0. Received: gpus={gpus}, retries={retries}"
        )
    accelerated = gpus > 0
    default_gpus = gpus

    @dsl.pipeline(name=PIPELINE_NAME)
    def cycleprune_pipeline(
        source: str = DEFAULT_SOURCE,
        preset: str = "seed",
        class_names: list = FORM_DEFAULTS["class_names"],
        batch_size: int = FORM_DEFAULTS["batch_size"],
        augment: bool = FORM_DEFAULTS["augment"],
        class_weight: str = FORM_DEFAULTS["class_weight"],
        seed: int = FORM_DEFAULTS["seed"],
        width: float = FORM_DEFAULTS["width"],
        min_lr: float = FORM_DEFAULTS["min_lr"],
        max_lr: float = FORM_DEFAULTS["max_lr"],
        lr_policy: str = FORM_DEFAULTS["lr_policy"],
        step_size_epochs: float = FORM_DEFAULTS["step_size_epochs"],
        epochs: int = FORM_DEFAULTS["epochs"],
        optimizer: str = FORM_DEFAULTS["optimizer"],
        momentum: float = FORM_DEFAULTS["momentum"],
        loss: str = FORM_DEFAULTS["loss"],
        focal_gamma: float = FORM_DEFAULTS["focal_gamma"],
        focal_alpha: float = FORM_DEFAULTS["focal_alpha"],
        sparsities: list = FORM_DEFAULTS["sparsities"],
        prune_epochs: int = FORM_DEFAULTS["prune_epochs"],
        prune_end_epoch: int = FORM_DEFAULTS["prune_end_epoch"],
        prune_frequency: int = FORM_DEFAULTS["prune_frequency"],
        extra_config: str = "",
        checkpoint_root: str = "",
        gpus: int = default_gpus,
        registry: str = "",
        model_name: str = "cycleprune",
        min_auc: float = GATE.min_auc,
        min_sensitivity: float = GATE.min_sensitivity,
        min_specificity: float = GATE.min_specificity,
        promotion_tolerance: float = GATE.tolerance,
    ) -> Artifact:
        """LR range test, cyclical-LR training, magnitude pruning and compression of a compact
        image classifier; the smallest model that keeps the dense model's validation AUC and
        sensitivity is selected. Defaults: the original article (VGG, PneumoniaMNIST).

        Args:
            source: Dataset: a .npz (MedMNIST layout), an image-folder root
                (<root>/<split>/<class>/*.png) or a prepared dataset folder, as a path in the
                container (default: the bundled PneumoniaMNIST).
            preset: Base configuration: seed (the article), small, best (small's recipe on
                a half-width ResNet-18, pruned to 90% over a longer fine-tuning, about three
                times the run time) or smoke. Every parameter below left at its default (the
                article's value, or [] for sparsities) takes this preset's value instead;
                class_names always applies, and min_lr and max_lr go together. To force a
                value equal to a default under another preset, use extra_config.
            class_names: Names of the label indices of a .npz source (ignored for image
                folders, whose class folders name them); [] = the file's own names or class_0,
                class_1, ... A .npz that names its classes needs the same names here, or [].
            batch_size: Batch size per GPU: a step on n GPUs takes n * batch_size images, and
                steps per epoch (and the CLR step size in steps) scale accordingly.
            augment: Random shifts, rotations and zooms of training images.
            class_weight: Per-class loss weights: balanced (n / (k * n_c)), none, or a list by
                class index such as [1.0, 0.33] (the article).
            seed: Seed of the data split, shuffling, augmentation and weight initialisation.
            width: Width multiplier of the network (1.0 = 64..512 filters).
            min_lr: Lower CLR bound (the article: 1e-3). Set min_lr and max_lr to 0 to train
                with the LR range test's suggestion; find_lr reports it either way.
            max_lr: Upper CLR bound (the article: 1e-1); 0 = the LR range test's suggestion.
            lr_policy: CLR policy: triangular, triangular2 or exp_range.
            step_size_epochs: CLR half-cycle in epochs (the article: 4).
            epochs: Training epochs, rounded up to whole CLR cycles.
            optimizer: sgd (with momentum) or adam.
            momentum: SGD momentum.
            loss: focal or crossentropy.
            focal_gamma: Focal loss focusing parameter gamma.
            focal_alpha: Focal loss balance parameter alpha.
            sparsities: Target sparsities; one prune -> compress -> evaluate branch each.
                [] = the preset's (seed: [0.5], small: [0.5, 0.75, 0.9], best: [0.9]).
            prune_epochs: Fine-tuning epochs while pruning.
            prune_end_epoch: Epoch at which the sparsity ramp reaches its target; 0 = the
                preset's (seed: the last fine-tuning epoch), or the last fine-tuning epoch when
                prune_epochs is set.
            prune_frequency: Prune every this many steps.
            extra_config: YAML or JSON sections for any other config field, applied last, e.g.
                {evaluate: {threshold_rule: f1}, compress: {quantizations: [int8]}}.
            checkpoint_root: Folder every attempt can reach (a mounted volume or bucket) for
                find_lr/train/prune checkpoints, so a retry resumes; empty = inside the pod.
            gpus: GPUs per GPU stage (find_lr, train, prune, evaluate); training mirrors over
                all of them (tf.distribute.MirroredStrategy). 0 = CPU.
            registry: Model registry (gs://bucket/prefix or a mounted folder): the selected
                model is pushed to <registry>/<model_name>/<version>/ and promoted to
                production only if it passes the gate; empty = no push.
            model_name: Name of the model in the registry.
            min_auc: Gate: lowest test ROC AUC for promotion.
            min_sensitivity: Gate: lowest test sensitivity for promotion.
            min_specificity: Gate: lowest test specificity for promotion.
            promotion_tolerance: Gate: how much worse than the production model, evaluated on
                this run's test split, each of AUC, sensitivity and specificity may be.
        """
        stage = functools.partial(
            _settle, image=image, gpus=gpus if accelerated else 0, retries=retries, env=env
        )
        config_task = stage(
            configure(
                preset=preset,
                class_names=class_names,
                batch_size=batch_size,
                augment=augment,
                class_weight=class_weight,
                seed=seed,
                width=width,
                min_lr=min_lr,
                max_lr=max_lr,
                lr_policy=lr_policy,
                step_size_epochs=step_size_epochs,
                epochs=epochs,
                optimizer=optimizer,
                momentum=momentum,
                loss=loss,
                focal_gamma=focal_gamma,
                focal_alpha=focal_alpha,
                sparsities=sparsities,
                prune_epochs=prune_epochs,
                prune_end_epoch=prune_end_epoch,
                prune_frequency=prune_frequency,
                extra_config=extra_config,
            ),
            "configure",
        )
        config = config_task.outputs["config"]
        data_task = stage(
            prepare_data(source=source, data_config=config_task.outputs["data_config"]),
            "prepare_data",
        )
        dataset = data_task.outputs["dataset"]
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER if checkpoint_run_id else ""
        lr_finder = stage(
            find_lr(
                dataset=dataset,
                config=config,
                checkpoint_root=checkpoint_root,
                run_id=run_id,
                gpus=gpus,
            ),
            "find_lr",
        ).outputs["lr_finder"]
        train_task = stage(
            train(
                dataset=dataset,
                config=config,
                lr_finder=lr_finder,
                checkpoint_root=checkpoint_root,
                run_id=run_id,
                gpus=gpus,
            ),
            "train",
        )
        dense_models = stage(
            compress(
                model=train_task.outputs["model"],
                dataset=dataset,
                config=config,
                target_sparsity=0.0,
            ),
            "compress",
        ).outputs["models"]
        dense_evaluation = stage(
            evaluate(
                models=dense_models, dataset=dataset, config=config, target_sparsity=0.0, gpus=gpus
            ),
            "evaluate",
        ).outputs["evaluation"]

        fan_out = stage(list_sparsities(config=config), "list_sparsities").output
        with dsl.ParallelFor(fan_out) as sparsity:
            prune_task = stage(
                prune(
                    model=train_task.outputs["model"],
                    dataset=dataset,
                    config=config,
                    sparsity=sparsity,
                    lr_finder=lr_finder,
                    checkpoint_root=checkpoint_root,
                    run_id=run_id,
                    gpus=gpus,
                ),
                "prune",
            )
            pruned_models = stage(
                compress(
                    model=prune_task.outputs["pruned"],
                    dataset=dataset,
                    config=config,
                    target_sparsity=sparsity,
                ),
                "compress",
            ).outputs["models"]
            pruned_evaluation = stage(
                evaluate(
                    models=pruned_models,
                    dataset=dataset,
                    config=config,
                    target_sparsity=sparsity,
                    gpus=gpus,
                ),
                "evaluate",
            ).outputs["evaluation"]

        select_task = stage(
            select_model(
                dense_evaluation=dense_evaluation,
                pruned_evaluations=dsl.Collected(pruned_evaluation),
                dense_models=dense_models,
                pruned_models=dsl.Collected(pruned_models),
                config=config,
            ),
            "select_model",
        )
        push_task = stage(
            push(
                selection=select_task.outputs["selection"],
                dense_evaluation=dense_evaluation,
                pruned_evaluations=dsl.Collected(pruned_evaluation),
                dense_models=dense_models,
                pruned_models=dsl.Collected(pruned_models),
                dataset=dataset,
                dataset_info=data_task.outputs["info"],
                config=config,
                registry=registry,
                model_name=model_name,
                min_auc=min_auc,
                min_sensitivity=min_sensitivity,
                min_specificity=min_specificity,
                promotion_tolerance=promotion_tolerance,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ),
            "push",
        )
        report_task = stage(
            report(
                config=config,
                dataset_info=data_task.outputs["info"],
                lr_finder=lr_finder,
                train_history=train_task.outputs["history"],
                train_tensorboard=train_task.outputs["tensorboard"],
                prune_histories=dsl.Collected(prune_task.outputs["history"]),
                prune_tensorboards=dsl.Collected(prune_task.outputs["tensorboard"]),
                dense_evaluation=dense_evaluation,
                pruned_evaluations=dsl.Collected(pruned_evaluation),
                dense_models=dense_models,
                pruned_models=dsl.Collected(pruned_models),
                selection=select_task.outputs["selection"],
                push_decision=push_task.outputs["decision"],
            ),
            "report",
        )
        return report_task.outputs["run"]

    return cycleprune_pipeline
