"""Misuse rows for tools/plan_parallelism.py and its --emit-env under eval (issue 15, item 3)."""

from misuse import Misuse

DRY = {"DATA_PATH": "data/mixture", "TOKENIZER_MODEL": "llama2/tokenizer.model", "ATTENTION_BACKEND": "flash"}
PLAN = "{python} tools/plan_parallelism.py --gpu-memory 80 --emit-env"

CASES = [
    # eval of a failed plan must fail (set -e stops): before, eval "" succeeded and the default layout launched.
    Misuse("3", "emit-env-failure-stops-eval",
           ["bash", "-c", f'set -e; eval "$({PLAN} --model 70b --gpus 8)"; examples/pretrain_llama2_harpe.sh --dry-run'],
           message=r"error: no layout fits", exit_code=1, env=DRY),
    Misuse("3", "emit-env-bad-flag-stops-eval",
           ["bash", "-c", f'set -e; eval "$({PLAN} --model 7b --gpus 8 --tp 3x)"; examples/pretrain_llama2_harpe.sh --dry-run'],
           message=r"argument --tp: invalid int value: '3x'", exit_code=1, env=DRY),
    # A 7B plan left in the environment does not launch the 70B script on the 7B plan's one node at TP 4.
    Misuse("3", "plan-for-another-model-refused",
           ["bash", "-c", f'eval "$({PLAN} --model 7b --gpus 8)"; examples/pretrain_llama2_70b_harpe.sh --dry-run'],
           message=r"plan for MODEL=7b, and this launch is MODEL=70b.*unset MODEL NNODES", exit_code=2, env=DRY),
    Misuse("3", "plan-for-another-model-refused-by-the-tiny-script",
           ["bash", "-c", f'eval "$({PLAN} --model 7b --gpus 8)"; examples/pretrain_tiny_harpe_cpu.sh {{tmp}}/run'],
           message=r"plan for MODEL=7b, and this launch is MODEL=tiny", exit_code=2),
    Misuse("3", "emit-env-abbreviation-refused", ["--model", "7b", "--gpus", "8", "--gpu-memory", "80", "--emit"],
           entry="megatron_harpe.planning.cli:main", message=r"unrecognized arguments: --emit", exit_code=2),
]
