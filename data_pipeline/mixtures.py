"""Ettin's per-phase data mixtures (recipe §5.1: the paper's table, billions of tokens).

A mixture entry `ettin:ROOT` expands, for the config's phase, to one `ROOT/<dir>:<billions>`
entry per source of that phase, where <dir> is ROOT's subdirectory whose name matches the
source (case, '-', '_' and spaces ignored: "DCLM-Dolmino" matches dclm_dolmino). Every source
of the phase must have a directory and every directory must be a source of the phase, or the
expansion fails naming both lists: silently training on a different mixture is worse.
The cross-objective phase continues on the decay (ProLong) data, as Ettin did.
"""
from __future__ import annotations

import os
import re

PHASE_TOKENS_B = {
    "pretrain": {"dclm": 837.2, "cc_head": 356.6, "starcoder": 263.9, "reddit": 80.3,
                 "pes2o": 57.3, "arxiv": 28.0, "stackexchange": 19.6, "tulu_flan": 16.6,
                 "open_web_math": 12.7, "algebraic_stackexchange": 12.6, "cc_news": 7.3,
                 "wikipedia": 7.3, "books": 5.3},
    "ext": {"dclm_dolmino": 175.5, "starcoder": 38.4, "reddit": 6.2, "pes2o": 8.3, "arxiv": 4.1,
            "stackexchange_dolmino": 2.7, "tulu_flan": 2.4, "math_dolmino": 10.4,
            "wikipedia": 0.5, "books": 0.8},
    "decay": {"dclm_dolmino": 26.0, "code_repos": 20.2, "arxiv": 3.0,
              "stackexchange_dolmino": 4.0, "tulu_flan": 4.1, "math_dolmino": 5.0,
              "wikipedia": 3.0, "books": 10.5, "textbooks": 0.5},
}
PHASE_TOKENS_B["cross"] = PHASE_TOKENS_B["decay"]
PREFIX = "ettin:"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def expand_root(root: str, phase: str) -> list[tuple[str, float]]:
    """[(ROOT/dir, billions of tokens)] for the phase; raises naming what does not match."""
    if phase not in PHASE_TOKENS_B:
        raise ValueError(f"ettin mixture: unknown phase {phase!r}; known {list(PHASE_TOKENS_B)}")
    if not os.path.isdir(root):
        raise ValueError(f"config.data.mixture {PREFIX}{root}: no such directory")
    table = PHASE_TOKENS_B[phase]
    by_key = {_key(name): name for name in table}
    dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    matched = {by_key[_key(d)]: d for d in dirs if _key(d) in by_key}
    extra = [d for d in dirs if _key(d) not in by_key]
    missing = [name for name in table if name not in matched]
    if extra or missing:
        raise ValueError(
            f"config.data.mixture {PREFIX}{root} for phase {phase!r}: directories without a "
            f"source in the phase table {extra}; sources without a directory {missing} "
            f"(phase sources: {list(table)})")
    return [(os.path.join(root, matched[name]), table[name]) for name in table]


def expand(spec: str, phase: str) -> str:
    """The mixture string with every `ettin:ROOT` entry replaced by its phase sources."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.startswith(PREFIX):
            out.extend(f"{path}:{weight}" for path, weight in
                       expand_root(entry[len(PREFIX):], phase))
        elif entry:
            out.append(entry)
    return ",".join(out)
