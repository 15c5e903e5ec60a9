"""Text generation with an Ettin decoder: KV-cache decoding, greedy or temperature/top-p sampling.

    python -m ettin_jax.generate (--checkpoint=RUN_DIR | --hf=HF_DIR) --prompt="Once upon a time"
        [--tokenizer=PATH] [--max_new_tokens=64] [--temperature=0.8 --top_p=0.95 --seed=0]

The prompt is encoded as `[CLS] text` (Ettin decoders saw every document start with [CLS])
and fed to `model.decode` at index 0; then one token per step, until every row has produced
[SEP] / EOS (the model config's sep_token_id and eos_token_id) or the length limit. The whole
loop is one jitted `lax.while_loop`. `--temperature=0` is greedy decoding.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ettin_jax import model as model_lib
from ettin_jax import model_loader


def check_decoder(model_or_causal, where: str):
    """Raises ValueError naming `where` unless the model (or `causal` flag) is a decoder."""
    causal = model_or_causal if isinstance(model_or_causal, bool) else model_or_causal.config.causal
    if not causal:
        raise ValueError(f"{where}: this is an encoder (masked LM, config.model.causal=False) "
                         "checkpoint; generation needs a decoder (causal LM)")


def stop_ids(config: model_lib.ModelConfig) -> tuple[int, ...]:
    return tuple(sorted({config.sep_token_id, config.eos_token_id}))


def sample_next(logits, key, *, temperature: float, top_p: float):
    """Next tokens `[batch]` from logits `[batch, vocab]` float32.

    temperature 0: argmax. Otherwise softmax(logits / temperature) restricted to the smallest
    set of most likely tokens whose probability reaches top_p (nucleus sampling).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)       # ties: the lower id first
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # The probability mass strictly before each sorted token; keep a token while that mass
        # is below top_p, so the most likely token always stays.
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = jnp.sum(before < top_p, axis=-1)
        # By rank, not by logit: tokens tied with the last kept one are not all in the nucleus.
        rank = jnp.argsort(order, axis=-1)
        logits = jnp.where(rank < kept[:, None], logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p",
                                             "stops"))
def _generate_jit(graphdef, state, prompt, key, *, max_new_tokens: int, temperature: float,
                  top_p: float, stops: tuple):
    """prompt `[batch, T]` int32 -> (tokens `[batch, max_new_tokens]`, lengths `[batch]`)."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.decode(prompt, cache, 0)
    stop_array = jnp.asarray(stops, jnp.int32)

    def choose(logits, step):
        return sample_next(logits, jax.random.fold_in(key, step), temperature=temperature,
                           top_p=top_p)

    first = choose(logits[:, -1], 0)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_array)
    lengths = jnp.ones((batch,), jnp.int32)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, cache, done, lengths = carry
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        logits, cache = model.decode(previous, cache, prompt_len + step - 1)
        token = choose(logits[:, -1], step)
        tokens = jax.lax.dynamic_update_slice_in_dim(
            tokens, jnp.where(done, 0, token)[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_array)
        return step + 1, tokens, cache, done, lengths

    _, tokens, _, _, lengths = jax.lax.while_loop(cond, body, (1, tokens, cache, done, lengths))
    return tokens, lengths


def generate(model: model_lib.EttinModel, prompt_ids, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True) -> list[list[int]]:
    """New tokens for each prompt (rows of equal length), each ending at its first stop token
    (included) or after `max_new_tokens`.

    prompt_ids: `[batch, T]` ints. use_cache=False recomputes the full forward pass for every
    token (greedy only; the reference the KV-cache path is tested against).
    """
    check_decoder(model, "generate")
    prompt = jnp.asarray(np.asarray(prompt_ids, np.int32))
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, T>0], got shape {prompt.shape}")
    limit = model.config.max_position_embeddings
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings={limit}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if not (0.0 < top_p <= 1.0 and temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1 (got {temperature}, "
                         f"{top_p})")
    # A copy in eval mode (the arrays are shared): the caller's model keeps its train/eval mode.
    model = nnx.merge(*nnx.split(model))
    model.eval()
    stops = stop_ids(model.config)
    if use_cache:
        graphdef, state = nnx.split(model)
        tokens, lengths = _generate_jit(graphdef, state, prompt, jax.random.key(seed),
                                        max_new_tokens=max_new_tokens,
                                        temperature=float(temperature), top_p=float(top_p),
                                        stops=stops)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [row[:n].tolist() for row, n in zip(tokens, lengths)]
    if temperature != 0.0:
        raise ValueError("use_cache=False supports greedy decoding only")
    # Every step runs the whole sequence, right-padded to its final length so that one shape
    # compiles; causal attention keeps the padding out of the positions that are read.
    total = prompt.shape[1] + max_new_tokens
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    out = []
    for row in np.asarray(prompt):
        ids = np.zeros((1, total), np.int32)
        ids[0, :len(row)] = row
        length, new = len(row), []
        for _ in range(max_new_tokens):
            token = int(jnp.argmax(forward(state, jnp.asarray(ids))[0, length - 1]))
            new.append(token)
            ids[0, length] = token
            length += 1
            if token in stops:
                break
        out.append(new)
    return out


def encode_prompt(tokenizer, text: str, config: model_lib.ModelConfig) -> list[int]:
    """`[CLS] text` ids (no [SEP]: that would end the document)."""
    return [config.bos_token_id] + tokenizer.encode(text, add_special_tokens=False).ids


def load_decoder(checkpoint: str | None, hf_dir: str | None, tokenizer_path: str | None,
                 dtype: str = ""):
    """(decoder in eval mode, tokenizer) from a training run or a transformers directory;
    arguments as model_loader.load_for_inference's. Raises ValueError naming the source for
    an encoder."""
    def check_run_config(config: dict, where: str):   # an encoder run: before its weights load
        check_decoder(bool(config.get("model", {}).get("causal", False)), where)

    model, tokenizer = model_loader.load_for_inference(checkpoint, hf_dir, tokenizer_path, dtype,
                                                       check_config=check_run_config)
    check_decoder(model, checkpoint or hf_dir)
    return model, tokenizer


def main(argv):
    from absl import flags  # pylint: disable=import-outside-toplevel
    f = flags.FLAGS
    model, tokenizer = load_decoder(f.checkpoint, f.hf, f.tokenizer, f.dtype)
    prompt = encode_prompt(tokenizer, f.prompt, model.config)
    logging.info("prompt: %d tokens %s", len(prompt), prompt)
    rows = generate(model, [prompt] * f.num_samples, max_new_tokens=f.max_new_tokens,
                    temperature=f.temperature, top_p=f.top_p, seed=f.seed)
    for i, new in enumerate(rows):
        stopped = bool(new) and new[-1] in stop_ids(model.config)
        text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        if f.num_samples > 1:
            print(f"--- sample {i} ({len(new)} tokens{', stopped' if stopped else ''})")
        print(f.prompt + text)
    return 0


def define_flags():
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ettin_jax import cli  # pylint: disable=import-outside-toplevel
    cli.define_model_source_flags()
    flags.adopt_module_key_flags(cli)   # defined in cli.py: list them in this --help too
    flags.DEFINE_string("prompt", "", "text to continue (encoded as [CLS] text)")
    flags.DEFINE_integer("max_new_tokens", 64, "stop after this many new tokens at the latest")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples from softmax(logits / T)")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling: keep the most likely tokens up to this mass")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("num_samples", 1, "continuations of the prompt generated at once")


if __name__ == "__main__":
    from ettin_jax import cli as cli_lib
    cli_lib.run(main, define_flags, usage=__doc__)
