"""pretrain_harpe.py's parse: Megatron's parse_and_validate_args with the HARPE group, nothing silently ignored."""

import logging

import pytest

from megatron_harpe.arguments import HarpeArgumentError
from megatron_harpe.training.entry import parse_and_validate
from utils import TINY_ARGV as TINY


def test_yaml_config_is_refused_not_half_applied(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("num_layers: 2\n")
    with pytest.raises(HarpeArgumentError, match="--yaml-cfg"):
        parse_and_validate(TINY + ["--yaml-cfg", str(cfg), "--harpe-bases", "1e4,2e4,3e4,4e4"])


def test_use_checkpoint_args_needs_a_checkpoint():
    with pytest.raises(HarpeArgumentError, match="needs --load or --pretrained-checkpoint"):
        parse_and_validate(TINY + ["--use-checkpoint-args"])


def test_argv_is_restored(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["caller", "--its-own"])
    parse_and_validate(TINY)
    assert sys.argv == ["caller", "--its-own"]


@pytest.mark.parametrize("rank, logged", [("0", True), ("3", False)])
def test_bases_are_logged_by_rank_0_only(monkeypatch, caplog, rank, logged):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with caplog.at_level(logging.INFO, logger="megatron_harpe.arguments"):
        args = parse_and_validate(TINY + ["--harpe-bases", "1e4,2e4,3e4,4e4"])
    assert args.harpe_bases == [1e4, 2e4, 3e4, 4e4]
    assert any("HARPE bases (4" in r.getMessage() for r in caplog.records) is logged


@pytest.mark.parametrize("untie, expected", [(True, [0]), (False, [0, 12])])
def test_embedding_ranks_as_pretrain_gpt(monkeypatch, untie, expected):
    from megatron.training import global_vars

    from megatron_harpe.training.entry import embedding_ranks

    args = parse_and_validate(TINY + (["--untie-embeddings-and-output-weights"] if untie else []))
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    assert embedding_ranks([0, 4, 8, 12]) == expected
    assert embedding_ranks([3]) == [3]


def test_the_wheels_compiled_dataset_helpers_are_used(monkeypatch):
    """megatron-core's wheel has helpers_cpp but no Makefile: megatron.training's start-up make would exit 1."""
    from megatron.core.datasets import utils as dataset_utils

    from megatron_harpe.training.entry import use_prebuilt_dataset_helpers

    monkeypatch.setattr(dataset_utils, "compile_helpers", dataset_utils.compile_helpers)
    if not (__import__("pathlib").Path(dataset_utils.__file__).parent / "Makefile").exists():
        with pytest.raises(SystemExit):
            dataset_utils.compile_helpers()  # the failure this works around
    use_prebuilt_dataset_helpers()
    dataset_utils.compile_helpers()  # returns: the compiled helpers import


def test_megatron_engine_without_te_names_the_fusion_flags(monkeypatch):
    from megatron.core.extensions import transformer_engine

    from megatron_harpe.training.entry import check_megatron_engine_flags

    monkeypatch.setattr(transformer_engine, "HAVE_TE", False)
    args = parse_and_validate(TINY + ["--transformer-impl", "local"])
    with pytest.raises(HarpeArgumentError, match="--no-rope-fusion --no-gradient-accumulation-fusion "
                                                 "--no-persist-layer-norm"):
        check_megatron_engine_flags(args)
    check_megatron_engine_flags(parse_and_validate(TINY + [
        "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
        "--no-persist-layer-norm"]))
