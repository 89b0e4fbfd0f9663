"""Misuse rows for the top-level commands (megatron_harpe/cli.py): harpe-select-bases (tools/select_bases.py) and
harpe-demo (tools/harpe_demo.py). Exit 2: a flag, value or combination refused; 1: an output that may not be
replaced."""

from pathlib import Path

from misuse import Misuse

SELECT = "megatron_harpe.cli:select_bases"
DEMO = "megatron_harpe.cli:demo"


def _user_picture(tmp: Path, _) -> dict:
    (tmp / "mine.png").write_bytes(b"\x89PNG the user's own picture")
    return {}


def _quickstart_folder_with_notes(tmp: Path, _) -> dict:
    (tmp / "q" / "demo").mkdir(parents=True)  # an earlier quickstart's output, beside the user's own notes
    (tmp / "q" / "NOTES.md").write_text("my notes")
    return {}


def _user_folder(tmp: Path, _) -> dict:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "NOTES.md").write_text("the user's notes\n")
    return {}


def _user_file(tmp: Path, _) -> dict:
    (tmp / "notes.txt").write_text("the user's notes\n")
    return {}


def _folder_named_png(tmp: Path, _) -> dict:
    (tmp / "pictures.png").mkdir()
    return {}


CASES = [
    # select_bases: a flag the chosen source of bases does not read is an error, not ignored (item 5).
    Misuse("5", "select-bases-num-bases-contradicts-the-preset", ["--bases", "paper-llama2-7b", "--num-bases", "8"],
           message=r"--bases paper-llama2-7b holds 32 bases but --num-bases is 8: drop --num-bases", entry=SELECT,
           exit_code=2),
    Misuse("5", "select-bases-base-min-with-a-list", ["--bases", "1e6,2e6", "--base-min", "1e4"],
           message=r"--base-min set the base search of --strategy, but --bases 1e6,2e6 is a list", entry=SELECT,
           exit_code=2),
    Misuse("5", "select-bases-descending-with-a-list", ["--bases", "1e6,2e6", "--descending"],
           message=r"--descending set the base search of --strategy.*drop --bases and pass --strategy", entry=SELECT,
           exit_code=2),
    Misuse("5", "select-bases-stride-with-uniform", ["--strategy", "uniform", "--stride", "1e4"],
           message=r"--strategy uniform does not use it: drop --stride", entry=SELECT, exit_code=2),
    Misuse("5", "select-bases-force-without-plot", ["--num-bases", "4", "--force"],
           message=r"no --plot was given: drop --force", entry=SELECT, exit_code=2),
    Misuse("5", "select-bases-list-and-strategy", ["--bases", "1e6,2e6", "--strategy", "uniform"],
           message=r"argument --strategy: not allowed with argument --bases", entry=SELECT, exit_code=2),
    Misuse("5", "select-bases-unknown-option", ["--num-heads", "32"],
           message=r"unrecognized arguments: --num-heads", entry=SELECT, exit_code=2),
    Misuse("5", "select-bases-negative-base", ["--bases=-1e4"],
           message=r"every RoPE base must be a positive finite number", entry=SELECT, exit_code=2),
    Misuse("5", "select-bases-plot-not-png", ["--bases", "1e6", "--plot", "{tmp}/bases.pdf"],
           message=r"--plot writes a PNG picture: give a path ending in \.png", entry=SELECT, exit_code=2),
    Misuse("1", "select-bases-plot-exists", ["--bases", "1e6", "--plot", "{tmp}/mine.png"], setup=_user_picture,
           message=r"mine\.png exists: choose another path or pass --force", entry=SELECT, exit_code=1),
    Misuse("6", "select-bases-plot-is-a-directory", ["--bases", "1e6", "--plot", "{tmp}/pictures.png", "--force"],
           setup=_folder_named_png,
           message=r"pictures\.png is a directory: give the picture's file name", entry=SELECT, exit_code=1),
    Misuse("6", "select-bases-plot-under-a-file", ["--bases", "1e6", "--plot", "{tmp}/notes.txt/bases.png"],
           setup=_user_file, message=r"notes\.txt is a file, not a directory", entry=SELECT, exit_code=1),
    Misuse("5", "select-bases-abbreviation-refused", ["--strat", "uniform"],
           message=r"unrecognized arguments: --strat", entry=SELECT, exit_code=2),
    Misuse("5", "select-bases-abf-base-without-plot", ["--num-bases", "4", "--abf-base", "1e6"],
           message=r"--abf-base only draws in the --plot picture, and no --plot was given: drop --abf-base",
           entry=SELECT, exit_code=2),

    # harpe-demo: its output folder holds only what it wrote (item 1).
    Misuse("5", "demo-unknown-option", ["--outdir", "{tmp}/demo"],
           message=r"unrecognized arguments: --outdir", entry=DEMO, exit_code=2),
    Misuse("1", "demo-out-holds-user-files", ["--out", "{tmp}/mine"], setup=_user_folder,
           message=r"mine exists and is not empty: choose another output directory or pass --force", entry=DEMO,
           exit_code=1),
    Misuse("1", "demo-force-keeps-user-files", ["--out", "{tmp}/mine", "--force"], setup=_user_folder,
           message=r"mine was not written by megatron-harpe .*NOTES\.md", entry=DEMO, exit_code=1),
    Misuse("1", "demo-out-is-a-file", ["--out", "{tmp}/notes.txt", "--force"], setup=_user_file,
           message=r"notes\.txt exists and is not a directory", entry=DEMO, exit_code=1),

    Misuse("1", "quickstart-force-keeps-the-users-files", ["bash", "examples/quickstart_cpu.sh", "{tmp}/q", "--force"],
           setup=_quickstart_folder_with_notes,
           message=r"holds NOTES\.md, which the quickstart did not write: --force would delete them", exit_code=1),
]
