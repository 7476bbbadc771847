"""pipelines.cluster against a local stand-in of the KFP v2beta1 REST API.

The real ``kfp.Client`` talks HTTP to a tiny server on 127.0.0.1 (random port, one thread, stopped
after each test); the tests assert the requests it sent and the errors users see.
"""

import argparse
import contextlib
import http.server
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cycleprune import __version__
from pipelines import cluster

API = "/apis/v2beta1"


class FakeKFP(http.server.BaseHTTPRequestHandler):
    """Answers the endpoints kfp.Client uses; every request is appended to ``server.log``."""

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        entry = {
            "method": method,
            "path": url.path,
            "query": query,
            "raw": raw,
            "auth": self.headers.get("Authorization"),
        }
        if raw and self.headers.get("Content-Type", "").startswith("application/json"):
            entry["json"] = json.loads(raw)
        state = self.server.state
        state["log"].append(entry)
        denied = state["deny"].get((method, url.path)) or state["deny"].get(("*", "*"))
        if denied:
            self._reply(denied, {"message": "denied by the stand-in", "code": 7})
            return
        self._reply(200, route(state, method, url.path, query, entry.get("json")))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def _named(items: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
    if "filter" not in query:
        return items
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    return [i for i in items if i["display_name"] == predicate["stringValue"]]


def route(state: dict, method: str, path: str, query: dict, body: Any) -> dict[str, Any]:
    pipelines, versions = state["pipelines"], state["versions"]
    if path == f"{API}/healthz":
        return {"multi_user": state["multi_user"], "pipeline_store": "database"}
    if path == f"{API}/pipelines" and method == "GET":
        return {"pipelines": _named(pipelines, query), "total_size": len(pipelines)}
    if path == f"{API}/pipelines" and method == "POST":
        pipeline = {**body, "pipeline_id": f"p-{len(pipelines) + 1}"}
        pipelines.append(pipeline)
        return pipeline
    if path == f"{API}/pipelines/upload_version":
        version = {
            "pipeline_id": query["pipelineid"][0],
            "display_name": query["name"][0],
            "pipeline_version_id": f"v-{len(versions) + 1}",
        }
        versions.append(version)
        return version
    if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
        pid = path.split("/")[-2]
        mine = [v for v in versions if v["pipeline_id"] == pid]
        if query.get("sort_by") == ["created_at desc"]:
            mine = mine[::-1]
        return {"pipeline_versions": _named(mine, query)}
    if path == f"{API}/experiments" and method == "GET":
        found = _named(state["experiments"], query)
        return {"experiments": found} if found else {}
    if path == f"{API}/experiments" and method == "POST":
        experiment = {**body, "experiment_id": f"e-{len(state['experiments']) + 1}"}
        state["experiments"].append(experiment)
        return experiment
    if path == f"{API}/runs" and method == "POST":
        run = {**body, "run_id": f"r-{len(state['runs']) + 1}", "state": "PENDING"}
        state["runs"].append(run)
        return run
    if path == f"{API}/runs" and method == "GET":
        mine = [r for r in state["runs"] if r["experiment_id"] == query["experiment_id"][0]]
        if query.get("sort_by") == ["created_at desc"]:
            mine = mine[::-1]
        return {"runs": _named(mine, query)[: int(query.get("page_size", ["10"])[0])]}
    if path.startswith(f"{API}/runs/r-"):
        return {"run_id": path.rsplit("/", 1)[-1], "state": state["run_state"]}
    if path == f"{API}/recurringruns" and method == "GET":
        mine = [r for r in state["recurring"] if r["experiment_id"] == query["experiment_id"][0]]
        return {"recurringRuns": _named(mine, query)}
    if path == f"{API}/recurringruns" and method == "POST":
        recurring = {**body, "recurring_run_id": f"rr-{len(state['recurring']) + 1}"}
        recurring.setdefault("experiment_id", "e-1")
        state["recurring"].append(recurring)
        return recurring
    if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
        rid = path.rsplit("/", 1)[-1]
        state["recurring"][:] = [r for r in state["recurring"] if r["recurring_run_id"] != rid]
        return {}
    raise AssertionError(f"stand-in has no route for {method} {path}")


@contextlib.contextmanager
def serve(**state: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeKFP)
    server.timeout = 5
    server.state = {
        "log": [],
        "deny": {},
        "multi_user": False,
        "pipelines": [],
        "versions": [],
        "experiments": [],
        "run_state": "SUCCEEDED",
        "recurring": [],
        "runs": [],
        **state,
    }
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    """A real compiled pipeline with parameters ``epochs`` and ``preset``, one task cached and
    one not at the top, and a cached one inside a ``ParallelFor`` (a DAG of its own).

    (This module has no ``from __future__ import annotations``: kfp reads the real annotations.)
    """
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def echo(epochs: int, preset: str) -> str:
        return f"{preset}:{epochs}"

    @dsl.pipeline(name="tiny")
    def tiny(epochs: int = 1, preset: str = "smoke"):
        echo(epochs=epochs, preset=preset)
        echo(epochs=epochs, preset="uncached").set_caching_options(enable_caching=False)
        with dsl.ParallelFor([1, 2]) as item:
            echo(epochs=item, preset=preset)

    path = tmp_path_factory.mktemp("compiled") / "tiny.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return str(path)


@pytest.fixture(autouse=True)
def isolated_kfp(tmp_path, monkeypatch):
    """No developer context file, no token, no endpoint variables leak into a test."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "context.json"))
    monkeypatch.setenv(cluster.TOKEN_PATH_ENV, str(tmp_path / "no-token"))
    for name in (cluster.HOST_ENV, cluster.UI_HOST_ENV):
        monkeypatch.delenv(name, raising=False)


def _spec_of(package: str) -> dict[str, Any]:
    import yaml

    with open(package) as f:
        return yaml.safe_load(f)


def _stored(package: str) -> dict[str, Any]:
    """Server state holding pipeline ``tiny`` with versions v1 (older) and v2."""
    spec = _spec_of(package)
    return {
        "pipelines": [{"pipeline_id": "p-1", "display_name": "tiny"}],
        "versions": [
            {
                "pipeline_id": "p-1",
                "pipeline_version_id": "v-1",
                "display_name": "v1",
                "pipeline_spec": spec,
            },
            {
                "pipeline_id": "p-1",
                "pipeline_version_id": "v-2",
                "display_name": "v2",
                "pipeline_spec": spec,
            },
        ],
    }


def _posts(state: dict, path: str) -> list[dict[str, Any]]:
    return [e for e in state["log"] if e["method"] == "POST" and e["path"] == f"{API}{path}"]


def _caching(spec: dict[str, Any]) -> dict[str, bool]:
    """``{dag/task: enableCache}`` over the root DAG and every component's DAG."""
    dags = {"root": spec["root"]["dag"]}
    dags.update({name: c["dag"] for name, c in spec["components"].items() if "dag" in c})
    return {
        f"{dag}/{name}": bool(task.get("cachingOptions", {}).get("enableCache"))
        for dag, body in dags.items()
        for name, task in body["tasks"].items()
    }


def _echo_caching(spec: dict[str, Any]) -> dict[str, bool]:
    return {k: v for k, v in _caching(spec).items() if "/echo" in k}


def test_the_package_caches_some_tasks_in_two_dags(package):
    assert _echo_caching(_spec_of(package)) == {
        "root/echo": True,
        "root/echo-2": False,
        "comp-for-loop-2/echo-3": True,
    }


def test_without_caching_turns_off_every_task_of_every_dag_in_a_copy(package):
    spec = _spec_of(package)
    platform = {"platforms": {"kubernetes": {}}}
    docs = cluster.without_caching([spec, platform])
    assert not any(_caching(docs[0]).values())
    assert docs[1] == platform
    assert _echo_caching(spec)["root/echo"]  # the input is left alone


def test_a_stored_version_spec_may_wrap_a_platform_spec(package):
    spec, platform = _spec_of(package), {"platforms": {"kubernetes": {"deploymentSpec": {}}}}
    assert cluster._version_docs(spec, "v") == [spec]
    wrapped = {"pipeline_spec": spec, "platform_spec": platform}
    assert cluster._version_docs(wrapped, "v") == [spec, platform]
    with pytest.raises(cluster.ClusterError, match="no pipeline spec for v"):
        cluster._version_docs(None, "v")


def test_upload_creates_the_pipeline_then_uploads_the_named_version(package, capsys):
    with serve() as (host, state):
        result = cluster.upload_pipeline(host, package, name="tiny", version="v7", description="d")
    (create,) = _posts(state, "/pipelines")
    assert create["json"] == {"name": "tiny", "display_name": "tiny", "description": "d"}
    (upload,) = _posts(state, "/pipelines/upload_version")
    assert upload["query"]["name"] == ["v7"]
    assert upload["query"]["pipelineid"] == ["p-1"]
    assert b'name="uploadfile"' in upload["raw"]
    assert b"pipelineInfo" in upload["raw"]  # the package itself went up
    assert result == {
        "pipeline_id": "p-1",
        "version_id": "v-1",
        "version": "v7",
        "link": f"{host}/#/pipelines/details/p-1/version/v-1",
    }
    assert result["link"] in capsys.readouterr().out


def test_upload_to_an_existing_pipeline_only_adds_a_version(package):
    with serve(**_stored(package)) as (host, state):
        result = cluster.upload_pipeline(host, package, name="tiny")
    assert _posts(state, "/pipelines") == []
    (upload,) = _posts(state, "/pipelines/upload_version")
    assert upload["query"]["pipelineid"] == ["p-1"]
    assert re.fullmatch(rf"v{re.escape(__version__)}-\d{{8}}-\d{{6}}", result["version"])
    assert result["version"] == upload["query"]["name"][0]


def test_submit_runs_the_named_version_with_parameters(package, capsys):
    with serve(**_stored(package)) as (host, state):
        result = cluster.submit_run(
            host,
            pipeline_name="tiny",
            version="v1",
            params={"epochs": 3},
            experiment="nightly",
            run_name="r",
            service_account="runner-sa",
            pipeline_root="gs://bucket/root",
            ui_host="http://ui.example",
        )
    (experiment,) = _posts(state, "/experiments")
    assert experiment["json"]["display_name"] == "nightly"
    (run,) = _posts(state, "/runs")
    body = run["json"]
    assert body["pipeline_version_reference"] == {
        "pipeline_id": "p-1",
        "pipeline_version_id": "v-1",
    }
    assert body["runtime_config"] == {
        "parameters": {"epochs": 3},
        "pipeline_root": "gs://bucket/root",
    }
    assert body["experiment_id"] == "e-1"
    assert body["display_name"] == "r"
    assert body["service_account"] == "runner-sa"
    assert result["state"] == "PENDING"
    assert result["link"] == "http://ui.example/#/runs/details/r-1"
    out = capsys.readouterr().out
    assert "PENDING" in out and result["link"] in out
    assert "Experiment details" not in out  # kfp's own chatter is swallowed


def test_submit_defaults_to_the_newest_version_and_waits(package, capsys):
    with serve(**_stored(package)) as (host, state):
        result = cluster.submit_run(host, pipeline_name="tiny", wait=True, timeout=30)
    (run,) = _posts(state, "/runs")
    assert run["json"]["pipeline_version_reference"]["pipeline_version_id"] == "v-2"
    assert any(e["path"] == f"{API}/runs/r-1" for e in state["log"])
    assert result["state"] == "SUCCEEDED"
    assert "finished: SUCCEEDED" in capsys.readouterr().out


@pytest.mark.parametrize("final", ["FAILED", "CANCELED"])
def test_submit_wait_returns_any_final_state(package, final):
    with serve(run_state=final, **_stored(package)) as (host, _):
        assert cluster.submit_run(host, pipeline_name="tiny", wait=True)["state"] == final


def test_submit_wait_gives_up_after_the_timeout(package, monkeypatch):
    monkeypatch.setattr(cluster, "POLL_SECONDS", 0.05)
    started = time.monotonic()
    running = serve(run_state="RUNNING", **_stored(package))
    late = pytest.raises(
        cluster.ClusterError, match=r"did not finish within 0 s \(last state RUNNING"
    )
    with running as (host, state), late as err:
        cluster.submit_run(host, pipeline_name="tiny", wait=True, timeout=0.3)
    assert host in str(err.value) and "#/runs/details/r-1" in str(err.value)
    assert time.monotonic() - started < 5
    assert sum(e["path"] == f"{API}/runs/r-1" for e in state["log"]) >= 2


def test_submit_once_starts_one_run_per_name_however_often_it_is_retried(package, capsys):
    # The retrain CronJob's pod may be retried after its run was created (the answer lost):
    # under the same per-schedule name, the retry finds that run instead of starting a twin.
    with serve(**_stored(package)) as (host, state):
        kwargs = {"pipeline_name": "tiny", "experiment": "retrain", "once": True}
        first = cluster.submit_run(host, run_name="retrain-29381760", **kwargs)
        state["runs"][0]["state"] = "RUNNING"
        retry = cluster.submit_run(host, run_name="retrain-29381760", **kwargs)
        assert len(_posts(state, "/runs")) == 1
        # The next night's job has another name and starts its own run.
        other = cluster.submit_run(host, run_name="retrain-29383200", **kwargs)
        # Another experiment's run of the same name does not count.
        elsewhere = cluster.submit_run(
            host, pipeline_name="tiny", run_name="retrain-29383200", experiment="adhoc", once=True
        )
    assert (first["existing"], retry["existing"], other["existing"]) == (False, True, False)
    assert retry["run_id"] == first["run_id"] == "r-1" and other["run_id"] == "r-2"
    assert retry["state"] == "RUNNING" and retry["link"].endswith("#/runs/details/r-1")
    assert elsewhere["run_id"] == "r-3"
    out = capsys.readouterr().out
    assert "Run 'retrain-29381760' (r-1) already exists in experiment 'retrain'" in out
    lookups = [e for e in state["log"] if e["method"] == "GET" and e["path"] == f"{API}/runs"]
    assert [e["query"]["experiment_id"] for e in lookups] == [["e-1"]] * 3 + [["e-2"]]
    # Should one name have several runs (started without --once), the lookup asks for the oldest.
    assert {(e["query"]["sort_by"][0], e["query"]["page_size"][0]) for e in lookups} == {
        ("created_at asc", "1")
    }
    with pytest.raises(ValueError, match=r"--once\) needs `run_name` \(--run-name\)"):
        cluster.submit_run("http://127.0.0.1:1", pipeline_name="tiny", once=True)


def _kfp_permission(method: str, path: str) -> tuple[str, str] | None:
    """The (resource, verb) multi-user KFP authorizes a v2beta1 request with (None: no check)."""
    parts = path.removeprefix(API + "/").split("/")
    if parts == ["healthz"]:
        return None
    verbs = {("GET", False): "list", ("GET", True): "get", ("POST", False): "create"}
    if parts[0] == "pipelines" and len(parts) >= 3 and parts[2] == "versions":
        return "pipelines/versions", verbs[(method, len(parts) == 4)]
    if parts[0] in ("pipelines", "experiments", "runs") and len(parts) <= 2:
        return parts[0], verbs[(method, len(parts) == 2)]
    raise AssertionError(f"no known KFP permission for {method} {path}: add it and to rbac.yaml")


def test_the_retrain_role_grants_every_call_the_cronjob_makes(package):
    # The CronJob runs `submit --pipeline P --version V --namespace N --no-cache --once` under
    # the cycleprune-retrain Role; multi-user KFP refuses (403) any call the Role does not grant.
    import yaml

    rbac = (Path(__file__).parents[1] / "manifests" / "base" / "rbac.yaml").read_text()
    (role,) = [
        doc
        for doc in yaml.safe_load_all(rbac)
        if doc["kind"] == "Role" and doc["metadata"]["name"] == "cycleprune-retrain"
    ]
    granted = {
        (res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]
    }
    with serve(multi_user=True, **_stored(package)) as (host, state):
        kwargs = {"pipeline_name": "tiny", "version": "v2", "experiment": "retrain", "once": True}
        for _ in range(2):  # the first attempt creates the experiment and run; a retry finds them
            cluster.submit_run(
                host, namespace="team", enable_caching=False, run_name="retrain-1", **kwargs
            )
    needed = {_kfp_permission(e["method"], e["path"]) for e in state["log"]} - {None}
    assert ("runs", "list") in needed and ("runs", "create") in needed
    assert needed <= granted, f"missing in rbac.yaml: {sorted(needed - granted)}"


def test_cli_submit_once_waits_for_the_existing_run(package, capsys):
    with serve(**_stored(package)) as (host, state):
        argv = ["submit", "--host", host, "--pipeline", "tiny", "--run-name", "n", "--once"]
        for _ in range(2):
            args = _parser().parse_args([*argv, "--wait", "--timeout", "30"])
            assert args.func(args) == 0
        state["run_state"] = "FAILED"
        args = _parser().parse_args([*argv, "--wait", "--timeout", "30"])
        assert args.func(args) == 1  # the existing run's outcome is the exit status
    assert len(_posts(state, "/runs")) == 1
    assert capsys.readouterr().out.count("finished: ") == 3


def test_submit_a_local_package_sends_its_spec(package):
    with serve() as (host, state):
        cluster.submit_run(host, package_path=package, params={"preset": "small"})
    (run,) = _posts(state, "/runs")
    assert run["json"]["pipeline_spec"]["pipelineInfo"]["name"] == "tiny"
    assert "pipeline_version_reference" not in run["json"]
    assert run["json"]["runtime_config"]["parameters"] == {"preset": "small"}
    assert _echo_caching(run["json"]["pipeline_spec"]) == _echo_caching(_spec_of(package))


@pytest.mark.parametrize("source", ["package", "stored version"])
def test_submit_without_cache_sends_the_spec_with_caching_off_everywhere(package, source, capsys):
    # kfp.Client ignores enable_caching for a stored version and, for a package, turns it off
    # only in the root DAG: the run must carry a spec with every task uncached instead.
    where = {"package_path": package} if source == "package" else {"pipeline_name": "tiny"}
    with serve(**_stored(package)) as (host, state):
        result = cluster.submit_run(host, params={"epochs": 2}, enable_caching=False, **where)
    (run,) = _posts(state, "/runs")
    body = run["json"]
    assert "pipeline_version_reference" not in body
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny"
    assert _echo_caching(body["pipeline_spec"]) == dict.fromkeys(
        _echo_caching(_spec_of(package)), False
    )
    assert body["runtime_config"]["parameters"] == {"epochs": 2}
    if source == "stored version":
        assert (result["pipeline_id"], result["version_id"]) == ("p-1", "v-2")
    assert "caching off" in capsys.readouterr().out


def test_submit_rejects_unknown_parameters_before_creating_a_run(package):
    unknown = r"Unknown pipeline parameter\(s\).*: epoch\. Known: epochs, preset"
    with serve(**_stored(package)) as (host, state), pytest.raises(ValueError, match=unknown):
        cluster.submit_run(host, pipeline_name="tiny", params={"epoch": 3})
    assert _posts(state, "/runs") == []


def test_submit_a_missing_pipeline_says_how_to_upload(package):
    with serve() as (host, _), pytest.raises(cluster.ClusterError) as err:
        cluster.submit_run(host, pipeline_name="nope")
    assert host in str(err.value) and "upload" in str(err.value)


def test_submit_needs_exactly_one_source(package):
    with pytest.raises(ValueError, match="exactly one"):
        cluster.submit_run("http://127.0.0.1:1", pipeline_name="a", package_path=package)
    with pytest.raises(ValueError, match="exactly one"):
        cluster.submit_run("http://127.0.0.1:1")


def test_schedule_sends_cron_concurrency_and_no_catchup(package, capsys):
    with serve(**_stored(package)) as (host, state):
        result = cluster.schedule_run(
            host, cron="0 0 3 * * 1", pipeline_name="tiny", version="v2", params={"preset": "seed"}
        )
    (recurring,) = _posts(state, "/recurringruns")
    body = recurring["json"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"preset": "seed"}
    assert body["display_name"] == "tiny-v2-schedule"
    assert "'v2'" in body["description"]
    assert result["recurring_run_id"] == "rr-1" and result["version_id"] == "v-2"
    out = capsys.readouterr().out
    assert "catch-up off" in out and "caching off" in out
    # A recurring run retrains: the version's spec with every task uncached, not a reference.
    assert "pipeline_version_reference" not in body
    assert not any(_caching(body["pipeline_spec"]).values())


def test_schedule_refuses_a_second_schedule_of_the_same_name_unless_replacing(package, capsys):
    with serve(**_stored(package)) as (host, state):
        first = cluster.schedule_run(host, cron="0 0 3 * * 1", pipeline_name="tiny", version="v2")
        with pytest.raises(cluster.ClusterError, match=r"already has a recurring run named "
                           r"'tiny-v2-schedule' \(rr-1\): pass --replace"):  # fmt: skip
            cluster.schedule_run(host, cron="0 0 4 * * 1", pipeline_name="tiny", version="v2")
        assert [r["recurring_run_id"] for r in state["recurring"]] == ["rr-1"]
        again = cluster.schedule_run(
            host, cron="0 0 4 * * 1", pipeline_name="tiny", version="v2", replace=True
        )
        # The new one exists before the old one goes: never a moment without a schedule.
        methods = [(e["method"], e["path"].rsplit("/", 1)[-1]) for e in state["log"]]
        assert methods.index(("POST", "recurringruns")) < methods.index(("DELETE", "rr-1"))
        assert [r["recurring_run_id"] for r in state["recurring"]] == ["rr-2"]
        assert state["recurring"][0]["trigger"] == {"cron_schedule": {"cron": "0 0 4 * * 1"}}
    assert first["replaced"] == [] and again["replaced"] == ["rr-1"]
    assert "Deleted the replaced recurring run 'tiny-v2-schedule' (rr-1)" in capsys.readouterr().out


def test_schedule_with_cache_refers_to_the_version_as_compiled(package, capsys):
    with serve(**_stored(package)) as (host, state):
        cluster.schedule_run(host, cron="0 0 3 * * 1", pipeline_name="tiny", enable_caching=True)
    (recurring,) = _posts(state, "/recurringruns")
    body = recurring["json"]
    assert body["pipeline_version_reference"]["pipeline_version_id"] == "v-2"
    assert "pipeline_spec" not in body
    assert "caching as compiled" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "0 3 * * 1"}, "6 fields"),
        ({"cron": "0 0 3 * * 1", "max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_schedule_validates_before_connecting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster.schedule_run("http://127.0.0.1:1", pipeline_name="tiny", **kwargs)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_fails_fast_with_the_host_in_the_message():
    host = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="Cannot reach the KFP API") as err:
        cluster.submit_run(host, pipeline_name="tiny")
    assert host in str(err.value)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_reported_with_host_and_status(status):
    with serve(deny={("*", "*"): status}) as (host, _), pytest.raises(cluster.ClusterError) as err:
        cluster.connect(host)
    assert host in str(err.value)
    assert f"HTTP {status}" in str(err.value)
    assert "denied by the stand-in" in str(err.value)


def test_forbidden_run_creation_is_a_cluster_error(package):
    denied = serve(deny={("POST", f"{API}/runs"): 403}, **_stored(package))
    with denied as (host, _), pytest.raises(cluster.ClusterError, match="not authorized") as err:
        cluster.submit_run(host, pipeline_name="tiny")
    assert host in str(err.value) and "creating run" in str(err.value)


def test_multi_user_without_namespace_is_refused_with_advice():
    with (
        serve(multi_user=True) as (host, _),
        pytest.raises(cluster.ClusterError, match="--namespace"),
    ):
        cluster.connect(host)


def test_service_account_token_is_sent_on_every_request(package, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    monkeypatch.setenv(cluster.TOKEN_PATH_ENV, str(token))
    with serve(**_stored(package)) as (host, state):
        cluster.submit_run(host, pipeline_name="tiny", namespace="team-a")
    assert state["log"], "no request reached the stand-in"
    assert {e["auth"] for e in state["log"]} == {"Bearer tok-123"}
    (experiment,) = _posts(state, "/experiments")
    assert experiment["json"]["namespace"] == "team-a"


@pytest.mark.parametrize("host", ["", "localhost:8080"])
def test_bad_host_is_a_value_error(host):
    with pytest.raises(ValueError, match="host"):
        cluster.connect(host)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cycleprune")
    cluster.add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_submit_and_schedule_end_to_end(package, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("preset: seed\nepochs: 2\n")
    with serve(**_stored(package)) as (host, state):
        args = _parser().parse_args(
            [
                "submit",
                "--host",
                host,
                "--pipeline",
                "tiny",
                "--params-file",
                str(params),
                "--param",
                "epochs=5",
            ]
        )
        assert args.func(args) == 0
        args = _parser().parse_args(
            ["schedule", "--host", host, "--pipeline", "tiny", "--cron", "0 30 2 * * *"]
        )
        assert args.func(args) == 0
        for flag in ("--no-cache", "--cache"):
            command = "submit" if flag == "--no-cache" else "schedule"
            extra = ["--cron", "0 30 2 * * *", "--replace"] if command == "schedule" else []
            args = _parser().parse_args(
                [command, "--host", host, "--pipeline", "tiny", flag, *extra]
            )
            assert args.func(args) == 0
    runs = _posts(state, "/runs")
    assert runs[0]["json"]["runtime_config"]["parameters"] == {"preset": "seed", "epochs": 5}
    assert "pipeline_version_reference" in runs[0]["json"]  # submit: as compiled
    assert not any(_caching(runs[1]["json"]["pipeline_spec"]).values())  # submit --no-cache
    first, second = _posts(state, "/recurringruns")
    assert first["json"]["no_catchup"] is True
    assert not any(_caching(first["json"]["pipeline_spec"]).values())  # schedule: no cache
    assert "pipeline_version_reference" in second["json"]  # schedule --cache: as compiled
    assert "#/runs/details/r-1" in capsys.readouterr().out


def test_cli_upload_names_the_pipeline_after_the_package(package):
    with serve() as (host, state):
        args = _parser().parse_args(
            ["upload", "--host", host, "--package", package, "--version", "v1"]
        )
        assert args.func(args) == 0
    (create,) = _posts(state, "/pipelines")
    assert create["json"]["name"] == "tiny"


def test_cli_reports_cluster_errors_as_one_line(capsys):
    host = f"http://127.0.0.1:{_closed_port()}"
    args = _parser().parse_args(["submit", "--host", host, "--pipeline", "tiny"])
    assert args.func(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot reach the KFP API at " + host)
    assert "Traceback" not in err


def test_parse_params_merges_file_then_assignments(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("sparsities: [0.5, 0.9]\nsource: gs://b/data.npz\n")
    params = cluster.parse_params(["sparsities=[0.75]", "m_by_n='2:4'", "flag=true"], path)
    assert params == {
        "sparsities": [0.75],
        "source": "gs://b/data.npz",
        "m_by_n": "2:4",
        "flag": True,
    }
    with pytest.raises(ValueError, match="name=value"):
        cluster.parse_params(["no-equals"])
