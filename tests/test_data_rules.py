"""Hand-checked rules of the data pipeline's pure functions: chunking (Ettin §5.2), the Gopher
quality rules, near-dedup shingling and best-fit packing. Each expectation is computed by hand
(or is a property of the documented rules), not read back from the code under test."""
import grain
import numpy as np
import pytest

from data_pipeline import chunking, dedup, packing, quality

CHUNK = chunking.ChunkConfig(chunk_size=100, min_chunk_size=30, always_skip_size=10,
                             backfill=True)
WIDTH = 98          # chunk_size - 2: room for [CLS] and [SEP]


def test_chunking_keeps_every_id_but_short_tails_and_backfills_the_last_piece():
    """For every length 1..999: pieces fit chunk_size - 2; the pieces put together are the
    document minus a non-first tail shorter than always_skip_size (10); a tail of 10..29 ids
    is backfilled so that it and the piece before it both keep >= min_chunk_size (30) ids."""
    for n in range(1, 1000):
        ids = np.arange(n, dtype=np.int32) * 7 + 3
        pieces = chunking.chunk_ids(ids, CHUNK)
        full, tail = divmod(n, WIDTH)
        kept = n - tail if full and tail < 10 else n        # a tiny non-first tail is dropped
        assert all(0 < len(p) <= WIDTH for p in pieces), n
        np.testing.assert_array_equal(np.concatenate(pieces), ids[:kept], err_msg=str(n))
        if full and 10 <= tail < 30:                        # backfilled
            assert len(pieces) == full + 1, n
            assert len(pieces[-1]) >= 30 and len(pieces[-2]) >= 30, (n, [len(p) for p in pieces])
            assert [len(p) for p in pieces[:-2]] == [WIDTH] * (full - 1), n
        else:                                               # plain cuts of 98
            want = [WIDTH] * full + ([tail] if tail and (not full or tail >= 10) else [])
            assert [len(p) for p in pieces] == want, n


def test_a_document_shorter_than_always_skip_size_is_one_piece():
    """always_skip_size drops only non-first pieces: a 5-id document must not vanish."""
    pieces = chunking.chunk_ids(np.array([11, 12, 13, 14, 15]), CHUNK)
    assert [p.tolist() for p in pieces] == [[11, 12, 13, 14, 15]]


def test_backfill_moves_a_random_amount_within_both_bounds():
    """Tail 20 after 98: the move m must satisfy 10 <= m <= 68 (last >= 30, previous >= 30).
    Over many documents (seeded by their ids) the draw spreads over that range, and no draw
    leaves either piece short."""
    moves = set()
    for seed in range(300):
        ids = np.random.default_rng(seed).integers(0, 50_000, WIDTH + 20)
        first, last = chunking.chunk_ids(ids, CHUNK)
        move = len(last) - 20
        assert 10 <= move <= 68, move
        np.testing.assert_array_equal(last, ids[WIDTH - move:])
        moves.add(move)
    assert min(moves) < 20 and max(moves) > 58        # a draw, not a constant


QCFG = quality.QualityConfig(languages=())


def _removed_by(text, rule):
    return quality.first_failing_rule(text, (rule,), QCFG) == rule


def test_top_bigram_repetition_counts_every_occurrence():
    """"alpha beta" 5 times, each followed by 3 distinct 4-char fillers: word chars total
    5*9 + 15*4 = 105; the top 2-gram covers 9*5/105 = 0.43 > 0.20, so the document goes.
    (One occurrence alone would be 9/105 = 0.086.) No 3..10-gram repeats: fillers differ."""
    fillers = iter(f"w{i:03d}" for i in range(15))
    text = " ".join(f"alpha beta {next(fillers)} {next(fillers)} {next(fillers)}"
                    for _ in range(5))
    assert _removed_by(text, "ngram_repetition")
    # The same bigram twice among 40 fillers: 18 / (18 + 160) = 0.10 <= 0.20: kept.
    fillers = [f"w{i:03d}" for i in range(40)]
    kept = " ".join(["alpha beta"] + fillers[:20] + ["alpha beta"] + fillers[20:])
    assert not _removed_by(kept, "ngram_repetition")


