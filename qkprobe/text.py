"""Sentence sets for text models: reading them, their sample ids, tokenized batches, prefix tokens.

``qkprobe run hf:DIR --text FILE`` records one row per sentence. A sentence is one non-blank line of
a text file, or the ``--text-field`` of one JSON object per line (``datasets``-style JSONL). Its
sample id is ``"<file>:<line>"``: the file relative to the *text root* recorded in the run file
(the file's folder, resolved), the line counted from 1, so a resume counts each sentence once
however the file is spelled, and ``qkprobe report`` finds the sentence again.

Batches are padded to their longest sentence; the HF adapter turns the attention mask into the
event's token mask, so padding never enters a statistic (a sentence's row is the one it gets
alone). Prefix tokens: a leading special token the tokenizer adds (BERT's ``[CLS]``) is a prefix
token, left out of the maps like a ViT's class token. ``[SEP]`` is not: it sits at another position
in every sentence, and it is a real token the model attends to (often a sink), so it is a map
token like any word.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import QKProbeError

#: Metadata keys of a text run: the folder sample ids are relative to, and the JSONL field read.
TEXT_ROOT = "text_root"
TEXT_FIELD = "text_field"
#: File suffixes read as JSON lines even without ``--text-field``.
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Sentence:
    """One sentence of a text file: its line (from 1) and its text."""

    line: int
    text: str


def is_jsonl(path: str, field: Optional[str]) -> bool:
    """Whether ``path`` is read as JSON lines: a ``--text-field`` is given or the suffix says so."""
    return field is not None or str(path).lower().endswith(JSONL_SUFFIXES)


def read_sentences(path: str, field: Optional[str] = None) -> List[Sentence]:
    """The sentences of a text file (one a non-blank line) or of a JSONL file (``field`` of each
    object, default ``"text"``), with their line numbers."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise QKProbeError(f"The text file {path} does not exist; pass a file with one sentence a line "
                           f"(or JSON lines with --text-field).")
    jsonl = is_jsonl(path, field)
    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            text = _json_text(line, field or "text", path, number) if jsonl else line.rstrip("\r\n")
            if text.strip():
                out.append(Sentence(number, text))
    if not out:
        raise QKProbeError(f"The text file {path} holds no sentences; write one sentence a line.")
    return out


def _json_text(line: str, field: str, path: str, number: int) -> str:
    try:
        obj = json.loads(line)
    except ValueError:
        raise QKProbeError(f"Line {number} of {path} is not JSON; give one JSON object a line, or a plain "
                           f"text file without --text-field.") from None
    value = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise QKProbeError(f"Line {number} of {path} has no text field {field!r}; name the field that holds "
                           f"the sentence with --text-field.")
    return value


def sentence_at(path: str, line: int, field: Optional[str] = None) -> Optional[str]:
    """The sentence on ``line`` (from 1) of ``path`` as :func:`read_sentences` reads it; None where
    the file or the line is gone or holds no sentence."""
    try:
        with open(path, encoding="utf-8") as fh:
            for number, text in enumerate(fh, 1):
                if number == line:
                    if is_jsonl(path, field):
                        text = _json_text(text, field or "text", path, number)
                    text = text.rstrip("\r\n")
                    return text if text.strip() else None
    except (OSError, UnicodeDecodeError, QKProbeError):
        return None
    return None


def sentence_ids(path: str, sentences: Sequence[Sentence], root: Optional[str] = None) -> Tuple[str, List[str]]:
    """``(text root, ids)``: ids ``"<file relative to the root>:<line>"``; the root is ``root``
    (the one a resumed run recorded) or the file's folder, resolved."""
    full = os.path.realpath(os.path.expanduser(str(path)))
    root = os.path.realpath(root) if root else os.path.dirname(full)
    rel = os.path.relpath(full, root).replace(os.sep, "/")
    return root, [f"{rel}:{s.line}" for s in sentences]


def parse_id(sample_id: str) -> Optional[Tuple[str, int]]:
    """``(file, line)`` of a sentence id, None for anything else."""
    name, _, line = str(sample_id).rpartition(":")
    return (name, int(line)) if name and line.isdigit() else None


def resolve_sentence(sample_id: str, root: Optional[str], field: Optional[str] = None) -> Optional[str]:
    """The sentence a sample id names, read from its file under ``root`` (never outside it)."""
    parsed = parse_id(sample_id)
    if not root or parsed is None or "\0" in sample_id:
        return None
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, parsed[0]))
    if os.path.commonpath([root, path]) != root:
        return None
    return sentence_at(path, parsed[1], field)


def is_tokenizer(obj: Any) -> bool:
    """Whether a model's preprocessing is a Hugging Face tokenizer (callable, with ``tokenize``)."""
    return callable(obj) and hasattr(obj, "tokenize") and hasattr(obj, "convert_ids_to_tokens")


def tokenizer_prefix_tokens(tokenizer) -> int:
    """1 when the tokenizer starts every sequence with a special token (BERT's ``[CLS]``), else 0."""
    ids = tokenizer("a")["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return 1 if ids and ids[0] in special else 0


def encode(tokenizer, texts: Sequence[str], device: Any = "cpu") -> Dict[str, Any]:
    """The model's keyword inputs for ``texts``: padded to the longest, truncated to the model's
    maximum length, on ``device``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def batches(sentences: Sequence[Sentence], ids: Sequence[str], size: int) -> Iterator[Tuple[List[str], List[str]]]:
    """(texts, ids) in file order, ``size`` at a time."""
    for start in range(0, len(sentences), max(1, int(size))):
        chunk = sentences[start:start + size]
        yield [s.text for s in chunk], list(ids[start:start + size])
