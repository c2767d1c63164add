"""Atomic file writes: a file appears whole under its name, or not at all.

The file is first written into a hidden temporary sibling (same directory, so os.replace is atomic
on one file system) and renamed over the target at the end. Whole directories (an ONNX export, a
clada-generate run) are staged the same way by exporters/publish.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path, write) -> Path:
    """Call write(tmp) for a temporary sibling of `path` (a str path ending like `path`, so tools
    that infer a format from the suffix still do) and rename it over `path` once write returns;
    on an error nothing is left behind."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name like {path / ('out' + (path.suffix or '.json'))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_json(path, obj, indent: int = 2) -> Path:
    """Write `obj` as JSON to `path` atomically; values JSON cannot hold (paths, dtypes) are
    written as their str()."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)

    return atomic_write(path, write)


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
