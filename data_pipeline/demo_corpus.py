"""A small real corpus built offline from the Python standard library installed on this machine.

Documents: each module's source file (code with its comments), plus each module, class and
function docstring as a separate prose document. `build()` writes the corpus as JSON lines,
trains a BPE tokenizer with the ModernBERT layout for the requested vocabulary, and runs
prepare on it, so training can start with no data configured and no network:

    python -m data_pipeline.demo_corpus --output=data/demo --vocab_size=512 --unk_id=500

Outputs under OUTPUT: corpus.jsonl, tokenizer/ (transformers-readable), shards/ (manifest.json).
A finished build is reused; OUTPUT/build.json records the vocabulary layout and size limit it
was built for, and a build into it with other ones is refused (use another --output).
Builders of one OUTPUT take turns (a flock on OUTPUT.lock): the processes of a multi-process
run all configure the demo at once, and the later ones find the first one's build.
`configure(config)` builds it for a config's vocabulary layout and points the config's data at
it (the demo variant of a run, ettin_jax.demo).
"""
from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import os
import sys
import sysconfig
import warnings

import ml_collections
from absl import flags

from data_pipeline import shards, tokenizer
from ettin_jax import cli


BUILD_KEY = "build.json"      # the vocabulary layout and size limit of the build in OUTPUT


def stdlib_files() -> list[str]:
    """The standard library's .py files (no tests, no site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (
            "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        # Old stdlib modules contain invalid escape sequences; parsing them is still correct.
        warnings.simplefilter("ignore", SyntaxWarning)
        try:
            tree = ast.parse(source)
        except SyntaxError:        # a few stdlib files are templates, not valid Python
            return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    return [d for d in docs if d and len(d.split()) >= 8]


def write_corpus(path: str, max_bytes: int) -> dict:
    """Writes documents as JSON lines until `max_bytes` of text; returns counts."""
    files = docs = size = 0
    tmp = path + ".tmp"
    with cli.naming_file(tmp), open(tmp, "w") as out:
        for file in stdlib_files():
            try:
                with open(file, encoding="utf-8") as f:
                    source = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            rel = os.path.relpath(file, sysconfig.get_paths()["stdlib"])
            for text in [source] + _docstrings(source):
                if not text.strip():
                    continue
                out.write(json.dumps({"text": text, "file": rel}) + "\n")
                docs += 1
                size += len(text)
            files += 1
            if size >= max_bytes:
                break
    os.replace(tmp, path)
    return {"files": files, "documents": docs, "chars": size}


@contextlib.contextmanager
def _one_builder(output: str):
    """Holds `<output>.lock` (flock) while this process builds into `output`."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        lock = open(output + ".lock", "a", encoding="utf-8")  # pylint: disable=consider-using-with
    except OSError as e:            # read-only: a finished build is reused without writing
        lock, why = None, e
    if lock is None:
        if not os.path.exists(os.path.join(output, "shards", shards.MANIFEST)):
            print(f"demo corpus: {output}.lock cannot be made ({why}); building without it "
                  "(two processes building at once would collide)", file=sys.stderr)
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"demo corpus: waiting for another process's build of {output}",
                  file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:        # a filesystem without file locks: build unguarded
            print(f"demo corpus: {output}.lock cannot be locked ({e}); two processes "
                  "building at once would collide", file=sys.stderr)
        yield                       # closing the file releases the lock


def build(output: str, *, vocab_size: int, unk_id: int, max_bytes: int = 8_000_000,
          workers: int = 1) -> tuple[str, str]:
    """Builds (or reuses) the demo corpus; returns (tokenizer_dir, shards_dir). ValueError
    when `output` holds a build (finished or not) for another layout or size limit."""
    with _one_builder(output):
        return _build(output, vocab_size=vocab_size, unk_id=unk_id, max_bytes=max_bytes,
                      workers=workers)


