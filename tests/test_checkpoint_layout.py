"""Megatron-LM's checkpoint layout: tracker, iteration directories, rank files and format, named as megatron names them."""

from __future__ import annotations

import os

import pytest

from megatron_harpe.checkpoint_layout import (CheckpointError, checkpoint_format, iteration_dir, rank_file,
                                              release_dir, torch_rank_files, write_release_tracker)
from megatron_harpe.command import RunError


@pytest.mark.parametrize("tp_rank, pp_rank, pp, iteration, expected", [
    (0, 0, 1, None, "release/mp_rank_00/model_optim_rng.pt"),
    (3, 0, 1, None, "release/mp_rank_03/model_optim_rng.pt"),
    (3, 1, 2, None, "release/mp_rank_03_001/model_optim_rng.pt"),
    (1, 0, 1, 20, "iter_0000020/mp_rank_01/model_optim_rng.pt"),
    (0, 2, 4, 0, "iter_0000000/mp_rank_00_002/model_optim_rng.pt"),
])
def test_rank_files_are_megatrons_names(tmp_path, tp_rank, pp_rank, pp, iteration, expected):
    assert rank_file(str(tmp_path), tp_rank, pp_rank, pp, iteration) == str(tmp_path / expected)


def _torch_checkpoint(root, directory, tp, pp):
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
            (root / directory / name).mkdir(parents=True)
            (root / directory / name / "model_optim_rng.pt").write_bytes(b"")


@pytest.mark.parametrize("tracker, expected", [("release", "release"), ("20", "iter_0000020"),
                                               ("20\n", "iter_0000020")])
def test_the_tracker_names_the_iteration(tmp_path, tracker, expected):
    (tmp_path / "iter_0000020").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(tracker)
    assert iteration_dir(str(tmp_path)) == str(tmp_path / expected)
    assert iteration_dir(str(tmp_path), 20) == str(tmp_path / "iter_0000020")


@pytest.mark.parametrize("tracker, iteration, message", [
    (None, None, "has no latest_checkpointed_iteration.txt: not a Megatron checkpoint directory"),
    ("not-an-iteration", None, "holds 'not-an-iteration', not an iteration number"),
    ("release", 30, "iter_0000030 does not exist: the checkpoint for iteration 30 is missing"),
])
def test_what_is_not_a_checkpoint_says_why(tmp_path, tracker, iteration, message):
    if tracker is not None:
        (tmp_path / "latest_checkpointed_iteration.txt").write_text(tracker)
    with pytest.raises(CheckpointError, match=message) as error:
        iteration_dir(str(tmp_path), iteration)
    assert isinstance(error.value, RunError) and isinstance(error.value, ValueError)
    assert error.value.exit_code == 1


def test_release_tracker_and_dir(tmp_path):
    write_release_tracker(str(tmp_path))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert release_dir(str(tmp_path)) == iteration_dir(str(tmp_path)) == str(tmp_path / "release")


def test_format_detection(tmp_path):
    _torch_checkpoint(tmp_path, "release", 2, 1)
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "metadata.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert checkpoint_format(str(tmp_path / "release")) == "torch"
    assert checkpoint_format(str(tmp_path / "dist")) == "torch_dist"
    with pytest.raises(CheckpointError, match="holds neither a torch_dist checkpoint"):
        checkpoint_format(str(tmp_path / "empty"))


@pytest.mark.parametrize("directory", ["release", "iter_0000020"])
def test_torch_rank_files_read_every_rank(tmp_path, directory):
    _torch_checkpoint(tmp_path, directory, 2, 2)
    files = torch_rank_files(str(tmp_path / directory), 2, 2)
    assert files == {(t, p): str(tmp_path / directory / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt")
                     for t in range(2) for p in range(2)}
    with pytest.raises(CheckpointError, match=r"holds 4 rank files, its args say TP=1 x PP=2"):
        torch_rank_files(str(tmp_path / directory), 1, 2)
    os.remove(files[1, 1])
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001/model_optim_rng.pt is missing: the checkpoint was "
                                              r"saved at TP=2 PP=2"):
        torch_rank_files(str(tmp_path / directory), 2, 2)
