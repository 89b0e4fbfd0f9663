import os

import pytest

from megatron_harpe.outputs import OutputExistsError, atomic_output_dir, atomic_output_files


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


def test_existing_output_needs_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(str(target)):
            pass
    assert (target / "mine.txt").read_text() == "user data"
    with atomic_output_dir(str(target), force=True) as tmp:
        open(f"{tmp}/new.txt", "w").write("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


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
