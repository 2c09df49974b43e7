"""engine/core/run_dir.py's file writes: atomic (the old file or the new one, never half) and durable (synced
before the rename, the folder after)."""

import os

import pytest

from transfer_engine.engine.core.run_dir import replace_atomic, write_atomic


def test_a_write_that_fails_leaves_the_earlier_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("earlier")
    with pytest.raises(UnicodeEncodeError):  # Fails before a byte is written: a direct write had emptied it.
        write_atomic(str(path), "new \ud800")
    assert path.read_text() == "earlier"

    def half_then_fail(staged):
        with open(staged, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomic(str(path), half_then_fail)
    assert path.read_text() == "earlier" and os.listdir(tmp_path) == ["results.json"]


def test_files_are_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """What a power loss needs (it cannot be simulated here): without it, a renamed but empty file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    path = str(tmp_path / "results.json")
    write_atomic(path, "{}")
    partial = str(tmp_path / ".partial-results.json")
    assert events == [("fsync", partial), ("replace", path), ("fsync", str(tmp_path))]

    events.clear()

    def saved_model(staged):
        os.makedirs(os.path.join(staged, "variables"))
        for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
            with open(os.path.join(staged, name), "w") as f:
                f.write("x")

    folder = str(tmp_path / "saved_model")
    replace_atomic(folder, saved_model)
    synced = [path for kind, path in events if kind == "fsync"]
    partial = str(tmp_path / ".partial-saved_model")
    assert {os.path.join(partial, "saved_model.pb"), os.path.join(partial, "variables", "variables.index"),
            partial}.issubset(synced[:-1])
    assert events[-2:] == [("replace", folder), ("fsync", str(tmp_path))]


def test_a_full_temporary_directory_is_named_when_staging_fails(tmp_path, monkeypatch):
    """replace_atomic stages in the temporary directory: a write failing there for want of space names it,
    not the target's device (which may well have space); other failures pass through unchanged."""
    import errno
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    with pytest.raises(OSError) as raised:
        replace_atomic(str(tmp_path / "model.keras"), full)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == f"{tmp_path / 'tmp'} (the temporary directory, TMPDIR)"

    def broken(path):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        replace_atomic(str(tmp_path / "model.keras"), broken)
    assert not (tmp_path / "model.keras").exists()
