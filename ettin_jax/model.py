"""The Ettin model: ModernBERT as transformers implements it, encoder and decoder, in Flax NNX.

One module serves both objectives. `config.causal=False` is `ModernBertForMaskedLM`,
`config.causal=True` is `ModernBertDecoderForCausalLM`; their parameter trees are
identical here (the decoder's q/k/v projections are kept fused, as Ettin trained them,
and split only on Hugging Face export), so a checkpoint moves between objectives as is.

    x = LayerNorm(embed[input_ids])
    for layer i:   (layer 0 has no attention norm)
        x = x + Dropout(Wo(Attention_i(RoPE(Wqkv(attn_norm(x))))))
        a, g = Wi(mlp_norm(x));  x = x + Wo_mlp(gelu(a) * g)
    hidden = final_norm(x)
    logits = LayerNorm(gelu(dense(hidden))) @ embed.T + decoder_bias

Layer i is global iff i % global_attn_every_n_layers == 0, else local (a window of
local_attention // 2 on each side for the encoder; the last 64 or 65 keys for the decoder).
After layer 0 the layers repeat in groups of global_attn_every_n_layers (local, local,
global); with `config.scan_layers` the whole groups run as one `lax.scan` (XLA compiles one
group, not every layer), optionally rematerialised (`config.remat`), while each layer keeps
its own parameters (`layers/<i>/...`).
Parameters are float32 and carry logical axis names (`vocab`, `embed`, `heads`, `kv`,
`mlp`, `norm`) for the sharding rules; matmuls run in `config.dtype`; the residual
stream, norms, RoPE and softmax stay in float32, as under PyTorch autocast.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ettin_jax import attention as attention_lib
from ettin_jax.model_config import DROPOUT_MASK, REMAT_POLICIES, ModelConfig


def _truncated_normal(rngs: nnx.Rngs, shape, std: float, cutoff: float):
    """N(0, std^2) truncated at +-cutoff*std, as torch's trunc_normal_(std, a=-c*std, b=c*std)."""
    return std * jax.random.truncated_normal(rngs.params(), -cutoff, cutoff, shape, jnp.float32)


def fold_in_each(keys, data):
    """`[fold_in(key, d) for key, d in zip(keys, data)]` as one key array; `keys` `[n]` or one
    key for all. Threefry keys fold in one vectorised hash, which a GPU compile unrolls once
    instead of once per key (twenty rounds each); other PRNGs go key by key, since
    unsafe_rbg's fold_in gives other keys under vmap."""
    keys = keys if keys.ndim else jnp.broadcast_to(keys, data.shape)
    if str(jax.random.key_impl(keys)) == "threefry2x32":
        return jax.vmap(jax.random.fold_in)(keys, data)
    return jnp.stack([jax.random.fold_in(key, d) for key, d in zip(keys, data)])


def _param(value, axes):
    """A float32 parameter annotated with logical axis names. It is placed by those names
    at creation only when a mesh is active (`jax.set_mesh` + `nnx.logical_axis_rules`);
    otherwise the names are metadata for `ettin_jax.sharding` to read."""
    mesh_active = not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=axes, eager_sharding=mesh_active)


