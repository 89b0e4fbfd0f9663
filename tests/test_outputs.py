import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from megatron_harpe.outputs import (
    MANIFEST,
    OWNER,
    DiskFullError,
    OutputExistsError,
    OutputOverlapError,
    atomic_output_dir,
    atomic_output_files,
    refuse_overlap,
    sweep_stale_staging,
)

OUTPUTS_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_harpe", "outputs.py")


def write_output(target, files=("done.txt",), force=False):
    with atomic_output_dir(str(target), force=force, tool="test") as tmp:
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            open(os.path.join(tmp, name), "w").write("ours")


def test_output_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(target)) as tmp:
            (tmp_path / "out").exists() and pytest.fail("target must not exist while writing")
            open(f"{tmp}/half.txt", "w").write("x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no partial output left
    with atomic_output_dir(str(target)) as tmp:
        open(f"{tmp}/done.txt", "w").write("ok")
    assert (target / "done.txt").read_text() == "ok"
    assert json.loads((target / MANIFEST).read_text())["entries"] == ["done.txt"]
    assert not (target / OWNER).exists()


def test_existing_output_needs_force_and_force_replaces_only_our_own(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "mine.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        write_output(users)
    # --force on a folder this package did not write: refused, nothing deleted
    with pytest.raises(OutputExistsError, match=r"mine\.txt.*remove it yourself"):
        write_output(users, force=True)
    assert sorted(p.name for p in users.iterdir()) == ["mine.txt"] and (users / "mine.txt").read_text() == "user data"

    ours = tmp_path / "ours"
    write_output(ours, ["a.txt", "sub/b.txt"])
    write_output(ours, ["new.txt"], force=True)
    assert sorted(p.name for p in ours.iterdir()) == [MANIFEST, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "users"]  # no staging left beside them


@pytest.mark.parametrize("foreign", ["NOTES.md", "sub/NOTES.md", "extra/deep/file.txt"])
def test_force_refuses_what_the_tool_did_not_write(tmp_path, foreign):
    target = tmp_path / "out"
    write_output(target, ["model.safetensors", "sub/b.txt"])
    (target / foreign).parent.mkdir(parents=True, exist_ok=True)
    (target / foreign).write_text("the user's")
    shown = foreign if not foreign.startswith("extra/") else "extra"  # the outermost foreign entry is named
    with pytest.raises(OutputExistsError, match=rf"{shown}, which test did not write.*remove them yourself"):
        write_output(target, ["other.txt"], force=True)
    assert (target / foreign).read_text() == "the user's" and (target / "model.safetensors").exists()


def test_a_file_is_never_replaced_by_a_directory(tmp_path):
    target = tmp_path / "out"
    target.write_text("a user's file")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="not a directory"):
            write_output(target, force=force)
    assert target.read_text() == "a user's file"


def test_out_may_not_be_inside_or_above_an_input(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    tokenizer = run / "tok.model"
    tokenizer.write_text("spm")
    cases = [(run, "holds"), (run / "checkpoints", "is"), (run / "checkpoints" / "hf", "is inside")]
    for out, relation in cases:
        with pytest.raises(OutputOverlapError, match=rf"--out {out} {relation} --megatron-dir"):
            refuse_overlap(str(out), {"--megatron-dir": str(run / "checkpoints"), "--tokenizer-model": None})
    with pytest.raises(OutputOverlapError, match="holds --tokenizer-model"):
        refuse_overlap(str(run), {"--tokenizer-model": str(tokenizer)})
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(OutputOverlapError, match="is --megatron-dir"):  # symlinks resolved
        refuse_overlap(str(link / "checkpoints"), {"--megatron-dir": str(run / "checkpoints")})
    refuse_overlap(str(tmp_path / "elsewhere"), {"--megatron-dir": str(run / "checkpoints")})  # no error
    refuse_overlap(str(tmp_path / "run2"), {"--megatron-dir": str(run)})  # a shared prefix is not nesting
    with pytest.raises(OutputOverlapError):
        with atomic_output_dir(str(run), force=True, inputs={"--megatron-dir": str(run / "checkpoints")}):
            pytest.fail("must not start")


def test_atomic_output_files(tmp_path):
    a, b = str(tmp_path / "out" / "x.bin"), str(tmp_path / "out" / "x.idx")
    with pytest.raises(RuntimeError):
        with atomic_output_files([a, b]) as staged:
            open(staged[a], "w").write("half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path / "out") == []  # nothing, not even the staging directory
    with atomic_output_files([a, b]) as staged:
        for path in (a, b):
            open(staged[path], "w").write("one")
    assert open(a).read() == open(b).read() == "one"
    with pytest.raises(OutputExistsError, match="pass --force"):
        with atomic_output_files([a, b]):
            pass
    with atomic_output_files([a, b], force=True) as staged:
        for path in (a, b):
            open(staged[path], "w").write("two")
    assert open(a).read() == "two" and sorted(os.listdir(tmp_path / "out")) == ["x.bin", "x.idx"]


CHILD = textwrap.dedent("""
    import importlib.util, signal, sys, time
    spec = importlib.util.spec_from_file_location("outputs", sys.argv[1])
    outputs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(outputs)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a shell starts a program (not a background job's SIG_IGN)
    kind, out = sys.argv[2], sys.argv[3]
    block = outputs.atomic_output_dir(out) if kind == "dir" else outputs.atomic_output_files([out + "/x.bin"])
    with block as staging:
        path = staging + "/half.bin" if kind == "dir" else staging[out + "/x.bin"]
        open(path, "wb").write(b"x" * 100000)
        print("writing", flush=True)
        time.sleep(120)
""")


@pytest.mark.parametrize("kind", ["dir", "files"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing(tmp_path, kind, signum):
    """scancel / a SLURM time limit (SIGTERM), Ctrl-C (SIGINT): the staging goes, the process dies by the signal."""
    parent = tmp_path / "parent"
    out = parent / ("out" if kind == "dir" else "files")
    child = subprocess.Popen([sys.executable, "-c", CHILD, OUTPUTS_PY, kind, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n", child.stderr.read()
    assert [p for p in parent.rglob("*") if p.name == "half.bin" or p.name == "x.bin"]  # mid-write
    child.send_signal(signum)
    child.wait(timeout=60)
    assert child.returncode == -signum, child.stderr.read()  # the default action: exit status 128 + signum
    assert [p.name for p in parent.iterdir()] == ([] if kind == "dir" else ["files"])
    assert kind == "dir" or list(out.iterdir()) == []


def test_signal_goes_on_to_the_previous_handler(tmp_path):
    seen = []

    def record(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    try:
        with pytest.raises(SystemExit) as stopped:
            with atomic_output_dir(str(tmp_path / "out")) as tmp:
                open(f"{tmp}/half.txt", "w").write("x")
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("the signal must interrupt the block")
        assert stopped.value.code == 128 + signal.SIGTERM and seen == [signal.SIGTERM]
        assert list(tmp_path.iterdir()) == []
        assert signal.getsignal(signal.SIGTERM) is record  # the block's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stale_staging_of_a_dead_process_is_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = socket.gethostname()
        owners = {".out.partial-dead": {"pid": dead.pid, "host": host},
                  ".out.partial-alive": {"pid": alive.pid, "host": host},
                  ".out.partial-elsewhere": {"pid": dead.pid, "host": host + "-another-node"},
                  ".partial-files-dead": {"pid": dead.pid, "host": host}}
        for name, owner in owners.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / OWNER).write_text(json.dumps(owner))
            (tmp_path / name / "shard.bin").write_bytes(b"x")
        (tmp_path / ".out.partial-unknown").mkdir()  # no owner record: not ours to judge
        (tmp_path / ".notes.partial-mine.txt").write_text("a user's hidden file")
        write_output(tmp_path / "out")  # the next run sweeps
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [".notes.partial-mine.txt", ".out.partial-alive", ".out.partial-elsewhere",
                        ".out.partial-unknown", "out"]
        assert sweep_stale_staging(str(tmp_path)) == []
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_gets_the_umask_permissions(tmp_path, umask, dirs, files):
    saved = os.umask(umask)
    try:
        write_output(tmp_path / "out", ["a.txt", "sub/b.txt"])
        with atomic_output_files([str(tmp_path / "files" / "x.bin")]) as staged:
            open(staged[str(tmp_path / "files" / "x.bin")], "w").write("x")
    finally:
        os.umask(saved)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == dirs
    assert mode(tmp_path / "out" / "a.txt") == mode(tmp_path / "out" / MANIFEST) == files
    assert mode(tmp_path / "files" / "x.bin") == files


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
])
def test_full_disk_is_one_error_and_leaves_nothing(tmp_path, error):
    with pytest.raises(DiskFullError, match=r"no space left on the device .* free space there or choose another"):
        with atomic_output_dir(str(tmp_path / "out")) as tmp:
            open(f"{tmp}/half.bin", "w").write("x")
            raise error
    with pytest.raises(DiskFullError, match="no space left"):
        with atomic_output_files([str(tmp_path / "files" / "x.bin")]):
            raise error
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["files"]
