"""The compiled pipeline: task graph, fan-out, cluster settings, determinism, K8s manifests."""

import inspect
import re

import pytest
import yaml

from components._base import DEFAULT_IMAGE
from components.parameters import PARAMETERS, pipeline_arguments
from cycleprune import __version__
from cycleprune.config import preset
from pipelines import compile as compile_module
from pipelines.local import _stage
from pipelines.pipeline import CACHED_STAGES, GPU_RESOURCE, UNCACHED_STAGES, build_pipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    paths = compile_module.compile_pipeline(out)
    return paths


@pytest.fixture(scope="module")
def ir(compiled):
    spec, platform = yaml.safe_load_all(compiled[0].read_text())
    return {"spec": spec, "platform": platform}


def _tasks(ir) -> dict:
    tasks = dict(ir["spec"]["root"]["dag"]["tasks"])
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    assert len(loops) == 1
    loop_component = loops[0]["componentRef"]["name"]
    return tasks, ir["spec"]["components"][loop_component]["dag"]["tasks"]


def test_writes_ir_and_manifests(compiled):
    assert [p.name for p in compiled] == [
        compile_module.IR_FILE,
        compile_module.MANIFEST_FILE,
    ]
    assert all(p.stat().st_size > 0 for p in compiled)


def test_task_graph(ir):
    top, loop = _tasks(ir)
    assert set(top) == {
        "configure", "list-sparsities", "prepare-data", "find-lr", "train", "compress",
        "evaluate", "for-loop-1", "select-model", "push", "report",
    }  # fmt: skip
    assert set(loop) == {"prune", "compress-2", "evaluate-2"}

    def deps(tasks, name):
        return set(tasks[name].get("dependentTasks", []))

    assert deps(top, "configure") == set()
    assert deps(top, "list-sparsities") == {"configure"}
    assert deps(top, "prepare-data") == {"configure"}
    assert deps(top, "find-lr") == {"configure", "prepare-data"}
    assert "find-lr" in deps(top, "train")
    assert "train" in deps(top, "compress")
    assert "compress" in deps(top, "evaluate")
    assert {"train", "find-lr", "list-sparsities"} <= deps(top, "for-loop-1")
    assert {"evaluate", "for-loop-1"} <= deps(top, "select-model")
    assert {"select-model", "for-loop-1", "prepare-data"} <= deps(top, "push")
    assert {"select-model", "push"} <= deps(top, "report")
    assert deps(loop, "compress-2") == {"prune"}
    assert deps(loop, "evaluate-2") == {"compress-2"}
    # Task names are the component names (a second use gets a -2 suffix).
    for name, task in {**top, **loop}.items():
        assert task["componentRef"]["name"] == f"comp-{name}"


