"""The atomic write of an export directory: everything is written into a hidden temporary
sibling (.NAME.tmp-PID-*), which is renamed into place only once the export validated. A failed
or interrupted export leaves the previous directory (or none) untouched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path


def check_output(output_dir: Path, force: bool) -> None:
    """Refuse an existing non-directory, and a non-empty directory unless `force`."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"{output_dir} exists and is not a directory; choose another --output")
        if any(output_dir.iterdir()) and not force:
            raise FileExistsError(
                f"{output_dir} already exists and is not empty; pass --force (force=True) to overwrite it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(output_dir: Path) -> None:
    """Delete the hidden siblings (.NAME.tmp-PID-*, .NAME.old-PID-*) that an export killed mid-way
    (SIGKILL, power loss) left behind; a sibling whose process still runs is another export's."""
    for p in output_dir.parent.glob(f".{glob.escape(output_dir.name)}.*-*"):
        kind, _, rest = p.name[len(output_dir.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _publishable(tmp: Path) -> None:
    """mkdtemp makes a private (0700) directory: give the export the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _commit(tmp: Path, output_dir: Path) -> None:
    """Rename `tmp` to `output_dir`; an existing `output_dir` is moved aside first and restored if
    the rename fails."""
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        if old is not None:
            os.rename(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(output_dir: Path, force: bool):
    """Yield a temporary sibling directory of `output_dir` to write the export into. On a normal
    exit it replaces `output_dir` (re-checked: another process may have filled it meanwhile); on an
    exception it is deleted and `output_dir` stays as it was."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output_dir)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        _publishable(tmp)
        check_output(output_dir, force)  # still free (or forced) after the long export?
        _commit(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
