"""The one Megatron parser entry: the caller's sys.argv, environment and stdout survive every parse."""

from __future__ import annotations

import os
import sys

import pytest

from megatron_harpe.arguments import HarpeArgumentError
from megatron_harpe.megatron_args import parse_megatron_args
from utils import TINY_ARGV as TINY

JOB = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def caller(monkeypatch):
    """A caller with its own argv, a RANK and no WORLD_SIZE / LOCAL_WORLD_SIZE."""
    monkeypatch.setattr(sys, "argv", ["caller", "--its-own"])
    monkeypatch.setenv("RANK", "5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _state():
    return list(sys.argv), dict(os.environ), sys.stdout


@pytest.mark.parametrize("argv, error", [
    (TINY + ["--harpe-bases", "1e4,2e4"], HarpeArgumentError),          # HARPE's check
    (TINY + ["--tensor-model-parallel-size", "3"], HarpeArgumentError),  # the layout
    (TINY + ["--fp16", "--bf16"], HarpeArgumentError),                  # megatron's validate_args
    (TINY + ["--num-layer", "3"], SystemExit),                          # megatron's parser
])
def test_a_failing_then_a_passing_parse_leave_the_caller_as_it_was(caller, capsys, argv, error):
    before = _state()
    with pytest.raises(error):
        parse_megatron_args(argv, world_size=8, local_world_size=8)
    assert _state() == before
    args = parse_megatron_args(TINY + ["--tensor-model-parallel-size", "2"], world_size=4, local_world_size=2)
    assert _state() == before
    assert (args.world_size, args.rank, args.data_parallel_size) == (4, 0, 2)
    assert "arguments ---" not in capsys.readouterr().out  # quiet: no argument dump


def test_the_job_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = parse_megatron_args(TINY)
    assert (args.world_size, args.rank) == (2, 1)
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["RANK"] == "1"


def test_local_world_size_bounds_tp(caller):
    with pytest.raises(HarpeArgumentError, match="more than the 2 GPUs of a node"):
        parse_megatron_args(TINY + ["--tensor-model-parallel-size", "4"], world_size=8, local_world_size=2)
    assert "LOCAL_WORLD_SIZE" not in os.environ


def test_not_quiet_prints_megatrons_argument_dump(caller, capsys):
    parse_megatron_args(TINY, world_size=1, quiet=False)
    assert "arguments ---" in capsys.readouterr().out
