"""Shared defaults for every Ettin config, and the grammar of the `:arg` string.

A size file (`configs/ettin_150m.py`) sets only what differs per size (shapes,
peak LR, weight decay, warmup lengths) and calls `get_config_for_size`.

The `arg` after the colon in `--config=configs/ettin_150m.py:ARG` reads

    ARG      := RUN_ARG [ "+" RUN_ARG ]      # one run, or a pair (below)
    RUN_ARG  := RUN [ "," KEY "=" VALUE ]*
    RUN      := OBJECTIVE [ "_" PHASE ]
    OBJECTIVE:= "mlm" | "clm"               # encoder (masked LM) or decoder (causal LM)
    PHASE    := "ext" | "decay"             # context extension, decay (default: pre-training)
              | "from_clm" | "from_mlm"     # cross-objective: continue the other objective's model

e.g. `mlm`, `clm_ext`, `mlm_decay`, `mlm_from_clm`, `clm_from_mlm,mntp=true`. The
KEY=VALUE options are the short switches listed in `_OPTIONS`; anything else is
overridden with `--config.a.b=value` flags as usual.

A pair `A+B` (`mlm+clm`, `mlm_ext+clm_ext`, `mlm_decay+clm_decay`, `mlm_from_clm+clm_from_mlm`)
names an encoder run and a decoder run of one phase that train in lockstep on the same packed
rows (ettin_jax.pairs). Options belong to the run they follow (`mlm_from_clm,mntp=true+
clm_from_mlm`). `get_config("A+B")` returns A's config with `config.pair = "A+B"`; main.py
builds each side as `get_config(A)` and `get_config(B)` of the same file with the same
`--config.*` overrides (ettin_jax.pairs.side_configs). Single runs have `config.pair == ""`.

Facts and their sources: ../shared/ettin_recipe.md (section numbers in comments).
"""
from __future__ import annotations

import ml_collections

OBJECTIVES = ("mlm", "clm")
PHASES = ("pretrain", "ext", "decay", "cross")
DATA_SEED = 21           # `shuffle_seed` of every Ettin yaml, cross-objective runs included

# Special token ids of the ModernBERT tokenizer (recipe §6).
UNK_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID = 50280, 50281, 50282, 50283, 50284
VOCAB_SIZE = 50368

# Short options accepted after the run name: name -> (parser, help).
_OPTIONS = {
    "mntp": (lambda s: _parse_bool("mntp", s),
             "encoder-from-decoder run trains with masked next-token prediction"),
    "window": (str, "decoder local window: 'training' (65 keys, as Ettin trained; the default) or "
                       "'transformers' (64 keys)"),
}


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"config option {key}={text!r}: expected true or false")


def split_pair(arg: str | None) -> list[str]:
    """The RUN_ARGs of a config arg: [arg] for one run, [A, B] for a pair `A+B`.

    A pair's runs must be one encoder and one decoder run of the same phase (module docstring).
    """
    if not arg or "+" not in arg:
        return [arg]
    runs = [part.strip() for part in arg.split("+")]
    if len(runs) != 2 or not all(runs):
        raise ValueError(f"config arg {arg!r}: a pair is two runs joined by one '+', "
                         "e.g. mlm+clm or mlm_ext+clm_ext")
    (objective_a, phase_a, _), (objective_b, phase_b, _) = map(parse_arg, runs)
    if objective_a == objective_b:
        raise ValueError(f"config arg {arg!r}: a pair is one encoder (mlm) and one decoder (clm) "
                         f"run; both sides are {objective_a}")
    if phase_a != phase_b:
        raise ValueError(f"config arg {arg!r}: a pair's runs must be of one phase (they train "
                         f"on the same rows), got {phase_a} and {phase_b}")
    return runs


