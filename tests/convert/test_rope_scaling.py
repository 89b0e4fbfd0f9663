"""RoPE scaling through conversion: the one table of fields against megatron's and transformers' own code, and the
logits of PI, YaRN and HARPE + PI models through both conversions against megatron's forward of the same checkpoint."""

from __future__ import annotations

import inspect
import json
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_harpe.convert.cli import hf_to_megatron, megatron_to_hf
from megatron_harpe.convert.rope_scaling import (
    FIELDS,
    RopeScaling,
    hf_rope_parameters,
    megatron_rope_flags,
    refuse_with_harpe,
)
from megatron_harpe.shape import LlamaShape, ShapeError

HEAD_DIM = 16  # utils.TINY_ARGV's heads


def mscale(s: float, m: float = 1.0) -> float:
    """YaRN's concentration term (Peng et al. 2023), written out here: 0.1 m ln s + 1."""
    return 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0


YARN_DEFAULTS = dict(beta_fast=32.0, beta_slow=1.0, truncate=True, mscale=1.0, mscale_all_dim=0.0)
# (megatron flags after the tiny shape's, the Hugging Face rope_parameters they are)
MAPPING = {
    "plain": ([], {"rope_type": "default", "rope_theta": 10000.0}),
    "pi": (["--rotary-seq-len-interpolation-factor", "4"], {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4}),
    "yarn": (["--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
              "--yarn-original-max-position-embeddings", "64"],
             {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
              **YARN_DEFAULTS, "attention_factor": mscale(4.0)}),
    "yarn-every-field": (["--position-embedding-type", "yarn", "--rotary-base", "500000", "--rotary-scaling-factor",
                          "8", "--yarn-original-max-position-embeddings", "32", "--yarn-beta-fast", "16",
                          "--yarn-beta-slow", "2", "--no-yarn-correction-range-round-to-int", "--mscale", "0.707",
                          "--mscale-all-dim", "0.5"],
                         {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                          "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0,
                          "truncate": False, "mscale": 0.707, "mscale_all_dim": 0.5,
                          "attention_factor": mscale(8.0, 0.707) / mscale(8.0, 0.5)}),
    # transformers alone would ignore a lone mscale (it uses both only when both are non-zero): attention_factor says it
    "yarn-mscale-only": (["--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
                          "--yarn-original-max-position-embeddings", "64", "--mscale", "0.707"],
                         {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 64, **YARN_DEFAULTS, "mscale": 0.707,
                          "attention_factor": mscale(4.0, 0.707)}),
}


def parsed(flags: list[str]):
    """megatron's parse and validation of a tiny Llama (head width 16) with ``flags``."""
    from megatron_harpe.convert.megatron_checkpoint import LLAMA2_FLAGS
    from megatron_harpe.megatron_args import parse_megatron_args
    from utils import TINY_ARGV

    return parse_megatron_args([*TINY_ARGV, *LLAMA2_FLAGS, *flags])


@pytest.mark.parametrize("row", sorted(MAPPING))
def test_the_table_maps_megatron_flags_to_rope_parameters_and_back(row):
    flags, rope_parameters = MAPPING[row]
    shape = LlamaShape.from_megatron_args(parsed(flags))
    assert hf_rope_parameters(shape.rope_scaling, shape.rope_theta) == rope_parameters
    assert RopeScaling.from_hf(rope_parameters) == shape.rope_scaling
    again = parsed(megatron_rope_flags(shape.rope_scaling) + ["--rotary-base", str(int(shape.rope_theta))])
    assert LlamaShape.from_megatron_args(again) == shape  # the flags written for it parse back to it


