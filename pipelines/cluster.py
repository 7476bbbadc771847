"""Talk to a Kubeflow Pipelines cluster: upload the compiled pipeline, submit runs, schedule them.

Thin wrappers around ``kfp.Client`` (the KFP v2beta1 REST API). Each call first checks that the
host answers ``GET /apis/v2beta1/healthz`` within ``timeout`` seconds, so a wrong host, a closed
port-forward or a refused token fails in seconds with a :class:`ClusterError` that names the host,
instead of a urllib3 traceback or ``kfp.Client``'s 25 s of healthz retries.

Authentication: when a ServiceAccount token file exists (``$KF_PIPELINES_SA_TOKEN_PATH``, default
``/var/run/secrets/kubeflow/pipelines/token``: a projected token with audience
``pipelines.kubeflow.org``, as the retrain CronJob mounts it), every request carries it as a bearer
token. Otherwise requests go out unauthenticated, which is what a ``kubectl port-forward`` to a
standalone (single-user) KFP needs.

Caching: the KFP API has no run-level caching switch, and ``kfp.Client`` ignores
``enable_caching`` for a stored pipeline version (and, for a package, turns it off only in the
root DAG, not in a ``ParallelFor``'s). So a run without caching is sent the pipeline's own spec,
the stored version's or the package's, with caching off in every task of every DAG
(:func:`without_caching`), instead of a reference to the version. ``submit`` caches as compiled
unless given ``--no-cache``; ``schedule`` turns caching off unless given ``--cache``, so every
run of a schedule retrains.

The CLI commands ``upload``, ``submit`` and ``schedule`` come from :func:`add_cluster_commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cycleprune import __version__, redaction
from cycleprune.config import load_yaml

API_PREFIX = "/apis/v2beta1"
DEFAULT_TIMEOUT = 10.0
DEFAULT_EXPERIMENT = "cycleprune"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
HOST_ENV = "KF_PIPELINES_ENDPOINT"
UI_HOST_ENV = "KF_PIPELINES_UI_ENDPOINT"
FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
POLL_SECONDS = 10.0


class ClusterError(RuntimeError):
    """The KFP API could not be reached, refused the request, or lacks what was asked for.

    The message always names the host.
    """


# ---------------------------------------------------------------------------------------------
# Connection


def _check_host(host: str | None) -> str:
    if not host or not host.strip():
        raise ValueError(f"A KFP host is required (--host or ${HOST_ENV}). Received: host={host!r}")
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise ValueError(
            "The KFP host must start with http:// or https:// "
            f"(e.g. http://localhost:8080). Received: host={host!r}"
        )
    return host


def _token_path() -> Path | None:
    path = Path(os.environ.get(TOKEN_PATH_ENV) or DEFAULT_TOKEN_PATH)
    return path if path.is_file() else None


def _healthz(host: str, token_path: Path | None, timeout: float) -> dict[str, Any]:
    """One bounded GET of the healthz endpoint; every failure becomes a ClusterError."""
    request = urllib.request.Request(f"{host}{API_PREFIX}/healthz")
    if token_path is not None:
        request.add_header("Authorization", f"Bearer {token_path.read_text().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        raise _http_error(host, "checking the KFP API", err.code, err.read()) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ClusterError(
            f"Cannot reach the KFP API at {host} ({reason}). Check the host, and that the "
            "port-forward or in-cluster service is up, e.g. "
            "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80` and "
            "--host http://localhost:8080."
        ) from None
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise ClusterError(
            f"{host}{API_PREFIX}/healthz did not answer with JSON: is {host} a KFP API endpoint?"
        ) from None


def _http_error(host: str, action: str, status: int | None, body: Any) -> ClusterError:
    detail = _server_message(body)
    if status == 401:
        why = (
            "not authenticated (HTTP 401): the request carried no valid token. In-cluster, "
            f"mount a ServiceAccount token with audience pipelines.kubeflow.org at "
            f"${TOKEN_PATH_ENV}"
        )
    elif status == 403:
        why = (
            "not authorized (HTTP 403): the caller's identity lacks the pipelines.kubeflow.org "
            "RBAC permission in that namespace"
        )
    elif status == 404:
        why = "not found (HTTP 404)"
    elif status == 409:
        why = "already exists (HTTP 409)"
    else:
        why = f"HTTP {status}"
    return ClusterError(f"The KFP API at {host} refused {action}: {why}.{detail}")


def _server_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        message = json.loads(body).get("message") or ""
    except (ValueError, AttributeError):
        message = str(body)
    # Redacted before it is cut: a server may echo a request's token or signed URL.
    message = redaction.redact(" ".join(str(message).split()))
    return f" Server said: {message[:400]}" if message else ""


@contextlib.contextmanager
def _calling(host: str, action: str) -> Iterator[None]:
    """Turn kfp_server_api and transport errors raised while doing ``action`` into ClusterError."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as err:
        raise _http_error(host, action, err.status, err.body) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise ClusterError(f"Lost the KFP API at {host} while {action}: {err}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # kfp.Client prints its own "Experiment details: ..." lines; we print one summary instead.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def connect(host: str, *, namespace: str | None = None, timeout: float = DEFAULT_TIMEOUT):
    """A ``kfp.Client`` for ``host``, after checking that the API answers.

    Args:
        host: KFP API endpoint with scheme, e.g. ``http://localhost:8080`` (a port-forward of
            ``svc/ml-pipeline-ui``) or ``http://ml-pipeline.kubeflow.svc.cluster.local:8888``.
        namespace: Profile namespace. Required when KFP runs in multi-user mode.
        timeout: Seconds to wait for the healthz check.

    Returns:
        A connected ``kfp.Client``.

    Raises:
        ValueError: ``host`` is empty or has no http(s) scheme, or ``timeout`` <= 0.
        ClusterError: The host is unreachable, is not a KFP API, refuses the credentials, or is
            multi-user and no ``namespace`` was given.
    """
    host = _check_host(host)
    if not timeout > 0:
        raise ValueError(f"Argument `timeout` must be > 0. Received: timeout={timeout}")
    token_path = _token_path()
    health = _healthz(host, token_path, timeout)
    if health.get("multi_user") and not namespace:
        raise ClusterError(
            f"The KFP API at {host} runs in multi-user mode: pass the profile namespace "
            "(--namespace)."
        )
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    credentials = ServiceAccountTokenVolumeCredentials(str(token_path)) if token_path else None
    kwargs = {"namespace": namespace} if namespace else {}
    with _quiet(), _calling(host, "connecting"):
        return kfp.Client(host=host, credentials=credentials, **kwargs)


# ---------------------------------------------------------------------------------------------
# Lookups


def _name_filter(name: str) -> str:
    return json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )


