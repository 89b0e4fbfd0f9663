"""HF Llama <-> Megatron conversion: bitwise round trips at every layout, logits against transformers, HARPE export."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from megatron_harpe.convert.cli import hf_to_megatron, megatron_to_hf, reshard
from megatron_harpe.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {  # tiny random Llamas: MHA, and GQA with 2 heads per group
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4),
}


def make_hf(path, kind, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=300, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPES[kind])
    fields.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf(root / kind, kind) for kind in SHAPES}


def same_weights(a, b):
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


LAYOUTS = [(kind, fmt, tp, pp) for kind in SHAPES for tp in (1, 2, 4) for pp in (1, 2) for fmt in ("torch", "torch_dist")]


@pytest.mark.parametrize("kind, fmt, tp, pp", LAYOUTS)
def test_round_trip_is_bitwise(tmp_path, hf_dirs, kind, fmt, tp, pp):
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert hf_to_megatron(["--hf-dir", hf_dirs[kind], "--out", str(meg), "--tp", str(tp), "--pp", str(pp),
                           "--format", fmt, "--dtype", "fp32"]) == 0
    trust = ["--allow-pickle"] if fmt == "torch_dist" else []  # its .metadata is a pickle
    assert megatron_to_hf(["--megatron-dir", str(meg), "--out", str(back), *trust]) == 0
    assert same_weights(hf_dirs[kind], back)
    config = json.load(open(back / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 300


def test_bf16_round_trip_and_torch_layout(tmp_path, hf_dirs):
    import torch as t

    assert hf_to_megatron(["--hf-dir", hf_dirs["gqa"], "--out", str(tmp_path / "m"), "--tp", "4", "--pp", "2",
                           "--format", "torch", "--dtype", "bf16"]) == 0
    shard = t.load(tmp_path / "m" / "release" / "mp_rank_03_001" / "model_optim_rng.pt", weights_only=False)
    assert shard["args"].tensor_model_parallel_size == 4 and shard["args"].padded_vocab_size == 512
    # TE names for the fused norms by default; 4 groups / TP 4 = one group per rank: (2 q + k + v) x 16 rows.
    assert shard["model"]["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (4 * 16, 128)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shard["model"]
    assert shard["model"]["output_layer.weight"].shape == (128, 128)  # 512 padded rows / 4
    assert (tmp_path / "m" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert megatron_to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "b")]) == 0
    back = load_file(tmp_path / "b" / "model.safetensors")
    orig = load_file(os.path.join(hf_dirs["gqa"], "model.safetensors"))
    assert all(torch.equal(back[k], orig[k].to(torch.bfloat16)) for k in orig)


def megatron_logits(root, tokens, allow_pickle=False):
    from megatron_harpe.cpu_compat import megatron_on_cpu
    from megatron_harpe.checkpoint_model import load_model

    model, args = load_model(str(root), allow_pickle=allow_pickle)
    with torch.no_grad(), megatron_on_cpu():
        position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
        logits = model(tokens, position_ids, None)
    return logits[..., :300], args


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_logits_equal_transformers(tmp_path, hf_dirs, fmt, megatron_single_process):
    from transformers import LlamaForCausalLM

    assert hf_to_megatron(["--hf-dir", hf_dirs["gqa"], "--out", str(tmp_path / "m"), "--format", fmt, "--dtype",
                           "fp32", "--transformer-impl", "local"]) == 0
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(3))
    ours, args = megatron_logits(tmp_path / "m", tokens, allow_pickle=fmt == "torch_dist")
    assert args.harpe_bases is None
    reference = LlamaForCausalLM.from_pretrained(hf_dirs["gqa"], dtype=torch.float32).eval()(tokens).logits
    assert (ours - reference).abs().max().item() <= 1e-5


def test_harpe_export_runs_in_transformers(tmp_path, hf_dirs, megatron_single_process):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    bases = "1e4,2.5e5,7e5,3e6"  # one per query group of the GQA model
    assert hf_to_megatron(["--hf-dir", hf_dirs["gqa"], "--out", str(tmp_path / "m"), "--dtype", "fp32",
                           "--harpe-bases", bases]) == 0
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(4))
    ours, args = megatron_logits(tmp_path / "m", tokens, allow_pickle=True)  # torch_dist
    assert args.harpe_bases == [1e4, 2.5e5, 7e5, 3e6]
    assert megatron_to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "hf"), "--allow-pickle"]) == 0
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_harpe_llama.HarpeLlamaForCausalLM"
    harpe = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    theirs = harpe(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    plain = LlamaForCausalLM.from_pretrained(hf_dirs["gqa"], dtype=torch.float32).eval()(tokens).logits
    assert (plain - theirs).abs().max().item() > 1e-3  # the bases matter
    generated = harpe.generate(tokens[:1, :10], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 16) and generated[0, 10].item() == harpe(tokens[:1, :10]).logits[0, -1].argmax()
    # Round trip: the exported HARPE model converts back with its bases.
    assert hf_to_megatron(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "m2"), "--dtype", "fp32"]) == 0
    assert megatron_logits(tmp_path / "m2", tokens, allow_pickle=True)[1].harpe_bases == [1e4, 2.5e5, 7e5, 3e6]


@pytest.mark.parametrize("flags", [["--harpe-strategy", "peak_valley", "--harpe-base-min", "1e4", "--harpe-base-max",
                                    "4e4", "--harpe-stride", "2e3", "--harpe-target-length", "4096"],
                                   ["--harpe-strategy", "uniform", "--harpe-descending"],
                                   ["--harpe-bases", "4e4,1e4,3e4,2e4"]])
def test_conversion_resolves_the_bases_as_the_trainer(tmp_path, hf_dirs, flags):
    """The same base flags choose the same bases in conversion and in pretrain_harpe.py's parse."""
    from megatron_harpe.checkpoint_layout import load_checkpoint_args
    from megatron_harpe.megatron_args import parse_megatron_args
    from utils import TINY_ARGV

    assert hf_to_megatron(["--hf-dir", hf_dirs["mha"], "--out", str(tmp_path / "m"), "--format", "torch",
                           "--seq-length", "64", *flags]) == 0
    saved = load_checkpoint_args(str(tmp_path / "m")).harpe_bases
    trainer = parse_megatron_args(TINY_ARGV + flags).harpe_bases  # the same 4 heads of width 16, --seq-length 64
    assert saved == trainer and len(saved) == 4 and all(isinstance(b, float) for b in saved)