def parse_arg(arg: str | None) -> tuple[str, str, dict]:
    """Splits one run's config arg into (objective, phase, options); see the module docstring.
    A pair `A+B` is split by `split_pair` first."""
    if not arg:
        raise ValueError(
            "missing config arg: use e.g. --config=configs/ettin_150m.py:mlm "
            "(runs: mlm, clm, mlm_ext, clm_ext, mlm_decay, clm_decay, mlm_from_clm, clm_from_mlm; "
            "pairs: mlm+clm, ...)")
    if "+" in arg:
        raise ValueError(f"config arg {arg!r} is a pair: split it with split_pair first")
    run, *pairs = [p.strip() for p in arg.split(",")]
    objective, _, phase = run.partition("_")
    if objective not in OBJECTIVES:
        raise ValueError(f"config arg {arg!r}: objective {objective!r} is not one of {OBJECTIVES}")
    if phase in ("", "pretrain"):
        phase = "pretrain"
    elif phase in ("from_clm", "from_mlm"):
        source = phase.removeprefix("from_")
        if source == objective:
            raise ValueError(f"config arg {arg!r}: a cross-objective run continues the *other* objective")
        phase = "cross"
    elif phase not in ("ext", "decay"):
        raise ValueError(
            f"config arg {arg!r}: phase {phase!r} is not one of ext, decay, from_clm, from_mlm")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in _OPTIONS:
            known = ", ".join(f"{k} ({h})" for k, (_, h) in _OPTIONS.items())
            raise ValueError(f"config arg {arg!r}: unknown option {pair!r}; known: {known}")
        options[key] = _OPTIONS[key][0](value)
    if options.get("mntp") and not (objective == "mlm" and phase == "cross"):
        raise ValueError(f"config arg {arg!r}: mntp applies only to mlm_from_clm")
    if "window" in options and objective != "clm":   # encoders' local window is symmetric
        raise ValueError(f"config arg {arg!r}: window applies only to clm runs (decoders); in "
                         "a pair, put it on the clm side (mlm+clm,window=...)")
    return objective, phase, options


def model_config(*, num_layers: int, hidden_size: int, intermediate_size: int,
                 num_heads: int, vocab_size: int = VOCAB_SIZE) -> ml_collections.ConfigDict:
    """Architecture of one size (recipe §1, §2). `intermediate_size` is I: Wi maps H -> 2I."""
    m = ml_collections.ConfigDict()
    m.vocab_size = vocab_size
    m.hidden_size = hidden_size
    m.intermediate_size = intermediate_size
    m.num_layers = num_layers
    m.num_heads = num_heads
    m.causal = False                      # False: encoder (MLM); True: decoder (CLM)
    m.global_attn_every_n_layers = 3      # layer i is global iff i % 3 == 0
    m.local_attention = 128               # encoder local layers see |i-j| <= 64
    # Decoder local layers: 'training' = keys i-64..i (FA2 window (64, 64) + causal, as Ettin
    # trained; recipe §3.2.1), 'transformers' = keys i-63..i (transformers' own sliding window).
    m.decoder_window = "training"
    m.global_rope_theta = 10_000.0
    m.local_rope_theta = 10_000.0
    m.max_position_embeddings = 1024
    m.norm_eps = 1e-5
    m.embedding_dropout = 0.0
    m.attn_out_dropout = 0.1              # dropout on the attention-output branch (recipe §1.2)
    m.mlp_dropout = 0.0
    m.initializer_range = 0.02            # full_megatron truncated normal (recipe §1.4)
    m.initializer_cutoff_factor = 2.0
    m.dtype = "bfloat16"                  # compute dtype; parameters stay float32
    m.attention_impl = "auto"             # auto | xla | pallas | mosaic | cudnn | splash
    # False: a Python loop over the layers. True: the repeated (local, local, global) layer
    # groups run as one lax.scan, so XLA compiles one group instead of every layer (the H100
    # compile of the train step here: 150m 20 s vs 28 s, 1b 31 s vs 34 s). But the scan
    # stacks every activation saved for the backward into [groups, ...] buffers, which XLA
    # fills with zeros, copies into and slices out of: the 150m step at 32 x 1024 compiled
    # for an H100 moves 241 GB in elementwise kernels instead of 120 (roofline 102 ms vs
    # 66 ms) and plans about twice the memory (bench/hlo_profile.py, bench/RESULTS.md).
    # So the loop is the default; the scan is for compile time or remat.
    m.scan_layers = False
    # Rematerialise the scanned group in the backward pass to save activation memory (needs
    # scan_layers): none | full (keep only each group's input) | dots (also keep the weight
    # matmuls' outputs) | dots_attention (also keep the attention kernels' outputs and the
    # dropout masks, so the backward runs no forward attention kernel and draws no mask).
    m.remat = "none"
    # q, k, v from the layer's one qkv weight: fused (one matmul, a [batch, seq, 3, heads,
    # head_dim] output the attention kernels read strided) | qk_v (q and k in one matmul, v
    # in its own, written contiguously). Same parameters and results; the H100 roofline of
    # the 150m step is 1.7% lower with qk_v (bench/RESULTS.md), but two narrower GEMMs may
    # run slower, which only a GPU tells (`bash bench/gpu.sh --stages=tune` times it).
    m.qkv_projection = "fused"
    m.pad_token_id = PAD_ID
    m.cls_token_id = CLS_ID
    m.sep_token_id = SEP_ID
    m.mask_token_id = MASK_ID
    m.bos_token_id = CLS_ID
    m.eos_token_id = SEP_ID
    return m