def _find_pipeline_id(client, host: str, name: str, namespace: str | None) -> str | None:
    with _calling(host, f"looking up pipeline {name!r}"):
        result = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=2)
    pipelines = result.pipelines or []
    if len(pipelines) > 1:
        raise ClusterError(f"{len(pipelines)} pipelines are named {name!r} at {host}.")
    return pipelines[0].pipeline_id if pipelines else None


def _find_version(client, host: str, pipeline_id: str, pipeline_name: str, version: str | None):
    action = f"looking up version {version!r} of pipeline {pipeline_name!r}"
    with _calling(host, action):
        if version:
            result = client.list_pipeline_versions(
                pipeline_id, filter=_name_filter(version), page_size=2
            )
        else:
            result = client.list_pipeline_versions(
                pipeline_id, sort_by="created_at desc", page_size=1
            )
    versions = result.pipeline_versions or []
    if not versions:
        what = f"version {version!r}" if version else "any version"
        raise ClusterError(
            f"Pipeline {pipeline_name!r} at {host} has no {what}; upload one with "
            "`python -m cycleprune upload`."
        )
    return versions[0]


def _require_pipeline(client, host: str, name: str, namespace: str | None) -> str:
    pipeline_id = _find_pipeline_id(client, host, name, namespace)
    if pipeline_id is None:
        where = f" in namespace {namespace!r}" if namespace else ""
        raise ClusterError(
            f"No pipeline named {name!r}{where} at {host}; upload it first with "
            "`python -m cycleprune upload` (or apply manifests/overlays/<env>)."
        )
    return pipeline_id


def _experiment_id(client, host: str, experiment: str, namespace: str | None) -> str:
    if not experiment:
        raise ValueError(f"Argument `experiment` must not be empty. Received: {experiment!r}")
    with _calling(host, f"getting or creating experiment {experiment!r}"), _quiet():
        return client.create_experiment(name=experiment, namespace=namespace).experiment_id


