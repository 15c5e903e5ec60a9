"""Config files: the arg grammar, the recipe's values per size and phase, clear errors."""
import importlib

import pytest

from configs import base, ettin_150m

SIZES = ["17m", "32m", "68m", "150m", "400m", "1b"]
RUNS = ["mlm", "clm", "mlm_ext", "clm_ext", "mlm_decay", "clm_decay", "mlm_from_clm", "clm_from_mlm"]


@pytest.mark.parametrize("size", SIZES + ["tiny"])
@pytest.mark.parametrize("run", RUNS)
def test_every_size_builds_every_run(size, run):
    config = importlib.import_module(f"configs.ettin_{size}").get_config(run)
    objective, _, phase = run.partition("_")
    assert config.objective == objective
    assert config.model.causal == (objective == "clm")
    assert config.phase == {"": "pretrain", "ext": "ext", "decay": "decay"}.get(phase, "cross")


def test_recipe_values():
    c = importlib.import_module("configs.ettin_150m").get_config("mlm")
    assert (c.model.num_layers, c.model.hidden_size, c.model.intermediate_size, c.model.num_heads) == (22, 768, 1152, 12)
    assert c.optimizer.peak_lr == 8e-4 and c.optimizer.weight_decay == 1e-5
    assert c.train.mask_ratio == 0.30 and c.train.seq_len == 1024
    assert c.model.global_rope_theta == c.model.local_rope_theta == 10_000
    decay = importlib.import_module("configs.ettin_1b").get_config("mlm_decay")
    assert decay.train.mask_ratio == 0.15 and decay.train.seq_len == 8192
    assert decay.model.global_rope_theta == decay.model.local_rope_theta == 160_000
    assert decay.optimizer.weight_decay == 5e-5
    cross = importlib.import_module("configs.ettin_17m").get_config("mlm_from_clm,mntp=true")
    assert cross.train.mntp and cross.train.mask_ratio == 0.15 and cross.seed == 210
    assert importlib.import_module("configs.ettin_17m").get_config("clm,window=training").model.decoder_window == "training"


# Recipe §2 / §3.1, one row per size: layers, hidden, GeGLU, heads, peak LR, weight decay,
# LR warmup tokens, batch-size warmup tokens.
RECIPE = {"17m": (7, 256, 384, 4, 3e-3, 3e-4, 4e9, 125e9), "32m": (10, 384, 576, 6, 3e-3, 3e-4, 4e9, 100e9),
          "68m": (19, 512, 768, 8, 3e-3, 3e-4, 3e9, 75e9), "150m": (22, 768, 1152, 12, 8e-4, 1e-5, 3e9, 50e9),
          "400m": (28, 1024, 2624, 16, 5e-4, 1e-5, 2e9, 10e9), "1b": (28, 1792, 3840, 28, 5e-4, 5e-5, 2e9, 3e9)}


@pytest.mark.parametrize("size", SIZES)
def test_size_table_is_the_recipe(size):
    c = importlib.import_module(f"configs.ettin_{size}").get_config("mlm")
    m, o = c.model, c.optimizer
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads, o.peak_lr, o.weight_decay,
            o.lr_warmup_tokens, o.batch_warmup_tokens) == RECIPE[size]
    assert m.hidden_size // m.num_heads == 64 and m.vocab_size == 50368


@pytest.mark.parametrize("arg,message", [
    (None, "missing config arg"),
    ("mlmx", "objective 'mlmx'"),
    ("mlm_warm", "phase 'warm'"),
    ("mlm_from_mlm", "continues the \\*other\\* objective"),
    ("clm,mntp=true", "mntp applies only to mlm_from_clm"),
    ("mlm,foo=1", "unknown option 'foo=1'"),
    ("mlm_from_clm,mntp=maybe", "expected true or false"),
])
def test_bad_args_say_what_is_wrong(arg, message):
    with pytest.raises(ValueError, match=message):
        base.parse_arg(arg)


