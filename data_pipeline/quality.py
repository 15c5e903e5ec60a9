"""Document quality rules in the spirit of Gopher (Rae et al. 2021, App. A) and C4.

Each rule is a named predicate over one document that says why it should be *removed*;
`first_failing_rule` returns the first failing rule name (or None), so prepare can count
removals per rule. Thresholds are Gopher's published values unless noted.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))


@dataclasses.dataclass
class QualityConfig:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_ratio: float = 0.1          # ('#' + '...' + '…') per word
    min_alpha_word_fraction: float = 0.8   # words with at least one letter
    max_non_alpha_char_fraction: float = 0.4   # C4-style: chars neither letter nor whitespace
    min_stop_words: int = 2
    max_dup_line_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    # top n-gram: share of characters covered by the most frequent n-gram, n = 2, 3, 4
    max_top_ngram_char_fraction: tuple = (0.20, 0.18, 0.16)
    # duplicated n-grams: share of characters in n-grams seen more than once, n = 5..10
    max_dup_ngram_char_fraction: tuple = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    languages: tuple = ("en",)             # empty = no language filter
    min_language_prob: float = 0.5


@dataclasses.dataclass
class _Doc:
    text: str
    words: list
    lines: list
    language: tuple | None = None      # (ISO code, probability), once _detect has run


def _word_count(doc, cfg):
    return not cfg.min_words <= len(doc.words) <= cfg.max_words


def _mean_word_length(doc, cfg):
    if not doc.words:
        return True
    mean = sum(map(len, doc.words)) / len(doc.words)
    return not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len


def _symbol_ratio(doc, cfg):
    symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
    return symbols / max(1, len(doc.words)) > cfg.max_symbol_ratio


def _alpha_words(doc, cfg):
    alpha = sum(1 for w in doc.words if _ALPHA.search(w))
    return alpha / max(1, len(doc.words)) < cfg.min_alpha_word_fraction


def _non_alpha_chars(doc, cfg):
    chars = [c for c in doc.text if not c.isspace()]
    non_alpha = sum(1 for c in chars if not c.isalpha())
    return non_alpha / max(1, len(chars)) > cfg.max_non_alpha_char_fraction


def _stop_words(doc, cfg):
    # The stop words are English: where the language rule keeps other languages too, they
    # judge the documents identified as English only (--languages=de kept no document).
    if cfg.languages and tuple(cfg.languages) != ("en",) and _detect(doc)[0] != "en":
        return False
    found = sum(1 for w in doc.words if w.lower().strip(".,;:!?\"'()") in _STOP_WORDS)
    return found < cfg.min_stop_words


def _duplicate_lines(doc, cfg):
    lines = [ln for ln in doc.lines if ln.strip()]
    if not lines:
        return False
    counts = collections.Counter(lines)
    dup_lines = sum(c for c in counts.values() if c > 1)
    dup_chars = sum(len(ln) * c for ln, c in counts.items() if c > 1)
    total_chars = sum(len(ln) for ln in lines)
    return (dup_lines / len(lines) > cfg.max_dup_line_fraction
            or dup_chars / max(1, total_chars) > cfg.max_dup_line_char_fraction)


def _ngrams(words, n):
    return list(zip(*(words[i:] for i in range(n))))


def _ngram_repetition(doc, cfg):
    total_chars = sum(map(len, doc.words))
    if total_chars == 0:
        return False
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram_char_fraction):
        grams = _ngrams(doc.words, n)
        if not grams:
            break
        gram, count = collections.Counter(grams).most_common(1)[0]
        if count > 1 and sum(map(len, gram)) * count / total_chars > limit:
            return True
    for n, limit in zip(range(5, 11), cfg.max_dup_ngram_char_fraction):
        grams = _ngrams(doc.words, n)
        counts = collections.Counter(grams)
        covered = [False] * len(doc.words)
        for i, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[i:i + n] = [True] * n
        dup_chars = sum(len(w) for w, c in zip(doc.words, covered) if c)
        if dup_chars / total_chars > limit:
            return True
    return False


_LANG_ID = None


def _detect(doc) -> tuple:
    """(ISO code, probability) of the document's language, computed once per document."""
    global _LANG_ID
    if doc.language is None:
        if _LANG_ID is None:  # loading the bundled model takes ~0.5 s: only when it is used
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
            _LANG_ID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        doc.language = _LANG_ID.classify(doc.text[:20_000])
    return doc.language


def _language(doc, cfg):
    if not cfg.languages:
        return False
    lang, prob = _detect(doc)
    return lang not in cfg.languages or prob < cfg.min_language_prob


RULES: dict[str, Callable[[_Doc, QualityConfig], bool]] = {
    "word_count": _word_count,
    "mean_word_length": _mean_word_length,
    "symbol_ratio": _symbol_ratio,
    "alpha_words": _alpha_words,
    "non_alpha_chars": _non_alpha_chars,
    "stop_words": _stop_words,
    "duplicate_lines": _duplicate_lines,
    "ngram_repetition": _ngram_repetition,
    "language": _language,
}


def first_failing_rule(text: str, rules: tuple[str, ...], cfg: QualityConfig) -> str | None:
    """Name of the first rule in `rules` that removes `text`, or None to keep it."""
    doc = _Doc(text, _WORD.findall(text), text.split("\n"))
    for name in rules:
        if RULES[name](doc, cfg):
            return name
    return None