def normalize(x, eps: float):
    """LayerNorm without its scale: (x - mean) / sqrt(var + eps) over the last axis, float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def layer_norm(x, scale, eps: float):
    """Bias-free LayerNorm over the last axis, computed in float32. x: `[..., hidden]`."""
    return normalize(x, eps) * scale[...]


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # exact erf GELU, as ACT2FN["gelu"]


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin `[batch, seq, 1, 2, head_dim // 2]` float32 for the rotate-half (GPT-NeoX)
    form: dimensions i and i + head_dim // 2 rotate together by position * inv_freq[i]; the
    sine carries the rotation's signs (-sin for the first half, +sin for the second)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, :, None, None, None] * inv_freq
    sin = jnp.sin(angles)
    return jnp.cos(angles), jnp.concatenate([-sin, sin], axis=-2)


def apply_rope(x, cos, sin):
    """x: `[batch, seq, heads, head_dim]`; rotation in float32, result in x's dtype.

    rotate_half(x) = (-x2, x1) is the two halves swapped (a flip of the size-2 axis) with
    the sign folded into `sin`: elementwise work XLA fuses into one loop, where slicing and
    concatenating halves copies the tensor (and zero-pads it in the gradient; timings in
    bench/RESULTS.md)."""
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    return (halves * cos + jnp.flip(halves, axis=-2) * sin).reshape(x.shape).astype(x.dtype)


def dropout(module: nnx.Dropout, x, key):
    """`module(x, rngs=key)` with the mask named DROPOUT_MASK, so a remat policy can keep it
    rather than draw it again in the backward (`model_config.REMAT_POLICIES`). Same mask and
    result as nnx.Dropout's; a None key (an inactive dropout) goes to the module itself."""
    if key is None or module.deterministic or module.rate in (0.0, 1.0):
        return module(x, rngs=key)
    keep_prob = 1.0 - module.rate
    keep = jax.random.bernoulli(key, p=keep_prob, shape=x.shape,
                                out_sharding=jax.typeof(x).sharding)
    return jax.lax.select(checkpoint_name(keep, DROPOUT_MASK), x / keep_prob, jnp.zeros_like(x))


