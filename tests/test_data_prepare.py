"""Prepare checks from issue 3: tokenizer layout, stage counts, dedup of planted near-duplicates,
quality rules, chunking, resume, and bad input failing with file:line and nothing damaged."""
import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import chunking, dedup, normalize, prepare, quality, shards, text_io, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point government company number group problem fact river stone garden "
         "window music paper story letter market money table light morning evening winter "
         "summer history science language animal mountain island village bridge road").split()
VERBS = "sees finds keeps moves holds opens builds carries follows remembers".split()
PREPS = "near under behind beside across beyond".split()
ADJS = "old new small large quiet bright dark early late green".split()
DETS = "The A Each Every One".split()


def english_doc(rng, n=120):
    """Distinct prose-like documents: random sentences over a small real vocabulary."""
    out = []
    while len(out) < n:
        det, noun, verb, prep, adj, noun2 = (rng.choice(x) for x in
                                             (DETS, WORDS, VERBS, PREPS, ADJS, WORDS))
        tail = "" if rng.random() < 0.5 else f" while {rng.choice(WORDS)} {rng.choice(VERBS)} it"
        out.extend(f"{det} {noun} {verb} the {adj} {noun2} {prep} the {rng.choice(WORDS)}"
                   f"{tail}.".split())
    return " ".join(out[:n])


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    rng = np.random.default_rng(0)
    tok = tokenizer.train_bpe([english_doc(rng) for _ in range(50)], vocab_size=512, unk_id=500)
    return tokenizer.save(tok, str(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return str(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=ROOT,
                          capture_output=True, text=True)


def dir_digest(path):
    h = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                h[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return h


def test_tokenizer_layout_and_transformers_can_load_it(tiny_tok):
    tok = tokenizer.load(tiny_tok)
    assert tok.get_vocab_size() == 512
    assert tokenizer.special_ids(tok) == {"unk": 500, "cls": 501, "sep": 502, "pad": 503,
                                          "mask": 504}
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_tok)
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id) == (501, 502, 503, 504)
    ids = hf("The river and the stone.")["input_ids"]
    assert ids[0] == 501 and ids[-1] == 502
    assert ids[1:-1] == tok.encode("The river and the stone.", add_special_tokens=False).ids
    assert hf.decode(ids, skip_special_tokens=True) == "The river and the stone."
    masked = hf("The river [MASK] stone.")["input_ids"]
    assert 504 in masked


def test_prepare_counts_stages_dedups_planted_near_duplicates_and_matches_tokenizer(tmp_path, tiny_tok):
    rng = np.random.default_rng(1)
    distinct = [english_doc(rng, 150) for _ in range(40)]
    planted = []
    for doc in distinct[:6]:                          # a few words changed
        words = doc.split()
        for i in rng.choice(len(words), 3, replace=False):
            words[i] = "zebra"
        planted.append(" ".join(words))
    exact = [distinct[7]]
    short = ["Too short to keep."]
    repeated = ["\n".join(["the same line of the text with words"] * 40)]
    texts = distinct + planted + exact + short + repeated
    assert min(dedup.jaccard(p, d) for p, d in zip(planted, distinct)) > 0.8
    src = write_jsonl(tmp_path / "a.jsonl", texts[:30])
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[30:]))
    out = tmp_path / "out"
    result = run_cli(f"--input={src}", f"--input={gz}", f"--output={out}",
                     f"--tokenizer={tiny_tok}", "--languages=en", "--workers=2",
                     "--docs_per_shard=16")
    assert result.returncode == 0, result.stderr
    with open(out / "stats.json") as f:
        stats = json.load(f)
    assert stats["documents_in"] == len(texts)
    assert stats["removed"]["near_duplicate"] == 6
    assert stats["removed"]["exact_duplicate"] == 1
    assert stats["removed"]["word_count"] == 1
    assert stats["removed"]["duplicate_lines"] == 1
    assert stats["documents_kept"] == 40
    manifest = shards.read_manifest(str(out))
    assert manifest["documents"] == 40 and len(manifest["shards"]) == 3
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint(tokenizer.load(tiny_tok))
    docs = shards.ArrayRecordDocs(str(out))
    tok = tokenizer.load(tiny_tok)
    for i, text in enumerate(distinct):
        want = [501] + tok.encode(text, add_special_tokens=False).ids + [502]
        np.testing.assert_array_equal(docs[i], want)
    assert manifest["tokens"] == sum(len(docs[i]) for i in range(len(docs)))
    n_tokens = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    assert stats["tokens_in"] == sum(n_tokens)
    assert stats["removed_tokens"]["near_duplicate"] == sum(n_tokens[40:46])
    assert stats["tokens_kept"] == sum(n_tokens[:40])
    assert stats["tokens_out"] == stats["tokens_kept"] + 2 * 40
    with open(out / "summary.txt") as f:
        assert "removed near_duplicate" in f.read()


