"""Choose (or read) HARPE bases, print one per head, optionally draw their waveforms."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_harpe.bases import STRATEGIES, parse_bases, select_bases, waveform_ripple


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bases", help="explicit list ('1e6,2.5e6,...') or a preset such as paper-llama2-7b")
    src.add_argument("--strategy", choices=STRATEGIES, default="peak_valley")
    p.add_argument("--num-bases", type=int, default=32, help="one per query group (32 for Llama-2-7B, 8 for 70B)")
    p.add_argument("--base-min", type=float, default=1e6)
    p.add_argument("--base-max", type=float, default=5e6)
    p.add_argument("--stride", type=float, default=30000, help="peak_valley candidate stride")
    p.add_argument("--descending", action="store_true", help="assign the largest base to the first head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--target-length", type=int, default=131072, help="tokens the waveform covers")
    p.add_argument("--plot", metavar="PNG", help="write the waveforms picture here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plot and os.path.exists(args.plot) and not args.force:
            raise ValueError(f"{args.plot} exists: choose another path or pass --force")
        if args.bases:
            bases = parse_bases(args.bases)
        else:
            bases = select_bases(args.num_bases, args.strategy, args.base_min, args.base_max, head_dim=args.head_dim,
                                 target_length=args.target_length, stride=args.stride, descending=args.descending)
        ripple = waveform_ripple(bases, head_dim=args.head_dim, target_length=args.target_length)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"bases": bases, "waveform_ripple": ripple}))
    else:
        for head, base in enumerate(bases):
            print(f"{head:3d}  {base:14.1f}")
        print(f"waveform ripple (lower = peaks and valleys interleave better): {ripple:.2f}")
    if args.plot:
        from megatron_harpe.plots import plot_bases

        tmp = args.plot + ".partial.png"
        plot_bases(bases, tmp, head_dim=args.head_dim, target_length=args.target_length)
        os.replace(tmp, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
