"""No test-set peeking: across the whole chain of stages, only evaluation reads the test split.

Every read of a prepared split goes through ``cycleprune.data._shard_paths`` (``load_arrays``,
``make_dataset`` and a re-prepared dataset alike), so a spy there sees every split each stage
opens. The chain is the pipeline's, on the tiny slice of PneumoniaMNIST, with the LR range test
choosing the bounds, so that stage runs for real too.
"""

from __future__ import annotations

import contextlib

import pytest

from cycleprune.config import preset


@pytest.fixture(scope="module")
def split_reads(tiny_npz, tmp_path_factory):
    from cycleprune import (
        compression,
        data,
        evaluation,
        lr_finder,
        pruning,
        selection,
        training,
    )

    work = tmp_path_factory.mktemp("chain")
    config = preset("smoke").override(
        ["prune.sparsities=[0.5]", "schedule.min_lr=0", "schedule.max_lr=0"]
    )
    reads: dict[str, set[str]] = {}
    stage = {"name": ""}
    real = data._shard_paths

    def spy(dataset_dir, info, split):
        reads.setdefault(stage["name"], set()).add(split)
        return real(dataset_dir, info, split)

    @contextlib.contextmanager
    def running(name):
        stage["name"] = name
        reads.setdefault(name, set())
        yield

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_shard_paths", spy)
        with running("prepare_data"):
            dataset = work / "dataset"
            data.prepare_dataset(tiny_npz, dataset, config.data)
        with running("find_lr"):
            bounds = lr_finder.run_lr_finder(dataset, work / "lr", config)
        with running("train"):
            trained = training.run_training(
                dataset, work / "train", config, min_lr=bounds.min_lr, max_lr=bounds.max_lr
            )
        with running("prune"):
            pruned = pruning.run_pruning(
                trained.model_path,
                dataset,
                work / "prune",
                config,
                final_sparsity=0.5,
                min_lr=bounds.min_lr,
                max_lr=bounds.max_lr,
            )
        evaluations = []
        for sparsity, model in ((0.0, trained.model_path), (0.5, pruned.model_path)):
            with running("compress"):
                folder = work / f"compressed_{sparsity}"
                compression.run_compression(model, str(dataset), str(folder), config)
            with running("evaluate"):
                record = evaluation.run_evaluation(
                    folder, dataset, work / f"eval_{sparsity}", config
                )
            evaluations.append({**record, "target_sparsity": sparsity})
        with running("select_model"):
            selection.select_model(selection.collect_entries(evaluations), config.select)
    return reads


def test_only_evaluation_reads_the_test_split(split_reads):
    readers = sorted(name for name, splits in split_reads.items() if "test" in splits)
    assert readers == ["evaluate"]


def test_each_stage_reads_what_it_needs(split_reads):
    # The spy saw the stages at all (so the assertion above cannot pass vacuously).
    assert split_reads["prepare_data"] == set()  # writes the splits from the .npz
    assert split_reads["find_lr"] == {"train"}
    assert split_reads["train"] == {"train", "val"}
    assert split_reads["prune"] == {"train", "val"}
    assert split_reads["compress"] == {"train"}  # int8 calibration images
    assert split_reads["evaluate"] == {"val", "test"}
    assert split_reads["select_model"] == set()
