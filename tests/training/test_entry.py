"""pretrain_harpe.py's parse: Megatron's parse_and_validate_args with the HARPE group, nothing silently ignored."""

import logging

import pytest

from megatron_harpe.arguments import HarpeArgumentError
from megatron_harpe.megatron_args import parse_megatron_args
from utils import TINY_ARGV as TINY


def test_yaml_config_is_refused_not_half_applied(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("num_layers: 2\n")
    with pytest.raises(HarpeArgumentError, match="--yaml-cfg"):
        parse_megatron_args(TINY + ["--yaml-cfg", str(cfg), "--harpe-bases", "1e4,2e4,3e4,4e4"])


def test_use_checkpoint_args_needs_a_checkpoint():
    with pytest.raises(HarpeArgumentError, match="needs --load or --pretrained-checkpoint"):
        parse_megatron_args(TINY + ["--use-checkpoint-args"])


def test_argv_is_restored(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["caller", "--its-own"])
    parse_megatron_args(TINY)
    assert sys.argv == ["caller", "--its-own"]


@pytest.mark.parametrize("rank, logged", [("0", True), ("3", False)])
def test_bases_are_logged_by_rank_0_only(monkeypatch, caplog, rank, logged):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with caplog.at_level(logging.INFO, logger="megatron_harpe.arguments"):
        args = parse_megatron_args(TINY + ["--harpe-bases", "1e4,2e4,3e4,4e4"])
    assert args.harpe_bases == [1e4, 2e4, 3e4, 4e4]
    assert any("HARPE bases (4" in r.getMessage() for r in caplog.records) is logged


@pytest.mark.parametrize("untie, expected", [(True, [0]), (False, [0, 12])])
def test_embedding_ranks_as_pretrain_gpt(monkeypatch, untie, expected):
    from megatron.training import global_vars

    from megatron_harpe.training.entry import embedding_ranks

    args = parse_megatron_args(TINY + (["--untie-embeddings-and-output-weights"] if untie else []))
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
    args = parse_megatron_args(TINY + ["--transformer-impl", "local"])
    with pytest.raises(HarpeArgumentError, match="--no-rope-fusion --no-gradient-accumulation-fusion "
                                                 "--no-persist-layer-norm"):
        check_megatron_engine_flags(args)
    check_megatron_engine_flags(parse_megatron_args(TINY + [
        "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
        "--no-persist-layer-norm"]))


# --- issue 15: one line per error, from rank 0, before megatron's argument dump; a failed load is a failure ------

def test_an_argument_error_is_one_line_not_megatrons_usage(capsys):
    from megatron_harpe.training.entry import main

    with pytest.raises(SystemExit) as exit_:
        main(TINY + ["--harpe-bases", "-1e4"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.out == ""
    assert out.err.splitlines() == ["pretrain_harpe.py: error: argument --harpe-bases: expected one argument "
                                    "(see pretrain_harpe.py --help)"]


def test_harpe_errors_come_before_megatrons_argument_dump(capsys):
    from megatron_harpe.training.entry import main

    assert main(TINY + ["--harpe-bases", "1e4,2e4"]) == 2
    out = capsys.readouterr()
    assert "arguments ---" not in out.out       # validate_args ends by printing every argument, on rank 0
    assert out.err.splitlines() == ["pretrain_harpe.py: error: HARPE needs one RoPE base per query group: got 2 "
                                    "bases for 4 query groups (num_query_groups, or num_attention_heads without "
                                    "GQA); give exactly 4 bases or let a strategy choose them"]


@pytest.mark.parametrize("argv", [["--harpe-bases", "1e4,2e4"], ["--harpe-bases"], ["--tensor-model-parallel-size",
                                                                                    "3"]])
def test_ranks_above_0_fail_silently(monkeypatch, capsys, argv):
    """torchrun prints every rank's stderr: the same error from 4 ranks is printed by rank 0 only."""
    from megatron_harpe.training.entry import main

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    try:
        code = main(TINY + argv)
    except SystemExit as e:
        code = e.code
    assert code == 2 and capsys.readouterr().err == ""


def test_the_layout_is_checked_against_the_node(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(HarpeArgumentError, match="--tensor-model-parallel-size 4 is more than the 2 GPUs of a node"):
        parse_megatron_args(TINY + ["--tensor-model-parallel-size", "4"])
    args = parse_megatron_args(TINY + ["--tensor-model-parallel-size", "4", "--harpe-tp-across-nodes"])
    assert args.tensor_model_parallel_size == 4 and args.data_parallel_size == 2


def test_check_only_prints_no_dump_and_starts_nothing(monkeypatch, capsys):
    from megatron_harpe.training import entry

    monkeypatch.setattr(entry, "choose_engine", lambda args: pytest.fail("--harpe-check-only chose an engine"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert entry.main(TINY + ["--harpe-check-only", "--tensor-model-parallel-size", "2"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == ["pretrain_harpe.py: the flags fit 2 rank(s): TP 2, PP 1, CP 1, "
                                                      "DP 1"]


def test_a_failed_load_in_the_megatron_engine_is_an_error(monkeypatch):
    """megatron's load_checkpoint ends with a bare sys.exit() (status 0) when it cannot load."""
    import sys

    from megatron.training import global_vars, training

    from megatron_harpe.training import entry

    args = parse_megatron_args(TINY + ["--load", "no/such/checkpoint"])
    monkeypatch.setattr(training, "load_checkpoint", lambda *a, **k: sys.exit())
    monkeypatch.setattr(training, "pretrain", lambda *a, **k: training.load_checkpoint(None, None, None))
    monkeypatch.setattr(global_vars, "set_global_variables",
                        lambda a, **k: monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", a))
    with pytest.raises(entry.RunFailed, match=r"could not load the checkpoint \(--load no/such/checkpoint;"):
        entry._run_megatron(args)
    monkeypatch.setattr(entry, "choose_engine", lambda args: "megatron")
    monkeypatch.setattr(entry, "check_megatron_engine_flags", lambda args: None)
    assert entry.main(TINY + ["--load", "no/such/checkpoint"]) == 1


def test_other_exits_of_load_checkpoint_pass_through():
    from megatron_harpe.training.entry import load_or_raise

    def exits_3():
        raise SystemExit(3)

    with pytest.raises(SystemExit) as exit_:
        load_or_raise(exits_3)()
    assert exit_.value.code == 3
    assert load_or_raise(lambda x: x + 1)(1) == 2
