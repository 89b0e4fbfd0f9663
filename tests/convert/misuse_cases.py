"""Misuse rows for the conversion commands (tools/convert_*.py, tools/reshard_megatron.py)."""

from misuse import Misuse

CASES = [
    Misuse("5", "unknown-option-refused", ["--hf-dir", "{tmp}/hf", "--out", "{tmp}/out", "--tensor-parallel", "2"],
           message=r"unrecognized arguments: --tensor-parallel", entry="megatron_harpe.convert.cli:hf_to_megatron",
           exit_code=2),
]
