r"""BPE tokenizers with the ModernBERT special-token layout, and loading/fingerprinting them.

Layout (recipe §6): regular tokens take ids [0, unk_id); the five special tokens sit at
    [UNK] unk_id, [CLS] unk_id+1, [SEP] unk_id+2, [PAD] unk_id+3, [MASK] unk_id+4
and ids above them up to vocab_size are reserved "[unused{k}]" tokens. ModernBERT itself is
unk_id=50280, vocab_size=50368; the tiny test config is unk_id=500, vocab_size=512.

A trained tokenizer is saved as a directory that both `tokenizers` and transformers'
`AutoTokenizer` read: tokenizer.json + tokenizer_config.json + special_tokens_map.json.

CLI:
    python -m data_pipeline.tokenizer train --input='corpus/*.jsonl' --output=DIR \
        --vocab_size=512 --unk_id=500
    python -m data_pipeline.tokenizer show DIR_OR_JSON
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from typing import Iterable, Iterator

from absl import flags
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ettin_jax import cli

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SPECIAL_NAMES = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
MODERNBERT_UNK_ID = 50280
MODERNBERT_VOCAB_SIZE = 50368


class TokenizerError(ValueError):
    """A tokenizer that cannot be used (missing file, wrong special-token layout)."""


def special_ids(tok: Tokenizer, where: str = "tokenizer") -> dict[str, int]:
    """{'unk','cls','sep','pad','mask'} -> id; raises naming `where` if one is missing."""
    out = {}
    for name in SPECIAL_NAMES:
        token_id = tok.token_to_id(name)
        if token_id is None:
            raise TokenizerError(f"{where}: has no {name} token; a ModernBERT-layout tokenizer "
                                 "needs [UNK] [CLS] [SEP] [PAD] [MASK] (train one with "
                                 "`python -m data_pipeline.tokenizer train`)")
        out[name.strip("[]").lower()] = token_id
    return out


def _tokenizer_json_path(path: str) -> str:
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def load(path_or_name: str) -> Tokenizer:
    """A tokenizer from a directory with tokenizer.json, a tokenizer.json file, or a hub name,
    with truncation and padding off: a tokenizer.json saved with them on (hub files often
    are) would cut or pad every document; documents are framed and cut here."""
    json_path = _tokenizer_json_path(path_or_name)
    if os.path.exists(json_path):
        try:
            tok = Tokenizer.from_file(json_path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{json_path}: not a readable tokenizer.json ({e})") from e
    elif not _HUB_NAME.fullmatch(path_or_name):
        raise TokenizerError(f"{path_or_name}: no such tokenizer file or directory")
    else:
        try:  # a hub name such as answerdotai/ModernBERT-base (needs network access)
            tok = Tokenizer.from_pretrained(path_or_name)
        except Exception as e:
            raise TokenizerError(f"{path_or_name}: neither a local tokenizer.json nor a loadable "
                                 f"hub tokenizer ({e})") from e
    tok.no_truncation()
    tok.no_padding()
    return tok


def fingerprint(tok: Tokenizer) -> str:
    """sha256 (hex, 16 chars) of what decides token ids: model, normalizer, pre-tokenizer, added tokens.

    Truncation/padding settings are left out: `load` turns them off.
    """
    spec = json.loads(tok.to_str())
    keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    blob = json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_layout_args(*, vocab_size: int, unk_id: int):
    """TokenizerError unless a ModernBERT layout fits: the 256 bytes below [UNK], the five
    specials from unk_id on, within vocab_size."""
    if unk_id < 257 or unk_id + len(SPECIAL_NAMES) > vocab_size:
        raise TokenizerError(f"unk_id={unk_id}, vocab_size={vocab_size}: need 257 <= unk_id and "
                             f"unk_id + {len(SPECIAL_NAMES)} <= vocab_size")


def train_bpe(texts: Iterable[str], *, vocab_size: int = MODERNBERT_VOCAB_SIZE,
              unk_id: int = MODERNBERT_UNK_ID, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Trains a byte-level BPE whose vocabulary follows the ModernBERT layout (module docstring).

    If the corpus is too small to learn `unk_id` regular tokens, the gap below [UNK] is filled
    with reserved "[unused{k}]" tokens so that the special ids land where the model expects them.
    """
    check_layout_args(vocab_size=vocab_size, unk_id=unk_id)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=unk_id, min_frequency=min_frequency, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    unused = 0

    def fill_to(target: int) -> None:
        nonlocal unused
        need = target - tok.get_vocab_size()
        if need > 0:
            tok.add_special_tokens([AddedToken(f"[unused{unused + k}]", special=True)
                                    for k in range(need)])
            unused += need

    fill_to(unk_id)
    for name in SPECIAL_NAMES:
        # [MASK] absorbs the space before it, as ModernBERT's does ("Paris is the [MASK].").
        tok.add_special_tokens([AddedToken(name, special=True, lstrip=name == "[MASK]",
                                           normalized=False)])
    fill_to(vocab_size)
    ids = special_ids(tok)
    if ids["unk"] != unk_id or tok.get_vocab_size() != vocab_size:
        raise TokenizerError(f"layout check failed: [UNK] at {ids['unk']} (want {unk_id}), "
                             f"vocab {tok.get_vocab_size()} (want {vocab_size})")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])])
    return tok