def test_harpe_with_equal_bases_is_llama(tmp_path, hf_dirs):
    """The HF HARPE model against transformers' own Llama: equal bases must give Llama's logits."""
    from megatron_harpe.hf.configuration_harpe_llama import HarpeLlamaConfig
    from megatron_harpe.hf.modeling_harpe_llama import HarpeLlamaForCausalLM
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(hf_dirs["gqa"], dtype=torch.float32).eval()
    config = HarpeLlamaConfig(harpe_bases=[10000.0] * 4, **plain.config.to_dict())
    harpe = HarpeLlamaForCausalLM(config).eval()
    harpe.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(harpe(tokens).logits, plain(tokens).logits, atol=1e-6, rtol=0)


def test_reshard(tmp_path, hf_dirs):
    assert hf_to_megatron(["--hf-dir", hf_dirs["mha"], "--out", str(tmp_path / "a"), "--tp", "2", "--pp", "2",
                           "--format", "torch", "--dtype", "fp32"]) == 0
    assert reshard(["--megatron-dir", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--tp", "4", "--pp", "1"]) == 0
    assert os.path.isfile(tmp_path / "b" / "release" / "mp_rank_03" / "model_optim_rng.pt")
    assert megatron_to_hf(["--megatron-dir", str(tmp_path / "b"), "--out", str(tmp_path / "hf")]) == 0
    assert same_weights(hf_dirs["mha"], tmp_path / "hf")


def test_tokenizer_files(tmp_path, hf_dirs):
    import sentencepiece
    from transformers import AutoTokenizer

    from megatron_harpe.data.synthetic import FillerText
    from megatron_harpe.data.tokenizer import train_sentencepiece

    spm = train_sentencepiece([FillerText(s).document(2000) for s in range(3)], str(tmp_path / "tok"),
                              vocab_size=300, byte_fallback=False)  # the model's 300 rows: no room for 256 bytes
    assert hf_to_megatron(["--hf-dir", hf_dirs["mha"], "--out", str(tmp_path / "m"), "--format", "torch"]) == 0
    assert megatron_to_hf(["--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "hf"),
                           "--tokenizer-model", spm]) == 0
    text = "The river city had a garden."
    expected = sentencepiece.SentencePieceProcessor(model_file=spm).encode(text)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode(text, add_special_tokens=False) == expected


def test_bad_inputs(tmp_path, hf_dirs, capsys):
    def convert(hf_dir, out="o", *extra):
        return hf_to_megatron(["--hf-dir", str(hf_dir), "--out", str(tmp_path / out), "--format", "torch", *extra])

    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert convert(bad) == 1 and "is not a Llama" in capsys.readouterr().err
    assert convert(hf_dirs["gqa"], "o", "--tp", "8") == 2  # a --tp the model cannot take: bad usage, as the trainer
    assert "TP=8 must divide" in capsys.readouterr().err

    broken = tmp_path / "broken"
    make_hf(broken, "mha")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert convert(broken) == 1 and "not a readable safetensors file" in capsys.readouterr().err

    sharded = tmp_path / "sharded"
    make_hf(sharded, "mha")
    weights = load_file(sharded / "model.safetensors")
    os.remove(sharded / "model.safetensors")
    from safetensors.torch import save_file

    names = sorted(weights)
    save_file({k: weights[k] for k in names[:10]}, str(sharded / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: ("model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors")
                            for i, k in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert(sharded) == 1 and "model-00002-of-00002.safetensors listed in the index is missing" in \
        capsys.readouterr().err

    assert convert(hf_dirs["mha"], "done") == 0
    assert convert(hf_dirs["mha"], "done") == 1 and "pass --force" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_interrupted_conversion_leaves_nothing(tmp_path, hf_dirs, monkeypatch):
    import megatron_harpe.convert.torch_format as writers

    def fail_midway(root, read_hf, shape, args, dtype, progress=None):
        os.makedirs(os.path.join(root, "release", "mp_rank_00"))
        raise KeyboardInterrupt

    monkeypatch.setattr(writers, "write_torch", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        hf_to_megatron(["--hf-dir", hf_dirs["mha"], "--out", str(tmp_path / "o"), "--format", "torch"])
    assert os.listdir(tmp_path) == []


@pytest.mark.multirank
@pytest.mark.parametrize("start_format, extra, convert_tp, layers, train_layout", [
    ("torch_dist", "", 2, 2, dict(NPROC="2", TP="2", PP="1")),
    # The 70B route: a streamed torch-format start that Megatron itself reads and re-saves as torch_dist.
    ("torch", "--auto-detect-ckpt-format", 2, 2, dict(NPROC="2", TP="2", PP="1")),
    # torch_dist written at TP 1 x PP 1, trained at TP 2 x PP 2 (two layers a stage): megatron reshards it on load.
    ("torch_dist", "", 1, 4, dict(NPROC="4", TP="2", PP="2")),
], ids=["torch_dist-tp2", "torch-tp2-auto-detect", "torch_dist-tp1pp1-to-tp2pp2"])
def test_checkpoint_from_training_exports(tmp_path, hf_dirs, megatron_single_process, start_format, extra,
                                          convert_tp, layers, train_layout):
    """Convert -> fine-tune with the training entry (compact engine, HARPE, GQA) -> export -> transformers."""
    from transformers import AutoModelForCausalLM

    from megatron_harpe.checkpoint_layout import load_checkpoint_args

    tiny = make_hf(tmp_path / "tiny", "mha", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=layers)
    assert hf_to_megatron(["--hf-dir", tiny, "--out", str(tmp_path / "start"), "--tp", str(convert_tp), "--format",
                           start_format, "--transformer-impl", "local"]) == 0
    env = dict(os.environ, LOAD=str(tmp_path / "start"), VOCAB_SIZE="300", TRAIN_ITERS="6", WARMUP_ITERS="2",
               SAVE_INTERVAL="6", EVAL_INTERVAL="6", EVAL_ITERS="1", LOG_INTERVAL="1", MASTER_PORT=str(free_port()),
               PYTHON=os.path.join(REPO, ".venv", "bin", "python"), **train_layout,
               EXTRA_ARGS=f"--distributed-timeout-minutes 3 --num-layers {layers} {extra}")
    run = subprocess.run([os.path.join(REPO, "examples", "pretrain_tiny_harpe_cpu.sh"), str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "iter_0000006" / "metadata.json").is_file()  # saved as torch_dist
    saved = load_checkpoint_args(str(checkpoints), allow_pickle=True)  # at the layout it trained with
    assert (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size, saved.num_layers) == (
        int(train_layout["TP"]), int(train_layout["PP"]), layers)
    assert megatron_to_hf(["--megatron-dir", str(checkpoints), "--out", str(tmp_path / "hf"), "--allow-pickle"]) == 0
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(6))
    ours, args = megatron_logits(checkpoints, tokens, allow_pickle=True)
    assert args.harpe_bases is not None  # trained with the tiny script's peak-valley bases
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    assert (ours - exported(tokens).logits).abs().max().item() <= 1e-5
    # It trained from the converted weights, not from a fresh init: 6 Adam steps at lr <= 1e-3 move a weight by at
    # most ~6e-3, while an independent init differs by the init scale (std 0.02; norms: 1 against U(0.5, 1.5)).
    # Every tensor, on both pipeline stages, stays that close and moved (all trained; ~4e-3 here).
    start = load_file(os.path.join(tiny, "model.safetensors"))
    after = load_file(tmp_path / "hf" / "model.safetensors")
    moved = {k: (after[k].float() - start[k]).abs().max().item() for k in start}
    assert sorted(after) == sorted(start) and 0 < min(moved.values()) and max(moved.values()) < 0.01, moved
