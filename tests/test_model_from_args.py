"""The layer spec is what the flags say, never a silent substitute, and is announced once (model_from_args)."""

import argparse

import pytest

from megatron_harpe.arguments import HarpeArgumentError
from megatron_harpe.model import have_te
from megatron_harpe import model_from_args
from megatron_harpe.megatron_args import parse_megatron_args
from utils import TINY_ARGV as TINY


@pytest.mark.skipif(have_te(), reason="Transformer Engine is installed here")
def test_transformer_engine_without_te_is_an_error_that_says_what_to_do():
    with pytest.raises(HarpeArgumentError, match="--transformer-impl local"):
        model_from_args.layer_impl(argparse.Namespace(transformer_impl="transformer_engine"))
    assert model_from_args.layer_impl(argparse.Namespace(transformer_impl="local")) == "local"


@pytest.mark.skipif(have_te(), reason="Transformer Engine is installed here")
def test_the_megatron_engine_refuses_before_it_starts(monkeypatch, capsys):
    from megatron_harpe.training import entry

    monkeypatch.setattr(entry, "choose_engine", lambda args: "megatron")  # as on a GPU machine without TE
    monkeypatch.setattr(entry, "_run_megatron", lambda args: pytest.fail("megatron.training was started"))
    assert entry.main(TINY + ["--transformer-impl", "transformer_engine"]) == 2
    assert "needs Transformer Engine" in capsys.readouterr().err


def test_build_model_announces_spec_and_rope_kernel_once(megatron_single_process, monkeypatch, capsys):
    from megatron_harpe.cpu_compat import megatron_on_cpu
    from megatron_harpe.cpu_compat import prepare_args_for_cpu

    monkeypatch.setattr(model_from_args, "_announced", False)
    args = parse_megatron_args(TINY + ["--harpe-bases", "1e4,2e4,3e4,4e4"])
    prepare_args_for_cpu(args)
    args.padded_vocab_size = 128
    with megatron_on_cpu():
        model_from_args.build_model(args)
        model_from_args.build_model(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines.count("layer spec: " + model_from_args.SPEC_NAMES["local"]) == 1
    assert sum(line.startswith("HARPE RoPE path: --harpe-rope-impl auto") for line in lines) == 1


def test_the_kernel_that_runs_says_so_once(monkeypatch, capsys):
    import torch

    from megatron_harpe import kernels

    monkeypatch.setattr(kernels, "_reported", set())
    q, k = torch.randn(8, 1, 4, 16), torch.randn(8, 1, 2, 16)
    inv = torch.rand(2, 8)
    for _ in range(2):
        kernels.harpe_rope_qk(q, k, torch.arange(8.0), inv, impl="torch")
    assert capsys.readouterr().out.splitlines() == ["HARPE RoPE kernel: torch (first call, on cpu)"]


def test_standard_rope_is_announced_as_such(monkeypatch):
    args = parse_megatron_args(TINY + ["--rotary-base", "500000"])
    assert model_from_args.rope_path(args, None).startswith("standard RoPE: megatron's")
    args.harpe_rope_impl = "unfused"
    assert model_from_args.rope_path(args, [1e4]).startswith("HARPE RoPE kernel: unfused")
