"""The command line: every command documents itself, stages run, failures exit cleanly."""

from __future__ import annotations

import json

import pytest

from cycleprune import cli
from cycleprune.preemption import PreemptedError
from cycleprune.training import DivergenceError

STAGES = ("run", "compile", "prepare-data", "find-lr", "train", "prune", "compress", "evaluate")


@pytest.mark.parametrize("command", STAGES)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m cycleprune {command}" in out
    if command not in ("compile",):
        assert "--preset" in out and "--set" in out


def test_prepare_data_through_the_cli(tiny_npz, tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli.main(["prepare-data", "--source", str(tiny_npz), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["train"] and (out / "dataset.json").is_file()


def test_bundled_data_gets_its_class_names(tmp_path):
    config = cli.load_config("smoke")
    named = cli._data_config_for(str(cli.BUNDLED_DATA), config)
    assert named.class_names == ("normal", "pneumonia")
    assert cli._data_config_for(str(tmp_path / "other.npz"), config).class_names == ()


def test_bad_override_is_one_line_and_exit_2(tiny_npz, tmp_path, capsys):
    code = cli.main(["prepare-data", "--source", str(tiny_npz), "--out", str(tmp_path / "x"),
                     "--set", "data.channels=2"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.channels must be 1 or 3") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("error", "code", "prefix", "fragment"),
    [
        (DivergenceError(12, 3.5, "/ck/ckpt-2"), 1, "error:", "step 12 with learning rate 3.5"),
        (PreemptedError(40, "/ck/ckpt-5"), 143, "preempted:", "step 40"),
    ],
)
def test_stage_failures_exit_with_their_code(
    monkeypatch, tmp_path, capsys, error, code, prefix, fragment
):
    from cycleprune import training

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(training, "run_training", fail)
    argv = ["train", "--dataset", str(tmp_path), "--out", str(tmp_path / "t"), "--min-lr", "0.001",
            "--max-lr", "0.1"]  # fmt: skip
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(prefix) and fragment in err


def test_prune_names_its_own_flags_before_any_work(tmp_path, capsys):
    model = tmp_path / "model.keras"
    base = ["prune", "--dataset", str(tmp_path), "--out", str(tmp_path / "p"), "--min-lr", "0.001",
            "--max-lr", "0.1"]  # fmt: skip
    assert cli.main([*base, "--model", str(model)]) == 2
    assert capsys.readouterr().err.strip() == f"error: Model not found: {model}"
    model.write_bytes(b"")
    assert cli.main([*base, "--model", str(model), "--sparsity", "1.5"]) == 2
    assert "--sparsity must be in [0, 1). Received: --sparsity=1.5" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2


class _StopError(Exception):
    pass


@pytest.mark.parametrize(("flags", "caching"), [([], True), (["--no-cache"], False)])
def test_run_caches_unless_told_not_to(monkeypatch, flags, caching):
    from pipelines import local

    seen = {}

    def fake_run_local(config, **kwargs):
        seen.update(kwargs)
        raise _StopError

    monkeypatch.setattr(local, "run_local", fake_run_local)
    with pytest.raises(_StopError):
        cli.main(["run", "--preset", "smoke", *flags])
    assert seen["enable_caching"] is caching