def test_the_table_defaults_are_megatrons():
    """Every yarn row's default is what megatron builds YarnRotaryEmbedding with when the flag is not given."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
    from megatron.training.argument_utils import _apply_yarn_config_from_args

    config = SimpleNamespace()  # what megatron.training sets on the TransformerConfig GPTModel reads
    _apply_yarn_config_from_args(config, parsed(["--position-embedding-type", "yarn"]))
    signature = inspect.signature(YarnRotaryEmbedding.__init__).parameters
    # args attribute -> (TransformerConfig attribute, YarnRotaryEmbedding parameter)
    megatron = {"rotary_scaling_factor": ("yarn_rotary_scaling_factor", "scaling_factor"),
                "yarn_original_max_position_embeddings": ("yarn_original_max_position_embeddings",
                                                          "original_max_position_embeddings"),
                "yarn_beta_fast": ("yarn_beta_fast", "beta_fast"), "yarn_beta_slow": ("yarn_beta_slow", "beta_slow"),
                "yarn_correction_range_round_to_int": ("yarn_correction_range_round_to_int",
                                                       "correction_range_round_to_int"),
                "mscale": ("yarn_mscale", "mscale"), "mscale_all_dim": ("yarn_mscale_all_dim", "mscale_all_dim")}
    assert sorted(megatron) == sorted(f.arg for f in FIELDS["yarn"])
    for f in FIELDS["yarn"]:
        attribute, parameter = megatron[f.arg]
        assert getattr(config, attribute) == f.default, f.arg
        assert signature[parameter].default == f.default, f.arg


@pytest.mark.parametrize("row", ["pi", "yarn", "yarn-every-field", "yarn-mscale-only"])
def test_transformers_builds_megatrons_frequencies_from_the_export(row):
    """transformers' own RoPE initialisation of the exported rope_parameters against megatron's own embedding."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
        _yarn_get_concentration_factor,
    )
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_harpe.cpu_compat import megatron_on_cpu

    flags, rope_parameters = MAPPING[row]
    scaling = LlamaShape.from_megatron_args(parsed(flags)).rope_scaling
    config = LlamaConfig(hidden_size=8 * HEAD_DIM, num_attention_heads=8, max_position_embeddings=256,
                         rope_parameters=dict(rope_parameters))
    inv_freq, attention = ROPE_INIT_FUNCTIONS[scaling.rope_type](config, "cpu")
    positions = torch.arange(300, dtype=torch.float32)  # beyond the original 32 / 64 positions
    theirs = torch.outer(positions, inv_freq)
    base = int(rope_parameters["rope_theta"])
    with megatron_on_cpu():
        if scaling.rope_type == "linear":
            ours = RotaryEmbedding(HEAD_DIM, 1.0, rotary_base=base, seq_len_interpolation_factor=scaling["factor"],
                                   use_cpu_initialization=True).get_freqs_non_repeated(300)
            expected_attention = 1.0
        else:
            megatron = YarnRotaryEmbedding(HEAD_DIM, rotary_base=base, use_cpu_initialization=True,
                                           scaling_factor=scaling["factor"],
                                           original_max_position_embeddings=scaling["original_max_position_embeddings"],
                                           beta_fast=scaling["beta_fast"], beta_slow=scaling["beta_slow"],
                                           mscale=scaling["mscale"], mscale_all_dim=scaling["mscale_all_dim"],
                                           correction_range_round_to_int=scaling["truncate"])
            ours = megatron.get_emb(300)[0][:, 0, 0, : HEAD_DIM // 2]
            expected_attention = _yarn_get_concentration_factor(scaling["factor"], scaling["mscale"],
                                                                 scaling["mscale_all_dim"])
    assert torch.equal(theirs, ours)
    assert attention == expected_attention


@pytest.mark.parametrize("flags, message", [
    (["--rotary-percent", "0.5"], r"trained with --rotary-percent 0\.5, which a Hugging Face Llama cannot express"),
    (["--rotary-interleaved"], r"trained with --rotary-interleaved, which"),
    (["--use-rope-scaling"], r"trained with --use-rope-scaling, which"),
    (["--no-rope-freq", "2"], r"trained with --no-rope-freq 2, which"),
    (["--position-embedding-type", "yarn", "--rotary-percent", "0.5"], r"--rotary-percent 0\.5"),
    (["--position-embedding-type", "learned_absolute"], r"not a Llama \(RoPE or YaRN"),
])
def test_megatron_settings_a_llama_cannot_express_are_refused(flags, message):
    with pytest.raises(ShapeError, match=message):
        LlamaShape.from_megatron_args(parsed(flags))


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, r"RoPE scaling 'dynamic' has no megatron counterpart"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, r"RoPE scaling 'llama3' has no megatron counterpart"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, r"partial_rotary_factor 0\.5: a megatron Llama rotates"),
    ({"rope_type": "linear", "factor": 2.5}, r"factor 2\.5: megatron's --rotary-seq-len-interpolation-factor takes an "
                                             r"integer"),
    ({"rope_type": "linear"}, r"'linear' RoPE scaling needs factor \(megatron's --rotary-seq-len-interpolation"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.0},
     r"attention_factor 1\.0: megatron's YaRN derives it from --rotary-scaling-factor, --mscale and --mscale-all-dim "
     r"\(1\.13\d+ for these\)"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0},
     r"key 'low_freq_factor' of 'yarn' RoPE has no megatron counterpart"),
])
def test_hugging_face_scalings_megatron_cannot_run_are_refused(params, message):
    with pytest.raises(ShapeError, match=message):
        RopeScaling.from_hf({"rope_theta": 10000.0, **params}, "m/config.json")