def save(tok: Tokenizer, directory: str, *, model_max_length: int = 8192) -> str:
    """Writes tokenizer.json + the config files transformers' AutoTokenizer needs; returns the dir."""
    os.makedirs(directory, exist_ok=True)
    special_ids(tok, where=directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    specials = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "pad_token": "[PAD]", "mask_token": "[MASK]",
                "bos_token": "[CLS]", "eos_token": "[SEP]"}
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast",
                  model_max_length=model_max_length, clean_up_tokenization_spaces=False,
                  model_input_names=["input_ids", "attention_mask"])
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(payload, f, indent=2)
    return directory


def _iter_texts(patterns: list[str], text_field: str) -> Iterator[str]:
    from data_pipeline import text_io  # local import: only the CLI reads corpora here
    for record in text_io.iter_records(text_io.expand_inputs(patterns), text_field=text_field):
        yield record.text


def define_flags():
    flags.DEFINE_multi_string("input", None, "train: glob of .jsonl/.jsonl.gz/.parquet/.txt "
                              "files (repeatable)")
    flags.DEFINE_string("output", None, "train: directory to write tokenizer.json into")
    flags.DEFINE_string("text_field", "text", "train: JSON/parquet field holding the text")
    flags.DEFINE_integer("vocab_size", MODERNBERT_VOCAB_SIZE, "train: vocabulary size")
    flags.DEFINE_integer("unk_id", MODERNBERT_UNK_ID,
                         "train: id of [UNK]; [CLS] [SEP] [PAD] [MASK] follow it")
    flags.DEFINE_integer("min_frequency", 2, "train: merges need this many occurrences")


def main(argv) -> int:
    f = flags.FLAGS
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if command == "train" and not args:
        if not f.input or not f.output:
            raise cli.UserError("train needs --input=GLOB and --output=DIR")
        tok = train_bpe(_iter_texts(f.input, f.text_field), vocab_size=f.vocab_size,
                        unk_id=f.unk_id, min_frequency=f.min_frequency,
                        show_progress=sys.stderr.isatty())
        save(tok, f.output)
        print(f"wrote {f.output}/tokenizer.json: vocab {tok.get_vocab_size()}, "
              f"specials {special_ids(tok)}, fingerprint {fingerprint(tok)}")
    elif command == "show" and len(args) == 1:
        tok = load(args[0])
        print(json.dumps({"vocab_size": tok.get_vocab_size(), "specials": special_ids(tok, args[0]),
                          "fingerprint": fingerprint(tok)}, indent=2))
    else:
        raise cli.UserError("usage: python -m data_pipeline.tokenizer train --input=GLOB "
                            "--output=DIR [flags] | show DIR_OR_JSON")
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__, positional=True)