def _find_run(client, host: str, experiment_id: str, experiment: str, name: str):
    """The experiment's run named ``name`` (the oldest, if several), or None."""
    with _calling(host, f"looking up runs named {name!r} in experiment {experiment!r}"):
        listed = client.list_runs(
            experiment_id=experiment_id,
            filter=_name_filter(name),
            sort_by="created_at asc",
            page_size=1,
        )
    runs = listed.runs or []
    return runs[0] if runs else None


def _declared_parameters(pipeline_spec: Any) -> set[str] | None:
    if not isinstance(pipeline_spec, Mapping):
        return None
    spec = pipeline_spec.get("pipeline_spec", pipeline_spec)  # a version may wrap the IR
    root = spec.get("root", {}) if isinstance(spec, Mapping) else {}
    params = root.get("inputDefinitions", {}).get("parameters")
    return set(params) if isinstance(params, Mapping) else None


def _check_params(params: Mapping[str, Any], declared: set[str] | None, what: str) -> None:
    if declared is None:
        return
    unknown = sorted(set(params) - declared)
    if unknown:
        raise ValueError(
            f"Unknown pipeline parameter(s) for {what}: {', '.join(unknown)}. "
            f"Known: {', '.join(sorted(declared))}"
        )


def _package_docs(package_path: Path) -> list[dict[str, Any]]:
    """The pipeline spec and, if any, the platform spec of a compiled pipeline file."""
    if not package_path.is_file():
        raise FileNotFoundError(f"No compiled pipeline at {package_path}")
    docs = [d for d in yaml.safe_load_all(package_path.read_text()) if d]
    if not docs or "root" not in docs[0]:
        raise ValueError(
            f"{package_path} is not a compiled KFP pipeline (IR YAML with a `root` section); "
            "use the file `python -m cycleprune compile` writes for the KFP API, not the "
            "Kubernetes manifest."
        )
    return docs


def _package_spec(package_path: Path) -> dict[str, Any]:
    return _package_docs(package_path)[0]


def _version_docs(pipeline_spec: Any, what: str) -> list[dict[str, Any]]:
    """A stored version's spec as package documents (it may wrap the IR with a platform spec)."""
    if isinstance(pipeline_spec, Mapping) and "root" in pipeline_spec:
        return [dict(pipeline_spec)]
    if isinstance(pipeline_spec, Mapping) and isinstance(
        pipeline_spec.get("pipeline_spec"), Mapping
    ):
        platform = pipeline_spec.get("platform_spec")
        return [dict(pipeline_spec["pipeline_spec"]), *([dict(platform)] if platform else [])]
    raise ClusterError(f"The KFP API returned no pipeline spec for {what}.")


def without_caching(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A copy of a compiled pipeline with caching off in every task of every DAG.

    Args:
        docs: The pipeline spec (IR) and optionally its platform spec, as from the YAML file.

    Returns:
        The documents, the pipeline spec's root DAG and every component DAG (the body of a
        ``ParallelFor`` is one) with ``cachingOptions.enableCache`` false.
    """
    docs = copy.deepcopy([dict(d) for d in docs])
    spec = docs[0]
    dags = [spec.get("root", {}).get("dag", {})]
    dags += [c.get("dag", {}) for c in spec.get("components", {}).values()]
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            task.setdefault("cachingOptions", {})["enableCache"] = False
    return docs


@contextlib.contextmanager
def _uncached_package(docs: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """A temporary package file of ``docs`` with caching off everywhere."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pipeline.yaml"
        path.write_text(yaml.safe_dump_all(without_caching(docs), sort_keys=False))
        yield str(path)


def _ui(host: str, ui_host: str | None) -> str:
    """The base of printed links (a user:password@ in it is redacted)."""
    return redaction.redact((ui_host or os.environ.get(UI_HOST_ENV) or host).rstrip("/"))


def _state(value: Any) -> str:
    return str(value or "UNKNOWN").upper()


# ---------------------------------------------------------------------------------------------
# Operations


