"""Misuse rows for the conversion commands (tools/convert_*.py, tools/reshard_megatron.py)."""

import tiny_checkpoints
from misuse import Misuse


HF_TO_MEGATRON = "megatron_harpe.convert.cli:hf_to_megatron"
MEGATRON_TO_HF = "megatron_harpe.convert.cli:megatron_to_hf"
RESHARD = "megatron_harpe.convert.cli:reshard"


def run_dir(tmp, get):
    """A training run's folder: the checkpoint beside the user's metrics."""
    tiny_checkpoints.copy_of("torch", tmp / "run" / "checkpoints", get)
    (tmp / "run" / "metrics.jsonl").write_text('{"iteration": 1, "loss": 5.7}\n')
    return {"run": str(tmp / "run")}


def hf_dir(tmp, get):
    return {"hf": str(tiny_checkpoints.copy_of("hf", tmp / "hf", get))}


def checkpoint(kind):
    def setup(tmp, get):
        return {"ckpt": str(tiny_checkpoints.copy_of(kind, tmp / "ckpt", get))}
    return setup


def users_folder(tmp, get):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "NOTES.md").write_text("my notes\n")
    return checkpoint("torch")(tmp, get)


def our_export_with_notes(tmp, get):
    tiny_checkpoints.copy_of("export", tmp / "export", get)
    (tmp / "export" / "NOTES.md").write_text("my notes on this export\n")
    return checkpoint("torch")(tmp, get)


def tokenizer_beside(tmp, get):
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer.model").write_bytes(b"not read: refused before")
    return checkpoint("torch")(tmp, get)


def pickle_payload(tmp, get):
    names = checkpoint("torch")(tmp, get)
    tiny_checkpoints.add_payload(tmp / "ckpt", tmp / "PAYLOAD_RAN")  # tmp must stay unchanged: the marker may not appear
    return names


def without_vocab_size(tmp, get):
    import torch

    names = checkpoint("torch")(tmp, get)
    file = tiny_checkpoints.rank_file(tmp / "ckpt")
    state = torch.load(file, weights_only=True)
    state["args"].vocab_size = None  # as a run that took its vocabulary from a tokenizer records it
    torch.save(state, file)
    return names


def yarn_checkpoint_with(**changes):
    """The tiny torch checkpoint as a YaRN run with ``changes`` to its saved args would have saved it."""
    def setup(tmp, get):
        import torch

        names = checkpoint("torch")(tmp, get)
        file = tiny_checkpoints.rank_file(tmp / "ckpt")
        state = torch.load(file, weights_only=True)
        for name, value in dict(position_embedding_type="yarn", rotary_scaling_factor=4.0,
                                yarn_original_max_position_embeddings=64, **changes).items():
            setattr(state["args"], name, value)
        torch.save(state, file)
        return names
    return setup


def hf_with_rope(rope_parameters):
    def setup(tmp, get):
        import json

        names = hf_dir(tmp, get)
        config_file = tmp / "hf" / "config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "rope_parameters": rope_parameters}))
        return names
    return setup


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def truncated(kind, file):
    def setup(tmp, get):
        names = checkpoint(kind)(tmp, get)
        tiny_checkpoints.truncate(tmp / "ckpt" / "release" / file)
        return names
    return setup


def bad_tokenizer(tmp, get):
    (tmp / "bad.model").write_bytes(b"this is not a sentencepiece model")
    return checkpoint("torch")(tmp, get)


OUT_OUTSIDE = r"choose an --out outside the inputs"
PICKLE = r"pass --allow-pickle only if you trust it"
TORCH_DIST = r"torch_dist metadata is a pickle .*; pass --allow-pickle if you trust .*ckpt"