def test_duplicate_lines_by_character_share_use_their_own_threshold():
    """8 distinct 10-char lines and one 12-char line twice: by count 2/10 = 0.2 <= 0.3, but
    by characters 24/104 = 0.23 > max_dup_line_char_fraction 0.2: removed by characters."""
    lines = [f"unique {i:03d}" for i in range(8)] + ["repeat line!"] * 2
    assert {len(ln) for ln in lines[:8]} == {10} and len(lines[-1]) == 12
    assert _removed_by("\n".join(lines), "duplicate_lines")
    # 9 distinct 10-char lines and one 10-char line twice: by chars 20/110 = 0.18, by count
    # 2/11 = 0.18: kept.
    keep = [f"unique {i:03d}" for i in range(9)] + ["repeat 000"] * 2
    assert not _removed_by("\n".join(keep), "duplicate_lines")


def test_non_alpha_char_fraction_ignores_whitespace():
    """Whitespace is neither counted as non-alphabetic nor in the denominator: "ab  cd  ef  gh"
    has 8 non-space chars, all letters: 0/8 = 0, kept (counting its 6 spaces would give
    6/14 = 0.43 > 0.4). "ab12 cd34": 4 digits of 8 non-space chars = 0.5 > 0.4: removed;
    "abc1 def2": 2/8 = 0.25: kept."""
    assert not _removed_by("ab  cd  ef  gh", "non_alpha_chars")
    assert not _removed_by("\n".join(["    indented line of code here"] * 3), "non_alpha_chars")
    assert _removed_by("ab12 cd34", "non_alpha_chars")
    assert not _removed_by("abc1 def2", "non_alpha_chars")


def test_near_dedup_ignores_letter_case():
    """Shingles are of the lower-cased text: a Title Case text and its lower-cased copy have
    identical shingle sets (Jaccard 1) and the copy is a near duplicate."""
    text = ("The Quick Brown Fox Jumps Over The Lazy Dog While Seven Tired Wizards Quietly "
            "Watch From Behind The Old Stone Wall Near The River")
    assert dedup.jaccard(text, text.lower()) == 1.0
    near = dedup.NearDedup()
    assert not near.is_duplicate(near.signature(text))
    assert near.is_duplicate(near.signature(text.lower()))


def _pack(lengths, seq_len=8, **kw):
    """Rows from documents of the given lengths; document i holds ids 10*(i+1) + 0, 1, ..."""
    docs = [{"ids": np.arange(n, dtype=np.int32) + 10 * (i + 1), "source": i, "key": i}
            for i, n in enumerate(lengths)]
    ds = packing.PackIterDataset(grain.MapDataset.source(docs), seq_len=seq_len, pad_id=-1,
                                 **kw)
    return list(ds)


def test_packing_picks_the_longest_piece_that_fits_including_an_exact_fit():
    """Lengths 3, 2, 4, 5 into rows of 8 (no gap filling): the row opens with the oldest (3),
    gap 5; of the pending 2, 4, 5 the longest that fits is 5, an exact fit (first fit would
    take 2, a strict '<' would take 4). The next row is 2 + 4, also full."""
    rows = _pack([3, 2, 4, 5], pool_size=16, fill_min=0)
    assert [r["input_ids"].tolist() for r in rows] == [
        [10, 11, 12, 40, 41, 42, 43, 44],
        [20, 21, 30, 31, 32, 33, -1, -1],
    ]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert rows[0]["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert rows[0]["source_ids"].tolist() == [0, 0, 0, 3, 3, 3, 3, 3]
    assert rows[1]["segment_ids"].tolist() == [1, 1, 2, 2, 2, 2, 0, 0]
    assert rows[1]["row_key"].tolist() == [1, 0]


def test_packing_best_fit_beats_first_fit_without_an_exact_fit():
    """Lengths 2, 1, 3, 5 into rows of 8: opener 2, gap 6; fitting pieces 1, 3, 5: best fit
    takes 5 (gap 1), then 1 fills it: [2, 5, 1]. Row two is the 3 alone."""
    rows = _pack([2, 1, 3, 5], pool_size=16, fill_min=0)
    assert [r["input_ids"].tolist() for r in rows] == [
        [10, 11, 40, 41, 42, 43, 44, 20],
        [30, 31, 32, -1, -1, -1, -1, -1],
    ]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 2, 2, 2, 2, 2, 3]


@pytest.mark.parametrize("lengths", [[8], [5, 3], [4, 4, 4, 4]])
def test_packing_exact_fits_leave_no_padding(lengths):
    """Pieces that sum to whole rows exactly fill them: no pad id anywhere."""
    rows = _pack(lengths, pool_size=16, fill_min=0)
    assert len(rows) == sum(lengths) // 8
    assert all((r["input_ids"] != -1).all() for r in rows)
