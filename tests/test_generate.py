"""Decoder generation: greedy output equals transformers' generate, the KV cache equals
recomputing the whole sequence, nucleus sampling keeps to the nucleus, and the CLI refuses
encoders."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import ettin_tiny
from data_pipeline import tokenizer as tokenizer_lib
from ettin_jax import checkpoint
from ettin_jax import generate as generate_lib
from ettin_jax import hf
from ettin_jax.model import EttinModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(objective: str, seed: int = 0) -> EttinModel:
    """The tiny config with weights pushed away from init, so that greedy choices are decisive
    (at init the logits are nearly flat and float noise could flip an argmax)."""
    config = ettin_tiny.get_config(objective).model
    config.attention_impl = "xla"
    # Noise from numpy: jax's eager random ops would compile a program per shape.
    model = EttinModel(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(np.float32)),
        params))
    model.eval()
    return model


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny decoder exported to transformers' format, with a tiny BPE tokenizer."""
    path = str(tmp_path_factory.mktemp("decoder"))
    model = _tiny("clm")
    words = "the cat sat on a mat and then it ran over to the dog who was asleep".split()
    tokenizer = tokenizer_lib.train_bpe([" ".join(words)] * 20, vocab_size=ettin_tiny.VOCAB_SIZE,
                                        unk_id=ettin_tiny.UNK_ID)
    hf.save_hf(model, model.config, path, tokenizer=tokenizer)
    return path, model


def test_greedy_equals_transformers_generate(decoder_dir):
    path, model = decoder_dir
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    torch_model.eval()
    rng = np.random.RandomState(0)
    # 40 new tokens: well past the 8-token sliding window of the local layers.
    for prompt_len in (1, 13):
        prompt = [[ettin_tiny.CLS_ID] + rng.randint(0, 500, size=prompt_len - 1).tolist()]
        ours = generate_lib.generate(model, prompt, max_new_tokens=40)[0]
        with torch.no_grad():
            theirs = torch_model.generate(torch.tensor(prompt), attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                                          max_new_tokens=40, do_sample=False)
        theirs = theirs[0, prompt_len:].tolist()
        assert ours == theirs, (prompt_len, ours, theirs)
        assert len(set(ours)) > 3, ours   # a real sequence, not one token repeated


def test_an_exported_decoders_tokenizer_encodes_prompts_as_generate_does(decoder_dir, tmp_path):
    """transformers' tokenizer(prompt) on the export gives encode_prompt's `[CLS] text` (a
    trailing [SEP] would end the document before the continuation), also when the export
    copies a tokenizer directory."""
    path, model = decoder_dir
    ours = tokenizer_lib.load(os.path.join(path, "tokenizer.json"))
    copied = str(tmp_path / "copied")
    tokenizer_dir = tokenizer_lib.save(ours, str(tmp_path / "tokenizer"))
    hf.save_hf(model, model.config, copied, tokenizer=tokenizer_dir)
    for directory in (path, copied):
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        for prompt in ("the cat sat", "on a mat and then"):
            expected = generate_lib.encode_prompt(ours, prompt, model.config)
            assert theirs(prompt)["input_ids"] == expected, directory
        assert theirs("a cat", "the dog")["input_ids"] == (
            generate_lib.encode_prompt(ours, "a cat", model.config) + [ettin_tiny.SEP_ID]
            + ours.encode("the dog", add_special_tokens=False).ids)
    # The export writes the special tokens and decoding settings data_pipeline.tokenizer.save
    # writes (no clean-up of spaces, [UNK] by name).
    written, saved = ({k: v for k, v in json.load(open(os.path.join(d, "tokenizer_config.json"))).items()
                       if k.endswith("_token") or k == "clean_up_tokenization_spaces"}
                      for d in (path, tokenizer_dir))
    assert written == saved