def upload_pipeline(
    host: str,
    package_path: str | os.PathLike,
    *,
    name: str,
    version: str | None = None,
    description: str | None = None,
    namespace: str | None = None,
    ui_host: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, str]:
    """Upload a compiled pipeline as a new version of pipeline ``name`` (created if missing).

    Args:
        host: KFP API endpoint (see :func:`connect`).
        package_path: The compiled pipeline IR YAML.
        name: Pipeline name; a DNS-style name (``cycleprune``) also works in Kubernetes-native
            API mode.
        version: Version name; default ``v<cycleprune version>-<UTC timestamp>``. KFP rejects a
            version name that already exists.
        description: Description for a new pipeline and for the version.
        namespace: Upload into this namespace (multi-user); default: a shared pipeline.
        ui_host: Base of the printed UI link (default ``$KF_PIPELINES_UI_ENDPOINT`` or host).
        timeout: Seconds to wait for the healthz check.

    Returns:
        ``{"pipeline_id", "version_id", "version", "link"}``.

    Raises:
        FileNotFoundError: ``package_path`` does not exist.
        ValueError: Bad host, or the file is not a compiled pipeline.
        ClusterError: Connection, authentication or API failure (e.g. the version exists).
    """
    if not name:
        raise ValueError(f"Argument `name` must not be empty. Received: name={name!r}")
    path = Path(package_path)
    _package_spec(path)
    version = version or _default_version()
    client = connect(host, namespace=namespace, timeout=timeout)
    host = _check_host(host)
    pipeline_id = _find_pipeline_id(client, host, name, namespace)
    if pipeline_id is None:
        import kfp_server_api

        body = kfp_server_api.V2beta1Pipeline(
            name=name, display_name=name, description=description, namespace=namespace
        )
        with _calling(host, f"creating pipeline {name!r}"):
            pipeline_id = client.pipelines.pipeline_service_create_pipeline(
                pipeline=body
            ).pipeline_id
        print(f"Created pipeline {name!r} ({pipeline_id}).")
    with _calling(host, f"uploading version {version!r} of pipeline {name!r}"), _quiet():
        uploaded = client.upload_pipeline_version(
            str(path),
            pipeline_version_name=version,
            pipeline_id=pipeline_id,
            description=description,
        )
    link = f"{_ui(host, ui_host)}/#/pipelines/details/{pipeline_id}/version/" + str(
        uploaded.pipeline_version_id
    )
    print(f"Uploaded {name!r} version {version!r}: {link}")
    return {
        "pipeline_id": pipeline_id,
        "version_id": uploaded.pipeline_version_id,
        "version": version,
        "link": link,
    }


def _default_version() -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return f"v{__version__}-{stamp}"