CASES = [
    Misuse("5", "unknown-option-refused", ["--hf-dir", "{tmp}/hf", "--out", "{tmp}/out", "--tensor-parallel", "2"],
           message=r"unrecognized arguments: --tensor-parallel", entry="megatron_harpe.convert.cli:hf_to_megatron",
           exit_code=2),
    # 1: nothing a user has is replaced or deleted
    Misuse("1", "export-out-holds-the-checkpoint", ["--megatron-dir", "{run}/checkpoints", "--out", "{run}", "--force"],
           message=r"--out .*run holds --megatron-dir .*" + OUT_OUTSIDE, entry=MEGATRON_TO_HF, setup=run_dir,
           exit_code=1),
    Misuse("1", "export-out-is-the-checkpoint", ["--megatron-dir", "{run}/checkpoints", "--out", "{run}/checkpoints",
                                                 "--force"],
           message=r"--out .*checkpoints is --megatron-dir .*" + OUT_OUTSIDE, entry=MEGATRON_TO_HF, setup=run_dir,
           exit_code=1),
    Misuse("1", "export-out-inside-the-checkpoint", ["--megatron-dir", "{run}/checkpoints", "--out",
                                                     "{run}/checkpoints/hf"],
           message=r"is inside --megatron-dir .*" + OUT_OUTSIDE, entry=MEGATRON_TO_HF, setup=run_dir, exit_code=1),
    Misuse("1", "export-out-holds-the-tokenizer", ["--megatron-dir", "{ckpt}", "--tokenizer-model",
                                                   "{tmp}/tok/tokenizer.model", "--out", "{tmp}/tok", "--force"],
           message=r"holds --tokenizer-model .*" + OUT_OUTSIDE, entry=MEGATRON_TO_HF, setup=tokenizer_beside,
           exit_code=1),
    Misuse("1", "import-out-is-the-hf-dir", ["--hf-dir", "{hf}", "--out", "{hf}", "--force"],
           message=r"is --hf-dir .*" + OUT_OUTSIDE, entry=HF_TO_MEGATRON, setup=hf_dir, exit_code=1),
    Misuse("1", "import-out-inside-the-hf-dir", ["--hf-dir", "{hf}", "--out", "{hf}/megatron"],
           message=r"is inside --hf-dir .*" + OUT_OUTSIDE, entry=HF_TO_MEGATRON, setup=hf_dir, exit_code=1),
    Misuse("1", "reshard-out-holds-the-checkpoint", ["--megatron-dir", "{run}/checkpoints", "--out", "{run}", "--tp",
                                                     "2", "--pp", "1", "--force"],
           message=r"holds --megatron-dir .*" + OUT_OUTSIDE, entry=RESHARD, setup=run_dir, exit_code=1),
    Misuse("1", "force-on-a-users-folder", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/mine", "--force"],
           message=r"not written by megatron-harpe .*NOTES\.md.*remove it yourself", entry=MEGATRON_TO_HF,
           setup=users_folder, exit_code=1),
    Misuse("1", "force-on-our-export-holding-a-users-file", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/export",
                                                             "--force"],
           message=r"holds NOTES\.md, which convert_megatron_to_hf did not write: --force would delete them",
           entry=MEGATRON_TO_HF, setup=our_export_with_notes, exit_code=1),
    Misuse("1", "out-is-a-file", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/mine/NOTES.md", "--force"],
           message=r"NOTES\.md exists and is not a directory", entry=MEGATRON_TO_HF, setup=users_folder, exit_code=1),
    # 2: nothing from a checkpoint is unpickled without --allow-pickle
    Misuse("2", "export-pickle-payload-refused", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/hf"],
           message=r"model_optim_rng\.pt holds objects beyond tensors and Megatron's own types "
                   r"\(Unsupported global: GLOBAL _io\.open\): .*" + PICKLE,
           entry=MEGATRON_TO_HF, setup=pickle_payload, exit_code=1),
    Misuse("2", "reshard-pickle-payload-refused", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/r", "--tp", "2",
                                                   "--pp", "1"],
           message=r"model_optim_rng\.pt holds objects beyond tensors .*" + PICKLE, entry=RESHARD,
           setup=pickle_payload, exit_code=1),
    Misuse("2", "export-torch-dist-needs-allow-pickle", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/hf"],
           message=TORCH_DIST, entry=MEGATRON_TO_HF, setup=checkpoint("torch_dist"), exit_code=1),
    Misuse("2", "reshard-torch-dist-needs-allow-pickle", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/r", "--tp", "2",
                                                          "--pp", "1"],
           message=TORCH_DIST, entry=RESHARD, setup=checkpoint("torch_dist"), exit_code=1),
    # 5: no flag silently ignored, no advice the command rejects
    Misuse("5", "base-search-flag-without-strategy", ["--hf-dir", "{tmp}/hf", "--out", "{tmp}/out",
                                                      "--harpe-base-min", "1e4"],
           message=r"--harpe-base-min set the base search of --harpe-strategy: add --harpe-strategy",
           entry=HF_TO_MEGATRON, exit_code=2),
    Misuse("5", "base-search-flag-with-explicit-bases", ["--hf-dir", "{tmp}/hf", "--out", "{tmp}/out",
                                                         "--harpe-bases", "1e4,2e4,3e4,4e4", "--harpe-stride", "1e4"],
           message=r"--harpe-stride set the base search of --harpe-strategy", entry=HF_TO_MEGATRON, exit_code=2),
    Misuse("5", "reshard-advises-its-own-vocab-flag", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/r", "--tp", "2",
                                                       "--pp", "1"],
           message=r"do not record the true vocabulary size .*: pass --vocab-size\n", entry=RESHARD,
           setup=without_vocab_size),
    # RoPE settings the other side cannot express: refused by name, not dropped (a dropped one shifts the logits)
    Misuse("5", "export-yarn-with-partial-rotary", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/hf"],
           message=r"trained with --rotary-percent 0\.5, which a Hugging Face Llama cannot express",
           entry=MEGATRON_TO_HF, setup=yarn_checkpoint_with(rotary_percent=0.5), exit_code=1),
    Misuse("5", "import-yarn-attention-factor-megatron-cannot-take",
           ["--hf-dir", "{hf}", "--out", "{tmp}/m", "--format", "torch"],
           message=r"attention_factor 1\.0: megatron's YaRN derives it from --rotary-scaling-factor, --mscale and "
                   r"--mscale-all-dim", entry=HF_TO_MEGATRON, setup=hf_with_rope({**YARN, "attention_factor": 1.0}),
           exit_code=1),
    Misuse("5", "import-harpe-bases-onto-yarn", ["--hf-dir", "{hf}", "--out", "{tmp}/m", "--format", "torch",
                                                 "--harpe-bases", "1e4,2e4,3e4,4e4"],
           message=r"HARPE bases with 'yarn' RoPE scaling: .*convert the model without bases", entry=HF_TO_MEGATRON,
           setup=hf_with_rope(YARN), exit_code=2),  # bad usage, as the trainer's refusal of the same pair
    # 6: a damaged input is one line naming the file
    Misuse("6", "export-truncated-pt", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/hf"],
           message=r"model_optim_rng\.pt is damaged or truncated .*re-copy the checkpoint", entry=MEGATRON_TO_HF,
           setup=truncated("torch", "mp_rank_00/model_optim_rng.pt")),
    Misuse("6", "export-truncated-distcp", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/hf", "--allow-pickle"],
           message=r"__0_0\.distcp is truncated \(\d+ of at least \d+ bytes\): the checkpoint is damaged, re-copy it",
           entry=MEGATRON_TO_HF, setup=truncated("torch_dist", "__0_0.distcp")),
    Misuse("6", "export-bad-tokenizer-model", ["--megatron-dir", "{ckpt}", "--out", "{tmp}/hf", "--tokenizer-model",
                                               "{tmp}/bad.model"],
           message=r"--tokenizer-model .*bad\.model: not a sentencepiece model .*give a sentencepiece model", entry=MEGATRON_TO_HF,
           setup=bad_tokenizer, exit_code=1),
]