def test_a_model_without_mask_token_exports_its_tokenizer(decoder_dir, tmp_path):
    """mask_token_id -1 (an imported config.json's null): the export names no [MASK] in the
    config or the tokenizer (the tokenizer's id_to_token(-1) raised OverflowError)."""
    path, model = decoder_dir
    config = dataclasses.replace(model.config, mask_token_id=-1)
    out = str(tmp_path / "no_mask")
    hf.save_hf(model, config, out, tokenizer=os.path.join(path, "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.mask_token is None and theirs.cls_token == "[CLS]"
    assert "mask_token_id" not in json.load(open(os.path.join(out, "config.json")))


def test_bad_lengths_and_temperatures_are_refused():
    model = _tiny("clm")
    for kwargs, words in ((dict(max_new_tokens=0), "max_new_tokens=0"),
                          (dict(max_new_tokens=4, temperature=float("nan")), "finite temperature"),
                          (dict(max_new_tokens=4, temperature=-1.0), "finite temperature")):
        with pytest.raises(ValueError, match=words):
            generate_lib.generate(model, [[ettin_tiny.CLS_ID, 5]], **kwargs)


def test_stops_at_the_first_stop_token():
    model = _tiny("clm", seed=3)
    prompt = [[ettin_tiny.CLS_ID, 5, 6, 7]]
    free = generate_lib.generate(model, prompt, max_new_tokens=30)[0]
    assert len(free) == 30 and ettin_tiny.SEP_ID not in free
    # Declare the token emitted at step 6 to be [SEP]/EOS: generation must end right there.
    stop = free[6]
    model.config = dataclasses.replace(model.config, sep_token_id=stop, eos_token_id=stop)
    stopped = generate_lib.generate(model, prompt, max_new_tokens=30)[0]
    assert stopped == free[:free.index(stop) + 1]


def test_kv_cache_equals_full_recompute():
    model = _tiny("clm", seed=1)
    rng = np.random.RandomState(1)
    prompts = rng.randint(0, 500, size=(3, 9))
    cached = generate_lib.generate(model, prompts, max_new_tokens=30)
    recomputed = generate_lib.generate(model, prompts, max_new_tokens=30, use_cache=False)
    assert cached == recomputed
    assert any(len(row) > 10 for row in cached)


def test_nucleus_sampling_stays_in_nucleus():
    rng = np.random.RandomState(2)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 2.0
    top_p = 0.6
    samples = np.stack([np.asarray(generate_lib.sample_next(
        jnp.asarray(logits), jax.random.key(i), temperature=0.7, top_p=top_p)) for i in range(300)])
    for row in range(4):
        probs = np.exp(logits[row] / 0.7 - np.max(logits[row] / 0.7))
        probs /= probs.sum()
        order = np.argsort(-probs)
        mass_before = np.cumsum(probs[order]) - probs[order]
        nucleus = set(order[mass_before < top_p].tolist())
        seen = set(samples[:, row].tolist())
        assert seen <= nucleus, (row, seen - nucleus)
        assert seen == nucleus, (row, nucleus - seen)   # 300 draws reach every nucleus token
    greedy = np.argmax(logits, axis=-1)
    tiny_p = generate_lib.sample_next(jnp.asarray(logits), jax.random.key(0), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(tiny_p), greedy)


def test_nucleus_of_tied_logits_is_the_smallest_ranked_set():
    """Tokens tied with the last one in the nucleus stay out of it (ties ranked by id, as a
    stable sort gives): probabilities [1/2, 1/4, 1/4] at top_p 3/4 keep tokens 0 and 1; four
    equal logits at top_p 0.3 keep 0 and 1 (mass before each: 0, 1/4, 1/2, 3/4)."""
    for probs, top_p in (([0.5, 0.25, 0.25], 0.75), ([0.25] * 4, 0.3)):
        logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (400, 1))
        samples = np.asarray(generate_lib.sample_next(logits, jax.random.key(0),
                                                      temperature=1.0, top_p=top_p))
        assert set(samples.tolist()) == {0, 1}, (probs, np.bincount(samples))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ettin_jax.generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_generates_from_a_training_run_and_refuses_encoders(decoder_dir, tmp_path):
    path, model = decoder_dir
    run = str(tmp_path / "decoder_run")
    checkpoint.save_imported(model, dataclasses.asdict(model.config), run)
    result = _cli(f"--checkpoint={run}", f"--tokenizer={path}", "--prompt=the cat", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-2000:]
    # The run is opened once: its config (decoder or not) and weights from one reader.
    assert result.stderr.count("Given directory is read only") == 1, result.stderr[-2000:]
    tokenizer = tokenizer_lib.load(path)
    prompt = generate_lib.encode_prompt(tokenizer, "the cat", model.config)
    new = generate_lib.generate(model, [prompt], max_new_tokens=12)[0]
    assert len(prompt) > 2 and new
    if new[-1] == ettin_tiny.SEP_ID:
        new = new[:-1]
    assert result.stdout.strip() == ("the cat" + tokenizer.decode(new, skip_special_tokens=False)).strip()

    # A training run of the wrong objective (an encoder): refused, naming the run.
    encoder_run = str(tmp_path / "encoder_run")
    encoder = _tiny("mlm")
    checkpoint.save_imported(encoder, dataclasses.asdict(encoder.config), encoder_run)
    result = _cli(f"--checkpoint={encoder_run}", "--prompt=the cat", f"--tokenizer={path}")
    assert result.returncode != 0
    assert encoder_run in result.stderr and "encoder" in result.stderr, result.stderr[-2000:]
    encoder_hf = str(tmp_path / "encoder_hf")
    hf.save_hf(encoder, encoder.config, encoder_hf)
    with pytest.raises(ValueError, match=f"{encoder_hf}: this is an encoder"):
        generate_lib.load_decoder(None, encoder_hf, path)
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        generate_lib.load_decoder(run, path, None)


def test_the_callers_model_keeps_its_training_mode():
    """generate() decodes in eval mode without switching the caller's model out of train mode
    (a training loop that samples between steps would otherwise train without dropout)."""
    model = _tiny("clm", seed=2)
    want = generate_lib.generate(model, [[ettin_tiny.CLS_ID, 5, 6]], max_new_tokens=5)
    dropouts = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)]
    assert dropouts and all(d.deterministic for d in dropouts)
    model.train()
    assert generate_lib.generate(model, [[ettin_tiny.CLS_ID, 5, 6]], max_new_tokens=5) == want
    assert not any(d.deterministic for d in dropouts)