def test_quality_rules_each_catch_their_case():
    cfg = quality.QualityConfig(languages=("en",))
    rng = np.random.default_rng(2)
    good = english_doc(rng, 120)
    assert quality.first_failing_rule(good, tuple(quality.RULES), cfg) is None
    cases = {
        "word_count": "few words only",
        "mean_word_length": " ".join(["a"] * 80),
        "symbol_ratio": good + " #" * 40,
        "stop_words": " ".join(rng.choice(WORDS, 120)),
        "ngram_repetition": " ".join(["river stone garden window"] * 40),
        "language": ("Der Fluss und die Steine liegen neben dem Garten, und das Fenster ist "
                     "offen. ") * 10,
    }
    for rule, text in cases.items():
        assert quality.first_failing_rule(text, (rule,), cfg) == rule, rule
        assert quality.first_failing_rule(good, (rule,), cfg) is None, rule


def test_normalize_is_nfc_idempotent_and_keeps_indentation():
    """Random texts of spaces, line breaks, zero-width characters and combining marks: the
    result is NFC (unicodedata's check), a second pass changes nothing, and a first line's
    indentation survives (code)."""
    import unicodedata
    alphabet = ["e", "a", " ", "\t", "\n", "\r\n", "\r", "\u200b", "\u200d", "\u0301", "\u0308",
                "\u00a0", "\u2001", "\ufeff", "x"]
    rng = np.random.default_rng(0)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet, rng.integers(0, 30)))
        once = normalize.normalize(text)
        assert unicodedata.is_normalized("NFC", once), repr(text)
        assert normalize.normalize(once) == once, repr(text)
        assert "\r" not in once and not once.endswith((" ", "\n"))
    assert normalize.normalize("Cafe\u200b\u0301 bar") == "Caf\u00e9 bar"
    code = "\n\n    return a + b  \n\n\n\nprint(x)\n"
    assert normalize.normalize(code) == "    return a + b\n\nprint(x)"


def test_texts_without_words_are_never_near_duplicates():
    """Their one shingle would be b"" for all of them; exact duplicates are still caught."""
    near = dedup.NearDedup()
    for text in ["\U0001f600\U0001f600 \U0001f389", "\u2192 \u2190 \u2191", "+-*/ =="]:
        assert near.signature(text) is None and not near.is_duplicate(near.signature(text))
    words = "the quick brown fox jumps over the lazy dog again and again"
    assert not near.is_duplicate(near.signature(words))
    assert near.is_duplicate(near.signature(words + "!"))


def test_chunking_follows_ettin_rules():
    cfg = chunking.ChunkConfig(chunk_size=100, min_chunk_size=30, always_skip_size=10)
    ids = np.arange(98 * 3 + 20)                         # tail of 20: backfilled to >= 30
    pieces = chunking.chunk_ids(ids, cfg)
    np.testing.assert_array_equal(np.concatenate(pieces), ids)   # moved, not duplicated
    assert all(len(p) <= 98 for p in pieces) and len(pieces[-1]) >= 30 and len(pieces[-2]) >= 30
    assert [len(p) for p in chunking.chunk_ids(ids, cfg)] == [len(p) for p in pieces]  # seeded
    tiny_tail = chunking.chunk_ids(np.arange(98 + 5), cfg)        # tail 5 < always_skip: dropped
    assert [len(p) for p in tiny_tail] == [98]
    assert [len(p) for p in chunking.chunk_ids(np.arange(50), cfg)] == [50]