def submit_run(
    host: str,
    *,
    pipeline_name: str | None = None,
    package_path: str | os.PathLike | None = None,
    version: str | None = None,
    params: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    wait: bool = False,
    timeout: float = 24 * 3600,
    namespace: str | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    enable_caching: bool = True,
    ui_host: str | None = None,
    connect_timeout: float = DEFAULT_TIMEOUT,
    once: bool = False,
) -> dict[str, Any]:
    """Start one run, of a stored pipeline version or of a local package; print its state and link.

    Args:
        host: KFP API endpoint (see :func:`connect`).
        pipeline_name: Run this stored pipeline (exclusive with ``package_path``).
        package_path: Run this compiled pipeline file (exclusive with ``pipeline_name``).
        version: Version name of ``pipeline_name``; default: its newest version.
        params: Pipeline parameters. Names are checked against the pipeline's declared inputs.
        experiment: Experiment name (created if missing).
        run_name: Display name; default ``<pipeline> <UTC timestamp>``.
        wait: Block until the run ends and print its final state.
        timeout: Seconds to wait when ``wait`` is set.
        namespace: Profile namespace (multi-user).
        service_account: Kubernetes ServiceAccount the run's pods use (e.g. the Workload
            Identity one from the manifests); default: the KFP installation's.
        pipeline_root: Artifact root (``gs://...``); default: the namespace's ``kfp-launcher``.
        enable_caching: Cache each task as compiled (every stage but ``push`` and
            ``report``). ``False`` turns caching off for every task: the run is sent the
            version's (or the package's) spec with caching off rather than a reference to the
            version (see the module docstring).
        ui_host: Base of the printed UI link (default ``$KF_PIPELINES_UI_ENDPOINT`` or host).
        connect_timeout: Seconds to wait for the healthz check.
        once: Start nothing if the experiment already has a run named ``run_name`` (required
            then): print that run and return it (``existing`` True). A retried submission (the
            nightly CronJob's pod, retried by its Job under a per-schedule name) thus never
            starts a second run when the first attempt's run was created but its answer lost.

    Returns:
        ``{"run_id", "state", "link", "experiment_id", "pipeline_id", "version_id",
        "existing"}``; ``state`` is the final one when ``wait`` is set.

    Raises:
        ValueError: Both or neither of ``pipeline_name``/``package_path``, unknown parameters,
            bad host or timeout.
        FileNotFoundError: ``package_path`` does not exist.
        ClusterError: Connection, authentication or API failure, a missing pipeline/version, or
            ``wait`` ran out of time.
    """
    if (pipeline_name is None) == (package_path is None):
        raise ValueError(
            "Give exactly one of `pipeline_name` and `package_path`. Received: "
            f"pipeline_name={pipeline_name!r}, package_path={package_path!r}"
        )
    if not timeout > 0:
        raise ValueError(f"Argument `timeout` must be > 0. Received: timeout={timeout}")
    if once and not run_name:
        raise ValueError(
            "Argument `once` (--once) needs `run_name` (--run-name): the run is recognised by "
            "its name. Received: "
            f"run_name={run_name!r}"
        )
    params = dict(params or {})
    docs: list[dict[str, Any]] = []
    if package_path is not None:
        docs = _package_docs(Path(package_path))
        _check_params(params, _declared_parameters(docs[0]), str(package_path))
        label = docs[0].get("pipelineInfo", {}).get("name", Path(package_path).stem)
    else:
        label = pipeline_name
    client = connect(host, namespace=namespace, timeout=connect_timeout)
    host = _check_host(host)
    pipeline_id = version_id = None
    if pipeline_name is not None:
        pipeline_id = _require_pipeline(client, host, pipeline_name, namespace)
        found = _find_version(client, host, pipeline_id, pipeline_name, version)
        version_id = found.pipeline_version_id
        what = f"pipeline {pipeline_name!r} version {found.display_name or version_id!r}"
        _check_params(params, _declared_parameters(found.pipeline_spec), what)
        if not enable_caching:
            docs = _version_docs(found.pipeline_spec, what)
    experiment_id = _experiment_id(client, host, experiment, namespace)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    run_name = run_name or f"{label} {stamp}"
    result = {"experiment_id": experiment_id, "pipeline_id": pipeline_id, "version_id": version_id}
    if once:
        found_run = _find_run(client, host, experiment_id, experiment, run_name)
        if found_run is not None:
            link = f"{_ui(host, ui_host)}/#/runs/details/{found_run.run_id}"
            state = _state(found_run.state)
            print(
                f"Run {run_name!r} ({found_run.run_id}) already exists in experiment "
                f"{experiment!r}, not starting another: {state}  {link}",
                flush=True,
            )
            if wait:
                state = _wait(client, host, found_run.run_id, timeout=timeout, link=link)
                print(
                    f"Run {run_name!r} ({found_run.run_id}) finished: {state}  {link}", flush=True
                )
            return {
                "run_id": found_run.run_id,
                "state": state,
                "link": link,
                **result,
                "existing": True,
            }
    with contextlib.ExitStack() as stack:
        if not enable_caching:
            source = {"pipeline_package_path": stack.enter_context(_uncached_package(docs))}
        elif package_path is not None:
            source = {"pipeline_package_path": str(package_path)}
        else:
            source = {"pipeline_id": pipeline_id, "version_id": version_id}
        with _calling(host, f"creating run {run_name!r}"), _quiet():
            run = client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name,
                params=params,
                pipeline_root=pipeline_root,
                service_account=service_account,
                **source,
            )
    link = f"{_ui(host, ui_host)}/#/runs/details/{run.run_id}"
    state = _state(run.state)
    caching = "" if enable_caching else ", caching off"
    print(f"Run {run_name!r} ({run.run_id}{caching}): {state}  {link}", flush=True)
    if wait:
        state = _wait(client, host, run.run_id, timeout=timeout, link=link)
        print(f"Run {run_name!r} ({run.run_id}) finished: {state}  {link}", flush=True)
    return {"run_id": run.run_id, "state": state, "link": link, **result, "existing": False}


