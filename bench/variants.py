"""One-at-a-time variants of a bench run: bench/train_step.py --variants (no flags here).

    --variants="prng_impl=threefry,rbg,unsafe_rbg;loss_vocab_chunk=4096,16384;batch=32,64,128"

means the baseline (the config and shape the other flags give), then each listed value of each
key changed alone, the rest as in the baseline (one at a time, not a product); a value equal
to the baseline's is not run again. A remat other than none also scans the layers (it needs
them scanned), and its name says so: `remat=dots+scan_layers=true`. Keys: the short names in
ALIASES, `batch` / `seq_len` (the shape), or any dotted config key (`model.remat`,
`train.loss_row_chunk`); values are converted to the type the config holds. Every variant is
built before the first one runs, so a typo fails at once, not after minutes of compiling.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable

from ettin_jax import cli

# Short names of the knobs a tuning sweep flips most.
ALIASES = {"prng_impl": "train.prng_impl", "loss_vocab_chunk": "train.loss_vocab_chunk",
           "loss_row_chunk": "train.loss_row_chunk", "attention_impl": "model.attention_impl",
           "remat": "model.remat", "scan_layers": "model.scan_layers", "dtype": "model.dtype",
           "qkv_projection": "model.qkv_projection",
           "xla_options": "train.xla_options"}
SHAPE_KEYS = ("batch", "seq_len")
BASELINE = "baseline"


@dataclasses.dataclass
class Variant:
    name: str            # "baseline" or "KEY=VALUE"
    config: object       # ml_collections.ConfigDict, its own copy
    rows: int
    seq_len: int


def parse(text: str) -> list[tuple[str, list[str]]]:
    """"k=a,b;k2=c" -> [("k", ["a", "b"]), ("k2", ["c"])]."""
    parsed = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, values = part.partition("=")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key.strip() or not values:
            raise cli.UserError(f"--variants entry {part!r}: expected KEY=VALUE[,VALUE...], e.g. "
                                "prng_impl=threefry,rbg (entries separated by ';')")
        parsed.append((key.strip(), values))
    return parsed


def _convert(old, text: str, where: str):
    if isinstance(old, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise cli.UserError(f"--variants {where}={text}: expected true or false")
        return lowered in ("true", "1", "yes")
    try:
        return type(old)(text) if isinstance(old, (int, float)) else text
    except ValueError:
        raise cli.UserError(f"--variants {where}={text}: expected a {type(old).__name__} "
                            f"(the baseline has {old!r})") from None


def _config_path(key: str, config) -> tuple[object, str]:
    """(section, leaf name) of a short or dotted key in config."""
    dotted = ALIASES.get(key, key)
    *sections, leaf = dotted.split(".")
    section = config
    for name in sections:
        section = section.get(name) if hasattr(section, "get") else None
    if section is None or not hasattr(section, "get") or leaf not in section:
        raise cli.UserError(f"--variants key {key!r}: not a config key; use batch, seq_len, "
                            f"{', '.join(ALIASES)} or a dotted key such as model.remat")
    return section, leaf


def one_at_a_time(config, rows: int, seq_len: int, parsed) -> list[Variant]:
    """The baseline, then one Variant per (key, value) that differs from the baseline."""
    out = [Variant(BASELINE, config.copy_and_resolve_references(), rows, seq_len)]
    for key, values in parsed:
        for text in values:
            name = f"{key}={text}"
            variant = Variant(name, config.copy_and_resolve_references(), rows, seq_len)
            if key in SHAPE_KEYS:
                value = _convert(rows if key == "batch" else seq_len, text, key)
                if value <= 0:
                    raise cli.UserError(f"--variants {name}: expected a positive integer")
                if value == (rows if key == "batch" else seq_len):
                    continue
                if key == "batch":
                    variant.rows = value
                else:
                    variant.seq_len = value
            else:
                section, leaf = _config_path(key, variant.config)
                value = _convert(section[leaf], text, key)
                if value == section[leaf]:
                    continue
                section[leaf] = value
                model = variant.config.model
                if ALIASES.get(key, key) == "model.remat" and value != "none" \
                        and not model.scan_layers:
                    model.scan_layers = True        # remat applies to scanned layer groups
                    variant.name += "+scan_layers=true"
            out.append(variant)
    return out


def run_all(variants: list[Variant], time_variant: Callable[[Variant], dict], *,
            budget_s: float = 0.0, emit: Callable[[dict], None],
            clock: Callable[[], float] = time.monotonic) -> list[dict]:
    """Times each variant with `time_variant` and passes every record to `emit` as soon as it
    exists (a sweep cut short keeps what it measured). A variant that fails (out of memory, an
    implementation this build lacks) is a record with "error", and the sweep goes on. With
    budget_s > 0 a variant is not started once less than the longest one so far is left; it
    is a record with "skipped". `clock` gives seconds (tests pass their own)."""
    start, longest, records = clock(), 0.0, []
    for variant in variants:
        head = {"config": f"{variant.config.size}:{variant.config.objective}",
                "batch": variant.rows, "seq_len": variant.seq_len, "variant": variant.name}
        left = budget_s - (clock() - start)
        if budget_s > 0 and left < longest:
            record = dict(head, skipped=f"budget: {left:.0f} s left, a variant took "
                                        f"{longest:.0f} s")
            print(f"variant {variant.name}: skipped ({record['skipped']})", flush=True)
        else:
            print(f"-- variant {variant.name} ({variant.rows}x{variant.seq_len})", flush=True)
            began = clock()
            try:
                record = dict(time_variant(variant), variant=variant.name)
            except Exception as e:  # pylint: disable=broad-except  # recorded, the sweep goes on
                record = dict(head, error=f"{type(e).__name__}: {e}"[:400])
                print(f"variant {variant.name} FAILED: {record['error']}", flush=True)
            longest = max(longest, clock() - began)
            gc.collect()   # the variant's state and step buffers go before the next one's
        emit(record)
        records.append(record)
    return records