def test_prepare_chunking_frames_every_chunk(tmp_path, tiny_tok):
    rng = np.random.default_rng(3)
    src = write_jsonl(tmp_path / "a.jsonl", [english_doc(rng, 600) for _ in range(3)])
    opts = prepare.Options(inputs=[src], output=str(tmp_path / "o"), tokenizer=tiny_tok,
                           filters=(), chunk=chunking.ChunkConfig(200, 60, 20))
    manifest = prepare.run(opts)
    docs = shards.ArrayRecordDocs(str(tmp_path / "o"))
    assert manifest["documents"] > 3
    for i in range(len(docs)):
        assert docs[i][0] == 501 and docs[i][-1] == 502 and len(docs[i]) <= 200


def test_resume_rewrites_only_missing_shards(tmp_path, tiny_tok):
    rng = np.random.default_rng(4)
    src = write_jsonl(tmp_path / "a.jsonl", [english_doc(rng) for _ in range(30)])
    out = tmp_path / "o"
    opts = prepare.Options(inputs=[src], output=str(out), tokenizer=tiny_tok, filters=(),
                           docs_per_shard=10)
    prepare.run(opts)
    before = dir_digest(out)
    kept = out / "shard-00000.arrayrecord"
    mtime = os.stat(kept).st_mtime_ns
    os.remove(out / "shard-00002.arrayrecord")          # as if killed while writing shard 2
    os.remove(out / "manifest.json")
    prepare.run(opts)
    assert dir_digest(out) == before
    assert os.stat(kept).st_mtime_ns == mtime            # finished shard not redone
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("content,expected", [
    ('{"text": "fine"}\n{"text": broken\n', r"a\.jsonl:2: malformed JSON"),
    ('{"text": "fine"}\n{"body": "x"}\n', r"a\.jsonl:2: no 'text' field"),
    ("", r"a\.jsonl: empty file"),
])
def test_bad_input_fails_naming_file_and_line(tmp_path, tiny_tok, content, expected):
    (tmp_path / "a.jsonl").write_text(content)
    result = run_cli(f"--input={tmp_path / 'a.jsonl'}", f"--output={tmp_path / 'o'}",
                     f"--tokenizer={tiny_tok}", "--filters=none", "--workers=1")
    assert result.returncode == 1
    assert __import__("re").search(expected, result.stderr), result.stderr
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_bad_sizes_are_refused_before_anything_is_written(tmp_path, tiny_tok):
    """--docs_per_shard=0 used to divide by zero after .work/ was written (and -5 wrote an
    empty dataset, exit 0)."""
    src = write_jsonl(tmp_path / "a.jsonl", ["some text"])
    for flag, words in (("--docs_per_shard=-5", "--docs_per_shard=-5: must be at least 1"),
                        ("--jaccard=1.5", "--jaccard=1.5: must lie in (0, 1)")):
        result = run_cli(f"--input={src}", f"--output={tmp_path / 'o'}", f"--tokenizer={tiny_tok}",
                         flag)
        assert result.returncode == 1 and f"error: {words}" in result.stderr, result.stderr
        assert not os.path.exists(tmp_path / "o")


