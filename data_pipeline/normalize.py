"""Text normalization before filtering and dedup: Unicode NFC and whitespace.

Whitespace rules keep code intact (indentation is never touched, the first line's included):
CRLF/CR -> LF, exotic spaces (NBSP, thin space, ...) -> ' ', zero-width characters removed,
trailing spaces stripped per line, runs of 3+ newlines -> 2, blank lines at the start and
whitespace at the end of the document removed. NFC comes last, so that no removed character
leaves a decomposed pair behind: normalize(normalize(t)) == normalize(t).
"""
from __future__ import annotations

import re
import unicodedata

_EXOTIC_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _EXOTIC_SPACES.sub(" ", text))
    text = _TRAILING.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    text = _LEADING_BLANK_LINES.sub("", text).rstrip()
    return unicodedata.normalize("NFC", text)
