"""Each method's stage-1 training, read back through megatron's own argument parser."""

import pytest

from megatron_harpe.compare.methods import ABF_STAGES, METHODS, stages
from megatron_harpe.compare.presets import BASE0, PRESETS
from megatron_harpe.compare.runner import pretrain_flags
from megatron_harpe.megatron_args import parse_megatron_args

PRESET = PRESETS["cpu"]


def _args(method: str, stage_index: int = 0):
    stage = stages(method, PRESET)[stage_index]
    flags = pretrain_flags(PRESET, stage, PRESET.stage1, save="/x/save", load="/x/stage0", data_prefix="/x/data",
                           tokenizer="/x/tokenizer.model", seed=1001, metrics_file="/x/m.jsonl")
    return parse_megatron_args(flags, world_size=1, rank=0, local_world_size=1)


def test_every_method_trains_at_l1_from_stage_0_with_the_same_data_and_seed():
    for method in METHODS:
        args = _args(method, -1)
        assert args.seq_length == PRESET.l1, method
        assert args.pretrained_checkpoint == "/x/stage0" and args.data_path == ["/x/data"], method
        assert args.seed == 1001 and args.harpe_engine == "compact", method
        assert args.lr == float(PRESET.stage1.lr) and args.lr_decay_style == "constant", method
        assert (args.num_layers, args.hidden_size, args.num_query_groups) == (
            PRESET.shape.num_layers, PRESET.shape.hidden_size, PRESET.shape.num_query_groups), method


@pytest.mark.parametrize("method, expected", [
    ("none", dict(position_embedding_type="rope", rotary_base=int(BASE0), rotary_seq_len_interpolation_factor=None,
                  harpe_bases=None)),
    ("abf", dict(position_embedding_type="rope", rotary_base=int(PRESET.abf_base),
                 rotary_seq_len_interpolation_factor=None, harpe_bases=None)),
    ("pi", dict(position_embedding_type="rope", rotary_base=int(BASE0),
                rotary_seq_len_interpolation_factor=PRESET.extension)),
    ("yarn", dict(position_embedding_type="yarn", rotary_base=int(BASE0), rotary_scaling_factor=PRESET.extension,
                  yarn_original_max_position_embeddings=PRESET.l0)),
    ("harpe_uniform", dict(position_embedding_type="rope", harpe_strategy="uniform",
                           harpe_base_min=PRESET.harpe_range[0], harpe_base_max=PRESET.harpe_range[1])),
    ("harpe_peak_valley", dict(position_embedding_type="rope", harpe_strategy="peak_valley",
                               harpe_base_min=PRESET.harpe_range[0], harpe_base_max=PRESET.harpe_range[1],
                               harpe_stride=PRESET.harpe_range[2])),
])
def test_rope_of_each_method(method, expected):
    args = _args(method)
    assert {k: getattr(args, k) for k in expected} == expected


def test_multistage_abf_spends_the_same_tokens_at_the_same_tokens_per_step():
    single, multi = stages("abf", PRESET)[0], stages("abf_multistage", PRESET)
    assert [s.seq_length for s in multi] == [PRESET.l1 // 4, PRESET.l1 // 2, PRESET.l1]
    per_step = {s.seq_length * s.global_batch_size for s in multi}
    assert per_step == {single.seq_length * single.global_batch_size}
    assert sum(s.train_iters for s in multi) == single.train_iters
    bases = [_args("abf_multistage", i).rotary_base for i in range(len(multi))]
    assert bases == [round(PRESET.abf_base * f, -2) for _, f in ABF_STAGES]  # 1/5, 2/5, 1 of the ABF base
    assert bases[-1] == _args("abf").rotary_base


def test_stage_0_decays_its_learning_rate_as_the_preset_says():
    from megatron_harpe.compare.methods import Stage

    stage = Stage(PRESET.l0, PRESET.stage0.global_batch_size, PRESET.stage0.iters, ("--rotary-base", "10000"))
    flags = pretrain_flags(PRESET, stage, PRESET.stage0, save="/x/s", load="", data_prefix="/x/d",
                           tokenizer="/x/t.model", seed=1234, metrics_file="/x/m.jsonl")
    args = parse_megatron_args(flags, world_size=1, rank=0, local_world_size=1)
    assert (args.lr_decay_style, args.min_lr, args.lr) == ("cosine", float(PRESET.stage0.min_lr),
                                                           float(PRESET.stage0.lr))
    assert (args.seq_length, args.rotary_base, args.harpe_bases) == (PRESET.l0, 10000, None)
