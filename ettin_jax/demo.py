"""The demo variant of a config: what a run with no dataset configured (config.data.mixture
== "") trains, so that `python main.py --config=configs/ettin_17m.py:mlm --workdir=runs/demo`
ends in minutes on a CPU.

    apply_demo(config) -> config     # a copy; unchanged (but resolved) when a mixture is set
    demo_variant(config) -> config   # the same keys, without building the corpus (the plan)
    demo_keys_named(message, config) # an error's config keys as a demo run's user sets them

`config.demo` mirrors the sections it replaces (`demo.train.seq_len`,
`demo.schedule.total_tokens`, ...; configs/base.py derives the dependent values). Applying
it copies those keys over, then builds the stdlib corpus (data_pipeline.demo_corpus) and
points config.data.mixture and config.data.tokenizer at it: everything downstream (loader,
checkpoints, export) sees a normal run.
"""
from __future__ import annotations

import re

import jax
import ml_collections
from absl import logging

from data_pipeline import demo_corpus
from ettin_jax import schedules


def demo_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A resolved copy of `config` with `config.demo`'s keys copied over when no mixture is
    set (else unchanged); the corpus is not built and config.data.mixture stays empty."""
    if config.data.mixture:
        return config.copy_and_resolve_references()
    config = demo_corpus.with_demo_sections(config)
    demo = config.demo
    if jax.default_backend() == "cpu":
        if demo.cpu_model_dtype:
            config.model.dtype = demo.cpu_model_dtype
        config.model.scan_layers = demo.cpu_scan_layers
    return config


def apply_demo(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if config.data.mixture:
        return config.copy_and_resolve_references()
    config = demo_variant(config)
    tokenizer_dir, shards_dir = demo_corpus.configure(config)
    logging.info("config.data.mixture is empty: demo run (config.demo) on the stdlib corpus "
                 "%s (tokenizer %s) with %d rows of %d tokens for %d tokens", shards_dir,
                 tokenizer_dir, config.train.global_batch_size, config.train.seq_len,
                 config.schedule.total_tokens)
    return config


def demo_keys_named(message: str, config: ml_collections.ConfigDict) -> str:
    """`message` with each `config.SECTION.KEY` that a demo run takes from config.demo named
    `config.demo.SECTION.KEY`, the key a user of the demo sets."""
    demo = config.get("demo") or {}

    def name(match):
        section, key = match.group(1), match.group(2)
        inside = isinstance(demo.get(section), ml_collections.ConfigDict) and key in demo[section]
        return f"config.demo.{section}.{key}" if inside else match.group(0)
    return re.sub(r"\bconfig\.(\w+)\.(\w+)", name, message)


def validate(config: ml_collections.ConfigDict, *, demo_run: bool):
    """schedules.validate of a run's config (the demo variant applied for a demo run), its
    messages naming the `config.demo.*` key where the demo takes the value from there."""
    try:
        schedules.validate(config)
    except ValueError as e:
        raise ValueError(demo_keys_named(str(e), config) if demo_run else str(e)) from None
