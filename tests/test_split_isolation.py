"""No test-set peeking: across the whole chain of stages, only evaluation reads the test split.

Every read of a prepared split goes through ``cycleprune.data._shard_paths`` (``load_arrays``,
``make_dataset`` and a re-prepared dataset alike), so a spy there sees every split each stage
opens. The chain is :func:`benchmarks.quality.run_chain`, the pipeline's stages through the
components' library calls, on the tiny slice of PneumoniaMNIST, with the LR range test choosing
the bounds so that stage runs for real too. Each stage's library function is wrapped to label the
reads it makes. (Each stage also hashes every shard's bytes against the dataset's content_hash,
test shards included, before it starts; that check parses no record and yields only match or
mismatch.)
"""

from __future__ import annotations

import functools

import pytest

from cycleprune.config import preset

STAGES = {
    "data": {"prepare_dataset": "prepare_data"},
    "lr_finder": {"run_lr_finder": "find_lr"},
    "training": {"run_training": "train"},
    "pruning": {"run_pruning": "prune"},
    "compression": {"run_compression": "compress"},
    "evaluation": {"run_evaluation": "evaluate"},
    "selection": {"select_model": "select_model"},
}


@pytest.fixture(scope="module")
def chain(tiny_npz, tmp_path_factory):
    import importlib

    from benchmarks import quality
    from cycleprune import data

    config = preset("smoke").override(
        ["prune.sparsities=[0.5]", "schedule.min_lr=0", "schedule.max_lr=0"]
    )
    reads: dict[str, set[str]] = {}
    stage = {"name": "outside any stage"}
    real_paths = data._shard_paths

    def spy(dataset_dir, info, split):
        reads.setdefault(stage["name"], set()).add(split)
        return real_paths(dataset_dir, info, split)

    def labelled(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            stage["name"] = name
            reads.setdefault(name, set())
            try:
                return fn(*args, **kwargs)
            finally:
                stage["name"] = "outside any stage"

        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_shard_paths", spy)
        for module_name, functions in STAGES.items():
            module = importlib.import_module(f"cycleprune.{module_name}")
            for function, name in functions.items():
                mp.setattr(module, function, labelled(name, getattr(module, function)))
        record = quality.run_chain(config, tiny_npz, tmp_path_factory.mktemp("chain"))
    return reads, record


def test_only_evaluation_reads_the_test_split(chain):
    reads, _ = chain
    readers = sorted(name for name, splits in reads.items() if "test" in splits)
    assert readers == ["evaluate"]


def test_each_stage_reads_what_it_needs(chain):
    reads, _ = chain
    # The spy saw every stage (so the assertion above cannot pass vacuously).
    assert reads == {
        "prepare_data": set(),  # writes the splits from the .npz
        "find_lr": {"train"},
        "train": {"train", "val"},
        "prune": {"train", "val"},
        "compress": {"train"},  # int8 calibration images
        "evaluate": {"val", "test"},
        "select_model": set(),
    }


def test_the_quality_chain_records_every_model_and_the_selection(chain):
    from benchmarks import quality

    _, record = chain
    names = {m["name"] for m in record["models"]}
    formats = {"keras", "tflite_float32", "tflite_dynamic", "tflite_int8"}
    assert names == {f"{v}/{f}" for v in ("dense", "prune_50") for f in formats}
    assert record["selected"] in names
    assert record["lr_bounds"]["from"] == "lr_finder"
    dense = next(m for m in record["models"] if m["name"] == "dense/keras")
    selected = next(m for m in record["models"] if m["name"] == record["selected"])
    assert record["size_ratio"] == pytest.approx(dense["gzip_bytes"] / selected["gzip_bytes"])
    summary = quality.aggregate([record, record])
    assert summary["selected_test"]["auc"]["mean"] == pytest.approx(selected["test"]["auc"])
    assert summary["selected_test"]["auc"]["std"] == 0.0
    runs = [{**record, "seed": 1}]
    page = quality.render({"preset": "smoke", "overrides": [], "runs": runs, "summary": summary})
    assert f"{record['selected']} (selected)" in page
