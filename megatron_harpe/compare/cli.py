"""``harpe-compare-methods`` (tools/compare_methods.py): HARPE against the paper's baselines at equal token budgets.

Only argparse at import (``--help`` loads neither torch nor megatron).
"""

from __future__ import annotations

import argparse

from megatron_harpe.command import UsageError, run_command

PRESET_NAMES = ("ci", "cpu", "gpu", "paper")


def compare_methods_parser() -> argparse.ArgumentParser:
    from megatron_harpe.compare.methods import METHODS

    p = argparse.ArgumentParser(
        description="Pretrain a small Llama at L0 on retrieval-rich synthetic text, extend it to 8 x L0 with each "
                    "method (HARPE peak-valley and uniform, ABF single- and multi-stage, PI, YaRN, none) at the same "
                    "tokens, export each to Hugging Face and evaluate passkey, NIAH, RULER NIAH and perplexity from "
                    "L0 to 2 x L1. Resumable: finished steps are skipped.", allow_abbrev=False)
    p.add_argument("--preset", choices=PRESET_NAMES, required=True,
                   help="ci: minutes, checks the chain (its numbers mean nothing); cpu: ~1 hour on 2 cores; gpu: one "
                        "H200; paper: print the Llama-2-7B cluster commands")
    p.add_argument("--out", help="results directory (required but for --preset paper); an unfinished run resumes")
    p.add_argument("--seeds", type=int, help="stage-1 seeds per method (default: the preset's)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--force", action="store_true", help="start --out over (removes only what this command wrote)")
    return p


def compare_methods(argv: list[str] | None = None) -> int:
    args = compare_methods_parser().parse_args(argv)

    def body() -> None:
        from megatron_harpe.compare.methods import check_methods

        methods = check_methods([m for m in args.methods.split(",") if m])
        if args.seeds is not None and args.seeds < 1:
            raise UsageError(f"--seeds {args.seeds}: give at least 1")
        if args.preset == "paper":
            if args.out or args.force:
                raise UsageError("--preset paper prints commands and writes nothing: drop --out / --force")
            from megatron_harpe.compare.paper import commands

            print(commands(methods, args.seeds or 1))
            return
        if not args.out:
            raise UsageError(f"--preset {args.preset} needs --out DIR")
        from megatron_harpe.compare.presets import preset
        from megatron_harpe.compare.runner import Runner, prepare_out

        chosen = preset(args.preset)
        if args.seeds is not None:
            chosen = chosen.with_seeds(args.seeds)
        prepare_out(args.out, chosen.summary(), args.force)
        Runner(chosen, args.out, methods).run()

    return run_command(body)