@pytest.mark.parametrize("arg,runs", [
    ("mlm", ["mlm"]),
    ("mlm+clm", ["mlm", "clm"]),
    ("clm_ext+mlm_ext", ["clm_ext", "mlm_ext"]),
    ("mlm_decay + clm_decay", ["mlm_decay", "clm_decay"]),
    ("mlm_from_clm,mntp=true+clm_from_mlm,window=transformers",
     ["mlm_from_clm,mntp=true", "clm_from_mlm,window=transformers"]),
])
def test_pairs_split_into_their_runs(arg, runs):
    assert base.split_pair(arg) == runs
    config = importlib.import_module("configs.ettin_tiny").get_config(arg)
    single = importlib.import_module("configs.ettin_tiny").get_config(runs[0])
    assert config.pair == ("+".join(runs) if len(runs) == 2 else "")
    assert config.objective == single.objective and config.train.seq_len == single.train.seq_len


@pytest.mark.parametrize("arg,message", [
    ("mlm+mlm", "both sides are mlm"),
    ("mlm+clm_ext", "of one phase .* got pretrain and ext"),
    ("mlm+clm+clm", "two runs joined by one"),
    ("mlm+", "two runs joined by one"),
    ("mlm+clm,mntp=true", "mntp applies only to mlm_from_clm"),
])
def test_bad_pairs_say_what_is_wrong(arg, message):
    with pytest.raises(ValueError, match=message):
        base.split_pair(arg)


def test_a_pair_is_split_before_it_is_parsed():
    with pytest.raises(ValueError, match="split it with split_pair"):
        base.parse_arg("mlm+clm")


# Recipe §3.2.1, written out from Ettin's yamls (pretraining/configs/standard/<size>/{,de_decay/,
# prolong_decay/}, cross-train/): (global, local) RoPE base per run; "rest" = every other size.
K10, K160 = 10_000.0, 160_000.0
ROPE = {"mlm": {"rest": (K10, K10)}, "clm": {"rest": (K10, K10)},
        "mlm_ext": {"17m": (K160, K10), "rest": (K160, K160)},
        "clm_ext": {"17m": (K160, K10), "rest": (K160, K160)},
        "mlm_decay": {"rest": (K160, K160)},
        "clm_decay": {"17m": (K160, K10), "32m": (K160, K10), "68m": (K160, K10),
                      "400m": (K160, K10), "rest": (K160, K160)},
        "mlm_from_clm": {"rest": (K160, K160)}, "clm_from_mlm": {"rest": (K160, K160)}}
MASK = {"mlm": 0.30, "clm": 0.30, "mlm_ext": 0.30, "clm_ext": 0.30, "mlm_decay": 0.15,
        "clm_decay": 0.15, "mlm_from_clm": 0.15, "clm_from_mlm": 0.15}


@pytest.mark.parametrize("size", SIZES + ["tiny"])
@pytest.mark.parametrize("run", RUNS)
def test_rope_and_mask_ratio_follow_ettins_yamls(size, run):
    c = importlib.import_module(f"configs.ettin_{size}").get_config(run)
    table = ROPE[run]
    assert (c.model.global_rope_theta, c.model.local_rope_theta) == table.get(size, table["rest"])
    assert c.train.mask_ratio == MASK[run]
    assert c.train.eval_mask_ratio == 0.15


@pytest.mark.parametrize("size", SIZES + ["tiny"])
def test_decoder_window_defaults_to_the_trained_65_keys(size):
    module = importlib.import_module(f"configs.ettin_{size}")
    assert module.get_config("clm").model.decoder_window == "training"
    assert module.get_config("clm_decay,window=transformers").model.decoder_window == "transformers"
    with pytest.raises(ValueError, match="window='wide'"):
        module.get_config("clm,window=wide")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("run", RUNS)
def test_seeds_and_checkpoint_interval(size, run):
    c = importlib.import_module(f"configs.ettin_{size}").get_config(run)
    cross = c.phase == "cross"
    assert c.seed == (210 if cross else 21)
    assert c.data.seed == 21                                  # shuffle_seed: 21 in every yaml
    every = ({"1b": 3_333_333_333}.get(size, 10_000_000_000) if cross else 8_500_000_000)
    assert c.checkpoint.every_tokens == pytest.approx(every, rel=1e-9)


