"""io.py: files appear whole under their name or not at all."""

from __future__ import annotations

import json

import pytest

from clada_compile.io import atomic_write, atomic_write_json, atomic_write_text


def test_writes_and_replaces(tmp_path):
    p = tmp_path / "sub" / "t.md"
    atomic_write_text(p, "one\n")
    atomic_write_text(p, "two\n")
    assert p.read_text() == "two\n"
    atomic_write_json(tmp_path / "r.json", {"a": 1, "p": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "p": str(tmp_path)}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json", "sub"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "plot.png"
    p.write_bytes(b"old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, write)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["plot.png"]
    assert seen[0].endswith(".png")  # the suffix stays: matplotlib picks the format from it


def test_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a file name like"):
        atomic_write_text(tmp_path, "x")
