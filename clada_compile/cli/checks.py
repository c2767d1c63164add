"""Checks of the commands' paths and files that run BEFORE the model is loaded.

Loading and tracing a model takes ~40 s: a bad --output or a damaged profile must not be found
only after that. Each check raises ValueError (FileExistsError, FileNotFoundError where that is the case) naming the
flag, the value and the fix; run_cli turns it into one `error:` line, exit status 2.
"""

from __future__ import annotations

from pathlib import Path


def _file_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is not a directory (nothing can be created under it)."""
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_file(path, flag: str) -> Path:
    """A file the command will write: not a directory, and its folder can be created."""
    path = Path(path).expanduser()
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise ValueError(f"{flag} {path}: {blocker} is a file, not a directory; choose another {flag}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name like {path / 'out.json'}")
    return path


def check_output_dir(path, flag: str, force: bool) -> Path:
    """A directory the command will (re)create: not a file, not under a file, and empty unless --force."""
    path = Path(path).expanduser()
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise ValueError(f"{flag} {path}: {blocker} is a file, not a directory; choose another {flag}")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{flag} {path} exists and is a file, not a directory; choose another {flag}")
        if any(path.iterdir()) and not force:  # FileExistsError, as export_onnx raises for the same case
            raise FileExistsError(f"{flag} {path} already exists and is not empty; pass --force to replace it "
                             f"or choose another {flag}")
    return path


def check_input_file(path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{flag} {path} {what}")
    return path


def check_model(spec: str) -> None:
    """The model exists and is one we can optimize (reads only its config, loads no weights)."""
    from clada_compile.models import check_spec

    check_spec(spec)


def check_profile(profile) -> None:
    """A calibration profile that is missing or not a profile: said now, not after loading."""
    if profile is not None:
        from clada_compile.calibrate import load_profile

        load_profile(profile)


def check_fractions(text: str, flag: str) -> list[float]:
    """"0.4,0.5" -> [0.4, 0.5], each in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise ValueError(f"{flag} must be fractions in (0, 1], got {text!r}")
    return values


def check_threads(threads) -> None:
    """--threads: None (torch's default) or >= 1; torch.set_num_threads(-1) would be a traceback."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