def test_the_demo_on_a_cpu_scans_the_layers_in_float32_and_a_real_run_keeps_its_model():
    """configs/base.py's demo.cpu_* keys replace the model's dtype and layer loop on a CPU
    backend (the suite runs on one); a run with a data mixture keeps the model section."""
    import jax  # pylint: disable=import-outside-toplevel
    from ettin_jax import demo  # pylint: disable=import-outside-toplevel
    assert jax.default_backend() == "cpu"
    config = importlib.import_module("configs.ettin_17m").get_config("mlm")
    assert (config.model.scan_layers, config.model.dtype) == (False, "bfloat16")
    on_cpu = demo.demo_variant(config)
    assert (on_cpu.model.scan_layers, on_cpu.model.dtype) == (True, "float32")
    config.demo.cpu_scan_layers, config.demo.cpu_model_dtype = False, ""
    assert (demo.demo_variant(config).model.scan_layers,
            demo.demo_variant(config).model.dtype) == (False, "bfloat16")
    config.demo.cpu_scan_layers, config.data.mixture = True, "data/web"
    assert (demo.demo_variant(config).model.scan_layers,
            demo.demo_variant(config).model.dtype) == (False, "bfloat16")


def test_an_override_of_a_derived_value_changes_it_alone():
    """decay_tokens follows total_tokens in extension and decay (and the demo's eval batch
    its train batch) until a flag sets it: then the flag changes that key only, not the one it
    followed (a shared ml_collections reference would set both)."""
    config = ettin_150m.get_config("mlm_ext")
    config.schedule.total_tokens = 2e11
    assert config.schedule.decay_tokens == 2e11
    config.schedule.decay_tokens = 1e9
    assert (config.schedule.total_tokens, config.schedule.decay_tokens) == (2e11, 1e9)
    config.demo.data.eval_batch_size = 6
    assert config.demo.train.global_batch_size == 16
    config.demo.train.global_batch_size = 32
    assert config.demo.data.eval_batch_size == 6
    fresh = ettin_150m.get_config("mlm_decay")
    fresh.demo.train.global_batch_size = 32
    assert fresh.demo.data.eval_batch_size == 32


@pytest.mark.parametrize("run", ["mlm", "mlm_ext", "clm_from_mlm"])
@pytest.mark.parametrize("flag,value", [("demo.schedule.decay_tokens", 1000.0),
                                        ("demo.schedule.total_tokens", 2e5),
                                        ("schedule.decay_tokens", 1e9)])
def test_schedule_flags_parse_as_numbers_of_tokens(run, flag, value):
    """The way main.py reads them (ml_collections' config_flags): a token count given as an
    integer or in e-notation sets that key. The demo's budget was an int, so its decay (a share
    of it) was an int-typed reference holding a float and no flag could set it."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    for text in (f"{value:.0f}", f"{value:e}"):
        argv = ["main.py", f"--config={ettin_150m.__file__}:{run}", f"--config.{flag}={text}"]
        flag_values = flags.FlagValues()   # overrides are found in the argv given at definition
        config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        section, key = flag.rsplit(".", 1)
        node = flag_values.config
        for part in section.split("."):
            node = node[part]
        assert node[key] == value


def test_the_window_option_belongs_to_decoders():
    """window= picks a decoder's local window; on an encoder it would do nothing, and in a pair
    `mlm,window=...+clm` would leave the decoder at its default."""
    with pytest.raises(ValueError, match="window applies only to clm runs"):
        ettin_150m.get_config("mlm,window=transformers")
    with pytest.raises(ValueError, match="window applies only to clm runs"):
        ettin_150m.get_config("mlm_from_clm,window=training")
    assert ettin_150m.get_config("clm_from_mlm,window=transformers").model.decoder_window == \
        "transformers"
