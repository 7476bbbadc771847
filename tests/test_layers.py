"""Imports go one way: cycleprune (library) <- components <- pipelines.

Checked in fresh interpreters, so what another test imported cannot hide a violation.
"""

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import cycleprune

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_MODULES = sorted(
    f"cycleprune.{m.name}"
    for m in pkgutil.iter_modules(cycleprune.__path__)
    if m.name != "__main__"
)


def _loaded_after(statement: str) -> set[str]:
    """Top-level package names in sys.modules after running ``statement`` in a new process."""
    code = (
        f"{statement}\n"
        "import json, sys\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_library_package_does_not_import_kfp():
    loaded = _loaded_after("import cycleprune")
    assert "kfp" not in loaded
    assert "tensorflow" not in loaded  # importing the package stays cheap


def test_library_modules_are_found():
    assert {"cycleprune.selection", "cycleprune.report", "cycleprune.config"} <= set(
        LIBRARY_MODULES
    )


def test_no_library_module_imports_kfp_or_the_upper_layers():
    # One interpreter for all modules (each import of TensorFlow costs seconds).
    statement = "\n".join(f"import {name}" for name in LIBRARY_MODULES)
    loaded = _loaded_after(statement)
    assert not {"kfp", "components", "pipelines"} & loaded


@pytest.mark.parametrize("module", ["cycleprune.selection", "cycleprune.report"])
def test_pure_modules_do_not_import_tensorflow(module):
    assert "tensorflow" not in _loaded_after(f"import {module}")


def test_configure_helpers_import_without_kfp():
    # The configure component imports components.parameters inside its container, where kfp.dsl
    # is the slim runtime; neither it nor the package may need the component decorator.
    loaded = _loaded_after("import components.parameters")
    assert "kfp" not in loaded


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_components_never_import_pipelines():
    files = sorted((ROOT / "components").glob("*.py"))
    assert len(files) >= 10
    for path in files:
        imported = _imported_names(path)
        assert not {n for n in imported if n.split(".")[0] == "pipelines"}, path.name


def test_library_sources_never_import_kfp_or_upper_layers():
    # Also catches imports inside functions, which sys.modules would not show.
    for path in sorted((ROOT / "cycleprune").glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue  # the CLI imports `pipelines` lazily, inside its `run`/`compile` commands
        roots = {n.split(".")[0] for n in _imported_names(path)}
        assert not roots & {"kfp", "components", "pipelines"}, path.name