def _wait(client, host: str, run_id: str, *, timeout: float, link: str) -> str:
    """Poll the run until it reaches a final state (kfp's own wait ignores CANCELED)."""
    poll = POLL_SECONDS
    deadline = time.monotonic() + timeout
    while True:
        with _calling(host, f"waiting for run {run_id}"):
            state = _state(client.get_run(run_id).state)
        if state in FINAL_STATES:
            return state
        if time.monotonic() + poll > deadline:
            raise ClusterError(
                f"Run {run_id} at {host} did not finish within {timeout:.0f} s (last state "
                f"{state}); it keeps running: {link}"
            )
        time.sleep(poll)


def _check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(
            "KFP cron schedules have 6 fields (second minute hour day-of-month month "
            f"day-of-week), e.g. '0 0 3 * * 1' for Mondays 03:00. Received: cron={cron!r}"
        )
    return " ".join(fields)


def schedule_run(
    host: str,
    *,
    cron: str,
    pipeline_name: str,
    version: str | None = None,
    params: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    name: str | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    namespace: str | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    enable_caching: bool = False,
    replace: bool = False,
    ui_host: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Create a KFP recurring run of a stored pipeline version.

    A recurring run of the same name in the experiment is an error (two schedules would both
    fire), unless ``replace``: then the new one is created first and the old one deleted, so a
    failure never leaves the pipeline unscheduled.

    By default every run of the schedule runs every task: the schedule is sent the version's
    spec with caching off (see the module docstring), so a scheduled retraining always retrains
    and re-reads its source.

    Args:
        host: KFP API endpoint (see :func:`connect`).
        cron: Six-field cron expression (seconds first), evaluated by KFP in UTC.
        pipeline_name: Stored pipeline to run.
        version: Version name; default: the newest version now (the schedule stays on it).
        params: Pipeline parameters, checked against the version's declared inputs.
        experiment: Experiment name (created if missing).
        name: Recurring-run name; default ``<pipeline>-<version>-schedule``.
        max_concurrency: Most runs of this schedule at once (>= 1).
        no_catchup: After a pause, start only the latest missed run instead of every one.
        namespace: Profile namespace (multi-user).
        service_account: ServiceAccount of the runs' pods.
        pipeline_root: Artifact root (``gs://...``) for the runs.
        enable_caching: Cache each task as compiled (the schedule then refers to the version);
            default: caching off for every task.
        replace: Replace the experiment's recurring run(s) of the same name.
        ui_host: Base of the printed UI link.
        timeout: Seconds to wait for the healthz check.

    Returns:
        ``{"recurring_run_id", "version_id", "link", "replaced"}`` (``replaced``: the IDs of
        the recurring runs deleted).

    Raises:
        ValueError: Bad cron, ``max_concurrency`` < 1, unknown parameters, bad host.
        ClusterError: Connection, authentication or API failure, a missing pipeline/version, or
            a recurring run of the same name without ``replace``.
    """
    cron = _check_cron(cron)
    if max_concurrency < 1:
        raise ValueError(
            f"Argument `max_concurrency` must be >= 1. Received: max_concurrency={max_concurrency}"
        )
    params = dict(params or {})
    client = connect(host, namespace=namespace, timeout=timeout)
    host = _check_host(host)
    pipeline_id = _require_pipeline(client, host, pipeline_name, namespace)
    found = _find_version(client, host, pipeline_id, pipeline_name, version)
    label = found.display_name or found.name or found.pipeline_version_id
    what = f"pipeline {pipeline_name!r} version {label!r}"
    _check_params(params, _declared_parameters(found.pipeline_spec), what)
    docs = [] if enable_caching else _version_docs(found.pipeline_spec, what)
    experiment_id = _experiment_id(client, host, experiment, namespace)
    name = name or f"{pipeline_name}-{label}-schedule"
    with _calling(host, f"looking up recurring runs named {name!r}"):
        listed = client.list_recurring_runs(
            experiment_id=experiment_id, filter=_name_filter(name), page_size=100
        )
    existing = [r.recurring_run_id for r in listed.recurring_runs or []]
    if existing and not replace:
        raise ClusterError(
            f"Experiment {experiment!r} at {host} already has a recurring run named {name!r} "
            f"({', '.join(existing)}): pass --replace to replace it, or --name for a second one"
        )
    with contextlib.ExitStack() as stack:
        if enable_caching:
            source = {"pipeline_id": pipeline_id, "version_id": found.pipeline_version_id}
        else:
            source = {"pipeline_package_path": stack.enter_context(_uncached_package(docs))}
        with _calling(host, f"creating recurring run {name!r}"), _quiet():
            recurring = client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name,
                description=f"{what}, caching {'as compiled' if enable_caching else 'off'}",
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=no_catchup,
                params=params,
                pipeline_root=pipeline_root,
                service_account=service_account,
                **source,
            )
    for old in existing:
        with _calling(host, f"deleting the replaced recurring run {old}"):
            client.delete_recurring_run(old)
        print(f"Deleted the replaced recurring run {name!r} ({old}).")
    link = f"{_ui(host, ui_host)}/#/recurringrun/details/{recurring.recurring_run_id}"
    print(
        f"Scheduled {name!r} ({recurring.recurring_run_id}) at '{cron}' UTC, "
        f"max {max_concurrency} at once, catch-up {'off' if no_catchup else 'on'}, "
        f"caching {'as compiled' if enable_caching else 'off'}: {link}"
    )
    return {
        "recurring_run_id": recurring.recurring_run_id,
        "version_id": found.pipeline_version_id,
        "link": link,
        "replaced": existing,
    }


# ---------------------------------------------------------------------------------------------
# CLI


def parse_params(
    assignments: Sequence[str], params_file: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Pipeline parameters from a YAML/JSON mapping file, then ``name=value`` overrides.

    Values are YAML (``0.5``, ``true``, ``[0.5, 0.9]``); anything that does not parse stays a
    string. Quote a value that must stay a string (``name="'2:4'"``).

    Args:
        assignments: ``name=value`` strings.
        params_file: Optional file holding a mapping of parameter names to values.

    Returns:
        The merged parameters.

    Raises:
        ValueError: A malformed assignment or a file that is not a mapping.
        FileNotFoundError: ``params_file`` does not exist.
    """
    params: dict[str, Any] = {}
    if params_file:
        path = Path(params_file)
        if not path.is_file():
            raise FileNotFoundError(f"No parameter file at {path}")
        loaded = load_yaml(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(
                f"{path} must hold a mapping of parameter names to values. "
                f"Received: {type(loaded).__name__}"
            )
        params.update({str(k): v for k, v in loaded.items()})
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--param expects name=value. Received: {assignment!r}")
        try:
            params[key] = load_yaml(raw)
        except yaml.YAMLError:
            params[key] = raw
    return params


def _host(args: argparse.Namespace) -> str:
    return args.host or os.environ.get(HOST_ENV, "")


def _run_command(action) -> int:
    try:
        return action()
    except ClusterError as err:
        print(f"error: {redaction.format_error(err)}", file=sys.stderr)
        return 3


def _cmd_upload(args: argparse.Namespace) -> int:
    name = args.name or _package_spec(args.package).get("pipelineInfo", {}).get("name")

    def action() -> int:
        upload_pipeline(
            _host(args),
            args.package,
            name=name,
            version=args.version,
            description=args.description,
            namespace=args.namespace,
            ui_host=args.ui_host,
            timeout=args.connect_timeout,
        )
        return 0

    return _run_command(action)


def _cmd_submit(args: argparse.Namespace) -> int:
    params = parse_params(args.param, args.params_file)

    def action() -> int:
        result = submit_run(
            _host(args),
            pipeline_name=args.pipeline,
            package_path=args.package,
            version=args.version,
            params=params,
            experiment=args.experiment,
            run_name=args.run_name,
            wait=args.wait,
            timeout=args.timeout,
            namespace=args.namespace,
            service_account=args.service_account,
            pipeline_root=args.pipeline_root,
            enable_caching=not args.no_cache,
            ui_host=args.ui_host,
            connect_timeout=args.connect_timeout,
            once=args.once,
        )
        return 0 if not args.wait or result["state"] == "SUCCEEDED" else 1

    return _run_command(action)


def _cmd_schedule(args: argparse.Namespace) -> int:
    params = parse_params(args.param, args.params_file)

    def action() -> int:
        schedule_run(
            _host(args),
            cron=args.cron,
            pipeline_name=args.pipeline,
            version=args.version,
            params=params,
            experiment=args.experiment,
            name=args.name,
            max_concurrency=args.max_concurrency,
            no_catchup=not args.catchup,
            namespace=args.namespace,
            service_account=args.service_account,
            pipeline_root=args.pipeline_root,
            enable_caching=args.cache,
            replace=args.replace,
            ui_host=args.ui_host,
            timeout=args.connect_timeout,
        )
        return 0

    return _run_command(action)


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("cluster")
    group.add_argument(
        "--host",
        help=f"KFP API endpoint with scheme (default: ${HOST_ENV}), "
        "e.g. http://localhost:8080 after "
        "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`",
    )
    group.add_argument("--namespace", help="profile namespace (required by multi-user KFP)")
    group.add_argument(
        "--ui-host", help=f"base of printed links (default: ${UI_HOST_ENV} or --host)"
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the API to answer (default: {DEFAULT_TIMEOUT})",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", help="pipeline version name (default: the newest)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter, YAML value (repeatable; overrides --params-file)",
    )
    p.add_argument(
        "--params-file", type=Path, metavar="FILE", help="YAML/JSON mapping of pipeline parameters"
    )
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"experiment name, created if missing (default: {DEFAULT_EXPERIMENT})",
    )
    p.add_argument(
        "--service-account",
        help="ServiceAccount for the run's pods (e.g. cycleprune-pipeline-runner from manifests/)",
    )
    p.add_argument(
        "--pipeline-root",
        help="artifact root, e.g. gs://BUCKET/pipeline-root "
        "(default: the namespace's kfp-launcher ConfigMap)",
    )


def add_cluster_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``upload``, ``submit`` and ``schedule`` commands to ``python -m cycleprune``.

    Each command sets ``func`` (``args -> exit code``): 0 on success, 1 when a waited-for run
    did not succeed, 3 on a :class:`ClusterError` (printed as one ``error:`` line).

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.
    """

    def command(name: str, func, text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        _add_connection_args(p)
        return p

    p = command(
        "upload",
        _cmd_upload,
        "Upload a compiled pipeline to a KFP cluster as a new "
        "version (the pipeline is created if missing).",
    )
    p.add_argument(
        "--package", type=Path, required=True, help="compiled pipeline IR YAML (from `compile`)"
    )
    p.add_argument("--name", help="pipeline name (default: the name compiled into the package)")
    p.add_argument("--version", help="version name (default: v<version>-<UTC timestamp>)")
    p.add_argument("--description", help="description of the pipeline and version")

    p = command(
        "submit", _cmd_submit, "Start a run on a KFP cluster and print its state and UI link."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="name of an uploaded pipeline")
    source.add_argument("--package", type=Path, help="compiled pipeline IR YAML to run directly")
    _add_run_args(p)
    p.add_argument("--run-name", help="run display name (default: <pipeline> <UTC time>)")
    p.add_argument(
        "--once",
        action="store_true",
        help="start nothing if the experiment already has a run named --run-name (required); "
        "makes a retried submission, e.g. the retrain CronJob's, safe",
    )
    p.add_argument(
        "--wait", action="store_true", help="wait for the run to end; exit 1 unless it succeeded"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=24 * 3600,
        metavar="S",
        help="seconds to wait with --wait (default: 86400)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every task, none from the cache (sends the version's spec with caching off); "
        "e.g. when the source changed under the same URI",
    )

    p = command(
        "schedule", _cmd_schedule, "Create a KFP recurring run of an uploaded pipeline version."
    )
    p.add_argument("--pipeline", required=True, help="name of an uploaded pipeline")
    p.add_argument(
        "--cron",
        required=True,
        help="6-field cron in UTC, seconds first, e.g. '0 0 3 * * 1' (Mondays 03:00)",
    )
    _add_run_args(p)
    p.add_argument("--name", help="recurring run name (default: <pipeline>-<version>-schedule)")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        help="most concurrent runs of this schedule (default: 1)",
    )
    p.add_argument(
        "--catchup",
        action="store_true",
        help="after a pause, start every missed run (default: only the latest)",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="let each run take unchanged stages from the cache as compiled (default: caching "
        "off, so every run retrains; the schedule is then sent the version's spec)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace the experiment's recurring run of the same name (created first, then the "
        "old one deleted); without it, a name already scheduled is an error",
    )
