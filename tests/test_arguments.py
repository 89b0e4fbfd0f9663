"""--harpe-* flags on Megatron-LM's parser: resolution, validation against the model, errors that say what to do."""

import argparse
import os
import subprocess
import sys

import pytest

from megatron_harpe.arguments import HarpeArgumentError, add_harpe_args, harpe_bases_from_args, resolve_harpe_args
from megatron_harpe.bases import PAPER_LLAMA2_7B_BASES, select_bases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "1", "--lr", "1e-3",
        "--train-iters", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
        "--position-embedding-type", "rope"]
LLAMA2_7B = ["--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "11008",
             "--num-attention-heads", "32", "--seq-length", "131072", "--max-position-embeddings", "131072",
             "--micro-batch-size", "1", "--lr", "2e-5", "--train-iters", "1", "--position-embedding-type", "rope"]


def parse(argv):
    from megatron_harpe.megatron_args import parse_megatron_args

    return parse_megatron_args(argv)


def test_paper_preset_gives_table_2():
    args = parse(LLAMA2_7B + ["--harpe-bases", "paper-llama2-7b"])
    assert args.harpe_bases == [float(b) for b in PAPER_LLAMA2_7B_BASES]
    assert harpe_bases_from_args(args) == args.harpe_bases


def test_strategy_resolves_against_the_model_and_seq_length():
    args = parse(TINY + ["--harpe-strategy", "uniform", "--harpe-base-min", "1e4", "--harpe-base-max", "4e4"])
    # 4 heads without GQA: one base per head, uniform (Eq. 9)
    assert args.harpe_bases == [1e4, 2e4, 3e4, 4e4]
    gqa = parse(TINY + ["--group-query-attention", "--num-query-groups", "2", "--harpe-strategy", "peak_valley",
                        "--harpe-base-min", "1e4", "--harpe-base-max", "2e5", "--harpe-stride", "1e4"])
    # one base per query group; the waveform covers --seq-length unless --harpe-target-length says otherwise
    assert gqa.harpe_bases == select_bases(2, "peak_valley", 1e4, 2e5, head_dim=16, target_length=256, stride=1e4)


def test_descending_and_explicit_lists():
    args = parse(TINY + ["--harpe-bases", "1e4,2e4,3e4,4e4", "--harpe-descending"])
    assert args.harpe_bases == [4e4, 3e4, 2e4, 1e4]


def test_no_harpe_flags_mean_standard_rope():
    args = parse(TINY + ["--rotary-base", "5000000"])
    assert args.harpe_bases is None and harpe_bases_from_args(args) is None


def _namespace(**kw):
    base = dict(harpe_bases=None, harpe_strategy="none", harpe_base_min=1e6, harpe_base_max=5e6, harpe_stride=3e4,
                harpe_target_length=None, harpe_descending=False, position_embedding_type="rope",
                use_rope_scaling=False, group_query_attention=False, num_query_groups=None, num_attention_heads=4,
                tensor_model_parallel_size=1, kv_channels=None, hidden_size=64, seq_length=256)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("overrides, message", [
    (dict(harpe_bases="1e4,2e4,3e4,4e4", harpe_strategy="uniform"), "not both"),
    (dict(harpe_bases="1e4,2e4,3e4"), "one RoPE base per query group: got 3 bases for 4"),
    (dict(harpe_bases="1e4,2e4", group_query_attention=True, num_query_groups=2, tensor_model_parallel_size=4),
     "do not divide by --tensor-model-parallel-size 4"),
    (dict(harpe_bases="1e4,2e4,3e4,4e4", position_embedding_type="yarn"), "--position-embedding-type rope"),
    (dict(harpe_bases="1e4,2e4,3e4,4e4", use_rope_scaling=True), "--use-rope-scaling"),
    (dict(harpe_bases="1e4,-2e4,3e4,4e4"), "positive"),
    (dict(harpe_strategy="uniform", harpe_base_min=5e6, harpe_base_max=1e6), "base_max"),
])
def test_bad_flags_say_what_to_change(overrides, message):
    with pytest.raises(HarpeArgumentError, match=message.replace("(", r"\(").replace("+", r"\+")):
        resolve_harpe_args(_namespace(**overrides))


def test_parser_group_is_megatron_extra_args_provider():
    parser = add_harpe_args(argparse.ArgumentParser())
    args = parser.parse_args(["--harpe-strategy", "peak_valley", "--harpe-engine", "compact"])
    assert args.harpe_strategy == "peak_valley" and args.harpe_engine == "compact" and args.harpe_bases is None


def test_cli_error_exits_2_and_writes_nothing(tmp_path):
    save = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_harpe.py"), *TINY,
                           "--harpe-bases", "1e4,2e4", "--save", str(save), "--save-interval", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "one RoPE base per query group: got 2 bases for 4" in proc.stderr
    assert not save.exists()


def test_compact_engine_refuses_flags_it_cannot_honour(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_harpe.py"), *TINY, "--harpe-engine",
                           "compact", "--async-save", "--exit-duration-in-mins", "5", "--save", str(tmp_path / "c"), "--save-interval", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--async-save" in proc.stderr and "--exit-duration-in-mins" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_megatron_validation_failures_are_named_not_tracebacks(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_harpe.py"), *TINY,
                           "--save", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "validate_args rejected the flags: assert args.save_interval is not None" in proc.stderr
    assert "Traceback" not in proc.stderr


# The shared base-selection group without defaults (conversion, select_bases): a search flag that the chosen source
# of bases does not read is refused, with the same words in every command.
def _strict(*argv, prefix="--harpe-"):
    from megatron_harpe.arguments import add_harpe_base_arguments, resolve_harpe_bases

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_harpe_base_arguments(parser, prefix=prefix, search_defaults=False)
    return resolve_harpe_bases(parser.parse_args(argv), 4, 16, 256, prefix=prefix, search_defaults=False)


@pytest.mark.parametrize("argv, message", [
    (["--harpe-base-min", "1e4"], r"--harpe-base-min set the base search of --harpe-strategy: add --harpe-strategy"),
    (["--harpe-bases", "1e4,2e4,3e4,4e4", "--harpe-stride", "1e4"],
     r"--harpe-stride set the base search of --harpe-strategy, but --harpe-bases 1e4,2e4,3e4,4e4 is a list"),
    (["--harpe-bases", "1e4,2e4,3e4,4e4", "--harpe-descending"], r"drop --harpe-descending"),
    (["--harpe-strategy", "geometric", "--harpe-stride", "1e4"], r"--harpe-strategy geometric does not use it"),
    (["--harpe-bases", "1e4,2e4"], r"got 2 bases for 4"),
])
def test_shared_group_without_defaults_refuses_unused_search_flags(argv, message):
    with pytest.raises(HarpeArgumentError, match=message):
        _strict(*argv)


def test_shared_group_without_defaults_resolves_like_the_trainer():
    assert _strict() is None
    assert _strict("--harpe-strategy", "uniform", "--harpe-base-min", "1e4", "--harpe-base-max", "4e4") == \
        [1e4, 2e4, 3e4, 4e4]
    assert _strict("--strategy", "uniform", "--base-min", "1e4", "--base-max", "4e4", "--descending",
                   prefix="--") == [4e4, 3e4, 2e4, 1e4]
    with pytest.raises(SystemExit):  # a list and a strategy exclude each other in the parser
        _strict("--harpe-bases", "1e4,2e4,3e4,4e4", "--harpe-strategy", "uniform")