def test_unreadable_records_name_file_and_line(tmp_path):
    """text_io's errors for what the CLI test above does not cover (each is an InputError, the
    CLI's one `error:` line): invalid UTF-8 and lone surrogates by line, corrupt gzip and
    parquet data by file; a byte-order mark is read."""
    def error_of(path):
        with pytest.raises(text_io.InputError) as raised:
            list(text_io.iter_file(str(path)))
        return str(raised.value)

    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n')
    assert error_of(bad_utf8).startswith(f"{bad_utf8}:3: not UTF-8")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "good"}\n{"text": "bad \\ud800 x"}\n')
    assert error_of(surrogate).startswith(f"{surrogate}:2: invalid unicode")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n')
    assert [r.text for r in text_io.iter_file(str(bom))] == ["first"]
    lines = "".join(json.dumps({"text": f"word {i} " * 20}) + "\n" for i in range(2000))
    corrupt = bytearray(gzip.compress(lines.encode()))
    corrupt[200:260] = bytes(b ^ 0xFF for b in corrupt[200:260])
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    assert error_of(tmp_path / "corrupt.jsonl.gz").startswith(
        f"{tmp_path / 'corrupt.jsonl.gz'}: cannot read as gzip")

    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"text": [english_doc(rng) for _ in range(300)]}),
                   str(tmp_path / "p.parquet"), row_group_size=100)
    data = bytearray((tmp_path / "p.parquet").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = bytes(400)
    (tmp_path / "p.parquet").write_bytes(bytes(data))
    assert error_of(tmp_path / "p.parquet").startswith(f"{tmp_path / 'p.parquet'}: ")


def test_other_tokenizer_on_existing_output_fails_and_damages_nothing(tmp_path, tiny_tok):
    rng = np.random.default_rng(5)
    src = write_jsonl(tmp_path / "a.jsonl", [english_doc(rng) for _ in range(5)])
    out = tmp_path / "o"
    assert run_cli(f"--input={src}", f"--output={out}", f"--tokenizer={tiny_tok}",
                   "--filters=none", "--workers=1").returncode == 0
    before = dir_digest(out)
    other = tokenizer.save(tokenizer.train_bpe(["zz yy xx\n" * 30], vocab_size=512, unk_id=500),
                           str(tmp_path / "other"))
    result = run_cli(f"--input={src}", f"--output={out}", f"--tokenizer={other}",
                     "--filters=none", "--workers=1")
    assert result.returncode == 1
    assert "different tokenizer fingerprint" in result.stderr and str(out) in result.stderr
    assert dir_digest(out) == before


def test_help_explains_the_tool():
    result = run_cli("--help")
    assert result.returncode == 0 and "near-duplicate" in result.stdout
    tok_help = subprocess.run([sys.executable, "-m", "data_pipeline.tokenizer", "train", "--help"],
                              cwd=ROOT, capture_output=True, text=True)
    assert tok_help.returncode == 0 and "--unk_id" in tok_help.stdout


def test_parquet_and_txt_inputs_with_normalization_counted(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(6)
    decomposed = "Cafe\u0301 " + english_doc(rng, 80) + "   \r\n\r\n\r\n\r\nend"
    pq.write_table(pa.table({"content": [english_doc(rng, 80), decomposed]}),
                   str(tmp_path / "a.parquet"))
    (tmp_path / "b.txt").write_text(english_doc(rng, 80))
    out = tmp_path / "o"
    manifest = prepare.run(prepare.Options(
        inputs=[str(tmp_path / "a.parquet"), str(tmp_path / "b.txt")], output=str(out),
        tokenizer=tiny_tok, text_field="content", filters=()))
    with open(out / "stats.json") as f:
        stats = json.load(f)
    assert stats["documents_in"] == manifest["documents"] == 3
    assert stats["normalized_changed"] == 1
    with open(out / ".work" / "kept.jsonl") as f:
        kept = [json.loads(line)["text"] for line in f]
    assert kept[1].startswith("Caf\u00e9 ") and kept[1].endswith(".\n\nend")
    assert "\r" not in kept[1] and "\n\n\n" not in kept[1]


def test_large_vocabulary_shards_hold_uint32_ids(tmp_path):
    tok = tokenizer.train_bpe(["a b c\n" * 10], vocab_size=70_000, unk_id=69_000)
    tok_dir = tokenizer.save(tok, str(tmp_path / "tok"))
    docs = [np.array([69_001, 5, 68_999, 69_002]), np.array([69_001, 69_002])]
    manifest = shards.write_token_dataset(str(tmp_path / "c"), docs, tokenizer_path=tok_dir,
                                          source="big")
    assert manifest["dtype"] == "<u4"
    reader = shards.ArrayRecordDocs(str(tmp_path / "c"))
    np.testing.assert_array_equal(reader[0], docs[0])


def test_tokenizer_cli_trains_the_layout(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", ["the river and the stone"] * 20)
    result = subprocess.run([sys.executable, "-m", "data_pipeline.tokenizer", "train",
                             f"--input={src}", f"--output={tmp_path / 'tok'}",
                             "--vocab_size=300", "--unk_id=290"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tok = tokenizer.load(str(tmp_path / "tok"))
    assert tokenizer.special_ids(tok)["mask"] == 294 and tok.get_vocab_size() == 300
    bad = subprocess.run([sys.executable, "-m", "data_pipeline.tokenizer", "show",
                          str(tmp_path / "missing" / "dir")], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "no such tokenizer" in bad.stderr


def test_special_token_text_in_a_document_is_text(tmp_path, tiny_tok):
    """tokenizers matches added tokens in the input even with add_special_tokens=False: a
    document mentioning [CLS], [SEP], [PAD] or [MASK] got their ids mid-document."""
    rng = np.random.default_rng(7)
    text = "In BERT, [CLS] starts and [SEP] ends; [MASK] hides a word and [PAD] fills. " + \
        english_doc(rng, 60)
    src = write_jsonl(tmp_path / "a.jsonl", [text])
    prepare.run(prepare.Options(inputs=[src], output=str(tmp_path / "o"), tokenizer=tiny_tok,
                                filters=()))
    ids = shards.ArrayRecordDocs(str(tmp_path / "o"))[0]
    specials = set(range(500, 505))                       # [UNK] [CLS] [SEP] [PAD] [MASK]
    assert ids[0] == 501 and ids[-1] == 502
    assert not specials & set(ids[1:-1].tolist())
    tok = tokenizer.load(tiny_tok)
    assert tok.decode(ids[1:-1].tolist()).startswith("In BERT, [CLS] starts and [SEP] ends")


def test_an_input_edited_in_place_is_another_input(tmp_path, tiny_tok):
    """The same size, other text: a resume reused the old scan's kept text."""
    rng = np.random.default_rng(8)
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [english_doc(rng) for _ in range(20)])
    opts = prepare.Options(inputs=[str(path)], output=str(tmp_path / "o"), tokenizer=tiny_tok,
                           filters=(), docs_per_shard=10)
    prepare.run(opts)
    os.remove(tmp_path / "o" / "manifest.json")          # as if stopped before it was written
    text = path.read_text()
    assert "river" in text
    path.write_text(text.replace("river", "stone"))      # same length
    with pytest.raises(shards.ShardError, match="different inputs"):
        prepare.run(opts)


def test_ctrl_c_with_workers_exits(tmp_path, tiny_tok):
    """Ctrl-C reaches every process of the group; with a pool the workers died holding
    their tasks and the parent waited for them forever in Pool.join."""
    import signal
    import time
    rng = np.random.default_rng(9)
    src = write_jsonl(tmp_path / "a.jsonl", [english_doc(rng) for _ in range(3000)])
    out = tmp_path / "o"
    # SIGINT as a terminal delivers it: a process started with SIGINT ignored (an xdist
    # worker's children are) keeps ignoring it, so the child installs Python's handler before
    # running prepare (a preexec_fn would fork this multithreaded process).
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
             "; sys.argv[0] = 'prepare'; runpy.run_module('data_pipeline.prepare', "
             "run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", start, f"--input={src}", f"--output={out}",
                             f"--tokenizer={tiny_tok}", "--workers=2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    while not (out / ".work" / "tokenizer.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(3.0)                                        # the workers are scanning
    assert proc.poll() is None, "finished before the signal: give it more input"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("prepare still running 30 s after Ctrl-C")
    assert proc.returncode == 130, stderr[-2000:]


def test_english_stop_words_judge_english_documents_only_where_other_languages_are_kept():
    """--languages=de kept no document: every German one failed the English stop-word rule."""
    german = ("Der Fluss und die Steine liegen neben dem Garten, und das Fenster ist offen. "
              * 10)
    nouns = " ".join(np.random.default_rng(10).choice(WORDS, 120))   # English, no stop words
    rule = ("stop_words",)
    assert quality.first_failing_rule(german, rule, quality.QualityConfig(languages=("de",))) \
        is None
    assert quality.first_failing_rule(german, rule, quality.QualityConfig(languages=("en",))) \
        == "stop_words"
    for languages in (("en", "de"), ("en",), ()):
        assert quality.first_failing_rule(nouns, rule, quality.QualityConfig(
            languages=languages)) == "stop_words", languages
