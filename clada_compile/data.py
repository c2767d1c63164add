"""Reading prompts (JSONL) and evaluation text, with errors that name the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_prompts(path, field: str = "article", limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (--data_path expects a JSONL file, one object per line)")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
        if not isinstance(row, dict):  # a list or a string would fail below with a TypeError
            raise ValueError(f"{path}:{n} holds a JSON {type(row).__name__}, not an object; --data_path expects "
                             f"one object per line, like {{\"{field}\": \"...\"}}")
        if field not in row:
            raise KeyError(f"{path}:{n} has no field {field!r} (fields: {', '.join(row)}); pass --prompt_field")
        text = str(row[field]).strip()
        if not text:
            raise ValueError(f"{path}:{n}: field {field!r} is empty")
        prompts.append(text)
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def load_text_tokens(path, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The whole text file tokenized as one stream (no special tokens) -> (N,) long."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = path.read_text()
    if max_tokens:  # tokenizing all of wikitext when a few thousand tokens are needed wastes time
        text = text[: max_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise ValueError(f"{path} is empty")
    return ids