def data_config(*, model: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """`config.data`: what data_pipeline.loader reads (its docstring has the batch format).

    seq_len is config.train.seq_len and the mask ratios are config.train.{eval_,}mask_ratio.
    Mixture strings: comma-separated PATH[:TOKEN_SHARE]; a PATH holds prepare output
    (manifest.json), MDS shards (index.json) or data-order parquet (data_pipeline.sources).
    """
    d = ml_collections.ConfigDict()
    d.mixture = ""                  # "" = demo corpus from the Python stdlib (demo_dir)
    d.eval_mixture = ""             # "" = hold out the last eval_documents of each source
    d.eval_documents = 512          # per source, at most a tenth of it
    d.eval_batch_size = 64          # global rows per eval batch
    d.tokenizer = ""                # dir/tokenizer.json; "" = the copy prepare kept / demo's
    d.unk_token_id = model.cls_token_id - 1   # ModernBERT layout: [UNK] right below [CLS]
    d.seed = seed                   # shuffles and masks derive from (seed, stream position)
    d.shuffle = True
    d.num_workers = 2               # Grain worker processes (0 = in the main process)
    d.worker_group_rows = 16        # rows a worker hands over at once
    d.worker_buffer_groups = 4      # groups prefetched per worker
    d.pack_pool_size = 256          # packing lookahead (pending document pieces)
    d.pack_fill_min = 32            # split a piece into a row gap this big (0 = never)
    d.mds_cache_dir = ""            # where zstd MDS shards are decompressed ("" = beside them)
    d.demo_dir = "data/demo"
    d.demo_max_bytes = 8_000_000    # text read from the stdlib for the demo corpus
    return d


# Sizes whose clm_decay yaml keeps the local RoPE base at 10k (standard/<size>/prolong_decay/
# decoder_<size>.yaml sets local_attn_rotary_emb_base: 10000.0); the others leave it unset.
_CLM_DECAY_LOCAL_10K = ("17m", "32m", "68m", "400m")
# Rows of train.seq_len in the largest micro batch that fits one 80 GB H100 (see
# _add_training_sections), per size and row length, model defaults (layers as a loop, remat
# none): XLA's GPU allocation plan of the train step, bench/memory.py --target=h100
# --budget_gb=60 (figures in bench/RESULTS.md; the smaller of mlm and clm). The scanned
# layers without remat need about twice the memory: schedules.max_micro_rows halves these then.
MAX_MICRO_ROWS = {
    "17m": {1024: 913, 8192: 115},
    "32m": {1024: 442, 8192: 55},
    "68m": {1024: 183, 8192: 22},
    "150m": {1024: 103, 8192: 13},
    "400m": {1024: 45, 8192: 5},
    "1b": {1024: 23, 8192: 2},
}


def rope_thetas(size: str, objective: str, phase: str) -> tuple[float, float]:
    """(global, local) RoPE base of a run, as Ettin's released yamls set them (recipe §3.2.1).

    A yaml without `local_attn_rotary_emb_base` (or with -1) uses the global base for local
    layers too. Sizes not in Ettin's table (e.g. `tiny`) follow the "otherwise" rows.
    """
    if phase == "pretrain":
        return 10_000.0, 10_000.0
    if phase == "ext":
        return 160_000.0, 10_000.0 if size == "17m" else 160_000.0
    if phase == "decay" and objective == "clm":
        return 160_000.0, 10_000.0 if size in _CLM_DECAY_LOCAL_10K else 160_000.0
    return 160_000.0, 160_000.0            # mlm_decay and both cross-objective runs


def get_config_for_size(arg: str | None, *, size: str, model: ml_collections.ConfigDict,
                        peak_lr: float, weight_decay: float, lr_warmup_tokens: float,
                        batch_warmup_tokens: float) -> ml_collections.ConfigDict:
    """The full config of one size for the run named by `arg` (recipe §3); for a pair `A+B`,
    A's config with `pair = "A+B"` (module docstring)."""
    runs = split_pair(arg)
    if len(runs) == 2:
        c = get_config_for_size(runs[0], size=size, model=model, peak_lr=peak_lr,
                                weight_decay=weight_decay, lr_warmup_tokens=lr_warmup_tokens,
                                batch_warmup_tokens=batch_warmup_tokens)
        c.pair = "+".join(runs)
        return c
    objective, phase, options = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.size = size
    c.objective = objective
    c.phase = phase
    c.seed = 21 if phase != "cross" else 210
    c.pair = ""                            # "A+B" for a pair config (module docstring)

    c.model = model
    c.model.causal = objective == "clm"
    if "window" in options:
        if options["window"] not in ("transformers", "training"):
            raise ValueError(f"config option window={options['window']!r}: "
                             "expected 'transformers' or 'training'")
        c.model.decoder_window = options["window"]
    c.model.global_rope_theta, c.model.local_rope_theta = rope_thetas(size, objective, phase)
    long_context = phase != "pretrain"
    if long_context:                       # phases 2-3 and cross-objective (recipe §3.2, §3.3)
        c.model.max_position_embeddings = 7999

    c.train = ml_collections.ConfigDict()
    c.train.mask_ratio = {"pretrain": 0.30, "ext": 0.30, "decay": 0.15, "cross": 0.15}[phase]
    c.train.eval_mask_ratio = 0.15
    c.train.mntp = bool(options.get("mntp", False))
    c.train.seq_len = 8192 if long_context else 1024
    c.train.global_batch_size = 4608      # sequences per optimizer step, every phase
    # Workdir of the previous phase. Phases 2-3 and cross-objective runs must name one, or
    # "scratch" to start them from a random initialisation on purpose (ettin_jax.workdir).
    c.train.init_from = ""
    # Cross-objective runs seed the model with 210 but shuffle the data with 21 (recipe §3.2.1).
    c.data = data_config(model=c.model, seed=DATA_SEED)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "stableadamw"
    c.optimizer.peak_lr = peak_lr
    c.optimizer.weight_decay = weight_decay
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.grad_clip_norm = 0.0      # 0 = off (StableAdamW clips updates instead)
    # Storage dtype of the Adam moments. 'bfloat16' halves their memory (a TPU-friendly
    # choice); the update itself is always computed in float32.
    c.optimizer.moments_dtype = "float32"
    c.optimizer.lr_warmup_tokens = lr_warmup_tokens
    c.optimizer.batch_warmup_tokens = batch_warmup_tokens
    # Batch-size warmup starts with this share of the step's sequences (in whole micro
    # batches, at least one) and grows linearly to all of them (schedules.warmup_micro_batches).
    # Our choice, not a figure of Ettin's: its yamls set batch_size_warmup_min_size to the
    # per-GPU micro batch (1/8 to 1/48 of a GPU's 1152 sequences in phase 1, 1/96 to 1/576 in
    # cross-objective runs), a key only bert24's sequence packer reads, and Ettin ran with
    # sequence_packing: false (recipe §4.4: how its warmup ran is unconfirmed). Each size the
    # warmup passes through compiles the step once more, about 1 / f of them.
    c.optimizer.batch_warmup_start_fraction = 1 / 8
    # StableAdamW decays weights by wd * lr_t / max_lr, max_lr = peak_lr * max_lr_fraction: the
    # LR the optimizer was built with (recipe §4.1). Extension and decay carry the phase-1
    # optimizer over (so its max_lr), a cross-objective run builds a fresh one at its own LR.
    c.optimizer.max_lr_fraction = 1.0

    _add_training_sections(c, size=size, phase=phase)
    _add_demo_variant(c)
    return c


def _add_training_sections(c: ml_collections.ConfigDict, *, size: str, phase: str):
    """Schedule, batching, checkpoints, mesh and logging of one phase (recipe §3.2, §3.3, §4.2)."""
    huge = size == "1b"                     # the 1b's extension and decay are a third as long
    # Each step's rows are split into micro batches whose gradients are summed (gradient
    # accumulation). 0 = auto: the fewest micro batches whose tokens per data-parallel device
    # stay within max_micro_tokens, for the run's measured mean length and device count
    # (ettin_jax.schedules.grad_accum_steps); a count fixes the split instead. max_micro_tokens
    # is the largest micro batch of the default model settings (remat none) that fits an 80 GB
    # H100 with JAX's default 75% memory pool, from XLA's GPU allocation plan (bench/memory.py
    # --target=h100 --budget_gb=60, bench/RESULTS.md); lower it for smaller accelerators.
    c.train.grad_accum_steps = 0
    # Sizes not measured (the test model) get 0: set it, or a grad_accum_steps count.
    c.train.max_micro_tokens = (MAX_MICRO_ROWS.get(size, {}).get(c.train.seq_len, 0)
                                * c.train.seq_len)
    c.train.init_optimizer_state = phase in ("ext", "decay")   # cross-objective: params only
    # Ettin's yamls evaluate never (eval_interval 99999...); a held-out loss now and then
    # costs little (8 batches per 1000 steps) and shows overfitting on small data.
    c.train.eval_every_steps = 1000
    c.train.eval_batches = 8                # held-out batches per eval; 0 = no eval
    # XLA options for the run's programs, "NAME=VALUE,...": ettin_jax/xla_options.py.
    c.train.xla_options = ""
    # Speed knobs (bench/train_step.py --variants measures them; bench/RESULTS.md "tuning knobs").
    # PRNG of the dropout keys: threefry | rbg | unsafe_rbg. Another PRNG draws other masks, so
    # it is a recorded setting (ettin_jax.workdir), unlike the loss chunks, which only trade
    # the live logits' memory (rows x vocab chunk, float32) against loop steps.
    c.train.prng_impl = "threefry"
    c.train.loss_vocab_chunk = 4096         # most vocabulary columns per chunk of the cross-entropy
    c.train.loss_row_chunk = 8192           # most predicted positions per chunk (equal chunks)
    # Divergence guard (ettin_jax.divergence): a step whose loss, gradient norm or LR is not
    # finite leaves params and optimizer state as they were, one whose new params' norm is not
    # keeps the params (either counts in skipped_steps); this many skips in a row stop the run
    # with an error naming the last good checkpoint.
    c.train.max_nonfinite_steps = 3
    # Warn when a logged loss exceeds this factor x the mean of the recent logged losses (0 = off).
    c.train.loss_spike_factor = 3.0
    # A re-run whose settings (LR, schedule, intervals, eval, logging) differ from the ones the
    # workdir recorded in run_identity.json is refused unless this is True (ettin_jax.workdir);
    # a change of size, objective, phase, model shape, tokenizer or data mixture always is.
    c.train.allow_config_change = False
    # Persistent XLA compilation cache of main.py: a restart (resume, next phase) reads the
    # compiled train step from disk instead of compiling it again. Shared by all runs of this
    # user (XLA keys each program by its HLO, jax version and device); "" = off. An already
    # set JAX_COMPILATION_CACHE_DIR (and JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) wins.
    c.train.compilation_cache_dir = "~/.cache/ettin-jax/xla"
    c.train.compilation_cache_min_compile_secs = 1.0   # programs compiling faster are not cached
    # XLA's own caches, kept in the same dir (jax_persistent_cache_enable_xla_caches): "all" =
    # GEMM autotuning results per fusion and the compiled GPU kernels, so a program that
    # changed (a config edit, the other objective, the next phase) reuses the kernels and
    # autotuning it shares with one compiled before; "xla_gpu_per_fusion_autotune_cache_dir"
    # = jax's default (autotuning only); "" = neither. JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES
    # wins when set.
    c.train.compilation_cache_xla_caches = "all"

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "warmup_stable_decay" if phase in ("pretrain", "cross") else "one_minus_sqrt"
    c.schedule.lr_fraction = {"pretrain": 1.0, "ext": 1.0, "decay": 0.5, "cross": 0.5}[phase]
    c.schedule.total_tokens = {"pretrain": 1.7e12, "ext": 8.3333e10 if huge else 2.5e11,
                               "decay": 1.6667e10 if huge else 5e10,
                               "cross": 1.6667e10 if huge else 5e10}[phase]
    if phase in ("ext", "decay"):            # 1-sqrt over the whole phase (t_decay = t_max)
        # A derived reference (`* 1`): it follows total_tokens, and an override of it changes
        # it alone (setting a field that holds total_tokens' own reference would set both).
        c.schedule.decay_tokens = c.schedule.get_ref("total_tokens") * 1
    else:
        c.schedule.decay_tokens = {"pretrain": 0.0, "cross": 3.333e9 if huge else 1e10}[phase]
    c.schedule.final_fraction = {"pretrain": 0.02, "ext": 0.5, "decay": 0.04, "cross": 0.02}[phase]
    if phase in ("ext", "decay"):
        c.optimizer.lr_warmup_tokens = 0.0
        c.optimizer.batch_warmup_tokens = 0.0
    if phase == "cross":
        c.optimizer.lr_warmup_tokens = 1e9 if huge else 3e9
        c.optimizer.batch_warmup_tokens = 1e10
        c.optimizer.max_lr_fraction = c.schedule.lr_fraction

    c.checkpoint = ml_collections.ConfigDict()
    # Recipe §3.3 (cross-objective: §3.2.1); converted to steps by schedules.checkpoint_every_steps.
    c.checkpoint.every_tokens = {"cross": 3.333333333e9 if huge else 1e10}.get(phase, 8.5e9)
    c.checkpoint.every_steps = 0            # > 0 overrides every_tokens
    c.checkpoint.keep_last = 3
    # Also keep every 10th save for good (0 = none). Ettin kept every save
    # (save_num_checkpoints_to_keep: 100000, 200 of phase 1 at 8.5B tokens); 1 does the same,
    # at ~1.8 GB each for 150m (computed, not measured: 150M float32 params, two Adam
    # moments).
    c.checkpoint.keep_every_nth = 10
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()    # device counts per axis; -1 = all the rest
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.progress_every_secs = 60.0
    c.log.device_peak_flops = 0.0           # per device, for MFU; 0 = from jax's device_kind
    c.log.profile_steps = 0                 # > 0: profile that many steps once, from step 10
    # Expected training throughput (all devices), for the wall time of `main.py --dry_run`'s
    # plan; 0 = unknown (bench/RESULTS.md has measured figures).
    c.log.tokens_per_sec_estimate = 0.0


def _add_demo_variant(c: ml_collections.ConfigDict):
    """`config.demo`: with no dataset configured (data.mixture == "") the run is a demo on the
    stdlib corpus that ends in minutes on a laptop CPU. It mirrors the sections it replaces
    (ettin_jax.demo.apply_demo copies every key over); values that follow from the phase are
    derived here, values that follow from other demo keys by reference (flags may change them).
    """
    demo = c.demo = ml_collections.ConfigDict()
    demo.train = ml_collections.ConfigDict()
    demo.train.global_batch_size = 16
    demo.train.grad_accum_steps = 1
    demo.train.seq_len = 128
    demo.train.eval_every_steps = 40
    demo.train.eval_batches = min(c.train.eval_batches, 4)
    demo.data = ml_collections.ConfigDict()
    demo.data.eval_batch_size = demo.train.get_ref("global_batch_size") * 1   # derived: see
    # schedule.decay_tokens in _add_training_sections
    demo.data.num_workers = 0               # tiny batches: loader workers would only compete
    demo.schedule = ml_collections.ConfigDict()
    demo.schedule.total_tokens = 120.0 * 16 * 128    # 120 steps; a float as schedule.total_tokens
    # The phase's decay keeps its share of the budget (all of it for extension and decay).
    decay_share = c.schedule.decay_tokens / c.schedule.total_tokens
    demo.schedule.decay_tokens = demo.schedule.get_ref("total_tokens") * decay_share
    demo.optimizer = ml_collections.ConfigDict()
    # A warmup only where the phase has one (not in extension and decay).
    demo.optimizer.lr_warmup_tokens = 15.0 * 16 * 128 if c.optimizer.lr_warmup_tokens > 0 else 0.0
    demo.optimizer.batch_warmup_tokens = 0.0
    demo.checkpoint = ml_collections.ConfigDict()
    demo.checkpoint.every_steps = 40
    demo.log = ml_collections.ConfigDict()
    demo.log.every_steps = 10
    # model.dtype on a CPU backend ("" = keep): CPUs lack fast bfloat16 matmuls.
    demo.cpu_model_dtype = "float32"
    # model.scan_layers on a CPU backend: XLA:CPU runs the 17m demo step about 17% faster with
    # the layer groups scanned than as a loop (bench/RESULTS.md, "The CPU demo").
    # The loop stays the default elsewhere for the GPU's memory traffic (model.scan_layers).
    demo.cpu_scan_layers = True