def _build(output: str, *, vocab_size: int, unk_id: int, max_bytes: int,
           workers: int) -> tuple[str, str]:
    tok_dir = os.path.join(output, "tokenizer")
    shard_dir = os.path.join(output, "shards")
    key = {"vocab_size": vocab_size, "unk_id": unk_id, "max_bytes": max_bytes}
    key_path = os.path.join(output, BUILD_KEY)
    if os.path.exists(key_path):
        with open(key_path, encoding="utf-8") as f:
            built = json.load(f)
        if built != key:
            def text(k):
                return ", ".join(f"{name}={k.get(name)}" for name in key)
            raise ValueError(f"{output} holds a demo corpus built for {text(built)} (recorded "
                             f"in {key_path}), not {text(key)}; build into another --output")
    elif os.path.exists(output) and os.listdir(output):
        # A build from before the record: its tokenizer's layout is all that can be checked.
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            tok = tokenizer.load(tok_dir)
            found = {"vocab_size": tok.get_vocab_size(),
                     "unk_id": tokenizer.special_ids(tok, tok_dir)["unk"]}
            if found != {"vocab_size": vocab_size, "unk_id": unk_id}:
                raise ValueError(f"{output} holds a demo corpus whose tokenizer has {found}, not "
                                 f"vocab_size={vocab_size}, unk_id={unk_id}; build into "
                                 "another --output")
    else:
        tokenizer.check_layout_args(vocab_size=vocab_size, unk_id=unk_id)   # before 8 MB of text
        os.makedirs(output, exist_ok=True)
        shards.write_json_atomic(key_path, key)
    if os.path.exists(os.path.join(shard_dir, shards.MANIFEST)):
        return tok_dir, shard_dir
    corpus = os.path.join(output, "corpus.jsonl")
    if not os.path.exists(corpus):
        counts = write_corpus(corpus, max_bytes)
        print(f"demo corpus: {counts['documents']:,} documents from {counts['files']} stdlib "
              f"files ({counts['chars']:,} chars) -> {corpus}", file=sys.stderr)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        print(f"demo corpus: training a {vocab_size}-token BPE tokenizer", file=sys.stderr)
        with open(corpus) as f:
            texts = (json.loads(line)["text"] for line in f)
            tok = tokenizer.train_bpe(texts, vocab_size=vocab_size, unk_id=unk_id)
        tokenizer.save(tok, tok_dir + ".tmp")
        os.replace(tok_dir + ".tmp", tok_dir)
    # Imported here: prepare pulls in datasketch and scipy (0.4 s), which a run that reuses
    # the built corpus (every run but the first) never needs.
    from data_pipeline import prepare  # pylint: disable=import-outside-toplevel
    # Code fails prose quality rules by design, so only dedup runs on the demo corpus.
    prepare.run(prepare.Options(inputs=[corpus], output=shard_dir, tokenizer=tok_dir,
                                source="python-stdlib", filters=(), docs_per_shard=2000,
                                workers=workers))
    return tok_dir, shard_dir


def build_dir(demo_dir: str, vocab_size: int, unk_id: int, max_bytes: int) -> str:
    """Where `configure` builds the corpus of this layout and size limit."""
    return os.path.join(demo_dir, f"v{vocab_size}-unk{unk_id}-b{max_bytes}")


def configure(config) -> tuple[str, str]:
    """Builds (or reuses) the corpus for `config.model`'s vocabulary layout under
    config.data.demo_dir and sets config.data.mixture and config.data.tokenizer to it.
    Returns (tokenizer_dir, shards_dir)."""
    d, m = config.data, config.model
    output = build_dir(d.demo_dir, m.vocab_size, d.unk_token_id, d.demo_max_bytes)
    tok_dir, shard_dir = build(output, vocab_size=m.vocab_size, unk_id=d.unk_token_id,
                               max_bytes=d.demo_max_bytes)
    d.mixture, d.tokenizer = shard_dir, tok_dir
    return tok_dir, shard_dir


def with_demo_sections(config):
    """A resolved copy of `config` with `config.demo`'s sections copied over the ones they
    mirror (demo.train.seq_len over train.seq_len, ...): what a run with no data configured
    trains on (ettin_jax.demo), and what `inspect` shows of it."""
    config = config.copy_and_resolve_references()
    for section, values in config.demo.items():
        if not isinstance(values, ml_collections.ConfigDict):
            continue
        for key, value in values.items():
            if section not in config or key not in config[section]:
                raise ValueError(f"config.demo.{section}.{key} replaces config.{section}.{key}, "
                                 "which this config does not have (configs/base.py)")
            config[section][key] = value
    return config


def define_flags():
    flags.DEFINE_string("output", None, "directory to build into", required=True)
    flags.DEFINE_integer("vocab_size", tokenizer.MODERNBERT_VOCAB_SIZE, "tokenizer vocabulary size")
    flags.DEFINE_integer("unk_id", tokenizer.MODERNBERT_UNK_ID, "id of [UNK]; the specials follow")
    flags.DEFINE_integer("max_bytes", 8_000_000, "stop after this much text")
    flags.DEFINE_integer("workers", 1, "tokenizer processes")


def main(argv) -> int:
    f = flags.FLAGS
    tok_dir, shard_dir = build(f.output, vocab_size=f.vocab_size, unk_id=f.unk_id,
                               max_bytes=f.max_bytes, workers=f.workers)
    print(f"tokenizer: {tok_dir}\nshards: {shard_dir}")
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