class Block(nnx.Module):
    """One pre-norm transformer layer: attention (global or local) then GeGLU MLP."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        H, I, nH, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
        std_in = config.initializer_range
        std_out = config.initializer_range / math.sqrt(2.0 * config.num_layers)
        c = config.initializer_cutoff_factor
        self.window_size = config.window_size(layer)
        self.rope_theta = config.rope_theta(layer)
        self.causal = config.causal
        self.eps = config.norm_eps
        self.qkv_projection = config.qkv_projection
        # Layer 0's attention input is the (already normalised) embedding output.
        self.attn_norm = _param(jnp.ones((H,)), ("norm",)) if layer > 0 else None
        # [hidden, 3 (q,k,v), heads, head_dim]: the layout of HF's fused Wqkv output columns.
        self.qkv = _param(_truncated_normal(rngs, (H, 3, nH, hd), std_in, c),
                          ("embed", None, "heads", "kv"))
        self.attn_out = _param(_truncated_normal(rngs, (nH, hd, H), std_out, c),
                               ("heads", "kv", "embed"))
        self.attn_out_dropout = nnx.Dropout(config.attn_out_dropout, rngs=rngs)
        self.mlp_norm = _param(jnp.ones((H,)), ("norm",))
        # [hidden, 2 (input, gate), intermediate]: HF's Wi output chunked in two halves.
        self.mlp_in = _param(_truncated_normal(rngs, (H, 2, I), std_in, c), ("embed", None, "mlp"))
        self.mlp_out = _param(_truncated_normal(rngs, (I, H), std_out, c), ("mlp", "embed"))
        self.mlp_dropout = nnx.Dropout(config.mlp_dropout, rngs=rngs)

    def dropouts(self):
        """The layer's two dropouts, in the order of `__call__`'s `dropout_keys`."""
        return self.attn_out_dropout, self.mlp_dropout

    def __call__(self, x, positions, segment_ids, *, dtype, attention_impl: str, cache=None,
                 dropout_keys=(None, None)):
        """x: `[batch, seq, hidden]` float32 residual stream -> same.

        `dropout_keys` (from `EttinModel.layer_dropout_keys()`) replace the dropouts' own
        streams, which a scanned layer group cannot advance. With `cache=(k, v, index)`
        (decoding; k, v `[batch, max_len, heads, head_dim]`) the new keys and values are
        written at `index..` and the queries attend to the whole cache; returns `(x, (k, v))`
        then.
        """
        # The norms that feed a matmul have their scale folded into its weight rows,
        # (norm(x) * s) @ W = norm(x) @ (s[:, None] * W) up to rounding: the scale's gradient
        # is then reduced from the `[hidden, ...]` weight gradient, where XLA otherwise wrote
        # a `[batch, seq, hidden]` float32 product per norm and read it back (the 150m step
        # moves 15 GB less, bench/RESULTS.md; tests/test_hf.py checks the gradients).
        if self.attn_norm is None:
            h, qkv_weight = x, self.qkv[...]
        else:
            h = normalize(x, self.eps)
            qkv_weight = self.attn_norm[...][:, None, None, None] * self.qkv[...]
        h, qkv_weight = h.astype(dtype), qkv_weight.astype(dtype)
        if self.qkv_projection == "fused":
            qkv = jnp.einsum("bsh,hcnd->bscnd", h, qkv_weight)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:   # "qk_v": v written on its own, contiguous for the attention kernel
            qk = jnp.einsum("bsh,hcnd->bscnd", h, qkv_weight[:, :2])
            q, k = qk[:, :, 0], qk[:, :, 1]
            v = jnp.einsum("bsh,hnd->bsnd", h, qkv_weight[:, 2])
        cos, sin = rope_cos_sin(positions, q.shape[-1], self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            attn = attention_lib.attention(q, k, v, impl=attention_impl, segment_ids=segment_ids,
                                           causal=self.causal, window_size=self.window_size)
        else:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            # Keys beyond index+T are unwritten; causality hides them from every query.
            attn = attention_lib.xla_attention(q, k.astype(dtype), v.astype(dtype), causal=True,
                                               window_size=self.window_size, q_offset=index)
        out = jnp.einsum("bsnd,ndh->bsh", attn, self.attn_out[...].astype(dtype))
        attn_key, mlp_key = dropout_keys
        x = x + dropout(self.attn_out_dropout, out, attn_key).astype(jnp.float32)

        h = normalize(x, self.eps).astype(dtype)
        mlp_in_weight = self.mlp_norm[...][:, None, None] * self.mlp_in[...]
        gate_in = jnp.einsum("bsh,hci->bsci", h, mlp_in_weight.astype(dtype))
        inner = gelu(gate_in[:, :, 0]) * gate_in[:, :, 1]
        out = jnp.einsum("bsi,ih->bsh", dropout(self.mlp_dropout, inner, mlp_key),
                         self.mlp_out[...].astype(dtype))
        x = x + out.astype(jnp.float32)
        return x if cache is None else (x, (k, v))


@jax.custom_vjp
def _stack_apart(*leaves):
    """jnp.stack(leaves): `[len(leaves), *shape]`, whose gradient hands each leaf its slice as
    a buffer of its own (behind an optimization barrier). As plain slices of one stacked
    gradient, XLA fused the optimizer updates of every layer of a kind into one kernel whose
    code grew with depth (bench/RESULTS.md); apart, equal updates share one kernel."""
    return jnp.stack(leaves)


def _stack_apart_fwd(*leaves):
    return jnp.stack(leaves), None


def _stack_apart_bwd(_, cotangent):
    return tuple(jax.lax.optimization_barrier([cotangent[i] for i in range(cotangent.shape[0])]))


_stack_apart.defvjp(_stack_apart_fwd, _stack_apart_bwd)


@functools.partial(jax.jit, static_argnames=("graph", "dtype", "attention_impl"))
def _block_call(x, graph, params, rest, dropout_keys, *, positions, segment_ids, dtype,
                attention_impl):
    """`Block.__call__` as a jitted function of the block's graph (static), params and rest:
    layers of one kind (same window, RoPE theta and shapes) have equal graphs, so jax traces
    and lowers one of each kind and every layer calls it (XLA inlines the calls: the compiled
    program is the same). The dropout streams in `rest` are not advanced: `dropout_keys`
    replace them, so the block changes no state."""
    return nnx.merge(graph, params, rest)(x, positions, segment_ids, dtype=dtype,
                                          attention_impl=attention_impl,
                                          dropout_keys=dropout_keys)


class EttinModel(nnx.Module):
    """Ettin encoder (`config.causal=False`) or decoder (`True`).

    `model(input_ids, segment_ids=None, positions=None)` -> logits `[batch, seq, vocab]`
    float32. `segment_ids [batch, seq]` int32 marks packed documents (0 = padding);
    `positions [batch, seq]` are RoPE positions (default 0..seq-1), restarting per
    document when packed. Sparse MLM prediction: `head_logits(gather(hidden_states(...)))`.
    `model.train()` / `model.eval()` switch the dropouts on and off; `model.attention_impl`
    picks the attention implementation ('auto', 'xla', 'pallas', 'cudnn', 'splash').
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        config = ModelConfig.from_config(config)
        self.config = config
        self.attention_impl = config.attention_impl
        H, V = config.hidden_size, config.vocab_size
        c = config.initializer_cutoff_factor
        std = config.initializer_range
        self.tok_embeddings = _param(_truncated_normal(rngs, (V, H), std, c), ("vocab", "embed"))
        self.embed_norm = _param(jnp.ones((H,)), ("norm",))
        self.embed_dropout = nnx.Dropout(config.embedding_dropout, rngs=rngs)
        self.layers = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = _param(jnp.ones((H,)), ("norm",))
        # Ettin trained the head's dense with the "in" std (full_megatron; recipe §1.4).
        self.head_dense = _param(_truncated_normal(rngs, (H, H), std, c), ("embed", None))
        self.head_norm = _param(jnp.ones((H,)), ("norm",))
        self.decoder_bias = _param(jnp.zeros((V,)), ("vocab",))

    def hidden_states(self, input_ids, segment_ids=None, positions=None):
        """input_ids `[batch, seq]` -> final-norm hidden states `[batch, seq, hidden]` float32."""
        config = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32),
                                         input_ids.shape)
        dtype = config.compute_dtype
        impl = attention_lib.resolve_implementation(self.attention_impl)
        x = jnp.take(self.tok_embeddings[...], input_ids, axis=0)
        x = self.embed_dropout(layer_norm(x, self.embed_norm, config.norm_eps))
        run = dict(positions=positions, segment_ids=segment_ids, dtype=dtype, attention_impl=impl)
        keys = self.layer_dropout_keys()

        def unrolled(x, i):   # compiled apart, traced once per kind of layer (_block_call)
            return _block_call(x, *nnx.split(self.layers[i], nnx.Param, ...), keys[i], **run)

        if not config.scan_layers:
            for i in range(len(self.layers)):
                x = unrolled(x, i)
            return layer_norm(x, self.final_norm, config.norm_eps)
        n, groups = config.global_attn_every_n_layers, config.num_layer_groups
        x = unrolled(x, 0)
        if groups:
            x = self._scan_groups(x, range(1, 1 + n * groups), run, keys)
        for i in range(1 + n * groups, len(self.layers)):   # a last group that is not whole
            x = unrolled(x, i)
        return layer_norm(x, self.final_norm, config.norm_eps)

    def layer_dropout_keys(self) -> list:
        """Per layer, the keys its two dropouts draw (None for one that is off: eval mode or
        rate 0), advancing their streams as `dropout.rngs()` would: fold_in(stream key, count),
        count + 1. The keys of all layers are folded in one call (`fold_in_each`)."""
        active = [(i, j, dropout.rngs) for i, block in enumerate(self.layers)
                  for j, dropout in enumerate(block.dropouts())
                  if not (dropout.deterministic or dropout.rate in (0.0, 1.0))]
        keys = [[None, None] for _ in self.layers]
        if active:
            folded = fold_in_each(
                jnp.stack([stream.key[...] for _, _, stream in active]),
                jnp.stack([stream.count[...] for _, _, stream in active]))
            for index, (i, j, stream) in enumerate(active):
                keys[i][j] = folded[index]
                stream.count[...] += 1
        return [tuple(layer_keys) for layer_keys in keys]

    def _scan_groups(self, x, layers, run, keys):
        """Layers `layers` (whole groups of global_attn_every_n_layers) as one `lax.scan` over
        the groups, so XLA compiles one group body instead of every layer.

        Each layer keeps its own parameters (checkpoints, sharding and HF keys see the same
        tree): they are stacked here per position in the group, `[groups, *shape]`, and the
        gradient of the stack flows back to them, one buffer per layer (`_stack_apart`). The
        body rebuilds the group's layers from the first group's graph (same shapes, window and
        RoPE theta at each position) and the scanned slice. Dropout keys (`keys`, from
        `layer_dropout_keys()`) come from each layer's own stream before the scan, so the
        masks equal the unrolled model's.
        """
        def stack(trees):
            return jax.tree.map(_stack_apart, *trees)

        n = self.config.global_attn_every_n_layers
        layers = list(layers)
        graphs, rests, stacked, group_keys = [], [], [], []
        for position in range(n):
            members = [self.layers[i] for i in layers[position::n]]
            graph, _, rest = nnx.split(members[0], nnx.Param, ...)
            graphs.append(graph)
            rests.append(rest)
            stacked.append(stack([nnx.state(block, nnx.Param) for block in members]))
            group_keys.append(stack([keys[i] for i in layers[position::n]]))

        def group(x, scanned):
            group_params, scanned_keys = scanned
            # Merged, not _block_call: a jitted block inside the scan body made XLA's plan
            # of the scanned step move 2.3 GB more (bench/hlo_profile.py, 150m 32 x 1024).
            for graph, rest, params, dropout_keys in zip(graphs, rests, group_params, scanned_keys):
                block = nnx.merge(graph, params, rest)
                x = block(x, dropout_keys=dropout_keys, **run)
            return x, None

        if self.config.remat != "none":
            group = jax.checkpoint(group, policy=REMAT_POLICIES[self.config.remat],
                                   prevent_cse=False)   # scan already keeps CSE out
        x, _ = jax.lax.scan(group, x, (stacked, group_keys))
        return x

    def head_features(self, hidden):
        """Prediction head before the tied decoder: `[..., hidden]` -> `[..., hidden]` float32.
        Training feeds these to `cross_entropy.cross_entropy` with `tok_embeddings` and
        `decoder_bias`, which never builds the full logits."""
        dtype = self.config.compute_dtype
        h = jnp.einsum("...h,hk->...k", hidden.astype(dtype), self.head_dense[...].astype(dtype))
        return layer_norm(gelu(h), self.head_norm, self.config.norm_eps)

    def head_logits(self, hidden):
        """Prediction head and tied decoder: hidden `[..., hidden]` -> logits `[..., vocab]` float32."""
        dtype = self.config.compute_dtype
        logits = jnp.einsum("...h,vh->...v", self.head_features(hidden).astype(dtype),
                            self.tok_embeddings[...].astype(dtype),
                            preferred_element_type=jnp.float32)
        return logits + self.decoder_bias[...]

    def __call__(self, input_ids, segment_ids=None, positions=None):
        return self.head_logits(self.hidden_states(input_ids, segment_ids, positions))

    def init_cache(self, batch: int, max_len: int):
        """An empty KV cache for `decode`: per layer (k, v) `[batch, max_len, heads, head_dim]`."""
        config = self.config
        shape = (batch, max_len, config.num_heads, config.head_dim)
        return [(jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))
                for _ in range(config.num_layers)]

    def decode(self, input_ids, cache, index):
        """Decoder step with a KV cache (generation).

        input_ids `[batch, T]` are the tokens at positions index..index+T-1 (the prompt at
        index 0, then one token per step); returns (logits `[batch, T, vocab]`, new cache).
        """
        config = self.config
        if not config.causal:
            raise ValueError("decode() needs a decoder (config.model.causal=True); this model is an encoder")
        positions = jnp.broadcast_to(index + jnp.arange(input_ids.shape[1], dtype=jnp.int32),
                                     input_ids.shape)
        dtype = config.compute_dtype
        x = jnp.take(self.tok_embeddings[...], input_ids, axis=0)
        x = self.embed_dropout(layer_norm(x, self.embed_norm, config.norm_eps))
        new_cache = []
        for block, (k_cache, v_cache) in zip(self.layers, cache):
            x, layer_cache = block(x, positions, None, dtype=dtype, attention_impl="xla",
                                   cache=(k_cache, v_cache, index))
            new_cache.append(layer_cache)
        return self.head_logits(layer_norm(x, self.final_norm, config.norm_eps)), new_cache


def count_params(model: nnx.Module) -> int:
    """Number of parameters (the tied decoder weight counted once, as transformers does)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