def test_fan_out_over_sparsities_and_collected_inputs(ir):
    top, body = _tasks(ir)
    loop = top["for-loop-1"]
    item = {"componentInputParameter": loop["parameterIterator"]["itemInput"]}
    assert body["prune"]["inputs"]["parameters"]["sparsity"] == item
    for name in ("compress-2", "evaluate-2"):
        assert body[name]["inputs"]["parameters"]["target_sparsity"] == item
    # One branch per sparsity of the resolved configuration, not of the raw form parameter.
    items = loop["parameterIterator"]["items"]["inputParameter"]
    assert loop["inputs"]["parameters"][items] == {
        "taskOutputParameter": {"producerTask": "list-sparsities", "outputParameterKey": "Output"}
    }
    fan_out = top["list-sparsities"]["inputs"]["artifacts"]["config"]["taskOutputArtifact"]
    assert fan_out == {"producerTask": "configure", "outputArtifactKey": "config"}
    configure = top["configure"]["inputs"]["parameters"]["sparsities"]
    assert configure == {"componentInputParameter": "sparsities"}
    defaults = ir["spec"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["sparsities"]["defaultValue"] == []  # [] = the preset's
    selected = top["select-model"]["inputs"]["artifacts"]
    assert selected["pruned_evaluations"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert selected["dense_evaluation"]["taskOutputArtifact"]["producerTask"] == "evaluate"


def _executor(ir, task_name):
    return ir["spec"]["deploymentSpec"]["executors"][f"exec-{task_name}"]["container"]


GPUS = "{{$.inputs.parameters['pipelinechannel--gpus']}}"


def test_gpu_stages_request_gpus_and_tolerate_the_taint(ir):
    tolerations = ir["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpus = ir["spec"]["root"]["inputDefinitions"]["parameters"]["gpus"]
    assert (gpus["parameterType"], gpus["defaultValue"]) == ("NUMBER_INTEGER", 1)
    for name in ("find-lr", "train", "prune", "evaluate", "evaluate-2"):
        accelerator = _executor(ir, name)["resources"]["accelerator"]
        assert accelerator["resourceType"] == GPU_RESOURCE
        assert accelerator["resourceCount"] == GPUS  # the `gpus` parameter, resolved at run time
        assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in tolerations[
            f"exec-{name}"
        ]["tolerations"]
    for name in (
        "configure",
        "list-sparsities",
        "prepare-data",
        "compress",
        "select-model",
        "report",
    ):
        assert "accelerator" not in _executor(ir, name).get("resources", {})
        assert f"exec-{name}" not in tolerations


def test_every_task_has_cpu_and_memory_requests_and_limits(ir):
    for name in ir["spec"]["deploymentSpec"]["executors"]:
        resources = _executor(ir, name.removeprefix("exec-"))["resources"]
        for key in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit"):
            assert resources[f"resource{key}"], (name, key)


def test_gpus_reaches_every_task_that_requests_gpus(ir):
    # The accelerator count is a placeholder of the task's own input `pipelinechannel--gpus`;
    # each such task must get that input from an input of its DAG, in the loop's DAG too (KFP
    # does not route a channel used only in set_accelerator_limit into a ParallelFor).
    top, loop = _tasks(ir)
    loop_inputs = ir["spec"]["components"]["comp-for-loop-1"]["inputDefinitions"]["parameters"]
    assert "pipelinechannel--gpus" in loop_inputs
    loop_task = next(t for t in top.values() if "parameterIterator" in t)
    assert loop_task["inputs"]["parameters"]["pipelinechannel--gpus"] == {
        "componentInputParameter": "gpus"
    }
    executors = ir["spec"]["deploymentSpec"]["executors"]

    def requests_gpus(task) -> bool:
        executor = executors.get(task["componentRef"]["name"].replace("comp-", "exec-", 1))
        return executor is not None and "accelerator" in executor["container"]["resources"]

    for tasks, source in ((top, "gpus"), (loop, "pipelinechannel--gpus")):
        users = [name for name, task in tasks.items() if requests_gpus(task)]
        assert users
        for name in users:
            inputs = tasks[name]["inputs"]["parameters"]
            assert inputs["pipelinechannel--gpus"] == {"componentInputParameter": source}, name
            assert inputs["gpus"] == {"componentInputParameter": source}, name


def test_retries_and_caching(ir):
    top, loop = _tasks(ir)
    tasks = {**top, **loop}
    for name in ("find-lr", "train", "prune"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert not {n for n, t in tasks.items() if "retryPolicy" in t} - {"find-lr", "train", "prune"}
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    # Every stage but push (registry side effects) and report (reads push's fresh decision).
    assert cached == {
        "configure", "list-sparsities", "prepare-data", "find-lr", "train", "compress", "evaluate",
        "select-model", "prune", "compress-2", "evaluate-2",
    }  # fmt: skip
    assert {_stage(n) for n in cached} == set(CACHED_STAGES)
    assert not {"push", "report"} & cached and set(UNCACHED_STAGES) == {"push", "report"}


@pytest.mark.parametrize("per_run", [True, False])
def test_run_id_of_the_checkpointing_stages(tmp_path, per_run):
    from kfp import compiler

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_pipeline(checkpoint_run_id=per_run), str(path))
    top, loop = _tasks({"spec": next(yaml.safe_load_all(path.read_text()))})
    tasks = {**top, **loop}

    def run_id(name):
        return tasks[name]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]

    # The run's ID changes every cache key it enters: kfp.local builds without it.
    expected = "{{$.pipeline_job_uuid}}" if per_run else ""
    assert {run_id(n) for n in ("find-lr", "train", "prune")} == {expected}
    assert run_id("push") == "{{$.pipeline_job_uuid}}"  # the model card's parent run


def test_env_reaches_every_task_and_is_absent_by_default(tmp_path, ir):
    from kfp import compiler

    path = tmp_path / "env.yaml"
    compiler.Compiler().compile(build_pipeline(env={"A_DIGEST": "abc"}), str(path))
    executors = next(yaml.safe_load_all(path.read_text()))["deploymentSpec"]["executors"]
    assert len(executors) == 13  # compress and evaluate twice: before and inside the loop
    for executor in executors.values():
        assert executor["container"]["env"] == [{"name": "A_DIGEST", "value": "abc"}]
    default = ir["spec"]["deploymentSpec"]["executors"].values()
    assert not any("env" in e["container"] for e in default)


def test_prepare_data_sees_only_data_settings(ir):
    top, _ = _tasks(ir)
    inputs = top["prepare-data"]["inputs"]
    assert set(inputs["parameters"]) == {"source", "data_config"}
    assert "artifacts" not in inputs


def test_image_is_set_at_compile_time(tmp_path, ir):
    assert DEFAULT_IMAGE.endswith(f":{__version__}")
    images = {e["container"]["image"] for e in ir["spec"]["deploymentSpec"]["executors"].values()}
    assert images == {DEFAULT_IMAGE}
    ir_path, _ = compile_module.compile_pipeline(tmp_path, image="registry.local/cp:dev")
    spec, _ = yaml.safe_load_all(ir_path.read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.local/cp:dev"}
    with pytest.raises(ValueError, match="image"):
        compile_module.compile_pipeline(tmp_path, image=" ")


def test_components_install_nothing_at_run_time(compiled):
    text = compiled[0].read_text()
    assert "pip install" not in text


def test_compiling_twice_gives_identical_bytes(compiled, tmp_path):
    again = compile_module.compile_pipeline(tmp_path)
    for first, second in zip(compiled, again, strict=True):
        assert first.read_bytes() == second.read_bytes()


def test_kubernetes_manifests(compiled):
    docs = list(yaml.safe_load_all(compiled[1].read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Pipeline", "PipelineVersion"]
    pipeline, version = docs
    assert pipeline["metadata"]["name"] == "cycleprune"
    assert re.fullmatch(
        rf"cycleprune-{__version__.replace('.', '-')}-[0-9a-f]{{8}}", version["metadata"]["name"]
    )
    assert version["spec"]["pipelineName"] == "cycleprune"
    assert version["spec"]["pipelineSpec"]["pipelineInfo"]["name"] == "cycleprune"


def test_every_parameter_is_described(ir):
    params = ir["spec"]["root"]["inputDefinitions"]["parameters"]
    assert set(PARAMETERS) <= set(params)
    assert {"source", "preset", "extra_config", "checkpoint_root", "gpus"} <= set(params)
    for name, spec in params.items():
        assert spec.get("description", "").strip(), name


def test_defaults_are_the_article_hyperparameters():
    signature = inspect.signature(build_pipeline().pipeline_func)
    defaults = {n: p.default for n, p in signature.parameters.items()}
    article = pipeline_arguments(preset("seed"))
    assert defaults["preset"] == "seed"
    # Named PneumoniaMNIST classes, sparsities [] = "the preset's", and 0 = "ramp over all
    # fine-tuning epochs" are the pipeline's own choices. The CLR bounds are the article's: the
    # range test finds no usable descent on its plain VGG within one epoch (its curve is flat),
    # so automatic bounds (0, 0) are opt-in there; the smaller BatchNorm presets use them.
    own = {"class_names", "sparsities", "prune_end_epoch"}
    for name in set(PARAMETERS) - own:
        assert defaults[name] == article[name], name
    assert (defaults["min_lr"], defaults["max_lr"]) == (1e-3, 1e-1)
    assert defaults["prune_end_epoch"] == 0


def test_push_defaults_to_no_registry_and_the_library_gate():
    from cycleprune.registry import GateConfig

    signature = inspect.signature(build_pipeline().pipeline_func)
    defaults = {n: p.default for n, p in signature.parameters.items()}
    gate = GateConfig()
    assert defaults["registry"] == "" and defaults["model_name"] == "cycleprune"
    assert (
        defaults["min_auc"],
        defaults["min_sensitivity"],
        defaults["min_specificity"],
        defaults["promotion_tolerance"],
    ) == (gate.min_auc, gate.min_sensitivity, gate.min_specificity, gate.tolerance)


def test_cpu_only_pipeline_has_no_gpu_settings(tmp_path):
    ir_path, _ = compile_module.compile_pipeline(tmp_path, gpus=0)
    text = ir_path.read_text()
    assert GPU_RESOURCE not in text
    spec = next(yaml.safe_load_all(text))  # the same parameters, gpus defaulting to 0
    assert spec["root"]["inputDefinitions"]["parameters"]["gpus"]["defaultValue"] == 0
    with pytest.raises(ValueError, match="gpus"):
        compile_module.compile_pipeline(tmp_path, gpus=-1)


def test_loop_tasks_only_reference_inputs_of_their_dag(ir):
    # Every componentInputParameter a loop task reads must be an input of the loop's DAG.
    _, loop = _tasks(ir)
    spec = ir["spec"]["components"]["comp-for-loop-1"]["inputDefinitions"]
    declared = set(spec.get("parameters", {})) | set(spec.get("artifacts", {}))
    for name, task in loop.items():
        for value in task["inputs"].get("parameters", {}).values():
            if "componentInputParameter" in value:
                assert value["componentInputParameter"] in declared, name


def test_version_name_changes_with_the_spec_and_the_image():
    # KFP refuses a changed spec under an existing PipelineVersion name: each change needs its own.
    name = compile_module.version_name
    image = "europe-docker.pkg.dev/p/r/cycleprune:0.1.0"
    assert name(image, b"spec") == name(image, b"spec")
    assert name(image, b"spec") != name(image, b"spec, changed")
    assert name(image, b"spec") != name(image.replace("0.1.0", "0.1.1"), b"spec")
    assert re.fullmatch(r"cycleprune-0-1-0-[0-9a-f]{8}", name(image, b"spec"))
    long = name("r/cycleprune:" + "x" * 80, b"spec")
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)
