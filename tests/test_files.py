"""hire.files: every write is whole or absent, and nobody's file is replaced unasked."""

import pytest

from hire.errors import HireError, OverwriteError
from hire.files import atomic_dir, atomic_files, atomic_path, atomic_write_json, atomic_write_text, refuse_overwrite


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text('{"new": ')  # half a file, then the process is interrupted
            raise KeyboardInterrupt
    assert path.read_text() == '{\n  "old": 1\n}\n'
    assert _leftovers(tmp_path) == []


def test_atomic_write_creates_missing_parents(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "c.txt", "x")
    assert path.read_text() == "x"


def test_refuse_overwrite_names_the_path_and_the_flag(tmp_path):
    refuse_overwrite(tmp_path / "new.json", force=False)  # nothing there: fine
    (tmp_path / "t.json").write_text("mine")
    with pytest.raises(OverwriteError, match=r"t.json exists \(file\); pass --force to overwrite it or choose another --plot"):
        refuse_overwrite(tmp_path / "t.json", force=False, flag="--plot")
    refuse_overwrite(tmp_path / "t.json", force=True)
    assert issubclass(OverwriteError, HireError) and issubclass(OverwriteError, FileExistsError)


def test_atomic_dir_appears_whole_and_replaces_only_when_asked(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    with pytest.raises(RuntimeError):  # a failed export leaves the previous directory as it was
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "config.json").write_text("2")
            raise RuntimeError("conversion failed")
    assert (out / "config.json").read_text() == "1"
    with pytest.raises(OverwriteError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("3")
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "weights.safetensors").write_text("4")
    assert sorted(p.name for p in out.iterdir()) == ["weights.safetensors"]
    assert _leftovers(tmp_path) == []


def test_atomic_files_replaces_files_one_by_one_and_keeps_the_rest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_text("ckpt")
    (run / "model.safetensors").write_text("old")
    with atomic_files(run) as tmp:
        (tmp / "model.safetensors").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tokenizer.json").write_text("tok")
    assert (run / "checkpoint.pt").read_text() == "ckpt"
    assert (run / "model.safetensors").read_text() == "new"
    assert (run / "sub" / "tokenizer.json").read_text() == "tok"
    with pytest.raises(RuntimeError):
        with atomic_files(run) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("interrupted")
    assert (run / "model.safetensors").read_text() == "new"
    assert _leftovers(tmp_path) == []
