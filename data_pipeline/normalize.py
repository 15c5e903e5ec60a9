"""Text normalization before filtering and dedup: Unicode NFC and whitespace.

Whitespace rules keep code intact (indentation inside a line is never touched):
CRLF/CR -> LF, exotic spaces (NBSP, thin space, ...) -> ' ', trailing spaces stripped per line,
runs of 3+ newlines -> 2, leading/trailing blank space of the document removed.
"""
from __future__ import annotations

import re
import unicodedata

_EXOTIC_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _EXOTIC_SPACES.sub(" ", text))
    text = _TRAILING.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()
