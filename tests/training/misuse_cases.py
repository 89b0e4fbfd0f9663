"""Misuse rows for the launch scripts (examples/pretrain_*.sh) and pretrain_harpe.py (issue 15, items 3-6)."""

from misuse import Misuse

from utils import TINY_ARGV

# What a dry run needs besides the layout; the flash-attn probe's answer is pinned (it depends on the machine).
DRY = {"DATA_PATH": "data/mixture", "TOKENIZER_MODEL": "llama2/tokenizer.model", "ATTENTION_BACKEND": "flash"}
HARPE = "examples/pretrain_llama2_harpe.sh"
LAUNCH_SCRIPTS = ["pretrain_llama2_harpe.sh", "pretrain_llama2_13b_harpe.sh", "pretrain_llama2_70b_harpe.sh",
                  "pretrain_llama2_abf.sh", "pretrain_llama2_abf_multistage.sh", "pretrain_llama2_pi.sh",
                  "pretrain_llama2_yarn.sh"]


def layout(name, message, script=HARPE, **settings):
    """A dry run whose shape x layout x bases the trainer refuses: one line, status 2, no command printed."""
    return Misuse("3", f"dry-run-{name}", ["bash", script, "--dry-run"], message=message, exit_code=2,
                  env={**DRY, **settings}, timeout=300)


def bad_checkpoint(tmp, _):
    """A --load folder whose tracker file megatron cannot read (it then calls a bare sys.exit())."""
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "latest_checkpointed_iteration.txt").write_text("not-an-iteration\n")
    return {}


def tiny_run_with_checkpoints(tmp, _):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("20\n")
    return {}


ENTRY = "megatron_harpe.training.entry:main"

CASES = [
    layout("70b-with-32-bases", r"refuses these settings: HARPE needs one RoPE base per query group: got 32 bases for "
           r"8 query groups.*MODEL=70b", script="examples/pretrain_llama2_70b_harpe.sh",
           HARPE_ARGS="--harpe-bases paper-llama2-7b"),
    layout("tp-beyond-a-node", r"--tensor-model-parallel-size 16 is more than the 8 GPUs of a node.*TP=16",
           NNODES="2", TP="16"),
    layout("heads-not-divisible-by-tp", r"32 attention heads do not divide by --tensor-model-parallel-size 3", TP="3"),
    layout("seq-not-divisible-by-2cp", r"--seq-length 131071 does not divide by 2 x --context-parallel-size 2",
           SEQ_LENGTH="131071"),
    layout("world-not-divisible", r"8 ranks do not divide by TP x PP x CP = 4 x 4 x 2 = 32", PP="4"),
    layout("global-batch-not-divisible", r"--global-batch-size 33 does not divide by --micro-batch-size 1 x data "
           r"parallel 2", NNODES="2", GBS="33"),
    layout("megatron-validate-args", r"refuses these settings: Megatron-LM's validate_args rejected the flags",
           EXTRA_ARGS="--fp16"),   # --bf16 and --fp16 together: megatron's own assert, through the same check
    *[Misuse("3", f"typo-{script}", ["bash", f"examples/{script}", "--dryrun"],
             message=rf"unknown argument '--dryrun' \(see {script} --help", exit_code=2) for script in LAUNCH_SCRIPTS],
    Misuse("3", "megatron-flag-without-double-dash", ["bash", HARPE, "--dry-run", "--lr", "1e-4"],
           message=r"unknown argument '--lr'.*flags go after --", exit_code=2, env=DRY),
    Misuse("3", "tiny-second-outdir", ["bash", "examples/pretrain_tiny_harpe_cpu.sh", "{tmp}/a", "{tmp}/b", "--dry-run"],
           message=r"a second OUTDIR '.*/b'", exit_code=2),
    Misuse("3", "tiny-force-keeps-checkpoints-on-a-bad-layout",
           ["bash", "examples/pretrain_tiny_harpe_cpu.sh", "{tmp}/run", "--force"], setup=tiny_run_with_checkpoints,
           message=r"4 attention heads do not divide by --tensor-model-parallel-size 3", exit_code=2,
           env={"TP": "3", "NPROC": "3"}, timeout=300),
    Misuse("4", "failed-load-is-not-success", ["{python}", "pretrain_harpe.py", *TINY_ARGV, "--load", "{tmp}/ckpt"],
           setup=bad_checkpoint, message=r"could not load the checkpoint \(--load .*/ckpt", exit_code=1, timeout=300),
    Misuse("5", "negative-looking-value-one-line", [*TINY_ARGV, "--harpe-bases", "-1e4"], entry=ENTRY,
           message=r"^pretrain_harpe.py: error: argument --harpe-bases: expected one argument \(see pretrain_harpe.py "
                   r"--help\)\n$", exit_code=2),
    Misuse("5", "unknown-megatron-flag-one-line", [*TINY_ARGV, "--num-layer", "3"], entry=ENTRY,
           message=r"^pretrain_harpe.py: error: unrecognized arguments: --num-layer 3 \(see pretrain_harpe.py --help\)",
           exit_code=2),
    Misuse("6", "bad-bases-before-the-argument-dump", [*TINY_ARGV, "--harpe-bases=-1e4,2e4,3e4,4e4"], entry=ENTRY,
           message=r"^pretrain_harpe.py: error: .*positive[^\n]*\n$", exit_code=2),
]