def test_a_yarn_attention_factor_megatron_reproduces_is_read_as_its_mscales():
    # transformers' own rule without attention_factor (both mscales used only when both are non-zero) ...
    read = RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "mscale": 0.707})
    assert (read["mscale"], read["mscale_all_dim"]) == (1.0, 0.0)
    # ... and the default factor given explicitly.
    read = RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "mscale": 0.707, "attention_factor": mscale(4.0)})
    assert (read["mscale"], read["mscale_all_dim"]) == (1.0, 0.0)


def test_harpe_with_yarn_is_refused_with_pi_accepted():
    yarn = RopeScaling.from_hf(MAPPING["yarn"][1])
    with pytest.raises(ShapeError, match=r"HARPE bases with 'yarn' RoPE scaling: .*pretrain_harpe.py refuses"):
        refuse_with_harpe(yarn, [1e4, 2e4])
    refuse_with_harpe(yarn, None)
    refuse_with_harpe(RopeScaling.from_hf(MAPPING["pi"][1]), [1e4, 2e4])


# --- through both conversions, logits against megatron's forward ---------------------------------------------------

ROPE = {  # max_position_embeddings 256; YaRN's original 64; the tokens run to 300
    "pi": {"rope_type": "linear", "factor": 4, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
             "rope_theta": 10000.0},
    "harpe-pi": {"rope_type": "linear", "factor": 4, "rope_theta": 10000.0},
}
BASES = "1e4,2.5e5,7e5,3e6"  # one per query group


@pytest.mark.parametrize("kind", sorted(ROPE))
def test_scaled_rope_exports_with_megatrons_logits(tmp_path, kind, megatron_single_process):
    from integration.test_convert import make_hf, megatron_logits
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    hf = make_hf(tmp_path / "hf", "gqa", rope_parameters=dict(ROPE[kind]), max_position_embeddings=256)
    harpe = ["--harpe-bases", BASES] if kind == "harpe-pi" else []
    assert hf_to_megatron(["--hf-dir", hf, "--out", str(tmp_path / "m"), "--format", "torch", "--dtype", "fp32",
                           "--transformer-impl", "local", *harpe]) == 0
    tokens = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(7))
    ours, args = megatron_logits(tmp_path / "m", tokens)
    if kind == "yarn":
        assert (args.position_embedding_type, args.rotary_scaling_factor, args.yarn_original_max_position_embeddings,
                args.yarn_beta_fast) == ("yarn", 4.0, 64, 16.0)
    else:
        assert args.rotary_seq_len_interpolation_factor == 4
    plain = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 10000.0})
    assert (ours - plain.eval()(tokens).logits).abs().max().item() > 1e-3  # the scaling matters
    if not harpe:  # the import: megatron's forward is transformers' of the original
        original = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(tokens).logits
        assert (ours - original).abs().max().item() <= 1e-5

    assert megatron_to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "export")]) == 0
    written = json.loads((tmp_path / "export" / "config.json").read_text())["rope_parameters"]
    assert {k: written[k] for k in ROPE[kind]} == ROPE[kind]
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32,
                                                    trust_remote_code=bool(harpe)).eval()
    assert (ours - exported(tokens).logits).abs().max().item() <= 1e-5


def test_the_harpe_config_runs_plain_rope_or_interpolation_only():
    from megatron_harpe.hf.configuration_harpe_llama import HarpeLlamaConfig

    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    HarpeLlamaConfig(harpe_bases=[1e4, 2e4], rope_parameters=dict(ROPE["pi"]), **sizes)
    with pytest.raises(ValueError, match=r"rope_type 'yarn': HARPE runs plain RoPE \('default'\) or position "):
        HarpeLlamaConfig(harpe_bases=[1e4, 2e4], rope_parameters=dict(ROPE["yarn"]), **sizes)
