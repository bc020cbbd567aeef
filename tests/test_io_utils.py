"""Atomic writes leave either the old file or the new one, never a partial one."""

import io

import pytest

from ish_tf import io_utils


def test_atomic_write_replaces_and_cleans(tmp_path):
    path = tmp_path / "a.txt"
    io_utils.atomic_write_text(str(path), "one")
    io_utils.atomic_write_text(str(path), "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_error_keeps_old_content_and_removes_temp(tmp_path):
    path = tmp_path / "a.bin"
    io_utils.atomic_write_bytes(str(path), b"old")
    with pytest.raises(RuntimeError):
        with io_utils.atomic_open(str(path), "wb") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_remove_stale_tmp(tmp_path):
    (tmp_path / ".x.jpg.abc.tmp").write_text("partial")
    (tmp_path / "keep.jpg").write_text("done")
    assert io_utils.remove_stale_tmp(str(tmp_path)) == [".x.jpg.abc.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.jpg"]


def test_progress_draws_only_when_enabled():
    buf = io.StringIO()
    for _ in io_utils.progress(range(5), desc="x", enabled=False):
        pass
    bar = io_utils.Progress(3, "work", enabled=True, stream=buf, min_interval=0)
    for _ in range(3):
        bar.update()
    bar.close()
    assert "3/3" in buf.getvalue()


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    path = tmp_path / "r.html"
    io_utils.atomic_write_text(str(path), "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
